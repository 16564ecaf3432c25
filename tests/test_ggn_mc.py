"""Monte-Carlo Gauss-Newton matrices and diagonals (``method="mc"``).

The sampled loss rows ``g`` are checked exactly where the expectation is a finite sum
(cross-entropy: the labels' probabilities; MSE: a basis of the Gaussian's covariance)
against the loss Hessian from `torch.autograd.functional`; the whole estimate is
unbiased within five standard errors of the exact Gauss-Newton matrix (a batch of one
sample repeated gives independent estimates), the same on every path that draws the
same numbers (engines, chunkings, the matrix and its diagonal), reproducible under a
seed and independent of the batch size.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcurv
from torchcurv._losses import mc_sampling, sampled_rows
from torchcurv.testing import assert_trees_close

D = torch.float64
SEED = torch.Generator().manual_seed


def mlp(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).to(D)


def positions() -> nn.Module:
    """Per-position logits ``[C=3, L=4]`` of a ``[2, 4]`` input (a segmentation head)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 5, 1), nn.Tanh(), nn.Conv1d(5, 3, 1)).to(D)


# (name, loss, output shape of one sample, target of one sample)
LOSSES: list[tuple[str, Any, tuple[int, ...], torch.Tensor]] = [
    ("cross_entropy", F.cross_entropy, (3,), torch.tensor(1)),
    ("ce_sum_smoothed", nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.2), (3,),
     torch.tensor(2)),
    ("ce_ignored", nn.CrossEntropyLoss(ignore_index=1), (3,), torch.tensor(1)),
    ("ce_soft", F.cross_entropy, (3,), torch.tensor([0.2, 0.5, 0.3], dtype=D)),
    ("ce_soft_smoothed", nn.CrossEntropyLoss(label_smoothing=0.3), (3,),
     torch.tensor([0.1, 0.1, 0.2], dtype=D)),
    ("ce_positions", F.cross_entropy, (3, 4), torch.tensor([0, 2, -100, 1])),
    ("mse", F.mse_loss, (3,), torch.tensor([0.5, -1.0, 2.0], dtype=D)),
    ("mse_sum", nn.MSELoss(reduction="sum"), (2, 2), torch.randn(2, 2, dtype=D)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "loss", "shape", "target"), LOSSES, ids=[c[0] for c in LOSSES])
def test_the_expected_outer_product_of_the_sampled_rows_is_the_loss_hessian(
    name: str, loss: Any, shape: tuple[int, ...], target: torch.Tensor
) -> None:
    torch.manual_seed(0)
    out = torch.randn(1, *shape, dtype=D)
    n = out.numel()
    H = torch.autograd.functional.hessian(lambda o: loss(o, target.unsqueeze(0)), out)
    H = H.reshape(n, n)
    sampling = mc_sampling("test", loss)
    expected = torch.zeros(n, n, dtype=D)
    if sampling.law == "gaussian":  # E[z z^T] = I = the sum over a basis of z
        rows = sampled_rows(sampling, out, target, torch.eye(n, dtype=D)).reshape(n, n)
        expected = rows.T @ rows
    else:  # every labelling of the positions, with its probability
        p = torch.softmax(out, dim=1)
        classes, rest = shape[0], shape[1:]
        for labels in torch.cartesian_prod(*[torch.arange(classes)] * max(1, math.prod(rest))):
            labels = labels.reshape(rest) if rest else labels.reshape(())
            chosen = F.one_hot(labels, classes).movedim(-1, 0).unsqueeze(0)  # [1, C, *rest]
            noise = (1e6 * chosen).to(D).reshape(1, n)  # Gumbel numbers picking `labels`
            g = sampled_rows(sampling, out, target, noise).reshape(n)
            probability = (p * chosen).sum(1).prod()
            expected += probability * torch.outer(g, g)
    assert_trees_close(expected, H)


def _unbiased(samples: torch.Tensor, exact: torch.Tensor) -> None:
    """`samples` ``[B, ...]``: independent estimates of `exact`, their mean within five
    standard errors of it."""
    error = (samples.mean(0) - exact).abs()
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    assert (error <= 5 * standard_error + 1e-12 * exact.abs().max()).all()


CASES = [
    ("mlp_ce", mlp, (4,), F.cross_entropy, torch.tensor(2)),
    ("mlp_mse", mlp, (4,), F.mse_loss, torch.tensor([0.3, -0.2, 1.0], dtype=D)),
    ("positions_ce", positions, (2, 4), F.cross_entropy, torch.tensor([0, 2, -100, 1])),
]


