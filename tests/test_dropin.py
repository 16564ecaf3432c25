"""Drop-in semantics: torch.func's rules for arguments, chunk_size=1, complex numbers and
empty tensors; `per_sample` as vmap (kwargs, out_dims=None); module-level `argnums=`.

Every value is checked in float64 against torch.func, `torch.autograd.functional` or
the loop oracle `torchcurv.reference`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchcurv
from torchcurv import TorchcurvError, reference

D = torch.float64
HESSIAN_MODES = ["fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd", "auto"]
JACOBIAN_MODES = ["rev", "fwd", "auto"]


# --------------------------------------------------------------------------------------
# every positional argument goes through the transform
# --------------------------------------------------------------------------------------


def _copy_into(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y.copy_(x)
    return y * x


@pytest.mark.parametrize("mode", ["rev", "auto"])
def test_jacobian_writes_into_an_undifferentiated_argument_as_jacrev(mode: str) -> None:
    x = torch.tensor([1.0, -2.0, 3.0], dtype=D)
    y_ours, y_theirs = torch.zeros(3, dtype=D), torch.zeros(3, dtype=D)
    ours = torchcurv.jacobian(_copy_into, mode=mode)(x, y_ours)  # type: ignore[arg-type]
    theirs = torch.func.jacrev(_copy_into)(x, y_theirs)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(y_ours, y_theirs)  # written, as torch.func writes it


def test_forward_mode_writes_into_an_undifferentiated_argument_in_a_loop() -> None:
    x = torch.tensor([1.0, -2.0], dtype=D)
    y = torch.zeros(2, dtype=D)
    J = torchcurv.jacobian(_copy_into, mode="fwd", chunk_size=1)(x, y)
    # y becomes x (its tangent too), so y * x = x**2: J = diag(2x), as reverse mode has it
    torch.testing.assert_close(J, torch.diag(2 * x))
    torch.testing.assert_close(J, torch.func.jacrev(_copy_into)(x, torch.zeros(2, dtype=D)))
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_with_an_undifferentiated_buffer_argument(mode: str) -> None:
    def f(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        scratch.zero_()
        return (x**3).sum() + scratch.sum()

    x = torch.tensor([0.5, -1.5], dtype=D)
    H = torchcurv.hessian(f, mode=mode, chunk_size=1)(x, torch.ones(2, dtype=D))  # type: ignore[arg-type]
    torch.testing.assert_close(H, torch.diag(6 * x))


# --------------------------------------------------------------------------------------
# chunk_size=1 is a plain loop
# --------------------------------------------------------------------------------------


def _branchy(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # data-dependent control flow (on primal values: fine in every mode)
        return x.sin() * x.sum()
    return x.cos()


class _ItemInBackward(torch.autograd.Function):
    """2x, whose backward calls ``.item()``: vmap cannot batch it, a loop can."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * (2.0 if grad.abs().sum().item() > 0 else 0.0)


def test_chunk_size_one_is_a_plain_loop_as_jacrev() -> None:
    x = torch.tensor([0.3, 0.4, -0.2], dtype=D)
    ours = torchcurv.jacobian(_ItemInBackward.apply, chunk_size=1)(x)
    torch.testing.assert_close(ours, torch.func.jacrev(_ItemInBackward.apply, chunk_size=1)(x))
    torch.testing.assert_close(ours, 2 * torch.eye(3, dtype=D))
    with pytest.raises(RuntimeError, match=r"\.item\(\)"):  # chunks of two are vmapped
        torchcurv.jacobian(_ItemInBackward.apply, chunk_size=2)(x)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_chunk_one_loops_over_both_stages(mode: str) -> None:
    x = torch.tensor([0.3, 0.4, -0.2], dtype=D)

    def f(x: torch.Tensor) -> torch.Tensor:
        return _branchy(x).sum()

    ours = torchcurv.hessian(f, mode=mode, chunk_size=1)(x)  # type: ignore[arg-type]
    torch.testing.assert_close(ours, reference.hessian(f)(x))


