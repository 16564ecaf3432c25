"""Taylor mode (``mode="taylor"``): per-sample Laplacians and input-Hessian diagonals
from one forward of jets.

Checked in float64 against the exact Hessian-vector-product path (``rev-over-rev``,
itself checked against the loop oracle elsewhere) and closed forms, on MLPs of every
activation it derives, a residual block with products, sums of constants,
concatenations and scalings, CNNs, a transformer block, attention with layer norm, and
attention written out with quotients and powers; with coordinates, weights, output selections and
vector outputs; gradients through it (``create_graph=True``) against autograd's double
backward; where it has no rule, ``explain`` says which op and the other engines answer.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcurv
from torchcurv.testing import assert_trees_close

D = torch.float64


class Mixed(nn.Module):
    """A residual branch with a product of two jets, scalings, a constant added, a
    concatenation with a constant, slicing and an elementwise method."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 6), nn.Linear(6, 5), nn.Linear(5, 2)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        gate = torch.sigmoid(self.a(x)).sum(-1, keepdim=True)
        y = x + self.b(h) * gate - self.shift / 2
        wide = torch.cat([y, 2.0 * y + 1.0, self.shift.expand_as(y)], dim=-1)
        return self.head(wide[..., 3:8]).sin() * 0.5 + F.softplus(x[..., :2])


class Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(F.gelu(self.conv(x))).flatten(1))  # type: ignore[no-any-return]


class Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean(1))  # type: ignore[no-any-return]


class AttentionNorm(nn.Module):
    """Attention (a module returning a tuple), a residual layer norm with a weight
    (whose second derivatives torch.func gets wrong), log-softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x + self.attn(x, x, x)[0])
        return F.log_softmax(self.head(h), dim=-1).sum(1)


class ByHand(nn.Module):
    """Attention written out (a matmul of two jets, softmax), a quotient of jets, a
    power, a logarithm, an absolute value."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 2.0, dim=-1)
        energy = (weights @ x).pow(2).sum((-1, -2))
        ratio = energy / (1.0 + x.pow(2).sum((-1, -2)))
        return torch.stack([ratio, torch.log(1 + x.abs().sum((-1, -2)))], dim=-1)


