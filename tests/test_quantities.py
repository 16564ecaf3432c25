"""Per-sample quantities of the Hessian: its diagonal and its trace (the Laplacian).

Each is checked in float64 against the full per-sample Hessian reduced (itself checked
against the loop oracle elsewhere, and here once more against autograd's double
backward), against closed forms, on every engine and chunking, and through
``create_graph=True`` against the gradient of the reduced full Hessian.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcurv
from torchcurv import reference
from torchcurv.testing import assert_quantities_match_hessian, assert_trees_close

D = torch.float64
MODES = ("auto", "fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd")
CHUNKS: tuple[Any, ...] = (None, (2, 1, 2), (3, None, 1))


class Quadratic(nn.Module):
    """``x * x * [0, 1, ..., n-1]``: output ``i`` has the Hessian ``2 i e_i e_i^T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x * torch.arange(x.shape[-1], dtype=x.dtype)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 2), nn.Tanh()
    )


def _diagonal(block: torch.Tensor, y_dims: int, x_shape: tuple[int, ...]) -> torch.Tensor:
    """``[B, *y, *x, *x] -> [B, *y, *x]``: the diagonal of each sample's block."""
    lead = block.shape[: 1 + y_dims]
    n = math.prod(x_shape)
    return block.reshape(*lead, n, n).diagonal(dim1=-2, dim2=-1).reshape(*lead, *x_shape)


def _full_diagonal(H: Any, wrt: str, model: nn.Module, X: torch.Tensor, y_dims: int) -> Any:
    """The diagonal leaves of a nested per-sample Hessian."""
    x_shape = tuple(X.shape[1:])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if wrt == "inputs":
        return _diagonal(H, y_dims, x_shape)
    if wrt == "params":
        return {n: _diagonal(H[n][n], y_dims, shapes[n]) for n in H}
    params = {n: _diagonal(H["params"][n]["params"][n], y_dims, shapes[n]) for n in H["params"]}
    return {"inputs": _diagonal(H["inputs"]["inputs"], y_dims, x_shape), "params": params}


@pytest.mark.parametrize("mode", MODES)
def test_closed_form_diagonal_and_laplacian(mode: str) -> None:
    X = torch.randn(3, 4, dtype=D)
    expected = torch.diag(2.0 * torch.arange(4, dtype=D)).expand(3, 4, 4)
    assert_trees_close(torchcurv.per_sample_hessian_diag(Quadratic(), X, mode=mode), expected)
    laplacian = torchcurv.per_sample_laplacian(Quadratic(), X, mode=mode)
    assert_trees_close(laplacian, torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=D).expand(3, 4))
    one = torchcurv.per_sample_laplacian(Quadratic(), X, output=2, mode=mode)
    assert one.shape == (3,)
    assert_trees_close(one, torch.full((3,), 4.0, dtype=D))


@pytest.mark.parametrize("chunk", CHUNKS, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("wrt", "selection"),
    [
        ("inputs", {"output": 1}),
        ("inputs", {}),
        ("params", {"output": 0}),
        ("params", {"loss": F.cross_entropy}),
        ("both", {"loss": F.cross_entropy}),
    ],
    ids=["inputs-output1", "inputs-all", "params-output0", "params-ce", "both-ce"],
)
def test_mlp_diagonal_equals_the_full_hessians(
    wrt: str, selection: dict[str, Any], mode: str, chunk: Any
) -> None:
    model = mlp().to(D)
    X = torch.randn(5, 3, dtype=D)
    if "loss" in selection:
        selection = {**selection, "targets": torch.tensor([0, 1, 1, 0, 1])}
    y_dims = 0 if selection else 1
    full = torchcurv.per_sample_hessian(model, X, wrt=wrt, chunk_size=None, **selection)
    expected = _full_diagonal(full, wrt, model, X, y_dims)
    diag = torchcurv.per_sample_hessian_diag(
        model, X, wrt=wrt, mode=mode, chunk_size=chunk, **selection
    )
    assert_trees_close(diag, expected)
    if wrt == "inputs":
        laplacian = torchcurv.per_sample_laplacian(
            model, X, mode=mode, chunk_size=chunk, **selection
        )
        assert_trees_close(laplacian, expected.sum(-1))


