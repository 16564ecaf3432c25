"""Repeated module-level calls reuse what the first one prepared (objective, engine,
works), and stay right when the weights, the module or the inputs change between calls.

Every result is checked in float64 against the loop oracle on the module as it is at
that call.
"""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import torchcurv
from torchcurv import reference
from torchcurv._errors import TorchcurvError, UnsupportedModuleError
from torchcurv.testing import assert_trees_close

D = torch.float64
GENERIC = ("fwd-over-rev", "rev-over-rev")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)


def _oracle(model: nn.Module, X: torch.Tensor, wrt: str = "inputs", output: Any = 1) -> Any:
    """Per-sample Hessians by the loop, on the module's current weights."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = []
    for x in X:
        if wrt == "inputs":
            rows.append(reference.hessian(lambda x: model(x[None])[0][output])(x))
        else:

            def g(p: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                return functional_call(model, p, (x[None],))[0][output]

            rows.append(reference.hessian(g)(params))
    if wrt == "inputs":
        return torch.stack(rows)
    return {a: {b: torch.stack([r[a][b] for r in rows]) for b in rows[0][a]} for a in rows[0]}


@pytest.mark.parametrize("mode", ["auto", *GENERIC])
@pytest.mark.parametrize("wrt", ["inputs", "params"])
def test_in_place_weight_updates_are_seen(wrt: str, mode: str) -> None:
    model = _mlp()
    X = torch.randn(4, 3, dtype=D)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # a training loop: a call, a step, a call...
        H = torchcurv.per_sample_hessian(model, X, wrt=wrt, output=1, mode=mode)
        assert_trees_close(H, _oracle(model, X, wrt))
        optimizer.zero_grad()
        model(X).pow(2).sum().backward()
        optimizer.step()


def test_replaced_parameters_and_data_swaps_are_seen() -> None:
    model = _mlp()
    X = torch.randn(4, 3, dtype=D)
    torchcurv.per_sample_hessian(model, X, output=1, mode="fwd-over-rev")
    model[0].weight = nn.Parameter(torch.randn(5, 3, dtype=D))
    H = torchcurv.per_sample_hessian(model, X, output=1, mode="fwd-over-rev")
    assert_trees_close(H, _oracle(model, X))
    model[0].weight.data = torch.randn(5, 3, dtype=D)  # same Parameter, new storage
    H = torchcurv.per_sample_hessian(model, X, wrt="params", output=1, mode="fwd-over-rev")
    assert_trees_close(H, _oracle(model, X, "params"))


@pytest.mark.parametrize("mode", ["auto", "fwd-over-rev"])
def test_replaced_submodules_without_parameters_are_seen(mode: str) -> None:
    model = _mlp()
    X = torch.randn(4, 3, dtype=D)
    torchcurv.per_sample_hessian(model, X, output=1, mode=mode)
    model[1] = nn.Sigmoid()  # no parameters: only the tree of modules says it changed
    H = torchcurv.per_sample_hessian(model, X, output=1, mode=mode)
    assert_trees_close(H, _oracle(model, X))


def test_new_inputs_batch_sizes_and_targets_are_seen() -> None:
    model = _mlp()
    for B in (4, 4, 7, 1, 4):
        X = torch.randn(B, 3, dtype=D)
        H = torchcurv.per_sample_hessian(model, X, output=1, mode="rev-over-rev")
        assert_trees_close(H, _oracle(model, X))
    X = torch.randn(4, 3, dtype=D)
    for y in (torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 0])):
        H = torchcurv.per_sample_hessian(model, X, targets=y, loss=F.cross_entropy)
        for i in range(4):
            target = y[i : i + 1]
            expected = reference.hessian(
                lambda x, target=target: F.cross_entropy(model(x[None]), target)
            )(X[i])
            assert_trees_close(H[i], expected)
    # Targets are checked on every call, not only on the first of a signature.
    with pytest.raises(TorchcurvError, match="outside the module's 2 classes"):
        torchcurv.per_sample_hessian(model, X, targets=torch.tensor([0, 1, 2, 0]),
                                     loss=F.cross_entropy)  # fmt: skip


def test_mode_switches_and_hooks_added_later_are_seen() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 2)).to(D)
    X = torch.randn(4, 3, dtype=D)
    model.eval()
    torchcurv.per_sample_hessian(model, X, output=1, mode="fwd-over-rev")
    model.train()
    with pytest.raises(UnsupportedModuleError, match="training mode"):
        torchcurv.per_sample_hessian(model, X, output=1, mode="fwd-over-rev")
    model.eval()
    handle = model[1].register_forward_hook(lambda m, i, out: out**2)
    try:
        H = torchcurv.per_sample_hessian(model, X, output=1, mode="fwd-over-rev")
        assert_trees_close(H, _oracle(model, X))
    finally:
        handle.remove()
    H = torchcurv.per_sample_hessian(model, X, output=1, mode="fwd-over-rev")
    assert_trees_close(H, _oracle(model, X))


class _WritesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)  # in place, on the input it was given
        return torch.tanh(self.linear(x))


class _LaterWritesItsInput(nn.Module):
    """Writes its input in place from its second forward on: the first forward (on
    sample 0, before any derivative) does not show it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        if self.forwards > 1:
            x.mul_(2.0)
        return torch.tanh(self.linear(x))