class Norms(nn.Module):
    """Layer and RMS norms (functions and modules, with and without their affine maps),
    softmax and log-softmax in their several spellings, a quotient of jets: the
    composed rules."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(4, 6), nn.Linear(6, 2)
        self.norm, self.plain = nn.LayerNorm(6), nn.LayerNorm(6, elementwise_affine=False)
        self.rms = nn.RMSNorm(6)
        self.w, self.b = nn.Parameter(torch.rand(6) + 0.5), nn.Parameter(torch.randn(6))
        self.soft, self.log_soft = nn.Softmax(dim=1), nn.LogSoftmax(-1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.rms.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.norm(torch.tanh(h)) + F.layer_norm(h, (6,), self.w, self.b, 1e-3)
        h = self.rms(h) * F.rms_norm(self.plain(h), [6])
        p = h.softmax(-1) + self.soft(h) + F.log_softmax(h, dim=2)
        return self.head(p + self.log_soft(h / (2.0 + h.pow(2)))).sum(1)  # type: ignore[no-any-return]


def _mlp(act: nn.Module, out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, out))


CASES = {
    "tanh": (lambda: _mlp(nn.Tanh()), (5,)),
    "gelu": (lambda: _mlp(nn.GELU()), (5,)),
    "silu-one-output": (lambda: _mlp(nn.SiLU(), 1), (5,)),
    "softplus": (lambda: _mlp(nn.Softplus(beta=2.0)), (5,)),
    "elu": (lambda: _mlp(nn.ELU()), (5,)),
    "relu": (lambda: _mlp(nn.ReLU()), (5,)),
    "mixed": (Mixed, (5,)),
    "cnn": (Cnn, (1, 4, 4)),
    "conv-transpose": (
        lambda: nn.Sequential(
            nn.ConvTranspose2d(1, 2, 3, stride=2, padding=1), nn.Tanh(),
            nn.ConvTranspose2d(2, 1, 2), nn.Flatten(), nn.Linear(16, 2),
        ),
        (1, 2, 2),
    ),
    "elementwise-zoo": (
        lambda: nn.Sequential(
            nn.Linear(5, 6), nn.CELU(), nn.Linear(6, 6), nn.SELU(), nn.Linear(6, 6),
            nn.Softsign(), nn.Linear(6, 6), nn.Hardswish(), nn.Linear(6, 6), nn.Hardshrink(0.05),
            nn.Linear(6, 6), nn.Softshrink(0.1), nn.Linear(6, 2),
        ),
        (5,),
    ),
    "transformer": (Transformer, (3, 4)),
    "attention-layer-norm": (AttentionNorm, (3, 4)),
    "attention-by-hand": (ByHand, (3, 4)),
    "norms-softmax": (Norms, (3, 4)),
    "cnn-maxpool": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8, 3),
        ),
        (1, 4, 4),
    ),
}  # fmt: skip


def _case(name: str, batch: int = 3) -> tuple[nn.Module, torch.Tensor]:
    make, shape = CASES[name]
    torch.manual_seed(0)
    return make().to(D).eval(), torch.randn(batch, *shape, dtype=D)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(
    "options",
    [{}, {"output": 0}, {"output": 1, "coordinates": [0, 3], "weights": [2.0, -0.5]}],
    ids=["all-outputs", "output-0", "coordinates-weights"],
)
def test_laplacians_equal_the_hessian_vector_products(name: str, options: Any) -> None:
    model, X = _case(name)
    if options.get("output") == 1 and model(X).shape[-1] == 1:
        options = {**options, "output": 0}
    decision = torchcurv.explain(torchcurv.per_sample_laplacian, model, X, mode="taylor",
                                 **options)  # fmt: skip
    assert decision.engine == "taylor"
    got = torchcurv.per_sample_laplacian(model, X, mode="taylor", **options)
    expected = torchcurv.per_sample_laplacian(model, X, mode="rev-over-rev", **options)
    assert got.shape == expected.shape
    assert_trees_close(got, expected)


@pytest.mark.parametrize("name", CASES)
def test_hessian_diagonals_equal_the_hessian_vector_products(name: str) -> None:
    model, X = _case(name)
    got = torchcurv.per_sample_hessian_diag(model, X, mode="taylor")
    expected = torchcurv.per_sample_hessian_diag(model, X, mode="rev-over-rev")
    assert got.shape == expected.shape
    assert_trees_close(got, expected)
    whole = torchcurv.per_sample_hessian(model, X, mode="rev-over-rev", output=0)
    matrix = torchcurv.to_matrix(whole, batch_dims=1)
    assert_trees_close(got[:, 0].flatten(1), matrix.diagonal(dim1=1, dim2=2))


class Closed(nn.Module):
    """``sum(sin(x)) + (x . x) * x_0``: Laplacian ``-sum(sin x) + 6 x_0`` (from the
    product: ``2 n x_0`` has ``d^2/dx_0^2 (x . x) x_0 = 6 x_0``, the others ``2 x_0``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x).sum(-1) + (x * x).sum(-1) * x[..., 0]


def test_closed_forms() -> None:
    X = torch.randn(4, 3, dtype=D)
    got = torchcurv.per_sample_laplacian(Closed(), X, mode="taylor")
    n = X.shape[1]
    expected = -torch.sin(X).sum(-1) + (6 + 2 * (n - 1)) * X[:, 0]
    assert_trees_close(got, expected)
    # an output that does not depend on the input has zero curvature
    constant = nn.Sequential(nn.Linear(3, 2)).to(D)
    assert float(torchcurv.per_sample_laplacian(constant, X, mode="taylor").abs().max()) == 0.0


def test_gradients_through_the_laplacian_equal_double_backward() -> None:
    model, X = _case("mixed")

    def grads(mode: str) -> tuple[torch.Tensor, ...]:
        L = torchcurv.per_sample_laplacian(model, X, output=0, mode=mode, create_graph=True)
        return torch.autograd.grad(L.pow(2).sum(), tuple(model.parameters()))

    for got, expected in zip(grads("taylor"), grads("rev-over-rev"), strict=True):
        assert_trees_close(got, expected)
    plain = torchcurv.per_sample_laplacian(model, X, output=0, mode="taylor")
    assert not plain.requires_grad


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0].sum((-1, -2))  # type: ignore[no-any-return]