def test_the_reduced_full_hessian_agrees_with_the_loop_oracle() -> None:
    model, X = cnn().to(D), torch.randn(2, 1, 5, 5, dtype=D)
    diag = torchcurv.per_sample_hessian_diag(model, X, output=1)
    for i, x in enumerate(X):
        H = reference.hessian(lambda x: model(x[None])[0, 1])(x)
        assert_trees_close(diag[i], H.reshape(25, 25).diagonal().reshape(1, 5, 5))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [None, (1, 1, 7)], ids=str)
def test_cnn_diagonal_and_laplacian_equal_the_full_hessian(mode: str, chunk: Any) -> None:
    model, X = cnn().to(D), torch.randn(3, 1, 5, 5, dtype=D)
    full = torchcurv.per_sample_hessian(model, X, chunk_size=None)  # [3, 2, 1, 5, 5, 1, 5, 5]
    expected = _diagonal(full, 1, (1, 5, 5))
    diag = torchcurv.per_sample_hessian_diag(model, X, mode=mode, chunk_size=chunk)
    assert diag.shape == (3, 2, 1, 5, 5)
    assert_trees_close(diag, expected)
    laplacian = torchcurv.per_sample_laplacian(model, X, mode=mode, chunk_size=chunk)
    assert_trees_close(laplacian, expected.sum((-3, -2, -1)))


def test_the_structured_engine_serves_diagonals_and_laplacians() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).to(D)
    X = torch.randn(32, 6, dtype=D)
    full = torchcurv.per_sample_hessian(model, X, output=0, mode="fwd-over-rev")
    for function in (torchcurv.per_sample_hessian_diag, torchcurv.per_sample_laplacian):
        decision = torchcurv.explain(function, model, X, output=0)
        assert decision.engine == "structured", decision
        result = function(model, X, output=0, mode="structured")
        diagonal = full.diagonal(dim1=1, dim2=2)
        expected = diagonal if function is torchcurv.per_sample_hessian_diag else diagonal.sum(-1)
        assert_trees_close(result, expected)


def test_tuple_argnums_give_a_tuple_of_diagonals_and_one_trace() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (torch.sin(a).sum(-1) * torch.cos(b).sum(-1) + (a * a).sum(-1))[:, None]

    A, Bt = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    full = torchcurv.per_sample_hessian(Two(), (A, Bt), argnums=(0, 1), output=0)
    diag = torchcurv.per_sample_hessian_diag(Two(), (A, Bt), argnums=(0, 1), output=0)
    assert isinstance(diag, tuple)
    assert len(diag) == 2
    assert_trees_close(diag[0], full[0][0].diagonal(dim1=1, dim2=2))
    assert_trees_close(diag[1], full[1][1].diagonal(dim1=1, dim2=2))
    laplacian = torchcurv.per_sample_laplacian(Two(), (A, Bt), argnums=(0, 1), output=0)
    assert_trees_close(laplacian, diag[0].sum(-1) + diag[1].sum(-1))


@pytest.mark.parametrize("mode", ["auto", "fwd-over-rev", "rev-over-rev"])
def test_gradients_through_the_laplacian_equal_those_of_the_full_trace(mode: str) -> None:
    model = mlp().to(D)
    X = torch.randn(4, 3, dtype=D)
    laplacian = torchcurv.per_sample_laplacian(model, X, output=0, mode=mode, create_graph=True)
    params = list(model.parameters())
    grads = torch.autograd.grad(
        laplacian.pow(2).sum(), params, allow_unused=True, materialize_grads=True
    )
    H = torchcurv.per_sample_hessian(model, X, output=0, create_graph=True)
    expected = torch.autograd.grad(
        H.diagonal(dim1=1, dim2=2).sum(-1).pow(2).sum(),
        params,
        allow_unused=True,
        materialize_grads=True,
    )
    assert_trees_close(list(grads), list(expected))


