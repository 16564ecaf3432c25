"""Per-sample Hessian-vector products: each sample's Hessian times its own vector.

Checked in float64 against the full per-sample Hessian contracted with the vectors (the
full Hessian itself checked against the loop oracle here once more), against a closed
form, on every mode and chunking, for inputs, parameters and both, and through
``create_graph=True`` against the gradient of the contracted full Hessian.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcurv
from torchcurv import reference
from torchcurv._errors import TorchcurvError, UnsupportedModuleError
from torchcurv.testing import assert_trees_close

D = torch.float64
MODES = ("auto", "fwd-over-rev", "rev-over-rev", "rev-over-fwd")
CHUNKS: tuple[Any, ...] = ("auto", None, 2, (3,))


class Cubic(nn.Module):
    """``sum(a * x**3) / 6`` with ``a = 1, 2, ...``: its Hessian is ``diag(a * x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.arange(1.0, x.shape[-1] + 1, dtype=x.dtype) * x**3).sum(-1) / 6


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)
    ).to(D)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 1), nn.Tanh()
    ).to(D)


def _vectors_like(model: nn.Module, X: torch.Tensor, wrt: str) -> Any:
    B = X.shape[0]
    params = {n: torch.randn(B, *p.shape, dtype=D) for n, p in model.named_parameters()}
    if wrt == "inputs":
        return torch.randn_like(X)
    if wrt == "params":
        return params
    return {"inputs": torch.randn_like(X), "params": params}


def _flat(tree: Any, B: int) -> torch.Tensor:
    """Leaves in pytree order (inputs first, then parameters in module order), flattened."""
    leaves = torch.utils._pytree.tree_leaves(tree)
    return torch.cat([leaf.reshape(B, -1) for leaf in leaves], dim=1)


def _expected(H: Any, V: Any, B: int) -> torch.Tensor:
    """The full per-sample Hessian times the vectors, flat: ``[B, N]``."""
    return torch.einsum("bij,bj->bi", torchcurv.to_matrix(H, batch_dims=1), _flat(V, B))


@pytest.mark.parametrize("mode", MODES)
def test_closed_form(mode: str) -> None:
    X = torch.randn(5, 3, dtype=D)
    V = torch.randn(5, 3, dtype=D)
    HV = torchcurv.per_sample_hvp(Cubic(), X, V, mode=mode)
    assert_trees_close(HV, torch.arange(1.0, 4.0, dtype=D) * X * V)


@pytest.mark.parametrize("chunk", CHUNKS, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wrt", ["inputs", "params", "both"])
@pytest.mark.parametrize("objective", ["output", "loss"])
def test_mlp_products_equal_the_full_hessian_times_the_vectors(
    objective: str, wrt: str, mode: str, chunk: Any
) -> None:
    model = mlp()
    X = torch.randn(6, 3, dtype=D)
    torch.manual_seed(1)
    V = _vectors_like(model, X, wrt)
    options: dict[str, Any] = (
        {"output": 1}
        if objective == "output"
        else {"loss": F.cross_entropy, "targets": torch.tensor([0, 1, 1, 0, 1, 0])}
    )
    HV = torchcurv.per_sample_hvp(model, X, V, wrt=wrt, mode=mode, chunk_size=chunk, **options)
    assert torch.utils._pytree.tree_structure(HV) == torch.utils._pytree.tree_structure(V)
    H = torchcurv.per_sample_hessian(model, X, wrt=wrt, mode="rev-over-rev", **options)
    assert_trees_close(_flat(HV, 6), _expected(H, V, 6))


def test_the_full_hessian_of_the_comparison_agrees_with_the_loop_oracle() -> None:
    model = mlp()
    X = torch.randn(3, 3, dtype=D)
    V = torch.randn(3, 3, dtype=D)
    HV = torchcurv.per_sample_hvp(model, X, V, output=1)
    for i in range(3):
        H = reference.hessian(lambda x: model(x[None])[0, 1])(X[i])
        assert_trees_close(HV[i], H @ V[i])


@pytest.mark.parametrize("mode", MODES)
def test_cnn_inputs(mode: str) -> None:
    model = cnn()
    X = torch.randn(4, 1, 5, 5, dtype=D)
    V = torch.randn(4, 1, 5, 5, dtype=D)
    HV = torchcurv.per_sample_hvp(model, X, V, mode=mode)
    assert HV.shape == X.shape
    H = torchcurv.per_sample_hessian(model, X, mode="rev-over-rev")  # [B, 1, *x, *x]
    assert_trees_close(HV.reshape(4, -1), _expected(H.reshape(4, 25, 25), V, 4))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(torch.cat([a * b[:, :1], torch.sin(b)], dim=1)))


def test_tuple_argnums_give_a_tuple_of_products() -> None:
    torch.manual_seed(0)
    model = TwoInputs().to(D)
    a, b = torch.randn(4, 2, dtype=D), torch.randn(4, 3, dtype=D)
    va, vb = torch.randn(4, 2, dtype=D), torch.randn(4, 3, dtype=D)
    HV = torchcurv.per_sample_hvp(model, (a, b), (va, vb), output=0, argnums=(0, 1))
    assert isinstance(HV, tuple)
    assert (HV[0].shape, HV[1].shape) == ((4, 2), (4, 3))
    H = torchcurv.per_sample_hessian(model, (a, b), output=0, argnums=(0, 1))
    assert_trees_close(_flat(HV, 4), _expected(H, (va, vb), 4))
    only_b = torchcurv.per_sample_hvp(model, (a, b), vb, output=0, argnums=1)
    assert_trees_close(only_b, HV[1] - _cross(model, a, b, va))


