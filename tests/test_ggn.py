"""Per-sample generalized Gauss-Newton matrices and their diagonals.

Checked in float64 against an independent path: each sample's Jacobian of the module
output and the loss Hessian with respect to that output, both from
`torch.autograd.functional`, multiplied out (``J^T H J``); against the closed forms of
cross-entropy (``H = diag(p) - p p^T``) and MSE; against the full Hessian where the
module is linear in what is differentiated (there the two agree); on an MLP, a CNN, a
residual block, a transformer block and an LSTM; for parameters, inputs and both; over
chunkings and budgets; through ``create_graph=True`` against finite differences.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

import torchcurv
from torchcurv.testing import assert_matches_finite_differences, assert_trees_close

D = torch.float64


def mlp(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, classes)).to(D)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).to(
        D
    )


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.outer(torch.tanh(self.inner(x))))  # type: ignore[no-any-return]


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(1))  # type: ignore[no-any-return]


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])  # type: ignore[no-any-return]


def sine_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss that is not convex in the output: its Hessian is indefinite."""
    return (torch.sin(out) * target).sum()


def _targets(loss: Any, B: int, classes: int) -> torch.Tensor:
    if loss is F.cross_entropy:
        return torch.randint(0, classes, (B,))
    return torch.randn(B, classes, dtype=D)


def reference_ggn(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, loss: Any, wrt: str) -> Any:
    """``[B, N, N]``: ``J^T H J`` per sample, over the inputs then the parameters in
    module order, from `torch.autograd.functional` (one sample at a time)."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    results = []
    for b in range(X.shape[0]):
        x = X[b]

        def output(*flat: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
            if wrt == "inputs":
                x, ps = flat[0], params
            elif wrt == "params":
                ps = list(flat)
            else:
                x, ps = flat[0], list(flat[1:])
            state = dict(zip(names, ps, strict=True))
            return torch.func.functional_call(model, state, (x.unsqueeze(0),))[0]

        point = {"inputs": (x,), "params": tuple(params), "both": (x, *params)}[wrt]
        z = output(*point)
        jacobians = torch.autograd.functional.jacobian(output, point)
        J = torch.cat([j.reshape(z.numel(), -1) for j in jacobians], dim=1)
        H = torch.autograd.functional.hessian(
            lambda o, b=b: loss(o.unsqueeze(0), Y[b].unsqueeze(0)), z
        ).reshape(z.numel(), z.numel())
        results.append(J.T @ H @ J)
    return torch.stack(results)


CASES = [
    ("mlp", mlp, (4,)),
    ("cnn", cnn, (1, 5, 5)),
    ("residual", Residual, (4,)),
    ("transformer", Encoder, (3, 4)),
    ("lstm", Recurrent, (3, 3)),
]


@pytest.mark.parametrize(("name", "make", "shape"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("loss", [F.cross_entropy, F.mse_loss, sine_loss])
@pytest.mark.parametrize("wrt", ["params", "inputs", "both"])
def test_ggn_and_its_diagonal_equal_jt_h_j(
    name: str, make: Any, shape: tuple[int, ...], loss: Any, wrt: str
) -> None:
    model = make().to(D).eval()
    torch.manual_seed(1)
    X = torch.randn(3, *shape, dtype=D)
    Y = _targets(loss, 3, 3)
    expected = reference_ggn(model, X, Y, loss, wrt)
    G = torchcurv.per_sample_ggn(model, X, loss=loss, targets=Y, wrt=wrt)
    assert_trees_close(torchcurv.to_matrix(G, batch_dims=1), expected)
    diagonal = torchcurv.per_sample_ggn_diag(model, X, loss=loss, targets=Y, wrt=wrt)
    flat = torch.cat([leaf.reshape(3, -1) for leaf in tree_leaves(diagonal)], 1)
    assert_trees_close(flat, expected.diagonal(dim1=1, dim2=2))
    if loss is not sine_loss:  # convex losses: positive semi-definite
        assert float(torch.linalg.eigvalsh(expected).min()) > -1e-12


def test_cross_entropy_has_the_closed_form_loss_hessian() -> None:
    """For a linear model ``z = W x + b`` the parameter Jacobian is known: the weight
    block of ``G`` is ``(diag(p) - p p^T) kron x x^T``."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D)
    X, y = torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,))
    G = torchcurv.per_sample_ggn(model, X, loss=F.cross_entropy, targets=y)
    p = model(X).softmax(-1).detach()
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    expected = torch.einsum("bij,bk,bl->bikjl", H, X, X)
    assert_trees_close(G["weight"]["weight"], expected)
    assert_trees_close(G["bias"]["bias"], H)


