"""Tests for the structured (Hessian-backpropagation) per-sample input Hessians."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torchcurv.engines.structured as structured_module
from torchcurv._errors import UnsupportedModuleError
from torchcurv.engines.structured import (
    prefer_structured,
    structured_cost,
    structured_input_hessian,
    unsupported_layer,
)

DTYPE = torch.float64
Output = int | slice | None
LossFn = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def _per_sample(net: nn.Module, output: Output) -> Callable[[Tensor], Tensor]:
    """The per-sample function whose Hessian `structured_input_hessian` computes."""

    def f(xi: Tensor) -> Tensor:
        out = net(xi.unsqueeze(0)).squeeze(0).reshape(-1)
        if output is None:
            return out.reshape(()) if out.numel() == 1 else out
        return out[output]

    return f


def _per_sample_loss(net: nn.Module, loss: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    def f(xi: Tensor, ti: Tensor) -> Tensor:
        return loss(net(xi.unsqueeze(0)), ti.unsqueeze(0))

    return f


def reference_vmap(
    net: nn.Module,
    x: Tensor,
    output: Output = None,
    loss: LossFn | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """`torch.vmap(torch.func.hessian(f))(x)` with the per-sample function."""
    if loss is not None:
        assert targets is not None
        return torch.vmap(torch.func.hessian(_per_sample_loss(net, loss)))(x, targets)
    return torch.vmap(torch.func.hessian(_per_sample(net, output)))(x)


def reference_loop(
    net: nn.Module,
    x: Tensor,
    output: Output = None,
    loss: LossFn | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """A plain Python loop of `torch.autograd.functional.hessian`, one scalar at a time."""
    results = []
    for i in range(x.shape[0]):
        xi = x[i]
        if loss is not None:
            assert targets is not None
            ti = targets[i]
            fl = _per_sample_loss(net, loss)
            results.append(torch.autograd.functional.hessian(lambda v, t=ti, fl=fl: fl(v, t), xi))
            continue
        f = _per_sample(net, output)
        out = f(xi)
        if out.dim() == 0:
            results.append(torch.autograd.functional.hessian(f, xi))
        else:
            per_out = [
                torch.autograd.functional.hessian(lambda v, k=k, f=f: f(v)[k], xi)
                for k in range(out.numel())
            ]
            results.append(torch.stack(per_out))
    return torch.stack(results)


@contextmanager
def reduction(mode: str) -> Iterator[None]:
    """Force the affine-prefix reduction on ("always") or off ("never"), or leave it ("auto")."""
    if mode == "auto":
        yield
        return

    def plan(
        ops: Sequence[Any], shapes: Any, bsz: float, m: float
    ) -> tuple[int, dict[str, float]]:
        p = next((i for i, o in enumerate(ops) if type(o).__name__ == "_Act"), len(ops))
        has_linear = any(type(o).__name__ == "_Linear" for o in ops[:p])
        return (p if mode == "always" and has_linear else 0), {}

    with mock.patch.object(structured_module, "_plan", plan):
        yield


def check(
    net: nn.Module,
    x: Tensor,
    output: Output = None,
    loss: LossFn | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """Compare against both references with default float64 tolerances; return H."""
    h = structured_input_hessian(net, x, output=output, loss=loss, targets=targets)
    assert h.dtype == x.dtype
    assert h.device == x.device
    torch.testing.assert_close(h, reference_vmap(net, x, output, loss, targets))
    torch.testing.assert_close(h, reference_loop(net, x, output, loss, targets))
    return h


# --------------------------------------------------------------------------------------------
# Random networks
# --------------------------------------------------------------------------------------------


def _activation() -> st.SearchStrategy[nn.Module]:
    floats = st.floats
    return st.one_of(
        st.just(nn.Tanh()),
        st.just(nn.Sigmoid()),
        st.builds(
            nn.Softplus,
            beta=floats(0.5, 3.0),
            threshold=st.sampled_from([0.5, 1.0, 2.0, 20.0]),
        ),
        st.builds(nn.GELU, approximate=st.sampled_from(["none", "tanh"])),
        st.just(nn.SiLU()),
        st.just(nn.ReLU()),
        st.builds(nn.LeakyReLU, negative_slope=floats(-0.5, 0.5)),
        st.builds(nn.ELU, alpha=floats(0.1, 2.0)),
    )


def _neutral() -> st.SearchStrategy[nn.Module]:
    return st.sampled_from(["identity", "dropout0", "dropout_eval"]).map(
        lambda k: (
            nn.Identity()
            if k == "identity"
            else nn.Dropout(0.0)
            if k == "dropout0"
            else nn.Dropout(0.5).eval()
        )
    )


@st.composite
def networks(draw: st.DrawFn, max_out: int = 8) -> tuple[nn.Module, int, int]:
    """A random (possibly nested) Sequential of Linear layers and activations."""
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 8)) for _ in range(depth)]
    widths.append(draw(st.integers(1, max_out)))
    layers: list[nn.Module] = []
    if draw(st.booleans()):
        layers.append(draw(_activation()))
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans())))
        if i < depth - 1 or draw(st.booleans()):
            for _ in range(draw(st.integers(1, 2))):
                layers.append(draw(_activation()))
        if draw(st.integers(0, 4)) == 0:
            layers.append(draw(_neutral()))
    if len(layers) > 2 and draw(st.booleans()):  # nest a chunk
        a = draw(st.integers(0, len(layers) - 2))
        b = draw(st.integers(a + 1, len(layers)))
        layers[a:b] = [nn.Sequential(*layers[a:b])]
    net = nn.Sequential(*layers).to(DTYPE)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p.shape[-1] if p.dim() == 2 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE) * 1.5 / fan_in**0.5)
    return net, widths[0], widths[-1]


def _inputs(seed: int, batch: int, n: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=gen, dtype=DTYPE) * 1.5


# --------------------------------------------------------------------------------------------
# Property tests against torch.func / torch.autograd
# --------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(data=st.data())
def test_matches_references_outputs(data: st.DataObject) -> None:
    net, n, m = data.draw(networks())
    mode = data.draw(st.sampled_from(["auto", "always", "never"]))
    batch = data.draw(st.integers(1, 4))
    x = _inputs(data.draw(st.integers(0, 2**31 - 1)), batch, n)
    output = data.draw(
        st.one_of(
            st.none(),
            st.integers(-m, m - 1),
            st.tuples(st.integers(-m, m - 1), st.integers(1, m)).map(
                lambda t: slice(t[0] % m, None, t[1])
            ),
        )
    )
    with reduction(mode):
        h = check(net, x, output)
    selects_scalar = isinstance(output, int) or (output is None and m == 1)
    if selects_scalar:
        assert h.shape == (batch, n, n)
    else:
        assert h.shape[0] == batch
        assert h.shape[2:] == (n, n)


@settings(deadline=None)
@given(data=st.data())
def test_matches_references_losses(data: st.DataObject) -> None:
    net, n, m = data.draw(networks(max_out=5))
    mode = data.draw(st.sampled_from(["auto", "always", "never"]))
    batch = data.draw(st.integers(1, 4))
    x = _inputs(data.draw(st.integers(0, 2**31 - 1)), batch, n)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    kind = data.draw(st.sampled_from(["ce_index", "ce_prob", "mse"]))
    if kind == "ce_index":
        loss, targets = F.cross_entropy, torch.randint(0, m, (batch,), generator=gen)
    elif kind == "ce_prob":
        # unnormalised probabilities exercise the sum(t) factor of the CE curvature
        targets = torch.rand(batch, m, generator=gen, dtype=DTYPE)
        loss = F.cross_entropy
    else:
        loss, targets = F.mse_loss, torch.randn(batch, m, generator=gen, dtype=DTYPE)
    with reduction(mode):
        h = check(net, x, loss=loss, targets=targets)
    assert h.shape == (batch, n, n)


def test_deep_wide_stack_and_all_outputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 8),
        nn.Tanh(),
        nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 7), nn.SiLU())),
        nn.Linear(7, 3),
        nn.Softplus(),
    ).to(DTYPE)
    x = torch.randn(6, 5, dtype=DTYPE)
    h = check(net, x)
    assert h.shape == (6, 3, 5, 5)
    torch.testing.assert_close(check(net, x, output=-1), h[:, 2])
    torch.testing.assert_close(check(net, x, output=slice(0, 2)), h[:, :2])


def test_multidim_features_flatten_unflatten() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Sigmoid(),
        nn.Linear(3, 4),  # acts on the last per-sample dim
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.ELU(),
        nn.Unflatten(1, (2, 3)),
        nn.Linear(3, 2),
        nn.GELU(approximate="tanh"),
    ).to(DTYPE)
    x = torch.randn(3, 2, 3, dtype=DTYPE)
    h = structured_input_hessian(net, x)
    assert h.shape == (3, 4, 2, 3, 2, 3)
    torch.testing.assert_close(h, reference_vmap(net, x).reshape(h.shape))
    h0 = structured_input_hessian(net, x, output=0)
    assert h0.shape == (3, 2, 3, 2, 3)
    torch.testing.assert_close(h0, h[:, 0])
    targets = torch.randn(3, 2, 2, dtype=DTYPE)
    h_mse = structured_input_hessian(net, x, loss=F.mse_loss, targets=targets)
    torch.testing.assert_close(h_mse, reference_vmap(net, x, loss=F.mse_loss, targets=targets))


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_affine_prefix_reduction(mode: str) -> None:
    """Wide inputs into a narrow first layer: H = A^T H_a0 A through the affine prefix."""
    torch.manual_seed(9)
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(24, 6),
        nn.Unflatten(1, (2, 3)),
        nn.Linear(3, 2),
        nn.Flatten(),
        nn.Softplus(),
        nn.Linear(4, 3),
        nn.Tanh(),
        nn.Linear(3, 2),
    ).to(DTYPE)
    x = torch.randn(5, 4, 6, dtype=DTYPE)
    ops = structured_module._parse(net)
    assert not isinstance(ops, str)
    shapes = structured_module._shapes(ops, (4, 6))
    assert structured_module._plan(ops, shapes, 512.0, 2.0)[0] == 5  # chosen when it pays
    with reduction(mode):
        h = structured_input_hessian(net, x)
        h_ce = structured_input_hessian(net, x, loss=F.cross_entropy, targets=torch.ones(5).long())
    assert h.shape == (5, 2, 4, 6, 4, 6)
    torch.testing.assert_close(h, reference_vmap(net, x).reshape(h.shape))
    ref_ce = reference_vmap(net, x, loss=F.cross_entropy, targets=torch.ones(5).long())
    torch.testing.assert_close(h_ce, ref_ce)


def test_flatten_first_layer() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    x = torch.randn(2, 2, 3, dtype=DTYPE)
    h = structured_input_hessian(net, x)
    assert h.shape == (2, 2, 3, 2, 3)
    torch.testing.assert_close(h, reference_vmap(net, x))


def test_single_layers_and_activation_only() -> None:
    x = torch.randn(4, 3, dtype=DTYPE)
    lin = nn.Linear(3, 1).to(DTYPE)
    h = structured_input_hessian(lin, x)
    assert torch.equal(h, torch.zeros(4, 3, 3, dtype=DTYPE))
    h = check(nn.Tanh(), x)
    assert h.shape == (4, 3, 3, 3)
    check(nn.Sequential(nn.Identity()), x, output=1)


def test_mse_with_plain_linear_is_exact_output_term() -> None:
    lin = nn.Linear(3, 2).to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE)
    h = check(lin, x, loss=F.mse_loss, targets=torch.randn(4, 2, dtype=DTYPE))
    w = lin.weight.detach()
    torch.testing.assert_close(h, (w.T @ w).expand(4, 3, 3))


def test_differentiable_wrt_input() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2), nn.Softplus()).to(DTYPE)
    x = torch.randn(2, 2, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: structured_input_hessian(net, v), (x,))
    targets = torch.tensor([0, 1])
    assert torch.autograd.gradcheck(
        lambda v: structured_input_hessian(net, v, loss=F.cross_entropy, targets=targets), (x,)
    )


# --------------------------------------------------------------------------------------------
# Piecewise-linear activations and activation edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "act", [nn.ReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(-0.3)], ids=["relu", "leaky", "leaky-neg"]
)
def test_piecewise_linear_exact_zeros(act: nn.Module) -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 5), act, nn.Linear(5, 3)).to(DTYPE)
    x = torch.randn(7, 4, dtype=DTYPE)
    h = structured_input_hessian(net, x)
    assert h.shape == (7, 3, 4, 4)
    assert torch.equal(h, torch.zeros_like(h))
    assert torch.equal(torch.vmap(torch.func.hessian(_per_sample(net, None)))(x), h)


@pytest.mark.parametrize("kind", ["ce_index", "ce_prob", "mse"])
def test_relu_loss_hessian_is_output_term(kind: str) -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.LeakyReLU()).to(DTYPE)
    x = torch.randn(5, 4, dtype=DTYPE)
    jac = torch.vmap(torch.func.jacrev(_per_sample(net, None)))(x)  # [B, 3, 4]
    out = net(x).detach()
    if kind == "mse":
        loss: LossFn = F.mse_loss
        targets = torch.randn(5, 3, dtype=DTYPE)
        curv = (2.0 / 3) * torch.eye(3, dtype=DTYPE).expand(5, 3, 3)
    else:
        loss = F.cross_entropy
        p = torch.softmax(out, dim=-1)
        targets = torch.randint(0, 3, (5,)) if kind == "ce_index" else torch.rand(5, 3).to(DTYPE)
        scale = torch.ones(5, dtype=DTYPE) if kind == "ce_index" else targets.sum(-1)
        curv = scale[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    h = check(net, x, loss=loss, targets=targets)
    torch.testing.assert_close(h, jac.transpose(1, 2) @ curv @ jac)


@pytest.mark.parametrize(("beta", "threshold"), [(2.0, 1.0), (1.0, 20.0), (0.5, 3.0)])
def test_softplus_threshold_region_exact(beta: float, threshold: float) -> None:
    z0 = threshold / beta  # exactly representable for these parameters
    zs = torch.tensor(
        [z0 - 1.0, z0 - 1e-3, z0, z0 + 1e-9, z0 + 1e-3, z0 + 2.0, -1.0], dtype=DTYPE
    ).unsqueeze(1)
    # First softplus sees z = x exactly; the second one sees the first's output.
    net = nn.Sequential(
        nn.Linear(1, 1, bias=False),
        nn.Softplus(beta, threshold),
        nn.Linear(1, 2),
        nn.Softplus(beta, threshold),
        nn.Linear(2, 1),
    ).to(DTYPE)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    h = check(net, zs)
    # single softplus: zero curvature exactly where torch's autograd says so (beta*z >= thr)
    single = nn.Sequential(nn.Softplus(beta, threshold)).to(DTYPE)
    hs = check(single, zs)
    linear_region = (zs[:, 0] * beta) >= threshold
    assert torch.equal(hs[linear_region], torch.zeros_like(hs[linear_region]))
    assert bool((hs[~linear_region] > 0).all())
    assert h.shape == (7, 1, 1)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_closed_form(approximate: str) -> None:
    z = torch.linspace(-6, 6, 61, dtype=DTYPE).unsqueeze(1)
    h = check(nn.GELU(approximate=approximate), z)
    zz = z[:, 0].clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(F.gelu(zz, approximate=approximate).sum(), zz, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), zz)
    torch.testing.assert_close(h[:, 0, 0], d2)
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 5), nn.GELU(approximate), nn.Linear(5, 1)).to(DTYPE)
    check(net, torch.randn(8, 3, dtype=DTYPE) * 2)


def test_elu_at_zero_matches_autograd() -> None:
    z = torch.tensor([[-1.0], [-0.0], [0.0], [1e-30], [-1e-30], [2.0]], dtype=DTYPE)
    net = nn.Sequential(nn.ELU(alpha=2.0), nn.Linear(1, 1), nn.Tanh()).to(DTYPE)
    check(net, z)
    check(nn.ELU(alpha=2.0).to(DTYPE), z)


def test_empty_batch() -> None:
    net = _mlp()
    x = torch.randn(0, 3, dtype=DTYPE)
    assert structured_input_hessian(net, x).shape == (0, 2, 3, 3)
    assert structured_input_hessian(net, x, output=1).shape == (0, 3, 3)
    targets = torch.zeros(0, dtype=torch.long)
    h = structured_input_hessian(net, x, loss=F.cross_entropy, targets=targets)
    assert h.shape == (0, 3, 3)


def test_float32_and_dtype_preserved() -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 1))
    x = torch.randn(5, 3)
    h = structured_input_hessian(net, x)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, reference_vmap(net, x))


def test_no_grad_and_grad_modes_agree() -> None:
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4), nn.SiLU(), nn.Linear(4, 2))
    net = net.to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    with torch.no_grad():
        h_ng = structured_input_hessian(net, x)
    h = structured_input_hessian(net, x)
    assert h.requires_grad
    torch.testing.assert_close(h_ng, h.detach())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)


def test_error_unsupported_layer_conv() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Conv2d(1, 1, 1)))
    reason = unsupported_layer(net)
    assert reason is not None
    assert "layer 1.1 (Conv2d) is not supported" in reason
    assert "supported: Linear, Tanh" in reason
    with pytest.raises(
        UnsupportedModuleError, match=r"structured_input_hessian: module .*1\.1 \(Conv2d\)"
    ):
        structured_input_hessian(net, torch.randn(2, 3))
    with pytest.raises(ValueError, match="mode='fwd-over-rev'"):
        structured_input_hessian(net, torch.randn(2, 3))
    assert not prefer_structured(net, (2, 3), n_outputs_selected=1, dtype_bytes=4)


def test_error_unsupported_layer_subclass_and_hooks() -> None:
    class MyTanh(nn.Tanh):
        def forward(self, input: Tensor) -> Tensor:
            return super().forward(input) * 2

    reason = unsupported_layer(nn.Sequential(nn.Linear(2, 2), MyTanh()))
    assert reason is not None
    assert "MyTanh" in reason
    lin = nn.Linear(2, 2)
    lin.register_forward_hook(lambda *_: None)
    reason = unsupported_layer(nn.Sequential(lin))
    assert reason is not None
    assert "hooks" in reason


def test_error_dropout_training() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.Tanh(), nn.Linear(4, 1)).to(DTYPE)
    reason = unsupported_layer(net)
    assert reason is not None
    assert "layer 1 (Dropout) is in training mode" in reason
    with pytest.raises(ValueError, match=r"structured_input_hessian.*Dropout.*p=0\.3.*eval\(\)"):
        structured_input_hessian(net, torch.randn(2, 3, dtype=DTYPE))
    net.eval()
    assert unsupported_layer(net) is None
    check(net, torch.randn(2, 3, dtype=DTYPE))


@pytest.mark.parametrize("output", [2, -3, 10])
def test_error_output_index_out_of_range(output: int) -> None:
    match = rf"output is out of range .* 2 \(flattened\) outputs per sample, got {output}\."
    with pytest.raises(ValueError, match=match):
        structured_input_hessian(_mlp(), torch.randn(2, 3, dtype=DTYPE), output=output)


def test_error_output_bad_type_and_empty_slice() -> None:
    x = torch.randn(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="must be None, an int or a slice"):
        structured_input_hessian(_mlp(), x, output=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="selects no outputs"):
        structured_input_hessian(_mlp(), x, output=slice(2, None))


def test_error_unknown_loss() -> None:
    x = torch.randn(2, 3, dtype=DTYPE)
    with pytest.raises(
        ValueError, match=r"structured_input_hessian: loss is not supp.*got l1_loss"
    ):
        structured_input_hessian(_mlp(), x, loss=F.l1_loss, targets=torch.randn(2, 2))


def test_error_loss_arguments() -> None:
    x = torch.randn(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match="needs `targets`"):
        structured_input_hessian(_mlp(), x, loss=F.mse_loss)
    with pytest.raises(ValueError, match="without `loss`"):
        structured_input_hessian(_mlp(), x, targets=torch.zeros(2))
    with pytest.raises(ValueError, match="must be None when `loss` is given"):
        structured_input_hessian(
            _mlp(), x, output=0, loss=F.cross_entropy, targets=torch.zeros(2).long()
        )
    with pytest.raises(ValueError, match=r"class indices in \[0, 1\], got values in \[0, 2\]"):
        structured_input_hessian(_mlp(), x, loss=F.cross_entropy, targets=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="must have the output's shape"):
        structured_input_hessian(_mlp(), x, loss=F.mse_loss, targets=torch.zeros(2, 3))


def test_error_shapes_and_dtype() -> None:
    with pytest.raises(ValueError, match=r"does not fit layer 0 \(Linear\).*last dim is 3"):
        structured_input_hessian(_mlp(), torch.randn(2, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match="dtype"):
        structured_input_hessian(_mlp(), torch.randn(2, 3, dtype=torch.float32))
    net = nn.Sequential(nn.Flatten(-2, -1), nn.Linear(6, 1)).to(DTYPE)
    with pytest.raises(ValueError, match=r"Flatten.*per-sample feature dims"):
        structured_input_hessian(net, torch.randn(2, 6, dtype=DTYPE))
    assert unsupported_layer(nn.Sequential(nn.Flatten(0))) is not None


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


def test_cost_model_keys_and_monotonicity() -> None:
    net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    net.append(nn.Linear(64, 1))
    keys = {"structured_flops", "generic_flops", "structured_bytes", "generic_bytes"}
    small = structured_cost(net, (16, 8), n_outputs_selected=1, dtype_bytes=4)
    big = structured_cost(net, (1024, 8), n_outputs_selected=1, dtype_bytes=8)
    assert set(small) == keys
    assert all(v > 0 for v in small.values())
    assert all(big[k] > small[k] for k in keys)
    assert prefer_structured(net, (128, 8), n_outputs_selected=1, dtype_bytes=4)
    # shapes that do not fit the module are not eligible for the structured path
    assert not prefer_structured(net, (128, 9), n_outputs_selected=1, dtype_bytes=4)
    with pytest.raises(ValueError, match="last dim is 8"):
        structured_cost(net, (128, 9), n_outputs_selected=1, dtype_bytes=4)


@pytest.mark.parametrize(
    ("widths", "batch", "m"),
    [
        ([8, 64, 64, 1], 128, 1),
        ([32, 128, 128, 1], 64, 1),
        ([128, 256, 256, 1], 16, 1),
        ([2, 512, 512, 1], 1000, 1),
        ([2, 512, 512, 512, 512, 512, 512, 3], 1000, 3),
    ],
)
def test_cost_model_prefers_structured_on_calibration_shapes(
    widths: list[int], batch: int, m: int
) -> None:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers)
    assert prefer_structured(net, (batch, widths[0]), n_outputs_selected=m, dtype_bytes=4)
