"""Today's architectures work by default: attention, recurrent layers, parametrizations,
hooks and forwards that edit tensors in place, each against the loop oracle in float64.

The oracle is `torchcurv.reference.hessian` (autograd's double backward, one row at a
time) over a plain loop of samples, on the fused ops. Autograd has no double backward
for the fused CPU flash-attention kernel, so the oracle of attention models runs with
the math kernel (`sdpa_kernel(SDPBackend.MATH)`, process-wide flags, test-only); the
torchcurv calls run without it, by default.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.parametrizations import weight_norm

import torchcurv
from torchcurv import TorchcurvError, _decompositions, reference
from torchcurv._decompositions import corrected_ops
from torchcurv.testing import assert_matches_finite_differences, assert_trees_close

D = torch.float64
MODES = ("fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd")


def _readout(y: Any) -> torch.Tensor:
    """A curved scalar per sample of a module's (first) output ``[1, ...]``."""
    y = y[0] if isinstance(y, tuple) else y
    flat = y.reshape(y.shape[0], -1)
    weights = torch.linspace(-1.0, 1.0, flat.shape[1], dtype=y.dtype)
    return (weights * torch.sin(flat)).sum(-1) + 0.1 * (flat * flat).sum(-1)


class Scalar(nn.Module):
    """``readout(module(x))``: one scalar per sample."""

    def __init__(self, module: nn.Module, call: Callable[..., Any] | None = None) -> None:
        super().__init__()
        self.module = module
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.call(self.module, x) if self.call is not None else self.module(x)
        return _readout(out)