def test_looped_forward_mode_refuses_random_operations_under_error() -> None:
    def noisy(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, 0.5, training=True)

    with pytest.raises(TorchcurvError, match="random operation"):
        torchcurv.jacobian(noisy, mode="fwd", chunk_size=1)(torch.ones(3, dtype=D))
    J = torchcurv.jacobian(noisy, mode="fwd", chunk_size=1, randomness="same")(
        torch.ones(4, dtype=D)
    )
    mask = torch.diagonal(J)  # one mask for every column: J = diag(mask / (1 - p))
    torch.testing.assert_close(J, torch.diag(mask))


# --------------------------------------------------------------------------------------
# complex numbers and empty tensors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_complex_inputs_are_refused_in_every_jacobian_mode(mode: str) -> None:
    z = torch.randn(3, dtype=torch.complex128)
    with pytest.raises(TorchcurvError, match=r"jacobian: .*must be real.*view_as_real"):
        torchcurv.jacobian(lambda z: torch.conj(0.5j * z), mode=mode)(z)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="real"):  # torch.func refuses too
        torch.func.jacrev(lambda z: torch.conj(0.5j * z))(z)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_complex_outputs_are_refused_in_every_hessian_mode(mode: str) -> None:
    x = torch.randn(3, dtype=D)
    with pytest.raises(TorchcurvError, match=r"hessian: func must return real tensors"):
        torchcurv.hessian(lambda x: (x * 1j).sum(), mode=mode)(x)  # type: ignore[arg-type]


def test_integer_outputs_get_a_clear_error() -> None:
    with pytest.raises(TorchcurvError, match="jacobian: func must return floating-point"):
        torchcurv.jacobian(lambda x: x.argmax())(torch.randn(3, dtype=D))


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_empty_outputs_give_empty_jacobians(mode: str) -> None:
    x = torch.randn(3, dtype=D)
    J = torchcurv.jacobian(lambda x: x[:0], mode=mode)(x)  # type: ignore[arg-type]
    assert J.shape == torch.func.jacrev(lambda x: x[:0])(x).shape == (0, 3)


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_empty_inputs_give_empty_jacobians(mode: str) -> None:
    J = torchcurv.jacobian(lambda x: x.sum() * torch.ones(2, dtype=D), mode=mode)(  # type: ignore[arg-type]
        torch.randn(0, dtype=D)
    )
    assert J.shape == (2, 0)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_empty_inputs_give_empty_hessians(mode: str) -> None:
    H = torchcurv.hessian(lambda x: (x**2).sum(), mode=mode)(torch.randn(0, dtype=D))  # type: ignore[arg-type]
    assert H.shape == (0, 0)


# --------------------------------------------------------------------------------------
# per_sample as vmap
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_per_sample_passes_keyword_arguments_through_unbatched(chunk_size: int | None) -> None:
    def f(x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return x * scale

    X, scale = torch.randn(5, 3, dtype=D), torch.randn(3, dtype=D)
    ours = torchcurv.per_sample(f, chunk_size=chunk_size)(X, scale=scale)
    torch.testing.assert_close(ours, torch.vmap(f)(X, scale=scale))


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("batch", [0, 5])
def test_per_sample_out_dims_none_returns_an_unbatched_output(
    chunk_size: int | None, batch: int
) -> None:
    c = torch.arange(2, dtype=D)

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, c + 1

    X = torch.randn(batch, 3, dtype=D)
    doubled, constant = torchcurv.per_sample(f, out_dims=(0, None), chunk_size=chunk_size)(X)
    torch.testing.assert_close(doubled, 2 * X)
    torch.testing.assert_close(constant, c + 1)


def test_per_sample_out_dims_none_of_a_batched_output_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"per_sample: .*out_dim is None"):
        torchcurv.per_sample(lambda x: x.sum(), out_dims=None)(torch.randn(4, 3, dtype=D))


def test_per_sample_rejects_bad_out_dims() -> None:
    with pytest.raises(TorchcurvError, match="per_sample: out_dims must be an int, None"):
        torchcurv.per_sample(lambda x: x, out_dims="0")(torch.randn(4, 3, dtype=D))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# module level: argnums
# --------------------------------------------------------------------------------------