def test_explain_shows_the_quantity_plan_and_refuses_options_it_does_not_take() -> None:
    model, X = cnn(), torch.randn(4, 1, 5, 5)
    decision = torchcurv.explain(
        torchcurv.per_sample_laplacian, model, X, output=0, mode="fwd-over-rev"
    )
    assert decision.function == "per_sample_laplacian"
    assert decision.basis_sizes == (1, 25)  # the outer stage runs over the 25 inputs
    auto = torchcurv.explain(torchcurv.per_sample_laplacian, model, X, output=0)
    assert auto.engine == "taylor"  # every op of the CNN has a cheap rule
    assert "Taylor mode applies and is predicted faster" in auto.why_engine
    small = torchcurv.explain(
        torchcurv.per_sample_hessian_diag, model, X, output=0, memory_budget=200_000
    )
    assert small.predicted_peak is not None
    assert small.predicted_peak <= small.budget
    diag = torchcurv.per_sample_hessian_diag(model, X, output=0, memory_budget=200_000)
    assert_trees_close(diag, torchcurv.per_sample_hessian_diag(model, X, output=0))
    with pytest.raises(torchcurv.TorchcurvError, match=r"does not take.*'wrt'"):
        torchcurv.explain(torchcurv.per_sample_laplacian, model, X, wrt="params")
    with pytest.raises(TypeError, match="wrt"):
        torchcurv.per_sample_laplacian(model, X, wrt="params")  # type: ignore[call-arg]


def test_empty_batches_give_empty_quantities() -> None:
    model = mlp().to(D)
    X = torch.randn(0, 3, dtype=D)
    assert torchcurv.per_sample_hessian_diag(model, X).shape == (0, 2, 3)
    assert torchcurv.per_sample_laplacian(model, X, output=0).shape == (0,)


# --------------------------------------------------------------------------------------
# function level: torchcurv.hessian_diag and torchcurv.laplacian
# --------------------------------------------------------------------------------------