@pytest.mark.parametrize(("name", "make", "shape", "loss", "target"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
@pytest.mark.parametrize("mode", ["auto", "rev-over-rev"])
def test_mc_estimates_are_unbiased(
    name: str, make: Any, shape: tuple[int, ...], loss: Any, target: torch.Tensor, mode: str
) -> None:
    model = make()
    torch.manual_seed(1)
    x = torch.randn(1, *shape, dtype=D)
    B = 1500
    X, Y = x.expand(B, *shape), target.unsqueeze(0).expand(B, *target.shape)
    options = dict(loss=loss, mode=mode)
    exact = torchcurv.per_sample_ggn_diag(model, x, targets=Y[:1], **options)
    estimate = torchcurv.per_sample_ggn_diag(
        model, X, targets=Y, method="mc", num_samples=2, generator=SEED(0), **options
    )
    for key in exact:
        _unbiased(estimate[key], exact[key][0])
    exact_matrix = torchcurv.per_sample_ggn(model, x, targets=Y[:1], wrt="inputs", **options)
    estimates = torchcurv.per_sample_ggn(
        model, X[:300], targets=Y[:300], wrt="inputs", method="mc", num_samples=3,
        generator=SEED(0), **options,
    )  # fmt: skip
    _unbiased(estimates, exact_matrix[0])


def test_every_path_drawing_the_same_numbers_gives_the_same_estimate() -> None:
    model = mlp()
    X, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))

    def diag(**options: Any) -> Any:
        return torchcurv.per_sample_ggn_diag(
            model, X, loss=F.cross_entropy, targets=y, method="mc", num_samples=4,
            generator=SEED(0), **options,
        )  # fmt: skip

    first = diag()
    assert torchcurv.explain(
        torchcurv.per_sample_ggn_diag, model, X, loss=F.cross_entropy, targets=y,
        method="mc", num_samples=4,
    ).engine == "structured"  # fmt: skip
    for options in [{"mode": "rev-over-rev"}, {"chunk_size": 1}, {"chunk_size": (2, 3)},
                    {"mode": "fwd-over-rev", "chunk_size": (4, 1)}]:  # fmt: skip
        assert_trees_close(diag(**options), first, rtol=0, atol=1e-14)
    matrix = torchcurv.per_sample_ggn(
        model, X, loss=F.cross_entropy, targets=y, method="mc", num_samples=4, generator=SEED(0)
    )
    for name, d in first.items():
        m = matrix[name][name].reshape(6, d[0].numel(), d[0].numel())
        assert_trees_close(m.diagonal(dim1=1, dim2=2).reshape(d.shape), d, rtol=0, atol=1e-14)
    assert_trees_close(diag(), first, rtol=0, atol=0)  # reproducible
    fewer = torchcurv.per_sample_ggn_diag(
        model, X[:2], loss=F.cross_entropy, targets=y[:2], method="mc", num_samples=4,
        generator=SEED(0),
    )  # fmt: skip
    assert_trees_close(fewer, {k: v[:2] for k, v in first.items()}, rtol=0, atol=1e-14)
    other = torchcurv.per_sample_ggn_diag(
        model, X, loss=F.cross_entropy, targets=y, method="mc", num_samples=4, generator=SEED(1)
    )
    assert not torch.equal(other["2.weight"], first["2.weight"])


def test_the_gauss_newton_matrix_of_an_estimate_is_psd_of_rank_at_most_s() -> None:
    model = mlp()
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    G = torchcurv.to_matrix(
        torchcurv.per_sample_ggn(
            model, X, loss=F.cross_entropy, targets=y, method="mc", num_samples=2
        ),
        batch_dims=1,
    )
    eigenvalues = torch.linalg.eigvalsh(G)
    assert (eigenvalues > -1e-12).all()
    assert ((eigenvalues > 1e-10).sum(-1) <= 2).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": lambda out, t: F.cross_entropy(out, t)}, "loss has no sampled curvature"),
        ({"loss": nn.CrossEntropyLoss(weight=torch.ones(3, dtype=D))}, "has class weights"),
        (
            {"loss": functools.partial(F.cross_entropy, label_smoothing=0.1)},
            "functools.partial or a wrapper is not recognised",
        ),
        ({"loss": nn.HuberLoss(), "targets": torch.randn(3, 3, dtype=D)}, "method='exact'"),
        ({"num_samples": None}, "num_samples must be an int >= 1 \\(sampled loss rows"),
        ({"num_samples": 0}, "num_samples must be"),
        ({"method": "hutchinson"}, "method must be one of 'exact', 'mc'"),
        ({"method": "exact"}, "num_samples applies to the estimators only.*method='mc'"),
        (
            {"method": "exact", "num_samples": None, "generator": torch.Generator()},
            "generator applies to the estimators only.*method='mc'",
        ),
        ({"generator": 3}, "generator must be a CPU torch.Generator"),
    ],
)
def test_bad_mc_arguments_are_refused(options: dict[str, Any], message: str) -> None:
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    call = {"loss": F.cross_entropy, "targets": y, "method": "mc", "num_samples": 2, **options}
    for function in (torchcurv.per_sample_ggn, torchcurv.per_sample_ggn_diag):
        with pytest.raises(torchcurv.TorchcurvError, match=f"^{function.__name__}: .*{message}"):
            function(mlp(), X, **call)


def test_cross_entropy_needs_logits_per_sample() -> None:
    model = nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)).to(D)  # one number per sample
    X, y = torch.randn(3, 4, dtype=D), torch.zeros(3)
    with pytest.raises(torchcurv.TorchcurvError, match="needs the module to return logits"):
        torchcurv.per_sample_ggn_diag(
            model, X, loss=F.cross_entropy, targets=y, method="mc", num_samples=2
        )


def test_a_budget_below_the_result_suggests_what_the_function_has() -> None:
    torchcurv.initialize()
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    for function, advice in [
        (torchcurv.per_sample_ggn, "params=, the diagonal: torchcurv.per_sample_ggn_diag"),
        (torchcurv.per_sample_ggn_diag, "params=\\)"),
    ]:
        with pytest.raises(torchcurv.MemoryBudgetError, match=f"ask for less.*{advice}") as info:
            function(mlp(), X, loss=F.cross_entropy, targets=y, memory_budget=64)
        assert "output=" not in str(info.value)