class PickedLogit(nn.Module):
    """tanh MLP whose per-sample output is the logit of a per-sample class index."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        logits = self.out(torch.tanh(self.hidden(x)))
        return logits.gather(1, index[:, None])[:, 0]


class MaskedSum(nn.Module):
    """A sequence model with a per-sample padding mask (positions to ignore)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x)) ** 2  # [B, T, 3]
        return (h * (~pad)[..., None]).sum(dim=(1, 2))


def _picked() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return PickedLogit().double(), torch.randn(6, 3, dtype=D), torch.randint(0, 4, (6,))


def _oracle(model: nn.Module, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [
            reference.hessian(lambda xi, i=i: model(xi[None], other[i : i + 1])[0])(x[i])
            for i in range(x.shape[0])
        ]
    )


@pytest.mark.parametrize("mode", HESSIAN_MODES)
@pytest.mark.parametrize("chunk_size", ["auto", None, 2, (2, 1, 2)])
def test_argnums_differentiates_one_input_beside_a_class_index(mode: str, chunk_size: Any) -> None:
    model, X, index = _picked()
    H = torchcurv.per_sample_hessian(
        model, (X, index), argnums=0, mode=mode, chunk_size=chunk_size
    )
    torch.testing.assert_close(H, _oracle(model, X, index))


def test_argnums_with_a_per_sample_padding_mask() -> None:
    torch.manual_seed(1)
    model = MaskedSum().double()
    X = torch.randn(4, 5, 2, dtype=D)
    pad = torch.rand(4, 5) < 0.3
    H = torchcurv.per_sample_hessian(model, (X, pad), argnums=0)
    torch.testing.assert_close(H, _oracle(model, X, pad))
    J = torchcurv.per_sample_jacobian(model, (X, pad), argnums=0)
    expected = torch.stack(
        [
            reference.jacobian(lambda xi, i=i: model(xi[None], pad[i : i + 1])[0])(X[i])
            for i in range(4)
        ]
    )
    torch.testing.assert_close(J, expected)


def test_argnums_tuple_nests_as_torch_func() -> None:
    model, X, index = _picked()
    H = torchcurv.per_sample_hessian(model, (X, index), argnums=(0,))
    assert isinstance(H, tuple)
    assert isinstance(H[0], tuple)
    torch.testing.assert_close(H[0][0], _oracle(model, X, index))


def test_argnums_with_wrt_both_and_batch_hessian() -> None:
    model, X, index = _picked()
    H = torchcurv.per_sample_hessian(model, (X, index), argnums=0, wrt="both")
    torch.testing.assert_close(H["inputs"]["inputs"], _oracle(model, X, index))
    w = "hidden.weight"
    expected = torch.stack(
        [
            reference.hessian(
                lambda p, i=i: torch.func.functional_call(
                    model,
                    {**dict(model.named_parameters()), w: p},
                    (X[i : i + 1], index[i : i + 1]),
                )[0]
            )(model.hidden.weight.detach())
            for i in range(6)
        ]
    )
    torch.testing.assert_close(H["params"][w]["params"][w], expected)
    y = torch.randn(6, dtype=D)
    Hb = torchcurv.batch_hessian(model, (X, index), y, loss=F.mse_loss, wrt="inputs", argnums=0)
    # (autograd's double backward of F.mse_loss through gather fails in torch 2.13 with
    # "ZeroTensors are immutable"; the same loss written out does not)
    whole = reference.hessian(lambda x: ((model(x, index) - y) ** 2).mean())(X)
    torch.testing.assert_close(Hb, whole)


def test_argnums_are_explained_and_planned_like_any_call() -> None:
    model, X, index = _picked()
    decision = torchcurv.explain(torchcurv.per_sample_hessian, model, (X, index), argnums=0)
    assert decision.engine == "fwd-over-rev"  # the structured engine takes one input only


def test_argnums_errors_name_the_argument_and_the_fix() -> None:
    model, X, index = _picked()
    with pytest.raises(TorchcurvError, match=r"inputs\[1\] must be floating-point.*argnums"):
        torchcurv.per_sample_hessian(model, (X, index))
    with pytest.raises(TorchcurvError, match="argnums is out of range"):
        torchcurv.per_sample_hessian(model, (X, index), argnums=2)
    with pytest.raises(TorchcurvError, match="argnums selects differentiated inputs"):
        torchcurv.per_sample_hessian(model, (X, index), argnums=0, wrt="params")
    with pytest.raises(TorchcurvError, match="argnums"):
        torchcurv.per_sample_hessian(model, (X, index), argnums="0")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# errors that say what to do, and selections a torch user writes
