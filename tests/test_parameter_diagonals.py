"""Structured per-sample parameter diagonals (`torchcurv.engines.diagonals`): the Hessian
and Gauss-Newton diagonals of parameters by backpropagation over the traced graph.

Checked in float64 against an independent path: each sample's whole parameter Hessian
from `torch.autograd.functional.hessian` (and ``J^T H J`` from its Jacobian and the loss
Hessian), its diagonal taken; on MLPs with every curved activation, ReLU, a residual
block, Linear layers over tokens, a CNN, a transformer block; for parameter subsets,
output selections and both losses; gradients with ``create_graph`` against finite
differences; where the engine cannot apply, ``"auto"`` says why and takes the generic
engine, which agrees.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import torchcurv
from torchcurv.testing import assert_matches_finite_differences, assert_trees_close

D = torch.float64


class Residual(nn.Module):
    def __init__(self, act: Any = torch.tanh) -> None:
        super().__init__()
        self.inner, self.outer, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + 0.5 * self.outer(self.act(self.inner(x)))
        return self.head(F.gelu(h) - h / 3)  # type: ignore[no-any-return]


class Tokens(nn.Module):
    """Linear layers over a sequence (``[T, F]`` per sample), mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sigmoid(self.a(x))).mean(1)  # type: ignore[no-any-return]


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(1))  # type: ignore[no-any-return]


class Square(nn.Module):
    """A product of two parameter-dependent tensors: not Hessian backpropagation's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h * h)  # type: ignore[no-any-return]


def _cnn() -> nn.Module:
    """Convolutions with padding, stride, dilation, groups and circular padding; max
    pooling."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2, stride=1),
        nn.Conv2d(2, 4, (3, 2), stride=2, dilation=(1, 2), groups=2, padding=1,
                  padding_mode="circular"),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(16, 3),
    )  # fmt: skip