def _u(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """A small network of one input: ``tanh(W2 tanh(W1 x))`` with two outputs."""
    return torch.tanh(W[:2, :4] @ torch.tanh(W[:4, 4:] @ x))


@pytest.mark.parametrize("chunk", [None, 1, (2, 3)], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_function_level_diagonal_and_laplacian_equal_the_full_hessian(
    mode: str, chunk: Any
) -> None:
    torch.manual_seed(0)
    W, X = torch.randn(4, 9, dtype=D), torch.randn(6, 5, dtype=D)
    shared = (0, None)
    H = torchcurv.per_sample(torchcurv.hessian(_u), in_dims=shared)(X, W)  # [B, 2, 5, 5]
    diag = torchcurv.hessian_diag(_u, mode=mode, chunk_size=chunk)
    assert_trees_close(
        torchcurv.per_sample(diag, in_dims=shared)(X, W), H.diagonal(dim1=-2, dim2=-1)
    )
    laplacian = torchcurv.laplacian(_u, mode=mode, chunk_size=chunk)
    lap = torchcurv.per_sample(laplacian, in_dims=shared)(X, W)
    assert_trees_close(lap, H.diagonal(dim1=-2, dim2=-1).sum(-1))
    # with respect to the weights (argnums=1): the diagonal of the weights' block
    dW = torchcurv.hessian_diag(_u, argnums=1, mode=mode, chunk_size=chunk)(X[0], W)
    HW = torchcurv.hessian(_u, argnums=1)(X[0], W).reshape(2, 36, 36)
    assert_trees_close(dW, HW.diagonal(dim1=-2, dim2=-1).reshape(2, 4, 9))


def test_function_level_tuple_argnums_and_pytrees() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(3, dtype=D), torch.randn(2, dtype=D)

    def f(a: torch.Tensor, scale: float, b: torch.Tensor) -> torch.Tensor:
        return scale * torch.sin(a).sum() * torch.cos(b).sum()

    H = torchcurv.hessian(f, argnums=(0, 2))(a, 2.0, b)
    da, db = torchcurv.hessian_diag(f, argnums=(0, 2))(a, 2.0, b)
    assert_trees_close(da, H[0][0].diagonal())
    assert_trees_close(db, H[1][1].diagonal())
    lap = torchcurv.laplacian(f, argnums=(0, 2))(a, 2.0, b)
    assert_trees_close(lap, H[0][0].diagonal().sum() + H[1][1].diagonal().sum())
    tree = {"a": a, "b": b}
    d = torchcurv.hessian_diag(lambda t: f(t["a"], 2.0, t["b"]))(tree)
    assert_trees_close(d, {"a": da, "b": db})


def test_gradient_of_a_pinn_residual_through_the_laplacian() -> None:
    """d/dW of the mean squared residual of Laplace's equation, against autograd on the
    loop oracle's Hessian traces."""
    torch.manual_seed(0)
    W, X = torch.randn(4, 9, dtype=D, requires_grad=True), torch.randn(5, 5, dtype=D)

    def scalar(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return _u(x, W)[0]

    lap = torchcurv.per_sample(torchcurv.laplacian(scalar), in_dims=(0, None))(X, W)
    (got,) = torch.autograd.grad(lap.pow(2).mean(), W)
    traces = torch.stack(
        [reference.hessian(scalar, create_graph=True)(x, W).diagonal().sum() for x in X]
    )
    (expected,) = torch.autograd.grad(traces.pow(2).mean(), W)
    assert_trees_close(got, expected)


@pytest.mark.parametrize("function", [torchcurv.hessian_diag, torchcurv.laplacian])
def test_function_level_bad_arguments(function: Any) -> None:
    x = torch.randn(3, dtype=D)
    with pytest.raises(torchcurv.TorchcurvError, match="argnums"):
        function(lambda x: x.sum(), argnums=2)(x)
    with pytest.raises(torchcurv.TorchcurvError, match="mode"):
        function(lambda x: x.sum(), mode="sideways")
    with pytest.raises(torchcurv.TorchcurvError, match="func"):
        function(3)


# --------------------------------------------------------------------------------------
# per_sample_laplacian's coordinates and weights
# --------------------------------------------------------------------------------------


def pinn() -> nn.Module:
    """``u(t, x, y)`` with one output, as a PINN's network is."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))


@pytest.mark.parametrize("chunk", ["auto", None, (2, 1, 1)], ids=str)
@pytest.mark.parametrize("mode", [*MODES, "structured"])
def test_coordinates_and_weights_select_and_weigh_the_diagonal(mode: str, chunk: Any) -> None:
    model = pinn().to(D)
    X = torch.randn(5, 3, dtype=D)
    diag = torchcurv.per_sample_hessian_diag(model, X, output=0, mode="rev-over-rev")  # [5, 3]
    spatial = torchcurv.per_sample_laplacian(
        model, X, output=0, coordinates=[1, 2], mode=mode, chunk_size=chunk
    )
    assert_trees_close(spatial, diag[:, 1] + diag[:, 2])
    mask = torch.tensor([False, True, True])
    masked = torchcurv.per_sample_laplacian(
        model, X, output=0, coordinates=mask, mode=mode, chunk_size=chunk
    )
    assert_trees_close(masked, spatial)
    weighted = torchcurv.per_sample_laplacian(
        model, X, output=0, coordinates=[2, 0], weights=[0.5, -3.0], mode=mode, chunk_size=chunk
    )
    assert_trees_close(weighted, 0.5 * diag[:, 2] - 3.0 * diag[:, 0])
    everywhere = torchcurv.per_sample_laplacian(
        model, X, output=0, weights=torch.tensor([1.0, 2.0, 3.0]), mode=mode, chunk_size=chunk
    )
    assert_trees_close(everywhere, diag @ torch.tensor([1.0, 2.0, 3.0], dtype=D))


def test_coordinates_run_over_every_differentiated_input_in_order() -> None:
    torch.manual_seed(0)

    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.sin(a).prod(-1) * torch.cos(b).sum(-1)

    a, b = torch.randn(4, 2, dtype=D), torch.randn(4, 3, dtype=D)
    H = torchcurv.per_sample_hessian(Two(), (a, b), argnums=(0, 1))
    diag = torch.cat([H[0][0].diagonal(dim1=1, dim2=2), H[1][1].diagonal(dim1=1, dim2=2)], 1)
    lap = torchcurv.per_sample_laplacian(Two(), (a, b), argnums=(0, 1), coordinates=[1, 4])
    assert_trees_close(lap, diag[:, 1] + diag[:, 4])


def test_repeated_calls_take_the_new_weights_and_gradients_flow() -> None:
    model = pinn().to(D)
    X = torch.randn(4, 3, dtype=D)
    diag = torchcurv.per_sample_hessian_diag(model, X, output=0)
    for w in ([1.0, 1.0], [2.0, -1.0]):
        lap = torchcurv.per_sample_laplacian(model, X, output=0, coordinates=[1, 2], weights=w)
        assert_trees_close(lap, w[0] * diag[:, 1] + w[1] * diag[:, 2])
    lap = torchcurv.per_sample_laplacian(
        model, X, output=0, coordinates=[1, 2], weights=[2.0, -1.0], create_graph=True
    )
    got = torch.autograd.grad(lap.pow(2).sum(), list(model.parameters()), materialize_grads=True)
    full = torchcurv.per_sample_hessian_diag(model, X, output=0, create_graph=True)
    reference_lap = 2.0 * full[:, 1] - full[:, 2]
    expected = torch.autograd.grad(
        reference_lap.pow(2).sum(), list(model.parameters()), materialize_grads=True
    )
    assert_trees_close(list(got), list(expected))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"coordinates": [3]}, r"must index the 3 differentiated entries"),
        ({"coordinates": [1, 1]}, "must not repeat"),
        ({"coordinates": []}, "non-empty sequence of ints"),
        ({"coordinates": [0.5]}, "non-empty sequence of ints"),
        ({"coordinates": torch.tensor([True, False])}, r"one sample's input shape \(3,\)"),
        ({"coordinates": [0, 1], "weights": [1.0]}, r"one number per coordinate \(2\)"),
        ({"weights": [1.0, 2.0]}, r"one number per entry of a sample \(3\)"),
        ({"weights": "heavy"}, "weights"),
    ],
)
def test_bad_coordinates_and_weights_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        torchcurv.per_sample_laplacian(pinn().to(D), torch.randn(2, 3, dtype=D), **options)


def _loop_hessians(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """One sample's input Hessian at a time, by the reference loop: ``[B, n, n]``."""
    return torch.stack([reference.hessian(lambda x: model(x)[0])(x) for x in X])


@pytest.mark.parametrize("chunk", ["auto", None, (2, 1, 1)], ids=str)
@pytest.mark.parametrize("mode", [*MODES, "structured", "taylor"])
def test_sigma_and_per_sample_weights_against_the_loop(mode: str, chunk: Any) -> None:
    """``tr(sigma sigma^T H) = sum_k d_k^T H d_k`` with sigma the same for every sample or
    one per sample, over all entries or some coordinates, and weights per sample."""
    model = pinn().to(D)
    X = torch.randn(5, 3, dtype=D)
    H = _loop_hessians(model, X)
    sigma, sigmas, few = (torch.randn(*s, dtype=D) for s in ((3, 4), (5, 3, 2), (5, 2, 3)))
    w = torch.randn(5, 2, dtype=D)

    def call(**options: Any) -> torch.Tensor:
        return torchcurv.per_sample_laplacian(  # type: ignore[no-any-return]
            model, X, output=0, mode=mode, chunk_size=chunk, **options
        )

    assert_trees_close(call(sigma=sigma), torch.einsum("bij,ik,jk->b", H, sigma, sigma))
    assert_trees_close(call(sigma=sigmas), torch.einsum("bij,bik,bjk->b", H, sigmas, sigmas))
    sub = H[:, [2, 0]][:, :, [2, 0]]  # coordinates [2, 0]: sigma's rows are theirs
    assert_trees_close(
        call(sigma=few, coordinates=[2, 0]), torch.einsum("bij,bik,bjk->b", sub, few, few)
    )
    diagonal = H.diagonal(dim1=1, dim2=2)
    assert_trees_close(call(weights=w, coordinates=[2, 0]), (diagonal[:, [2, 0]] * w).sum(1))
    every = torch.randn(5, 3, dtype=D)  # flat over a sample's entries, without coordinates
    assert_trees_close(call(weights=every), (diagonal * every).sum(1))


def test_sigma_on_images_and_vector_outputs() -> None:
    """Sigma's rows run over one sample's entries in flat order, for any shape; every
    output entry gets its own trace."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)).to(D)
    X = torch.randn(3, 1, 3, 3, dtype=D)
    H = torchcurv.per_sample_hessian(model, X, mode="rev-over-rev").reshape(3, 2, 9, 9)
    sigmas = torch.randn(3, 9, 5, dtype=D)
    expected = torch.einsum("byij,bik,bjk->by", H, sigmas, sigmas)
    for mode in ("auto", "fwd-over-rev", "taylor"):
        got = torchcurv.per_sample_laplacian(model, X, sigma=sigmas, mode=mode)
        assert_trees_close(got, expected)
    weights = torch.randn(3, 1, 3, 3, dtype=D)  # per sample, in the sample's shape
    got = torchcurv.per_sample_laplacian(model, X, weights=weights)
    diagonal = H.diagonal(dim1=2, dim2=3)
    assert_trees_close(got, (diagonal * weights.reshape(3, 1, 9)).sum(-1))


@pytest.mark.parametrize("mode", ["fwd-over-rev", "rev-over-rev", "taylor"])
def test_hutchinson_with_one_column_of_sigma_is_exact(mode: str) -> None:
    """With one column ``s``, every probe is ``v = +-s`` and ``v^T H v = s^T H s``; with
    weights on one coordinate, ``(w v) . (H v) = w H_ii``: the estimates are exact."""
    model = pinn().to(D)
    X = torch.randn(4, 3, dtype=D)
    H = _loop_hessians(model, X)
    sigmas = torch.randn(4, 3, 1, dtype=D)
    got = torchcurv.per_sample_laplacian(
        model, X, output=0, sigma=sigmas, method="hutchinson", num_samples=3, mode=mode
    )
    assert_trees_close(got, torch.einsum("bij,bi,bj->b", H, sigmas[..., 0], sigmas[..., 0]))
    if mode == "taylor":
        return  # a weighted Hutchinson trace needs H v (refused, tested below)
    w = torch.randn(4, 1, dtype=D)
    got = torchcurv.per_sample_laplacian(
        model, X, output=0, coordinates=[1], weights=w, method="hutchinson", num_samples=2,
        mode=mode,
    )  # fmt: skip
    assert_trees_close(got, w[:, 0] * H[:, 1, 1])


def test_taylor_and_hessian_vector_products_share_sigmas_probes() -> None:
    model = pinn().to(D)
    X = torch.randn(6, 3, dtype=D)
    sigmas = torch.randn(6, 3, 5, dtype=D)
    estimates = [
        torchcurv.per_sample_laplacian(
            model, X, output=0, sigma=sigmas, method="hutchinson", num_samples=7,
            generator=torch.Generator().manual_seed(3), mode=mode, chunk_size=chunk,
        )
        for mode, chunk in (("taylor", "auto"), ("fwd-over-rev", (4, 2, 3)))
    ]  # fmt: skip
    assert_trees_close(estimates[0], estimates[1])
    exact = torchcurv.per_sample_laplacian(model, X, output=0, sigma=sigmas)
    assert not torch.allclose(estimates[0], exact)  # an estimate, from K-entry probes


def test_repeated_calls_take_the_new_per_sample_coefficients_and_gradients_flow() -> None:
    model = pinn().to(D)
    X = torch.randn(4, 3, dtype=D)
    H = _loop_hessians(model, X)
    for seed in range(3):  # one template, new values every call
        sigmas = torch.randn(4, 3, 2, dtype=D, generator=torch.Generator().manual_seed(seed))
        got = torchcurv.per_sample_laplacian(model, X, output=0, sigma=sigmas)
        assert_trees_close(got, torch.einsum("bij,bik,bjk->b", H, sigmas, sigmas))
        w = sigmas[..., 0]
        got = torchcurv.per_sample_laplacian(model, X, output=0, weights=w)
        assert_trees_close(got, (H.diagonal(dim1=1, dim2=2) * w).sum(1))
    for mode in ("taylor", "fwd-over-rev"):
        lap = torchcurv.per_sample_laplacian(
            model, X, output=0, sigma=sigmas, create_graph=True, mode=mode
        )
        got = torch.autograd.grad(lap.pow(2).sum(), list(model.parameters()), allow_unused=True,
                                  materialize_grads=True)  # fmt: skip
        full = torchcurv.per_sample_hessian(model, X, output=0, create_graph=True)
        reference_lap = torch.einsum("bij,bik,bjk->b", full, sigmas, sigmas)
        expected = torch.autograd.grad(reference_lap.pow(2).sum(), list(model.parameters()),
                                       allow_unused=True, materialize_grads=True)  # fmt: skip
        assert_trees_close(list(got), list(expected))


def test_coefficients_that_require_grad_give_detached_results_without_create_graph() -> None:
    model = pinn().to(D)
    X = torch.randn(4, 3, dtype=D)
    for options in (
        {"sigma": torch.randn(4, 3, 2, dtype=D, requires_grad=True)},
        {"sigma": torch.randn(3, 2, dtype=D, requires_grad=True)},
        {"weights": torch.randn(4, 3, dtype=D, requires_grad=True)},
        {"weights": torch.randn(3, dtype=D, requires_grad=True)},
    ):
        for mode in ("taylor", "fwd-over-rev", "structured"):
            got = torchcurv.per_sample_laplacian(model, X, output=0, mode=mode, **options)
            assert not got.requires_grad
        (coefficient,) = options.values()
        lap = torchcurv.per_sample_laplacian(model, X, output=0, create_graph=True, **options)
        assert torch.autograd.grad(lap.sum(), coefficient)[0].abs().sum() > 0


def test_many_probes_are_planned_from_a_few_chunks() -> None:
    """The planner measures a chunked Hutchinson run in probe mode (the first and last
    chunks computed, the others copies): thousands of probes cost no more to plan."""
    model = pinn().to(D)
    X = torch.randn(3, 3, dtype=D)
    calls = []
    real = F.linear

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    for mode in ("taylor", "fwd-over-rev"):
        torchcurv.per_sample_laplacian(model, X, output=0, mode=mode, method="hutchinson",
                                       num_samples=8, memory_budget="1GiB")  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "linear", counted)
        for mode in ("taylor", "fwd-over-rev"):
            calls.clear()
            torchcurv.per_sample_laplacian(model, X, output=0, mode=mode, method="hutchinson",
                                           num_samples=3000, memory_budget="1GiB")  # fmt: skip
            assert len(calls) < 3000, (mode, len(calls))


def test_per_sample_coefficients_are_chunked_with_the_batch() -> None:
    model = pinn().to(D)
    X = torch.randn(7, 3, dtype=D)
    sigmas = torch.randn(7, 3, 4, dtype=D)
    w = torch.randn(7, 3, dtype=D)
    for options in ({"sigma": sigmas}, {"weights": w}):
        whole = torchcurv.per_sample_laplacian(model, X, output=0, chunk_size=None, **options)
        for mode in ("fwd-over-rev", "taylor"):
            chunked = torchcurv.per_sample_laplacian(
                model, X, output=0, mode=mode, chunk_size=(3, 1, 2), **options
            )
            assert_trees_close(chunked, whole)
            tight = torchcurv.per_sample_laplacian(
                model, X, output=0, mode=mode, memory_budget="24KB", **options
            )
            assert_trees_close(tight, whole)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sigma": torch.ones(2, 2)}, r"one row per entry of a sample \(D = 3\)"),
        ({"sigma": torch.ones(3, 2, 2)}, r"\[B, D, K\] with one per sample \(B = 2\)"),
        ({"sigma": torch.ones(3)}, r"must be a real matrix \[D, K\]"),
        ({"sigma": torch.ones(3, 0)}, "at least one column"),
        ({"sigma": "wide"}, "sigma"),
        ({"sigma": torch.ones(2, 1), "coordinates": [0]}, r"one row per coordinate \(D = 1\)"),
        ({"sigma": torch.ones(3, 1), "weights": [1.0, 1.0, 1.0]}, "cannot be combined"),
        ({"sigma": torch.ones(3, 1, dtype=torch.complex128)}, "sigma must be real"),
        ({"sigma": torch.ones(3, 1, dtype=torch.bool)}, "sigma must hold numbers"),
        ({"weights": torch.ones(2, 3, dtype=torch.bool)}, "weights must hold numbers"),
        ({"weights": torch.ones(3, dtype=torch.complex128)}, "weights must be real"),
        ({"weights": torch.ones(2, 2)}, r"or a row of them per sample \(2 x 3\)"),
        (
            {"sigma": torch.ones(3, 1), "method": "hutch++", "num_samples": 6},
            r"sigma cannot be used with method='hutch\+\+'",
        ),
        (
            {"weights": torch.ones(2, 3), "method": "hutchinson", "num_samples": 2,
             "mode": "taylor"},
            "Hutchinson estimate is of unweighted traces",
        ),
    ],
)  # fmt: skip
def test_bad_sigma_and_weights_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        torchcurv.per_sample_laplacian(
            pinn().to(D), torch.randn(2, 3, dtype=D), output=0, **options
        )


def test_function_level_diagonals_of_scalars() -> None:
    t, xy = torch.tensor(2.0, dtype=D), torch.tensor([0.5, -1.0], dtype=D)
    assert_trees_close(torchcurv.hessian_diag(lambda t: t**3)(t), torch.tensor(12.0, dtype=D))

    def u(t: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        return t**3 * torch.sin(xy).sum()

    dt, dxy = torchcurv.hessian_diag(u, argnums=(0, 1))(t, xy)
    assert_trees_close(dt, 6 * t * torch.sin(xy).sum())
    assert_trees_close(dxy, -(t**3) * torch.sin(xy))
    X = torch.randn(5, dtype=D)  # a batch of scalars
    d = torchcurv.per_sample_hessian_diag(nn.Tanh(), X)
    assert_trees_close(d, -2 * torch.tanh(X) * (1 - torch.tanh(X) ** 2))


# --------------------------------------------------------------------------------------
# every quantity on today's architectures, through the harness's assertion
# --------------------------------------------------------------------------------------


class _Block(nn.Module):
    """A transformer encoder block on 3 tokens of width 4; one output entry."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[:, 0, :2]


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("wrt", ["inputs", "params"])
@pytest.mark.parametrize(
    ("model", "shape"), [(_Block, (3, 4)), (_Recurrent, (4, 3))], ids=["transformer", "lstm"]
)
def test_every_quantity_on_a_transformer_block_and_an_lstm(
    model: type[nn.Module], shape: tuple[int, ...], wrt: str
) -> None:
    torch.manual_seed(0)
    module = model().to(D).eval()
    X = torch.randn(2, *shape, dtype=D)
    if wrt == "params":  # a scalar loss: every quantity, the product and eigenvalues too
        y = torch.tensor([0, 1])
        assert_quantities_match_hessian(
            module, X, wrt=wrt, loss=F.cross_entropy, targets=y, mode="rev-over-rev"
        )
    else:
        assert_quantities_match_hessian(module, X, output=1)