class Padded(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.pad(x, (1, 1))).sum(-1)


@pytest.mark.parametrize(
    ("make", "shape", "options", "why"),
    [
        (Recurrent, (3, 4), {}, "no rule for lstm (LSTM)"),
        (Padded, (4,), {}, "no rule for pad"),
        (lambda: _mlp(nn.Tanh()), (5,), {"loss": F.cross_entropy, "targets": "classes"},
         "a loss is not traced"),
    ],
)  # fmt: skip
def test_where_it_has_no_rule_explain_says_which_and_auto_answers(
    make: Any, shape: Any, options: Any, why: str
) -> None:
    torch.manual_seed(0)
    model = make().to(D).eval()
    X = torch.randn(3, *shape, dtype=D)
    if options.get("targets") == "classes":
        options = {**options, "targets": torch.randint(0, 3, (3,))}
    refused = f"mode='taylor' cannot.*{re.escape(why)}"
    with pytest.raises(torchcurv.UnsupportedModuleError, match=refused):
        torchcurv.per_sample_laplacian(model, X, mode="taylor", **options)
    got = torchcurv.per_sample_laplacian(model, X, **options)
    assert_trees_close(got, torchcurv.per_sample_laplacian(model, X, mode="rev-over-rev",
                                                           **options))  # fmt: skip


def test_other_quantities_refuse_the_mode() -> None:
    model, X = _case("tanh")
    with pytest.raises(torchcurv.TorchcurvError, match="per_sample_hessian: mode"):
        torchcurv.per_sample_hessian(model, X, mode="taylor")
    with pytest.raises(torchcurv.UnsupportedModuleError, match="wrt='inputs'"):
        torchcurv.per_sample_hessian_diag(model, X, mode="taylor", wrt="params", output=0)
    with pytest.raises(torchcurv.UnsupportedModuleError, match="unweighted traces"):
        torchcurv.per_sample_laplacian(model, X, mode="taylor", method="hutchinson",
                                       num_samples=3, weights=[1.0] * 5)  # fmt: skip
    with pytest.raises(torchcurv.UnsupportedModuleError, match="unweighted traces"):
        torchcurv.per_sample_hessian_diag(model, X, mode="taylor", method="hutchinson",
                                          num_samples=3)  # fmt: skip
    with pytest.raises(torchcurv.UnsupportedModuleError, match="not a hutch\\+\\+ estimate"):
        torchcurv.per_sample_laplacian(model, X, mode="taylor", method="hutch++",
                                       num_samples=3, output=0)  # fmt: skip


def test_the_module_is_left_as_it_was() -> None:
    model, X = _case("mixed")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torchcurv.per_sample_laplacian(model, X, mode="taylor", create_graph=True)
    torchcurv.per_sample_hessian_diag(model, X, mode="taylor")
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize(
    ("name", "engine", "why"),
    [
        ("mixed", "taylor", "Taylor mode applies and is predicted faster"),
        ("cnn-maxpool", "taylor", "Taylor mode applies and is predicted faster"),
        ("attention-by-hand", "taylor", "Taylor mode applies and is predicted faster"),
        ("norms-softmax", "taylor", "Taylor mode applies and is predicted faster"),
        ("transformer", None, "Taylor mode applies but is predicted slower"),
        ("attention-layer-norm", None, "Taylor mode applies but is predicted slower"),
    ],
)
def test_auto_takes_it_where_every_op_has_a_cheap_rule(name: str, engine: Any, why: str) -> None:
    """Softmax, norms, products of matrices and quotients have rules composed of the
    cheap ones; a smooth op's nested products per direction (attention modules) cost
    what the Hessian-vector products cost: there ``"auto"`` keeps the generic engine."""
    model, X = _case(name)
    decision = torchcurv.explain(torchcurv.per_sample_laplacian, model, X, output=0)
    assert why in decision.why_engine
    assert decision.engine == engine if engine else decision.engine != "taylor"
    assert_trees_close(
        torchcurv.per_sample_laplacian(model, X, output=0),
        torchcurv.per_sample_laplacian(model, X, output=0, mode="rev-over-rev"),
    )


