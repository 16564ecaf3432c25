"""Stochastic estimators of per-sample diagonals and Laplacians: Hutchinson and Hutch++.

Unbiased exactly where it can be shown (the mean over all ``2^n`` Rademacher vectors is
the diagonal and the trace), within a few standard errors of the exact value (the
variance of Hutchinson's trace estimate is known in closed form), reproducible under a
seed, independent of the chunking and of the batch size, and Hutch++ below Hutchinson's
variance at equal product counts on a Hessian with a decaying spectrum.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch import nn

import torchcurv
from torchcurv._transforms import hessian_diagonal, hutchpp_trace
from torchcurv.testing import assert_matches_finite_differences, assert_trees_close

D = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)
    ).to(D)


class Quadratic(nn.Module):
    """``x^T A x`` for a fixed symmetric ``A``: every sample's Hessian is ``2 A``."""

    def __init__(self, eigenvalues: torch.Tensor) -> None:
        super().__init__()
        n = eigenvalues.numel()
        q, _ = torch.linalg.qr(
            torch.randn(n, n, dtype=D, generator=torch.Generator().manual_seed(1))
        )
        self.register_buffer("A", q @ torch.diag(eigenvalues) @ q.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,ij,bj->b", x, self.A, x)[:, None]


class TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(a) * b).sum(-1, keepdim=True)


def _all_signs(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=n)), dtype=D)


@pytest.mark.parametrize("mode", ["fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd"])
def test_the_mean_over_every_rademacher_vector_is_exact(mode: str) -> None:
    torch.manual_seed(0)
    W = torch.randn(3, 4, dtype=D)

    def f(x: torch.Tensor) -> torch.Tensor:  # three outputs
        return torch.tanh(W @ torch.sin(x))

    x = torch.randn(4, dtype=D)
    H = torchcurv.hessian(f)(x)  # [3, 4, 4]
    probes = _all_signs(4)
    diag = hessian_diagonal(f, mode=mode, chunk_size=(None, 5), estimate=True)(x, probes)
    assert_trees_close(diag, H.diagonal(dim1=1, dim2=2))
    trace = hessian_diagonal(f, mode=mode, chunk_size=(2, 3), trace=True, estimate=True)(x, probes)
    assert_trees_close(trace, H.diagonal(dim1=1, dim2=2).sum(-1))
    w = torch.tensor([2.0, -1.0], dtype=D)
    weighted = hessian_diagonal(
        f, mode=mode, trace=True, coordinates=[3, 1], weights=w, estimate=True
    )(x, probes)
    assert_trees_close(weighted, 2.0 * H[:, 3, 3] - H[:, 1, 1])


