"""Forwards that update state: buffers written in place, running statistics in training.

Each sample gets its own copy of the buffers its forward writes, and the updates are
discarded (the caller's buffers never change); normalisations that would update running
statistics normalise by the batch's (the input's) statistics and update nothing. Oracles:
autograd's double backward (`torchcurv.reference`) on a fresh copy of the module for
every evaluation, in float64.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import torchcurv
from torchcurv import reference
from torchcurv._decompositions import corrected_ops, discarding_running_updates
from torchcurv.testing import assert_trees_close

D = torch.float64
MODES = ("auto", "rev-over-rev", "fwd-over-rev")


class RunningCentre(nn.Module):
    """Centres its input by a running mean that it updates in place, and counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.register_buffer("mean", torch.linspace(-0.5, 0.5, 4))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))  # the sample's own statistics
        self.calls += 1
        return torch.tanh(self.linear(x - self.mean)) * (1.0 + self.calls.to(x.dtype))


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def _fresh_oracle(model: nn.Module, X: torch.Tensor, *, wrt: str, output: Any) -> Any:
    """Per-sample Hessians, each evaluation of the forward on a fresh copy of `model`."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    for x in X:
        if wrt == "inputs":

            def f(x: torch.Tensor) -> torch.Tensor:
                return copy.deepcopy(model)(x[None])[0][output]

            rows.append(reference.hessian(f)(x))
        else:

            def g(p: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                return functional_call(copy.deepcopy(model), p, (x[None],))[0][output]

            rows.append(reference.hessian(g)(params))
    if wrt == "inputs":
        return torch.stack(rows)
    return {a: {b: torch.stack([r[a][b] for r in rows]) for b in rows[0][a]} for a in rows[0]}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wrt", ["inputs", "params"])
def test_buffers_written_in_place_are_per_sample_and_discarded(wrt: str, mode: str) -> None:
    torch.manual_seed(0)
    model = RunningCentre().to(D)
    X = torch.randn(5, 4, dtype=D)
    before = _buffers(model)
    expected = _fresh_oracle(model, X, wrt=wrt, output=1)
    H = torchcurv.per_sample_hessian(model, X, wrt=wrt, output=1, mode=mode)
    assert_trees_close(H, expected)
    for chunk in (1, (2, None, None)):
        H = torchcurv.per_sample_hessian(model, X, wrt=wrt, output=1, chunk_size=chunk)
        assert_trees_close(H, expected)
    assert_trees_close(_buffers(model), before, rtol=0, atol=0)


def test_buffers_written_in_place_with_a_jacobian_and_an_empty_batch() -> None:
    model = RunningCentre().to(D)
    X = torch.randn(3, 4, dtype=D)
    J = torchcurv.per_sample_jacobian(model, X)
    for i, x in enumerate(X):
        expected = reference.jacobian(lambda x: copy.deepcopy(model)(x[None])[0])(x)
        assert_trees_close(J[i], expected)
    empty = torchcurv.per_sample_hessian(model, X[:0], output=0)
    assert empty.shape == (0, 4, 4)
    assert int(model.calls) == 0


def _instance_norm_model(track: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3),
        nn.InstanceNorm1d(3, affine=True, track_running_stats=track),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4, 2),
    ).to(D)


@pytest.mark.parametrize("mode", ["auto", "fwd-over-rev", "rev-over-rev", "rev-over-fwd"])
def test_instance_norm_with_running_statistics_in_training_uses_input_statistics(
    mode: str,
) -> None:
    tracking = _instance_norm_model(track=True).train()
    plain = _instance_norm_model(track=False).train()  # input statistics, nothing tracked
    with torch.no_grad():
        tracking[1].running_mean.uniform_(-1, 1)  # type: ignore[operator]
    before = _buffers(tracking)
    X = torch.randn(4, 2, 6, dtype=D)
    H = torchcurv.per_sample_hessian(tracking, X, output=0, mode=mode)
    expected = torch.stack([reference.hessian(lambda x: plain(x[None])[0, 0])(x) for x in X])
    assert_trees_close(H, expected)
    assert_trees_close(_buffers(tracking), before, rtol=0, atol=0)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    return model.to(D).train()


@pytest.mark.parametrize("mode", ["fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd"])
@pytest.mark.parametrize("wrt", ["params", "inputs"])
def test_batch_hessian_takes_batch_norm_in_training_with_batch_statistics(
    wrt: str, mode: str
) -> None:
    model = _bn_model()
    before = _buffers(model)
    X, y = torch.randn(6, 3, dtype=D), torch.randint(0, 3, (6,))
    H = torchcurv.batch_hessian(model, X, y, loss=F.cross_entropy, wrt=wrt, mode=mode)
    # The oracle: autograd's double backward of the batch loss with batch statistics,
    # on a copy whose running statistics may change.
    params = {n: p.detach() for n, p in model.named_parameters()}
    if wrt == "params":
        expected = reference.hessian(
            lambda p: F.cross_entropy(functional_call(copy.deepcopy(model), p, (X,)), y)
        )(params)
    else:
        expected = reference.hessian(lambda x: F.cross_entropy(copy.deepcopy(model)(x), y))(X)
    assert_trees_close(H, expected)
    assert_trees_close(_buffers(model), before, rtol=0, atol=0)
    assert model.training


def test_per_sample_calls_still_refuse_batch_norm_in_training() -> None:
    with pytest.raises(torchcurv.UnsupportedModuleError, match="couple the samples"):
        torchcurv.per_sample_hessian(_bn_model(), torch.randn(4, 3, dtype=D), output=0)


def test_discarding_running_updates_routes_with_batch_statistics() -> None:
    x = torch.randn(4, 3, dtype=D)
    layer = nn.BatchNorm1d(3).to(D)
    plain = nn.BatchNorm1d(3, track_running_stats=False).to(D)
    before = _buffers(layer)
    with corrected_ops(), discarding_running_updates():
        actual = layer(x)
    assert_trees_close(actual, plain(x))
    after = _buffers(layer)
    # The op updates nothing; the module's own Python code counts the batch.
    assert int(after.pop("num_batches_tracked")) == int(before.pop("num_batches_tracked")) + 1
    assert_trees_close(after, before, rtol=0, atol=0)
