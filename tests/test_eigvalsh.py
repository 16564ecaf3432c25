"""Per-sample top eigenvalues of the Hessian: Lanczos (no Hessian formed) and dense.

Checked in float64 against `torch.linalg.eigvalsh` of the full per-sample Hessian, a
closed form, a rank-one Hessian (Lanczos breaks down and restarts), gradients with the
eigenvectors held fixed, and the argument checks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcurv
from torchcurv.testing import assert_trees_close

D = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = (nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    return nn.Sequential(*layers).to(D)


class Cubic(nn.Module):
    """``sum(a * x**3) / 6``: the Hessian is ``diag(a * x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.arange(1.0, x.shape[-1] + 1, dtype=x.dtype) * x**3).sum(-1) / 6


class RankOne(nn.Module):
    """``(a . x)^2``: the Hessian ``2 a a^T`` has one nonzero eigenvalue, ``2 |a|^2``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.a).pow(2)


@pytest.mark.parametrize("method", ["lanczos", "dense"])
def test_closed_form(method: str) -> None:
    X = torch.randn(5, 4, dtype=D)
    top = torchcurv.per_sample_hessian_eigvalsh(Cubic(), X, k=3, method=method)
    assert_trees_close(top, (torch.arange(1.0, 5.0, dtype=D) * X).sort(-1).values[:, -3:])


@pytest.mark.parametrize("mode", ["auto", "fwd-over-rev", "rev-over-rev", "rev-over-fwd"])
@pytest.mark.parametrize("wrt", ["inputs", "params", "both"])
def test_lanczos_and_dense_equal_eigvalsh_of_the_full_hessian(wrt: str, mode: str) -> None:
    model = mlp()
    X = torch.randn(4, 4, dtype=D)
    y = torch.tensor([0, 2, 1, 1])
    options: dict[str, Any] = {"wrt": wrt, "loss": F.cross_entropy, "targets": y}
    H = torchcurv.to_matrix(torchcurv.per_sample_hessian(model, X, **options), batch_dims=1)
    n = H.shape[-1]
    expected = torch.linalg.eigvalsh(H)[:, -3:]
    lanczos = torchcurv.per_sample_hessian_eigvalsh(
        model, X, k=3, mode=mode, num_iterations=n, **options
    )
    assert_trees_close(lanczos, expected)
    dense = torchcurv.per_sample_hessian_eigvalsh(model, X, k=3, method="dense", **options)
    assert_trees_close(dense, expected)


def test_a_breakdown_restarts_and_chunking_changes_nothing() -> None:
    X = torch.randn(6, 4, dtype=D)
    a = RankOne().a
    expected = torch.tensor([0.0, 0.0, 2 * float(a @ a)], dtype=D).expand(6, 3)
    for chunk in ("auto", None, 1, 4):
        top = torchcurv.per_sample_hessian_eigvalsh(
            RankOne(), X, k=3, chunk_size=chunk, generator=torch.Generator().manual_seed(0)
        )
        assert_trees_close(top, expected, atol=1e-12)


def test_gradients_hold_the_eigenvectors_fixed() -> None:
    model = mlp()
    X = torch.randn(3, 4, dtype=D)
    params = list(model.parameters())
    top = torchcurv.per_sample_hessian_eigvalsh(
        model, X, k=1, output=0, num_iterations=4, create_graph=True
    )
    got = torch.autograd.grad(top.sum(), params, materialize_grads=True)
    H = torchcurv.per_sample_hessian(model, X, output=0, create_graph=True)
    dense = torch.linalg.eigvalsh(H)[:, -1:]  # its backward is v^T dH v
    expected = torch.autograd.grad(dense.sum(), params, materialize_grads=True)
    assert_trees_close(list(got), list(expected))


def test_explain_shows_lanczos() -> None:
    decision = torchcurv.explain(
        torchcurv.per_sample_hessian_eigvalsh, mlp(), torch.randn(4, 4, dtype=D), k=2, output=0
    )
    assert decision.basis_sizes == ()
    assert decision.engine == "fwd-over-rev"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 5, "output": 0}, r"k must be an int from 1 to the 4"),
        ({"k": 0, "output": 0}, "k must be an int"),
        ({"k": 1}, "one entry per sample"),
        ({"k": 1, "output": 0, "method": "dense", "num_iterations": 3}, "lanczos' only"),
        ({"k": 5, "output": 0, "method": "dense"}, r"k must be an int from 1 to the 4"),
        ({"k": 1, "output": 0, "method": "power"}, "'lanczos' or 'dense'"),
        (
            {"k": 1, "output": 0, "num_iterations": 0},
            "num_iterations must be an int of at least k",
        ),
        (
            {"k": 3, "output": 0, "num_iterations": 2},
            "num_iterations must be an int of at least k",
        ),
        ({"k": 1, "output": 0, "num_iterations": 2.0}, "num_iterations must be an int"),
    ],
)
def test_bad_arguments_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        torchcurv.per_sample_hessian_eigvalsh(mlp(), torch.randn(2, 4, dtype=D), **options)