def test_hutchpp_with_a_full_sketch_is_exact() -> None:
    torch.manual_seed(0)
    W = torch.randn(5, dtype=D)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ W) * torch.sin(x).sum()

    x = torch.randn(5, dtype=D)
    trace = torchcurv.hessian(f)(x).trace()
    probes = torch.randn(10, 5, dtype=D)  # k = 5 = n: the sketch spans the whole space
    assert_trees_close(hutchpp_trace(f, "fwd-over-rev", 5)(x, probes), trace)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_estimates_are_reproducible_and_independent_of_chunking_and_batch(method: str) -> None:
    model = mlp()
    X = torch.randn(6, 4, dtype=D)

    def estimate(X: torch.Tensor, chunk: Any, seed: int = 0) -> torch.Tensor:
        return torchcurv.per_sample_laplacian(  # type: ignore[no-any-return]
            model, X, output=1, method=method, num_samples=9, chunk_size=chunk,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    first = estimate(X, None)
    assert torch.equal(first, estimate(X, None))
    for chunk in [1, 4, "auto", (2, None, 3)] if method == "hutchinson" else [1, 4, "auto"]:
        assert_trees_close(estimate(X, chunk), first, rtol=0, atol=1e-14)
    assert_trees_close(estimate(X[:2], None), first[:2], rtol=0, atol=1e-14)
    assert not torch.equal(estimate(X, None, seed=1), first)


def test_hutchinson_diagonals_of_parameters_are_within_five_standard_errors() -> None:
    """Var of ``v_i (H v)_i`` with Rademacher ``v``: ``sum_{j != i} H_ij^2``."""
    model = mlp()
    X = torch.randn(3, 4, dtype=D)
    y = torch.tensor([0, 1, 1])
    loss = nn.functional.cross_entropy
    S = 500
    H = torchcurv.per_sample_hessian(model, X, wrt="params", loss=loss, targets=y)
    M = torchcurv.to_matrix(H, batch_dims=1)  # [3, P, P]
    exact = M.diagonal(dim1=1, dim2=2)
    deviation = ((M.pow(2).sum(-1) - exact.pow(2)) / S).sqrt()
    estimate = torchcurv.per_sample_hessian_diag(
        model, X, wrt="params", loss=loss, targets=y, method="hutchinson", num_samples=S,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert list(estimate) == [n for n, _ in model.named_parameters()]
    flat = torch.cat([e.reshape(3, -1) for e in estimate.values()], dim=1)
    assert ((flat - exact).abs() <= 5 * deviation + 1e-12).all()


def test_hutchinson_traces_are_within_five_standard_errors() -> None:
    """Var of Hutchinson's trace estimate with Rademacher probes:
    ``2 (||H||_F^2 - sum H_ii^2) / S``."""
    model = mlp()
    X = torch.randn(8, 4, dtype=D)
    S = 64
    H = torchcurv.per_sample_hessian(model, X, output=0)  # [8, 4, 4]
    exact = H.diagonal(dim1=1, dim2=2).sum(-1)
    variance = 2 * (H.pow(2).sum((1, 2)) - H.diagonal(dim1=1, dim2=2).pow(2).sum(-1)) / S
    estimate = torchcurv.per_sample_laplacian(
        model, X, output=0, method="hutchinson", num_samples=S,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert ((estimate - exact).abs() <= 5 * variance.sqrt() + 1e-12).all()


def test_hutchpp_has_a_lower_variance_than_hutchinson_on_a_decaying_spectrum() -> None:
    n, B, S = 16, 400, 12
    model = Quadratic(2.0 ** -torch.arange(n, dtype=D))
    X = torch.randn(B, n, dtype=D)  # every sample: the same Hessian 2A, independent probes
    exact = 2 * model.A.trace()
    variances = {}
    for method in ("hutchinson", "hutch++"):
        estimate = torchcurv.per_sample_laplacian(
            model, X, output=0, method=method, num_samples=S,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        variances[method] = float((estimate - exact).pow(2).mean())
    # Measured: 0.62 (Hutchinson) and 0.034 (Hutch++), mean squared errors at S = 12.
    assert variances["hutch++"] < 0.1 * variances["hutchinson"], variances


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m, X: torchcurv.per_sample_laplacian(m, X, output=0, num_samples=3),
            "estimators only",
        ),
        (
            lambda m, X: torchcurv.per_sample_laplacian(m, X, output=0, method="hutchinson"),
            "num_samples",
        ),
        (
            lambda m, X: torchcurv.per_sample_laplacian(
                m, X, output=0, method="hutch++", num_samples=2
            ),
            r"int >= 3",
        ),
        (
            lambda m, X: torchcurv.per_sample_laplacian(m, X, method="hutch++", num_samples=6),
            "one entry per sample",
        ),
        (
            lambda m, X: torchcurv.per_sample_hessian_diag(m, X, method="hutch++", num_samples=6),
            "must be one of 'exact', 'hutchinson'",
        ),
        (
            lambda m, X: torchcurv.per_sample_laplacian(
                m, X, output=0, method="hutch++", num_samples=6, coordinates=[0, 1]
            ),
            r"coordinates cannot be used with method='hutch\+\+' .*got \[0, 1\]\. "
            r"Use method='hutchinson'",
        ),
        (
            lambda m, X: torchcurv.per_sample_laplacian(
                TwoInputs(),
                (X, X),
                output=0,
                argnums=(0, 1),
                coordinates=torch.ones(4, dtype=torch.bool),
            ),
            "as a boolean mask needs one differentiated input",
        ),
        (
            lambda m, X: torchcurv.per_sample_laplacian(
                m, X, output=0, method="hutchinson", num_samples=4, generator=0
            ),
            "CPU torch.Generator",
        ),
    ],
)
def test_bad_estimator_options_are_refused(call: Any, message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        call(mlp(), torch.randn(3, 4, dtype=D))


def test_explain_shows_the_probes_axis() -> None:
    decision = torchcurv.explain(
        torchcurv.per_sample_hessian_diag, mlp(), torch.randn(4, 4, dtype=D), output=0,
        method="hutchinson", num_samples=17,
    )  # fmt: skip
    assert decision.basis_sizes[-1] == 17
    assert math.prod(decision.basis_sizes) >= 17


def test_function_level_estimators() -> None:
    x = torch.randn(6, dtype=D)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x).sum() * torch.sin(x).sum()

    H = torchcurv.hessian(f)(x)
    a = torch.arange(1.0, 7.0, dtype=D)

    def rank_one(x: torch.Tensor) -> torch.Tensor:  # H = 2 a a^T: any sketch spans its range
        return (a @ torch.sin(x)) ** 2 / 2 + (a @ x) ** 2

    sketched = torchcurv.laplacian(rank_one, method="hutch++", num_samples=3)(
        torch.zeros(6, dtype=D)
    )
    assert_trees_close(sketched, torchcurv.hessian(rank_one)(torch.zeros(6, dtype=D)).trace())

    def estimate(seed: int) -> torch.Tensor:
        return torchcurv.hessian_diag(  # type: ignore[no-any-return]
            f, method="hutchinson", num_samples=5, generator=torch.Generator().manual_seed(seed)
        )(x)

    assert torch.equal(estimate(0), estimate(0))
    assert not torch.equal(estimate(0), estimate(1))
    probes = _all_signs(6)  # the mean over every sign vector is exact
    exact = hessian_diagonal(f, estimate=True)(x, probes)
    assert_trees_close(exact, H.diagonal())
    with pytest.raises(torchcurv.TorchcurvError, match="one entry with method='hutch"):
        torchcurv.laplacian(lambda x: torch.sin(x), method="hutch++", num_samples=6)(x)
    with pytest.raises(torchcurv.TorchcurvError, match="must be one of 'exact', 'hutchinson'"):
        torchcurv.hessian_diag(f, method="hutch++", num_samples=6)


@pytest.mark.parametrize(
    ("public", "method"),
    [
        (torchcurv.per_sample_laplacian, "hutchinson"),
        (torchcurv.per_sample_laplacian, "hutch++"),
        (torchcurv.per_sample_hessian_diag, "hutchinson"),
    ],
)
def test_gradients_through_estimates_match_finite_differences(public: Any, method: str) -> None:
    """Hutchinson's estimate under a fixed generator is a smooth function of the inputs
    and the parameters (the probes do not move): its ``create_graph=True`` gradient,
    with respect to both, against central finite differences of the estimate itself.
    Hutch++ holds its sketch's basis ``Q`` fixed in the gradient (an unbiased estimate
    of the trace's gradient, not the derivative of the estimate): with more sketch
    sign vectors (10) than input entries (4) ``Q`` spans everything, the estimate is the
    exact Laplacian and its gradient the exact one, checked against finite differences of
    the exact Laplacian."""
    model = mlp()
    weight = model[2].weight
    X = torch.randn(3, 4, dtype=D)
    mix = torch.randn(3, 4, dtype=D)  # weighs every sample (and diagonal entry) differently
    num_samples = 30 if method == "hutch++" else 6

    def estimate(X: torch.Tensor, create_graph: bool = False, how: str = method) -> torch.Tensor:
        out = public(
            model, X, output=1, method=how, create_graph=create_graph,
            num_samples=None if how == "exact" else num_samples,
            generator=None if how == "exact" else torch.Generator().manual_seed(5),
        )  # fmt: skip
        return (out * (mix if out.dim() == 2 else mix[:, 0])).sum()

    reference = "exact" if method == "hutch++" else method

    def of_both(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.copy_(w)  # in place: the module's prepared call sees the new values
        try:
            return estimate(X, how=reference)
        finally:
            with torch.no_grad():
                weight.copy_(saved)

    if method == "hutch++":
        assert_trees_close(estimate(X), estimate(X, how="exact"))
    Xg = X.clone().requires_grad_(True)
    gradient = torch.autograd.grad(estimate(Xg, create_graph=True), (Xg, weight))
    assert all(float(g.abs().max()) > 1e-3 for g in gradient)  # both depend on them
    assert_matches_finite_differences(
        of_both, gradient, X, weight.detach().clone(), argnums=(0, 1), order=1
    )


def test_function_level_estimates_under_per_sample_follow_its_randomness() -> None:
    """Inside `torchcurv.per_sample` the probes are random draws under vmap: refused
    with ``randomness="error"`` (saying why), one draw for all samples with ``"same"``,
    each sample its own with ``"different"``; every one an estimate of that sample's."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x).sum() * x.sum()

    x = torch.randn(4, dtype=D)
    X = x.expand(3, 4).clone()  # three equal samples
    estimate = torchcurv.laplacian(
        f, method="hutchinson", num_samples=2, generator=torch.Generator().manual_seed(0)
    )
    with pytest.raises(torchcurv.TorchcurvError, match="probes of a function-level estimate"):
        torchcurv.per_sample(estimate)(X)
    same = torchcurv.per_sample(estimate, randomness="same")(X)
    assert torch.equal(same, same[:1].expand(3))
    different = torchcurv.per_sample(estimate, randomness="different")(X)
    assert len(set(different.tolist())) > 1
    exact = torchcurv.laplacian(f)(x)
    probes = _all_signs(4)  # every sign vector, as the estimate averages them
    assert_trees_close(hessian_diagonal(f, trace=True, estimate=True)(x, probes), exact)