def _oracle(model: nn.Module, X: torch.Tensor, wrt: str) -> Any:
    """Per-sample Hessians by a loop of autograd double backwards (fused ops)."""
    model = copy.deepcopy(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    rows = []
    with sdpa_kernel(SDPBackend.MATH):
        for x in X:
            if wrt == "inputs":
                rows.append(reference.hessian(lambda x: model(x[None].clone())[0])(x))
            else:

                def f(p: dict[str, torch.Tensor], x: torch.Tensor = x) -> torch.Tensor:
                    return functional_call(model, p, (x[None].clone(),))[0]

                rows.append(reference.hessian(f)(params))
    if wrt == "inputs":
        return torch.stack(rows)
    return {a: {b: torch.stack([r[a][b] for r in rows]) for b in rows[0][a]} for a in rows[0]}


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    modes: tuple[str, ...] = ("auto",)
    params: bool = True
    options: dict[str, Any] = field(default_factory=dict)


def _mha(batch_first: bool, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(4, 2, batch_first=batch_first).double().eval()

        def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            x = x if batch_first else x.transpose(0, 1)
            out = m(x, x, x, **kwargs)[0]
            return out if batch_first else out.transpose(0, 1)

        return Scalar(mha, call)

    return make


def _encoder(batch_first: bool, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(
            4, 2, 6, dropout=0.1, batch_first=batch_first, norm_first=not batch_first
        )
        layer = layer.double().eval()

        def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
            x = x if batch_first else x.transpose(0, 1)
            out = m(x, **kwargs)
            return out if batch_first else out.transpose(0, 1)

        return Scalar(layer, call)

    return make


def _recurrent(cls: type[nn.Module], **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return Scalar(cls(3, 3, **kwargs).double())

    return make


CAUSAL = nn.Transformer.generate_square_subsequent_mask(4, dtype=D)
PADDING = torch.tensor([[False, False, True, False]])  # one sample: [1, source length]
FLOAT_MASK = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=D)

CASES = [
    Case("MHA-batch-first", _mha(True, need_weights=False), (4, 4), MODES),
    Case("MHA-seq-first", _mha(False, need_weights=False), (4, 4)),
    Case("MHA-need-weights", _mha(True), (4, 4), params=False),
    Case("MHA-float-mask", _mha(True, need_weights=False, attn_mask=FLOAT_MASK), (4, 4)),
    Case(
        "MHA-key-padding-mask",
        _mha(False, need_weights=False, key_padding_mask=PADDING),
        (4, 4),
        params=False,
    ),
    Case(
        "MHA-causal",
        _mha(True, need_weights=False, attn_mask=CAUSAL, is_causal=True),
        (4, 4),
        ("auto", "rev-over-fwd"),
    ),
    Case("TransformerEncoderLayer", _encoder(True), (4, 4), ("auto", "fwd-over-fwd")),
    Case(
        "TransformerEncoderLayer-seq-first-padding",
        _encoder(False, src_key_padding_mask=PADDING),
        (4, 4),
    ),
    Case(
        "TransformerEncoderLayer-causal",
        _encoder(True, src_mask=CAUSAL, is_causal=True),
        (4, 4),
        params=False,
    ),
    Case("GRU", _recurrent(nn.GRU, batch_first=True), (4, 3), MODES, options={"chunk_size": 1}),
    Case(
        "GRU-2-layers-bidirectional", _recurrent(nn.GRU, num_layers=2, bidirectional=True), (3, 3)
    ),
    Case("RNN-tanh", _recurrent(nn.RNN, batch_first=True), (4, 3), ("auto", "fwd-over-fwd")),
    Case("RNN-relu-no-bias", _recurrent(nn.RNN, nonlinearity="relu", bias=False), (3, 3)),
    Case("LSTM", _recurrent(nn.LSTM, batch_first=True), (4, 3), MODES),
    Case("LSTM-proj-bidirectional", _recurrent(nn.LSTM, proj_size=2, bidirectional=True), (3, 3)),
    Case("GRUCell", _recurrent(nn.GRUCell), (3,), ("auto", "rev-over-fwd")),
    Case("LSTMCell", _recurrent(nn.LSTMCell), (3,)),
    Case("RNNCell", _recurrent(nn.RNNCell), (3,)),
]


def _case_params() -> list[Any]:
    out = []
    for case in CASES:
        for mode in case.modes:
            out.append(pytest.param(case, "inputs", mode, id=f"{case.name}-inputs-{mode}"))
        if case.params:
            out.append(pytest.param(case, "params", "auto", id=f"{case.name}-params-auto"))
    return out


@pytest.mark.parametrize(("case", "wrt", "mode"), _case_params())
def test_architecture_matches_the_loop_oracle(case: Case, wrt: str, mode: str) -> None:
    model = case.make()
    X = torch.randn(3 if wrt == "inputs" else 2, *case.shape, dtype=D)
    H = torchcurv.per_sample_hessian(model, X, wrt=wrt, mode=mode, **case.options)
    assert_trees_close(H, _oracle(model, X, wrt), what=f"{case.name} {wrt} {mode}")


def test_attention_takes_no_fused_fast_path_and_is_routed(monkeypatch: Any) -> None:
    def fused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a fused fast path ran inside the derivative")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)
    monkeypatch.setattr(torch, "_native_multi_head_attention", fused)
    calls: list[int] = []
    rule = _decompositions._RULES[torch.nn.functional.scaled_dot_product_attention]

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return rule(*args, **kwargs)

    monkeypatch.setitem(
        _decompositions._RULES, torch.nn.functional.scaled_dot_product_attention, counting
    )
    model = _encoder(True)()
    X = torch.randn(2, 4, 4, dtype=D)
    with torch.no_grad():  # the eval-mode, no-grad fast path is what a user's forward takes
        torchcurv.per_sample_hessian(model, X)
    assert calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_routed_forwards_keep_the_fused_values(dtype: torch.dtype) -> None:
    x = torch.randn(2, 5, 4, dtype=dtype)
    for make in (_encoder(True, src_mask=CAUSAL[:4, :4], is_causal=True), _mha(False)):
        module = make().to(dtype)
        with torch.no_grad():
            expected = module(x[:, :4])
            with corrected_ops():
                actual = module(x[:, :4])
        assert_trees_close(actual, expected)
    for cls in (nn.GRU, nn.LSTM, nn.RNN):
        layer = cls(4, 3, num_layers=2, bidirectional=True, batch_first=True).to(dtype)
        with torch.no_grad():
            expected = layer(x)
            with corrected_ops():
                actual = layer(x)
        assert_trees_close(actual, expected)


def test_corrected_ops_is_local_to_its_thread() -> None:
    seen: list[int] = []
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    with corrected_ops():
        thread = threading.Thread(target=lambda: seen.append(torch._C._len_torch_function_stack()))
        thread.start()
        thread.join()
        inside = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    assert seen == [0]
    assert inside == flags


# --------------------------------------------------------------------------------------
# a mode without a rule: auto takes one that has it; an explicit one is refused
# --------------------------------------------------------------------------------------


class _Cube(torch.autograd.Function):
    """``x ** 3`` with a backward (differentiable again) but no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 3 * grad * x**2


class _CubeLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Cube.apply(x)  # type: ignore[no-any-return]


def _without_forward_rule() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), _CubeLayer(), nn.Linear(3, 1)).double()


@pytest.mark.parametrize("wrt", ["inputs", "params"])
def test_auto_takes_reverse_over_reverse_without_a_forward_mode_rule(wrt: str) -> None:
    model = _without_forward_rule()
    X = torch.randn(3, 3, dtype=D)
    decision = torchcurv.explain(torchcurv.per_sample_hessian, model, X, wrt=wrt)
    assert decision.engine == "rev-over-rev"
    assert "'fwd-over-rev' cannot differentiate this module" in decision.why_engine
    H = torchcurv.per_sample_hessian(model, X, wrt=wrt)
    assert_trees_close(H, _oracle(model, X, wrt))


def test_an_explicit_mode_without_a_rule_is_refused_with_the_one_that_works() -> None:
    X = torch.randn(2, 3, dtype=D)
    with pytest.raises(TorchcurvError, match=r"mode='fwd-over-rev'.*mode='rev-over-rev'"):
        torchcurv.per_sample_hessian(_without_forward_rule(), X, mode="fwd-over-rev")
    with pytest.raises(TorchcurvError, match=r"mode='fwd'.*mode='rev'"):
        torchcurv.per_sample_jacobian(_without_forward_rule(), X, mode="fwd")


@pytest.mark.parametrize("mode", MODES)
def test_weight_norm_parameter_hessians_in_every_mode(mode: str) -> None:
    # torch has no forward-mode rule for _weight_norm_interface, and autograd's double
    # backward of it is wrong (the g-v block; tests/test_op_audit.py): routed, and
    # checked against finite differences of the (right) first derivative.
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Linear(3, 3)), nn.Tanh(), nn.Linear(3, 1)).double()
    X = torch.randn(2, 3, dtype=D)
    H = torchcurv.per_sample_hessian(model, X, wrt="params", mode=mode)
    params = {n: p.detach() for n, p in model.named_parameters()}
    for i in range(2):
        sample = {a: {b: H[a][b][i, 0] for b in H[a]} for a in H}  # output [1]
        assert_matches_finite_differences(
            lambda p, i=i: functional_call(model, p, (X[i : i + 1],))[0, 0], sample, params
        )


# --------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------


def test_backward_hooks_do_not_run_inside_the_derivative_forward_hooks_do() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    plain = copy.deepcopy(model)
    fired: list[str] = []
    model[1].register_full_backward_hook(lambda m, gi, go: fired.append("backward"))
    model[0].register_forward_hook(lambda m, i, o: fired.append("forward"))
    X = torch.randn(3, 3, dtype=D)
    for wrt in ("inputs", "params"):
        for mode in ("auto", "rev-over-rev"):
            H = torchcurv.per_sample_hessian(model, X, wrt=wrt, mode=mode)
            assert_trees_close(H, _oracle(plain, X, wrt), what=f"{wrt} {mode}")
    assert set(fired) == {"forward"}
    fired.clear()
    model(X).sum().backward()  # the hooks are still the caller's, and still fire
    assert set(fired) == {"forward", "backward"}


# --------------------------------------------------------------------------------------
# the caller's inputs, parameters and buffers are never written
# --------------------------------------------------------------------------------------


class _EditsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return torch.tanh(self.linear(x)).sum(-1)


class _CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.linear(x)).sum(-1)


class _Renormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(5, 3, max_norm=1.0)
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = (x.detach().abs() * 10).long() % 5  # indices from a float input
        return torch.tanh(self.linear(self.embedding(i)) * x[..., None]).sum((-1, -2))


@pytest.mark.parametrize(
    "make", [_EditsItsInput, _CountsCalls, _Renormed], ids=lambda m: m.__name__
)
@pytest.mark.parametrize("wrt", ["inputs", "params"])
def test_inputs_parameters_and_buffers_are_never_written(
    make: Callable[[], nn.Module], wrt: str
) -> None:
    torch.manual_seed(0)
    model = make().double()
    with torch.no_grad():
        model.get_submodule("embedding" if make is _Renormed else "linear").weight.mul_(3)
    X = torch.randn(3, 3, dtype=D)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    X0 = X.clone()
    H = torchcurv.per_sample_hessian(model, X, wrt=wrt)
    assert torch.equal(X, X0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert_trees_close(H, _oracle(model, X, wrt))
