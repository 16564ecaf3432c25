"""The modules of the test suite, as data: each case builds a model, a batch and targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

D = torch.float64


class Residual(nn.Module):
    """A residual block (not Sequential): x + W2 tanh(W1 x), then a head."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x + self.outer(torch.tanh(self.inner(x)))))


class Tied(nn.Module):
    """Two layers sharing one weight tensor."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.second.weight = self.first.weight
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class Untied(nn.Module):
    """`Tied` with its shared weight as two separate parameters."""

    def __init__(self, tied: Tied) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.load_state_dict(
            {**tied.state_dict(), "second.weight": tied.first.weight.detach().clone()}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class TwoInputs(nn.Module):
    """A forward with two positional inputs and a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, z: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x) * scale + torch.sin(self.b(z))))


class TupleOutput(nn.Module):
    """Returns (logits, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.tanh(self.body(x))
        return self.head(features), features


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, 3)
    )


def cnn(channels: int = 2) -> nn.Module:
    """The MNIST-shaped seed model: 1x28x28 input, 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 13 * 13, 10),
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    )


def batchnorm_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


def frozen_mlp() -> nn.Module:
    model = mlp()
    model[0].weight.requires_grad_(False)
    return model


@dataclass
class Case:
    """A model with a batch: ``inputs()`` gives positional inputs (a tuple)."""

    name: str
    build: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]
    classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch: int = 3

    def model(self) -> nn.Module:
        torch.manual_seed(1)
        return self.build().to(D).eval()

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(self.batch, *s, dtype=D) for s in self.shapes)

    def targets(self) -> torch.Tensor:
        return torch.randint(0, self.classes, (self.batch,))


CASES = [
    Case("mlp", mlp, ((3,),), 3),
    Case("cnn", small_cnn, ((1, 6, 6),), 3, batch=2),
    Case("batchnorm-eval", batchnorm_mlp, ((3,),), 3),
    Case("tied", Tied, ((3,),), 2),
    Case("frozen", frozen_mlp, ((3,),), 3),
    Case("two-inputs-kwargs", TwoInputs, ((3,), (2,)), 2, kwargs={"scale": 0.7}),
    Case("residual", Residual, ((4,),), 3),
]


def single_objective(
    model: nn.Module,
    case: Case,
    *,
    wrt: str,
    output: Any = None,
    loss: Any = None,
    params: Any = None,
) -> Callable[..., torch.Tensor]:
    """The objective of one sample, written independently of torchcurv's `_Objective`.

    Returns ``g(diff, xs, target)`` where `diff` is what is differentiated.
    """
    names = None if params is None else params
    all_named = dict(model.named_parameters())
    chosen = [
        n for n, p in all_named.items() if (p.requires_grad if names is None else n in names)
    ]
    base = {n: p.detach() for n, p in all_named.items()}
    base.update({n: b.detach() for n, b in model.named_buffers()})

    def g(diff: Any, xs: tuple[torch.Tensor, ...], target: Any) -> torch.Tensor:
        if wrt == "inputs":
            values, inputs = base, diff
        elif wrt == "params":
            values, inputs = {**base, **diff}, xs
        else:
            values, inputs = {**base, **diff["params"]}, diff["inputs"]
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        out = torch.func.functional_call(
            model, values, tuple(x[None] for x in inputs), case.kwargs
        )
        if loss is not None:
            return loss(out, target[None])
        out = out[0]
        return out if output is None else out[output]

    g.chosen = chosen  # type: ignore[attr-defined]
    return g


__all__ = ["CASES", "Case", "D", "F", "Tied", "Untied", "cnn", "single_objective"]