# --------------------------------------------------------------------------------------


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x if mask is None else x * mask).tanh().sum(-1, keepdim=True)


def test_a_per_sample_tensor_in_kwargs_points_to_argnums() -> None:
    model, X = _Masked(), torch.randn(5, 4, dtype=D)
    mask = (torch.rand(5, 4) > 0.5).to(D)
    with pytest.raises(TorchcurvError, match=r"kwargs\['mask'\] looks per-sample.*argnums=\(0,\)"):
        torchcurv.per_sample_hessian(model, X, kwargs={"mask": mask})
    # the advice works, and equals the oracle
    H = torchcurv.per_sample_hessian(model, (X, mask), argnums=0)
    for i in range(5):
        expected = reference.hessian(lambda x, i=i: model(x[None], mask[i : i + 1]).sum())(X[i])
        torch.testing.assert_close(H[i, 0], expected)
    # an unbatched tensor in kwargs is fine
    shared = torch.ones(4, dtype=D)
    torchcurv.per_sample_hessian(model, X, kwargs={"mask": shared})


def test_a_wrong_shaped_params_tensor_is_named() -> None:
    model, X = _Masked(), torch.randn(3, 4, dtype=D)
    with pytest.raises(
        TorchcurvError, match=r"params\['linear.weight'\] must have the parameter's shape \(2, 4\)"
    ):
        torchcurv.per_sample_hessian(
            model, X, wrt="params", params={"linear.weight": torch.zeros(4, 2, dtype=D)}
        )


def test_a_one_argument_predicate_selects_like_a_two_argument_one() -> None:
    model, X = _Masked(), torch.randn(3, 4, dtype=D)
    one = torchcurv.per_sample_hessian(model, X, wrt="params", params=lambda n: "bias" in n)
    two = torchcurv.per_sample_hessian(model, X, wrt="params", params=lambda n, p: "bias" in n)
    assert list(one) == ["linear.bias"]
    torch.testing.assert_close(one, two)
    with pytest.raises(TorchcurvError, match="takes neither"):
        torchcurv.per_sample_hessian(model, X, wrt="params", params=lambda a, b, c: True)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(3, 3, bias=False).double()
        self.decode = nn.Linear(3, 3, bias=False).double()
        self.decode.weight = self.encode.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).tanh()).pow(2).sum(-1, keepdim=True)


def test_any_name_of_a_tied_weight_selects_its_one_entry() -> None:
    model, X = _Tied(), torch.randn(2, 3, dtype=D)
    first = torchcurv.per_sample_hessian(model, X, wrt="params", params=["encode.weight"])
    alias = torchcurv.per_sample_hessian(model, X, wrt="params", params=["decode.weight"])
    given = torchcurv.per_sample_hessian(
        model, X, wrt="params", params={"decode.weight": model.encode.weight.detach()}
    )
    assert list(alias) == list(given) == ["encode.weight"]
    torch.testing.assert_close(alias, first)
    torch.testing.assert_close(given, first)
    W = model.encode.weight.detach()
    expected = reference.hessian(
        lambda w: torch.func.functional_call(model, {"encode.weight": w}, (X[:1],)).sum(),
    )(W)
    torch.testing.assert_close(first["encode.weight"]["encode.weight"][0, 0], expected)


class _ClampsItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.linear.weight.clamp_(-0.1, 0.1)
        return self.linear(x).tanh().sum(-1, keepdim=True)


@pytest.mark.parametrize("wrt", ["inputs", "params"])
def test_a_forward_that_writes_a_parameter_is_refused_and_writes_nothing(wrt: str) -> None:
    model, X = _ClampsItsWeight(), torch.randn(2, 3, dtype=D)
    before = model.linear.weight.detach().clone()
    selection: dict[str, Any] = (
        {"wrt": "params", "params": "linear.bias"} if wrt == "params" else {}
    )
    with pytest.raises(TorchcurvError, match=r"writes in place \(aten::clamp_\).*outside the"):
        torchcurv.per_sample_hessian(model, X, **selection)
    assert torch.equal(model.linear.weight, before)