@pytest.mark.parametrize("name", ["cnn", "mixed", "transformer"])
@pytest.mark.parametrize(
    "options", [{}, {"output": 0}, {"output": 1, "coordinates": [0, 2]}],
    ids=["all-outputs", "output-0", "coordinates"],
)  # fmt: skip
def test_hutchinson_traces_equal_those_of_the_hessian_vector_products(
    name: str, options: Any
) -> None:
    """The same probes from the same seeds: ``v^T H v`` per probe, to rounding."""
    model, X = _case(name)

    def estimate(mode: str, **extra: Any) -> torch.Tensor:
        return torchcurv.per_sample_laplacian(  # type: ignore[no-any-return]
            model, X, mode=mode, method="hutchinson", num_samples=5,
            generator=torch.Generator().manual_seed(7), **options, **extra,
        )  # fmt: skip

    got = estimate("taylor")
    assert_trees_close(got, estimate("fwd-over-rev"))
    assert_trees_close(estimate("taylor", chunk_size=1), got, rtol=0, atol=1e-14)

    def gradients(mode: str) -> tuple[torch.Tensor, ...]:
        total = estimate(mode, create_graph=True).sum()
        return torch.autograd.grad(  # the head's bias does not reach a second derivative
            total, tuple(model.parameters()), allow_unused=True, materialize_grads=True
        )

    for g, e in zip(gradients("taylor"), gradients("rev-over-rev"), strict=True):
        assert_trees_close(g, e)


class Reshaping(nn.Module):
    """Shapes read from the input, flips, cumulative sums, batched transposes, and a
    tuple output."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.linear(x.reshape(x.shape[0], 8)))
        h = h.view(x.size(0), 2, 4).flip(-1).cumsum(-1).mT.mT
        return (F.celu(h) * torch.clamp(h, -0.5, 0.5)).sum((1, 2)), x


def test_shapes_read_from_the_input_and_tuple_outputs() -> None:
    torch.manual_seed(0)
    model, X = Reshaping().to(D), torch.randn(3, 2, 4, dtype=D)
    options: dict[str, Any] = {"output": lambda out: out[0]}
    assert torchcurv.explain(torchcurv.per_sample_laplacian, model, X, **options).engine == (
        "taylor"
    )
    got = torchcurv.per_sample_laplacian(model, X, mode="taylor", **options)
    assert_trees_close(got, torchcurv.per_sample_laplacian(model, X, mode="rev-over-rev",
                                                           **options))  # fmt: skip


def test_chunks_of_directions_and_budgets_change_nothing() -> None:
    """The outer axis runs over the directions: a Laplacian adds its chunks' sums, a
    diagonal concatenates their entries; a tight budget chunks them."""
    model, X = _case("cnn")
    options: dict[str, Any] = {"output": 1, "coordinates": [0, 3, 7, 9, 11],
                               "weights": [1.0, 2.0, -1.0, 0.5, 3.0]}  # fmt: skip
    whole = torchcurv.per_sample_laplacian(model, X, mode="taylor", **options)
    diagonal = torchcurv.per_sample_hessian_diag(model, X, mode="taylor")
    for chunk in [(None, 1, 2), (1, 1, 3), 2, (None, None, 16)]:
        got = torchcurv.per_sample_laplacian(model, X, mode="taylor", chunk_size=chunk, **options)
        assert_trees_close(got, whole, rtol=0, atol=1e-14)
        assert_trees_close(
            torchcurv.per_sample_hessian_diag(model, X, mode="taylor", chunk_size=chunk),
            diagonal, rtol=0, atol=1e-14,
        )  # fmt: skip
    torchcurv.initialize()
    budget = 12_000
    decision = torchcurv.explain(
        torchcurv.per_sample_laplacian, model, X, mode="taylor", memory_budget=budget, output=0
    )
    assert decision.basis_chunks[1] < 16  # the 16 directions in chunks
    tight = torchcurv.per_sample_laplacian(model, X, mode="taylor", memory_budget=budget, output=0)
    assert_trees_close(tight, torchcurv.per_sample_laplacian(model, X, mode="taylor", output=0))