class Conv1dResidual(nn.Module):
    """``x + conv(tanh(conv(x)))`` with ``padding="same"``, dilated."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv1d(2, 2, 3, padding="same")
        self.outer = nn.Conv1d(2, 2, 3, padding="same", dilation=2, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.outer(torch.tanh(self.inner(x)))
        return self.head(h.flatten(1))  # type: ignore[no-any-return]


def _mlp(*acts: nn.Module) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(4, 5)]
    for act in acts:
        layers += [act, nn.Linear(5, 5)]
    layers[-1] = nn.Linear(5, 3)
    return nn.Sequential(*layers)


MODELS = {
    "mlp-tanh-sigmoid": lambda: _mlp(nn.Tanh(), nn.Sigmoid()),
    "mlp-gelu-softplus-silu": lambda: _mlp(nn.GELU(), nn.Softplus(beta=2.0), nn.SiLU()),
    "mlp-elu-gelu-tanh": lambda: _mlp(nn.ELU(), nn.GELU(approximate="tanh")),
    "mlp-relu": lambda: _mlp(nn.ReLU(), nn.LeakyReLU(0.1)),
    "residual": Residual,
    "tokens": Tokens,
    "cnn": _cnn,
    "conv1d-residual": Conv1dResidual,
}
SHAPES = {"tokens": (2, 4), "cnn": (1, 5, 5), "conv1d-residual": (2, 6)}


def model_and_data(name: str, batch: int = 3) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS[name]().to(D).eval()
    shape = (batch, *SHAPES.get(name, (4,)))
    return model, torch.randn(*shape, dtype=D), torch.randint(0, 3, (batch,))


def reference(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: Any, *, ggn: bool
) -> dict[str, torch.Tensor]:
    """Each sample's whole parameter Hessian (or J^T H J) from autograd, its diagonal."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, start = {}, 0
        for n, s in zip(names, shapes, strict=True):
            size = int(torch.tensor(s).prod())
            out[n] = v[start : start + size].reshape(s)
            start += size
        return out

    rows = []
    for i in range(X.shape[0]):
        x, t = X[i : i + 1], y[i : i + 1]

        def output(v: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
            return functional_call(model, unflat(v), (x,))  # type: ignore[no-any-return]

        if ggn:
            o = output(flat)
            J = torch.autograd.functional.jacobian(output, flat).reshape(o.numel(), -1)
            H = torch.autograd.functional.hessian(lambda o, t=t: loss(o, t), o).reshape(
                o.numel(), o.numel()
            )
            rows.append((J.T @ H @ J).diagonal())
        else:
            H = torch.autograd.functional.hessian(lambda v, t=t: loss(output(v), t), flat)
            rows.append(H.diagonal())
    stacked = torch.stack(rows)
    return {n: v for n, v in zip(names, _split(stacked, shapes), strict=True)}


def _split(stacked: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    out, start = [], 0
    for s in shapes:
        size = int(torch.tensor(s).prod())
        out.append(stacked[:, start : start + size].reshape(-1, *s))
        start += size
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("quantity", ["hessian", "ggn"])
@pytest.mark.parametrize("loss", [F.cross_entropy, F.mse_loss], ids=["cross_entropy", "mse"])
def test_structured_diagonals_equal_autograd(name: str, quantity: str, loss: Any) -> None:
    model, X, y = model_and_data(name)
    if loss is F.mse_loss:
        y = torch.randn(X.shape[0], 3, dtype=D)
    public = (
        torchcurv.per_sample_ggn_diag if quantity == "ggn" else torchcurv.per_sample_hessian_diag
    )
    options: dict[str, Any] = dict(loss=loss, targets=y, wrt="params")
    assert torchcurv.explain(public, model, X, **options).engine == "structured"
    got = public(model, X, **options)
    assert_trees_close(got, reference(model, X, y, loss, ggn=quantity == "ggn"))
    generic = public(model, X, mode="rev-over-rev", **options)
    assert_trees_close(got, generic)


def test_relu_networks_have_the_ggn_as_hessian_diagonal() -> None:
    model, X, y = model_and_data("mlp-relu")
    h = torchcurv.per_sample_hessian_diag(model, X, loss=F.cross_entropy, targets=y, wrt="params")
    g = torchcurv.per_sample_ggn_diag(model, X, loss=F.cross_entropy, targets=y)
    assert_trees_close(h, g)


def test_an_output_without_a_loss_and_a_parameter_subset() -> None:
    model, X, _ = model_and_data("residual")
    options: dict[str, Any] = dict(wrt="params", output=1, params=["inner.weight", "head.bias"])
    decision = torchcurv.explain(torchcurv.per_sample_hessian_diag, model, X, **options)
    assert decision.engine == "structured"
    got = torchcurv.per_sample_hessian_diag(model, X, **options)
    assert set(got) == {"inner.weight", "head.bias"}
    assert float(got["head.bias"].abs().max()) == 0.0  # the output is linear in the bias
    every = torchcurv.per_sample_hessian_diag(
        model, X, wrt="params", output=1, mode="rev-over-rev"
    )
    assert_trees_close(got, {n: every[n] for n in got})


def test_parameters_of_other_layers_in_the_gauss_newton_diagonal() -> None:
    """Transformer and transposed-convolution parameters take their per-row gradients
    directly."""
    torch.manual_seed(0)
    transposed = nn.Sequential(
        nn.ConvTranspose2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).to(D)
    cases = [
        (transposed, torch.randn(3, 1, 3, 3, dtype=D)),
        (Encoder().to(D).eval(), torch.randn(3, 2, 4, dtype=D)),
    ]
    y = torch.randint(0, 3, (3,))
    for model, X in cases:
        options: dict[str, Any] = dict(loss=F.cross_entropy, targets=y)
        assert torchcurv.explain(torchcurv.per_sample_ggn_diag, model, X, **options).engine == (
            "structured"
        )
        got = torchcurv.per_sample_ggn_diag(model, X, **options)
        assert_trees_close(got, reference(model, X, y, F.cross_entropy, ggn=True))
        # The Hessian of such parameters is not backpropagation's: the generic engine.
        decision = torchcurv.explain(
            torchcurv.per_sample_hessian_diag, model, X, wrt="params", **options
        )
        assert decision.engine != "structured"
        assert "not those of a Linear or convolution" in decision.why_engine or "through more" in (
            decision.why_engine
        )


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (Square, "neither linear in them nor an elementwise activation"),
        (lambda: _tied(), "tied weights"),
        (lambda: _hooked(), "has hooks"),
        (lambda: _branching(), "torch.fx cannot trace"),
    ],
)
def test_where_it_cannot_apply_auto_says_why_and_agrees(make: Any, why: str) -> None:
    torch.manual_seed(0)
    model = make().to(D).eval()
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    options: dict[str, Any] = dict(loss=F.cross_entropy, targets=y, wrt="params")
    decision = torchcurv.explain(torchcurv.per_sample_hessian_diag, model, X, **options)
    assert decision.engine != "structured"
    assert why in decision.why_engine
    with pytest.raises(torchcurv.UnsupportedModuleError, match="mode='structured' cannot"):
        torchcurv.per_sample_hessian_diag(model, X, mode="structured", **options)
    got = torchcurv.per_sample_hessian_diag(model, X, **options)
    assert_trees_close(got, reference(model, X, y, F.cross_entropy, ggn=False))