def _cross(model: nn.Module, a: torch.Tensor, b: torch.Tensor, va: torch.Tensor) -> torch.Tensor:
    """The part of ``(H v)_b`` that comes from ``v_a``: ``H_ba v_a``."""
    H = torchcurv.per_sample_hessian(model, (a, b), output=0, argnums=(0, 1))
    return torch.einsum("bij,bj->bi", H[1][0], va)


@pytest.mark.parametrize("mode", ["fwd-over-rev", "rev-over-rev", "rev-over-fwd"])
def test_gradients_through_the_products_equal_those_of_the_contracted_hessian(mode: str) -> None:
    model = mlp()
    X = torch.randn(3, 3, dtype=D)
    V = torch.randn(3, 3, dtype=D, requires_grad=True)
    W = torch.randn(3, 3, dtype=D)
    HV = torchcurv.per_sample_hvp(model, X, V, output=1, mode=mode, create_graph=True)
    params = list(model.parameters())
    # (the last bias does not enter an input Hessian: a zero gradient)
    got = torch.autograd.grad((HV * W).sum(), [*params, V], materialize_grads=True)
    H = torchcurv.per_sample_hessian(model, X, output=1, mode="rev-over-rev", create_graph=True)
    contracted = torch.einsum("bij,bj->bi", H, V)
    expected = torch.autograd.grad((contracted * W).sum(), [*params, V], materialize_grads=True)
    assert_trees_close(list(got), list(expected))


def test_repeated_calls_take_the_new_vectors() -> None:
    model = mlp()
    X = torch.randn(4, 3, dtype=D)
    H = torchcurv.per_sample_hessian(model, X, output=1)
    for _ in range(3):
        V = torch.randn(4, 3, dtype=D)
        HV = torchcurv.per_sample_hvp(model, X, V, output=1, mode="fwd-over-rev")
        assert_trees_close(HV, torch.einsum("bij,bj->bi", H, V))


def test_dict_vectors_may_come_in_any_key_order() -> None:
    model = mlp()
    X = torch.randn(4, 3, dtype=D)
    V = _vectors_like(model, X, "params")
    backwards = dict(reversed(list(V.items())))
    HV = torchcurv.per_sample_hvp(model, X, backwards, wrt="params", output=0)
    assert list(HV) == list(V)
    assert_trees_close(HV, torchcurv.per_sample_hvp(model, X, V, wrt="params", output=0))


def test_explain_and_empty_batches() -> None:
    model = mlp()
    X = torch.randn(8, 3, dtype=D)
    decision = torchcurv.explain(torchcurv.per_sample_hvp, model, X, vectors=X, output=0)
    assert decision.engine == "fwd-over-rev"
    assert decision.basis_sizes == ()
    empty = torchcurv.per_sample_hvp(model, X[:0], X[:0], output=0)
    assert empty.shape == (0, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, X: torchcurv.per_sample_hvp(m, X, X), r"output.*one entry.*shape \(2,\)"),
        (lambda m, X: torchcurv.per_sample_hvp(m, X, None, output=0), "vectors is required"),
        (lambda m, X: torchcurv.per_sample_hvp(m, X, X[:3], output=0), r"shape \(4, 3\)"),
        (lambda m, X: torchcurv.per_sample_hvp(m, X, X[:, :2], output=0), r"shape \(4, 3\)"),
        (lambda m, X: torchcurv.per_sample_hvp(m, X, X.float(), output=0), "dtype"),
        (
            lambda m, X: torchcurv.per_sample_hvp(m, X, {"0.weight": X}, wrt="params", output=0),
            "must be a dict with the keys",
        ),
        (lambda m, X: torchcurv.per_sample_hvp(m, X, X, output=0, mode="fwd-over-fwd"), "mode"),
        (lambda m, X: torchcurv.per_sample_hvp(m, X, X, output=0, mode="structured"), "mode"),
        (
            lambda m, X: torchcurv.per_sample_hvp(m, X, X, output=0, chunk_size=(2, 1)),
            r"\(batch,\)",
        ),
    ],
)
def test_bad_arguments_are_refused_clearly(call: Any, message: str) -> None:
    with pytest.raises((TorchcurvError, UnsupportedModuleError), match=message):
        call(mlp(), torch.randn(4, 3, dtype=D))


@pytest.mark.parametrize("mode", MODES)
def test_mse_loss_products_in_every_mode(mode: str) -> None:
    """Forward mode over torch.func.grad of F.mse_loss fails upstream ("ZeroTensors are
    immutable"); the product's gradient is a vmapped vjp, over which it does not."""
    model = mlp()
    X, Y, V = (torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D), torch.randn(4, 3, dtype=D))
    HV = torchcurv.per_sample_hvp(model, X, V, loss=F.mse_loss, targets=Y, mode=mode)
    H = torchcurv.per_sample_hessian(model, X, loss=F.mse_loss, targets=Y, mode="rev-over-rev")
    assert_trees_close(HV, torch.einsum("bij,bj->bi", H, V))