@pytest.mark.parametrize("mode", ["auto", "rev-over-rev"])  # forward mode refuses them
def test_forwards_that_write_their_inputs_never_write_the_callers(mode: str) -> None:
    torch.manual_seed(0)
    model = _WritesItsInput().to(D)
    X = torch.randn(4, 3, dtype=D)
    before = X.clone()
    for _ in range(2):
        H = torchcurv.per_sample_hessian(model, X, output=1, mode=mode)
        expected = torch.stack(
            [reference.hessian(lambda x: model(x[None].clone())[0][1])(x) for x in X]
        )
        assert_trees_close(H, expected)
        assert torch.equal(X, before)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_a_write_the_first_forward_did_not_show_never_reaches_the_callers_inputs(
    mode: str,
) -> None:
    torch.manual_seed(0)
    model = _LaterWritesItsInput().to(D)
    X = torch.randn(4, 3, dtype=D)
    before = X.clone()
    try:
        J = torchcurv.per_sample_jacobian(model, X, mode=mode, chunk_size=None)
    except (TorchcurvError, RuntimeError):
        pass  # refused (forward mode cannot write a vmapped input in place): fine
    else:  # the write doubled the input of the derivative: the Jacobian is 2 W tanh'
        W, b = model.linear.weight.detach(), model.linear.bias.detach()
        expected = torch.stack([(1 - torch.tanh(2 * W @ x + b) ** 2)[:, None] * 2 * W
                                for x in X])  # fmt: skip
        assert_trees_close(J, expected)
    assert torch.equal(X, before)


class _ClampsItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.linear.weight.clamp_(-0.1, 0.1)
        return torch.tanh(self.linear(x))


def test_a_forward_that_writes_a_parameter_is_refused_and_the_parameter_is_untouched() -> None:
    torch.manual_seed(0)
    model = _ClampsItsWeight().to(D)
    before = model.linear.weight.detach().clone()
    for _ in range(2):
        with pytest.raises(TorchcurvError, match=r"writes in place \(aten::clamp_\)"):
            torchcurv.per_sample_hessian(model, torch.randn(4, 3, dtype=D), output=1)
    assert torch.equal(model.linear.weight, before)


def test_repeated_calls_hold_no_batch_alive() -> None:
    model = _mlp()
    X = torch.randn(64, 3, dtype=D)
    y = torch.randint(0, 2, (64,))
    torchcurv.per_sample_hessian(model, X, targets=y, loss=F.cross_entropy, wrt="params")
    torchcurv.per_sample_hessian(model, X, targets=y, loss=F.cross_entropy, wrt="params")
    refs = [weakref.ref(X), weakref.ref(y)]
    del X, y
    gc.collect()
    assert all(r() is None for r in refs)


def test_a_transposing_data_swap_is_seen() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)).to(D)
    X = torch.randn(2, 3, dtype=D)
    torchcurv.per_sample_hessian(model, X, output=0, mode="fwd-over-rev")
    model[0].weight.data = model[0].weight.data.t()  # same storage, new strides
    H = torchcurv.per_sample_hessian(model, X, output=0, mode="fwd-over-rev")
    assert_trees_close(H, _oracle(model, X, output=0))


class _Tempered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.temperature = nn.Linear(3, 5), nn.Linear(5, 2), 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x) / self.temperature))


def test_attribute_changes_are_seen_with_backward_hooks() -> None:
    torch.manual_seed(0)
    model = _Tempered().to(D)
    model.l1.register_full_backward_hook(lambda *args: None)
    X = torch.randn(3, 3, dtype=D)
    for temperature in (1.0, 0.3):
        model.temperature = temperature
        H = torchcurv.per_sample_hessian(model, X, output=1, mode="fwd-over-rev")
        assert_trees_close(H, _oracle(model, X))


class _Switch(nn.Module):
    """Writes its input, or a counter buffer, in place once a Python flag is set."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.write_input = self.write_buffer = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.write_input:
            x.mul_(2.0)
        if self.write_buffer:
            self.count += 1
        return torch.tanh(self.linear(x)) * (1 + self.count)


@pytest.mark.parametrize("flag", ["write_input", "write_buffer"])
def test_a_forward_that_starts_writing_after_a_flag_flips_is_prepared_anew(flag: str) -> None:
    torch.manual_seed(0)
    model = _Switch().to(D)
    X = torch.randn(3, 3, dtype=D)
    before = X.clone()
    torchcurv.per_sample_hessian(model, X, output=1, mode="rev-over-rev")
    setattr(model, flag, True)
    H = torchcurv.per_sample_hessian(model, X, output=1, mode="rev-over-rev")
    fresh = copy.deepcopy(model)
    expected = torch.stack(
        [reference.hessian(lambda x: copy.deepcopy(fresh)(x[None].clone())[0, 1])(x) for x in X]
    )
    assert_trees_close(H, expected)
    assert torch.equal(X, before)
    assert float(model.count) == 0.0