def test_global_backward_hooks_are_refused_with_the_fix() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    X = torch.randn(2, 3, dtype=D)
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda *a: None)
    try:
        for mode in ["auto", "rev-over-rev"]:
            with pytest.raises(TorchcurvError, match=r"global module backward hooks.*remove"):
                torchcurv.per_sample_hessian(model, X, mode=mode)
    finally:
        handle.remove()
    torchcurv.per_sample_hessian(model, X)  # fine once removed


class _Nested(nn.Module):
    """A TransformerEncoder with its nested-tensor fast path (vmap cannot batch it)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2).double()

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, src_key_padding_mask=padding)[:, 0, :2]


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")
def test_the_planned_default_falls_back_to_a_loop_where_vmap_cannot_batch() -> None:
    torch.manual_seed(0)
    model = _Nested().eval()
    X, padding = torch.randn(3, 5, 8, dtype=D), torch.zeros(3, 5, dtype=torch.bool)
    padding[:, 3:] = True
    with pytest.warns(torchcurv.TorchcurvFallbackWarning, match="nested_tensor_from_mask"):
        decision = torchcurv.explain(
            torchcurv.per_sample_hessian, model, (X, padding), argnums=0, output=1
        )
    assert decision.looped
    assert decision.batch_chunk == 1
    with pytest.warns(torchcurv.TorchcurvFallbackWarning, match="loop over samples"):
        H = torchcurv.per_sample_hessian(model, (X, padding), argnums=0, output=1)
    for i in range(3):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            expected = reference.hessian(lambda x, i=i: model(x[None], padding[i : i + 1])[0, 1])(
                X[i]
            )
        torch.testing.assert_close(H[i], expected)


def test_data_dependent_control_flow_loops_under_the_default_plan() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.linear(x).tanh()
            return y * 2 if x.sum().item() > 0 else y

    model, X = Branchy(), torch.randn(4, 3, dtype=D)
    with pytest.warns(torchcurv.TorchcurvFallbackWarning, match=r"\.item\(\)"):
        H = torchcurv.per_sample_hessian(model, X)
    for i in range(4):
        torch.testing.assert_close(H[i], reference.hessian(lambda x: model(x[None])[0])(X[i]))


@pytest.mark.parametrize(
    "loss", [F.cross_entropy, nn.CrossEntropyLoss(), F.nll_loss], ids=["ce", "module", "nll"]
)
def test_class_targets_out_of_range_are_named(loss: Any) -> None:
    model, X = nn.Linear(4, 3).double(), torch.randn(4, 4, dtype=D)
    with pytest.raises(TorchcurvError, match=r"targets\[2\] is 5, outside the module's 3 classes"):
        torchcurv.per_sample_hessian(model, X, loss=loss, targets=torch.tensor([0, 1, 5, 0]))
    # ignore_index is a class index a loss accepts
    torchcurv.per_sample_hessian(model, X, loss=loss, targets=torch.tensor([0, -100, 2, 0]))


def test_recurrent_dropout_in_training_is_named_up_front() -> None:
    class Stacked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(3, 4, num_layers=2, dropout=0.5, batch_first=True).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gru(x)[0][:, -1].sum(-1, keepdim=True)

    X = torch.randn(2, 5, 3, dtype=D)
    with pytest.raises(TorchcurvError, match=r"GRU at 'gru' is in training mode.*'different'"):
        torchcurv.per_sample_hessian(Stacked(), X)


def test_functional_dropout_is_refused_under_the_public_name() -> None:
    class Dropping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(self.linear(x), 0.5, training=True)

    with pytest.raises(TorchcurvError, match=r"^per_sample_hessian\(Dropping\): .*'different'"):
        torchcurv.per_sample_hessian(Dropping(), torch.randn(2, 3, dtype=D))


def test_testing_is_an_attribute_after_a_plain_import() -> None:
    import torchcurv as fresh

    assert fresh.testing.check_model is not None