def _tied() -> nn.Module:
    model = _mlp(nn.Tanh(), nn.Tanh())
    model[2].weight = model[4].weight = nn.Parameter(torch.randn(5, 5))  # type: ignore[index]
    model[4] = nn.Linear(5, 5)  # type: ignore[index]
    model.append(nn.Tanh()).append(nn.Linear(5, 3))
    model[4].weight = model[2].weight  # type: ignore[index]
    return model


def _hooked() -> nn.Module:
    model = _mlp(nn.Tanh())
    model[0].register_forward_hook(lambda m, i, o: o * 1.0)  # type: ignore[index]
    return model


class _Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return torch.tanh(h) if h.shape[-1] == 3 else h  # fx cannot trace a shape test


def _branching() -> nn.Module:
    return _Branching()


@pytest.mark.parametrize(
    "public", [torchcurv.per_sample_hessian_diag, torchcurv.per_sample_ggn_diag]
)
def test_gradients_match_finite_differences(public: Any) -> None:
    """``create_graph=True``: gradients in the inputs and in a weight."""
    model, X, y = model_and_data("residual", batch=2)
    weight = model.inner.weight  # type: ignore[union-attr]
    torch.manual_seed(1)
    mix = {n: torch.randn(2, *p.shape, dtype=D) for n, p in model.named_parameters()}

    def value(X: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        out = public(model, X, loss=F.cross_entropy, targets=y, wrt="params",
                     create_graph=create_graph)  # fmt: skip
        return sum((out[n] * mix[n]).sum() for n in out)  # type: ignore[return-value]

    def of_both(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(w)
        try:
            return value(X)
        finally:
            with torch.no_grad():
                weight.copy_(saved)

    Xg = X.clone().requires_grad_(True)
    gradient = torch.autograd.grad(value(Xg, create_graph=True), (Xg, weight))
    assert all(float(g.abs().max()) > 1e-4 for g in gradient)
    assert_matches_finite_differences(
        of_both, gradient, X, weight.detach().clone(), argnums=(0, 1), order=1
    )


def test_the_module_is_left_as_it_was() -> None:
    model, X, y = model_and_data("residual")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for public in (torchcurv.per_sample_hessian_diag, torchcurv.per_sample_ggn_diag):
        public(model, X, loss=F.cross_entropy, targets=y, wrt="params")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_an_ignored_target_has_zero_curvature() -> None:
    """cross_entropy's ``ignore_index=-100``: that sample's loss is 0, and so are its
    diagonals (the closed form of cross-entropy agrees with autograd)."""
    model, X, y = model_and_data("mlp-tanh-sigmoid")
    y[1] = -100
    for public in (torchcurv.per_sample_hessian_diag, torchcurv.per_sample_ggn_diag):
        got = public(model, X, loss=F.cross_entropy, targets=y, wrt="params")
        generic = public(
            model, X, loss=F.cross_entropy, targets=y, wrt="params", mode="rev-over-rev"
        )
        assert_trees_close(got, generic)
        assert all(float(v[1].abs().max()) == 0.0 for v in got.values())
        assert all(float(v[0].abs().max()) > 0.0 for v in got.values())


class Reused(nn.Module):
    """One Linear called twice: its per-row gradient is the sum over both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))  # type: ignore[no-any-return]


def test_a_reused_layer_in_the_gauss_newton_diagonal() -> None:
    torch.manual_seed(0)
    model = Reused().to(D)
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    options: dict[str, Any] = dict(loss=F.cross_entropy, targets=y)
    assert torchcurv.explain(torchcurv.per_sample_ggn_diag, model, X, **options).engine == (
        "structured"
    )
    got = torchcurv.per_sample_ggn_diag(model, X, **options)
    assert_trees_close(got, reference(model, X, y, F.cross_entropy, ggn=True))
    # The Hessian of a reused layer is not backpropagation's: the generic engine.
    decision = torchcurv.explain(
        torchcurv.per_sample_hessian_diag, model, X, wrt="params", **options
    )
    assert "called 2 times" in decision.why_engine