@pytest.mark.parametrize("loss", [F.cross_entropy, F.mse_loss, sine_loss])
def test_a_module_linear_in_what_is_differentiated_has_its_hessian_as_ggn(loss: Any) -> None:
    """The Gauss-Newton matrix drops only the module's own second derivatives: for a
    linear layer's parameters (and a linear map of the inputs) it is the Hessian."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D)
    X = torch.randn(5, 4, dtype=D)
    Y = _targets(loss, 5, 3)
    for wrt in ("params", "inputs"):
        G = torchcurv.per_sample_ggn(model, X, loss=loss, targets=Y, wrt=wrt)
        H = torchcurv.per_sample_hessian(model, X, loss=loss, targets=Y, wrt=wrt)
        assert_trees_close(G, H)


@pytest.mark.parametrize("chunk_size", [None, 1, (2, 1), (None, 2), "auto"], ids=lambda c: repr(c))
def test_chunking_and_budgets_change_nothing(chunk_size: Any) -> None:
    model = mlp(classes=5)
    X, y = torch.randn(7, 4, dtype=D), torch.randint(0, 5, (7,))
    whole = torchcurv.per_sample_ggn(model, X, loss=F.cross_entropy, targets=y, chunk_size=None)
    G = torchcurv.per_sample_ggn(model, X, loss=F.cross_entropy, targets=y, chunk_size=chunk_size)
    assert_trees_close(G, whole)
    d = torchcurv.per_sample_ggn_diag(
        model, X, loss=F.cross_entropy, targets=y, chunk_size=chunk_size
    )
    assert_trees_close(
        d,
        {
            n: torch.diagonal(
                whole[n][n].reshape(7, p.numel(), p.numel()), dim1=1, dim2=2
            ).reshape(7, *p.shape)
            for n, p in model.named_parameters()
        },
    )
    small = torchcurv.per_sample_ggn_diag(
        model, X, loss=F.cross_entropy, targets=y, memory_budget="64KiB"
    )
    assert_trees_close(small, d)


def test_explain_shows_the_output_axis_and_a_parameter_subset() -> None:
    model = mlp(classes=5)
    X, y = torch.randn(4, 4, dtype=D), torch.randint(0, 5, (4,))
    decision = torchcurv.explain(
        torchcurv.per_sample_ggn_diag, model, X, loss=F.cross_entropy, targets=y
    )
    assert decision.engine == "structured"  # the default: wrt='params', as the function's
    decision = torchcurv.explain(
        torchcurv.per_sample_ggn, model, X, loss=F.cross_entropy, targets=y
    )
    assert decision.basis_sizes == (5,)
    assert "Gauss-Newton" in decision.why_engine
    d = torchcurv.per_sample_ggn_diag(model, X, loss=F.cross_entropy, targets=y, params="2.*")
    assert set(d) == {"2.weight", "2.bias"}
    full = torchcurv.per_sample_ggn_diag(model, X, loss=F.cross_entropy, targets=y)
    assert_trees_close(d, {n: full[n] for n in d})


@pytest.mark.parametrize("public", [torchcurv.per_sample_ggn, torchcurv.per_sample_ggn_diag])
def test_gradients_match_finite_differences(public: Any) -> None:
    model = mlp()
    weight = model[2].weight
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    torch.manual_seed(2)
    mix = {n: torch.randn(3, *p.shape, dtype=D) for n, p in model.named_parameters()}

    def value(X: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        out = public(model, X, loss=F.cross_entropy, targets=y, create_graph=create_graph)
        if public is torchcurv.per_sample_ggn:
            out = {n: out[n][n].reshape(3, mix[n].numel() // 3, -1).sum(-1) for n in out}
        return sum((out[n].reshape(3, -1) * mix[n].reshape(3, -1)).sum() for n in out)  # type: ignore[return-value]

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
    model = mlp().train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    torchcurv.per_sample_ggn(model, X, loss=F.cross_entropy, targets=y)
    assert model.training
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


class LogSoftmaxModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3).to(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.linear(x), dim=-1)


class Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3).to(D)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (LogSoftmaxModel, {"loss": F.nll_loss}, "Gauss-Newton matrix of that split is zero"),
        (LogSoftmaxModel, {"loss": nn.NLLLoss()}, "move the final log_softmax into the loss"),
        (mlp, {"loss": None}, "loss must be given"),
        (mlp, {"loss": None, "targets": None}, "loss is required"),
        (Pair, {"loss": lambda out, t: F.cross_entropy(out[0], t)}, "must return one tensor"),
    ],
)
def test_splits_it_cannot_make_are_refused(make: Any, options: Any, message: str) -> None:
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    with pytest.raises(torchcurv.TorchcurvError, match=f"(?i){message}"):
        torchcurv.per_sample_ggn_diag(make(), X, **{"targets": y, **options})


def test_the_diagonal_sums_to_the_trace() -> None:
    model = cnn()
    X, y = torch.randn(2, 1, 5, 5, dtype=D), torch.randint(0, 3, (2,))
    G = torchcurv.to_matrix(
        torchcurv.per_sample_ggn(model, X, loss=F.cross_entropy, targets=y), batch_dims=1
    )
    d = torchcurv.per_sample_ggn_diag(model, X, loss=F.cross_entropy, targets=y)
    total = sum(leaf.reshape(2, -1).sum(1) for leaf in d.values())
    assert_trees_close(total, G.diagonal(dim1=1, dim2=2).sum(1))
    assert math.isclose(float(G.diagonal(dim1=1, dim2=2).sum()), float(sum(total)), rel_tol=1e-12)


def test_modes_are_those_of_the_loss_hessian() -> None:
    model = mlp()
    X, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    reference = torchcurv.per_sample_ggn_diag(model, X, loss=F.cross_entropy, targets=y)
    for mode in ("fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd", "structured"):
        got = torchcurv.per_sample_ggn_diag(model, X, loss=F.cross_entropy, targets=y, mode=mode)
        assert_trees_close(got, reference)
    with pytest.raises(torchcurv.UnsupportedModuleError, match="whole Gauss-Newton matrices"):
        torchcurv.per_sample_ggn(model, X, loss=F.cross_entropy, targets=y, mode="structured")
