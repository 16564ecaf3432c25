# ruff: noqa: B008, PT011
"""Conformance with torch.func and torch.autograd.functional (issue 11).

Paraphrases, in our own code, of PyTorch's tests for jacrev / jacfwd / hessian / jvp /
vjp / vmap (``test/functorch/test_eager_transforms.py``, ``test/functorch/test_vmap.py``)
and ``torch.autograd.functional`` (``test/autograd/test_functional.py``), run against
every torchcurv mode, chunk sizes, ``per_sample`` and ``reference``. Each case names the
PyTorch test it follows. Where torchcurv differs on purpose the test says why, and
``docs/differences.rst`` lists it; where torch.func is wrong the expectation is the
float64 oracle or a closed form, with a comment naming torch's behaviour.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import torch
import torch.autograd.functional as AF
from torch.func import hessian as torch_hessian
from torch.func import jacfwd, jacrev
from torch.utils._pytree import tree_flatten, tree_map

import torchcurv
from torchcurv import TorchcurvError, reference

# torch warns when vmap uses its slow fallback (aten::put in the backward of take); the
# warning is torch's own, and both libraries take that path.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

F32, F64 = torch.float32, torch.float64
DTYPES = [F32, F64]
JACOBIAN_MODES = ["rev", "fwd", "auto"]
HESSIAN_MODES = ["fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd", "auto"]
CHUNKS = [None, 1, 2]
# torch.func's transform for each torchcurv Jacobian mode ("auto" agrees with both).
TORCH_JACOBIAN = {"rev": jacrev, "fwd": jacfwd, "auto": jacrev}
# Any of the errors torch raises for a bad call; torchcurv's own are all TorchcurvError.
TORCH_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def chunk_id(chunk: Any) -> str:
    return f"chunk({chunk})"


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assert_tree_close(actual: Any, expected: Any) -> None:
    """Same pytree structure (tuple, list, dict and their order), then every leaf equal
    with `torch.testing.assert_close` at its default (dtype) tolerances."""
    actual_leaves, actual_spec = tree_flatten(actual)
    expected_leaves, expected_spec = tree_flatten(expected)
    assert actual_spec == expected_spec, f"structure differs:\n{actual_spec}\n{expected_spec}"
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e)
        else:
            assert a == e


def randn(*shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype)


# --------------------------------------------------------------------------------------
# Jacobians: cases as data
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A function, how to build its arguments in a dtype, and the argnums to use."""

    name: str
    follows: str
    func: Callable[..., Any]
    make_args: Callable[[torch.dtype], tuple[Any, ...]]
    argnums: int | tuple[int, ...] = 0

    def __repr__(self) -> str:  # the pytest id
        return self.name


def _take(x: torch.Tensor) -> torch.Tensor:
    return torch.take(x, torch.ones(3, dtype=torch.long))


def _diff_numel(x: torch.Tensor) -> torch.Tensor:
    return x[0, 1:].unsqueeze(-1)  # (2, 4) -> (3, 1)


def _two_linear(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return 2 * x + 3 * y, 4 * x + 5 * y


def _two_linear_dict(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"left": 2 * x + 3 * y, "right": 4 * x + 5 * y}


def _pair_and_two(a: Any, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    a0, a1 = a
    return a0 + a1 * 2 + b * 3 + c * 4


def _pair_and_two_pytree_out(a: Any, b: torch.Tensor, c: torch.Tensor) -> Any:
    a0, a1 = a
    return a0 + a1 * 2, {"foo": b * 3 + c * 4}


def _composite_output(x: torch.Tensor) -> Any:
    total = x.sum()
    return [(total, {"a": x, "out": [x, total]})]


def _chunked_outputs(x: torch.Tensor, y: torch.Tensor) -> Any:
    return (x.sin(), x + y), (x + 2, x.sum())


def _scalar_args(dtype: torch.dtype) -> tuple[Any, ...]:
    s = randn(dtype=dtype)
    return ((s, s), s, s)


JACOBIAN_CASES = [
    Case("sin", "TestJac::test_simple", torch.sin, lambda d: (randn(3, dtype=d),)),
    Case(
        "sin_not_flat",
        "TestJac::test_simple_not_flat",
        torch.sin,
        lambda d: (randn(2, 3, dtype=d),),
    ),
    Case("take", "TestJac::test_take", _take, lambda d: (randn(5, dtype=d),)),
    Case("diff_numel", "TestJac::test_diff_numel", _diff_numel, lambda d: (randn(2, 4, dtype=d),)),
    Case(
        "multiply_argnums_1",
        "TestJac::test_multiple_args",
        torch.multiply,
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=1,
    ),
    Case(
        "two_outputs_two_argnums",
        "TestJac::test_multiple_outputs_multiple_argnums",
        _two_linear,
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "two_outputs_int_argnums",
        "TestJac::test_multiple_outputs_single_argnums",
        _two_linear,
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=0,
    ),
    Case(
        "two_outputs_one_tuple_argnums",
        "TestJac::test_multiple_outputs_single_argnums",
        _two_linear,
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=(0,),
    ),
    Case(
        "dict_outputs",
        "TestJac::test_multiple_outputs_pytree",
        _two_linear_dict,
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "pytree_inputs_all_argnums",
        "TestJac::test_multiple_inputs_pytree",
        _pair_and_two,
        _scalar_args,
        argnums=(0, 1, 2),
    ),
    Case(
        "pytree_inputs_tuple_argnums",
        "TestJac::test_multiple_inputs_pytree",
        _pair_and_two,
        _scalar_args,
        argnums=(0,),
    ),
    Case(
        "pytree_inputs_int_argnums",
        "TestJac::test_multiple_inputs_pytree",
        _pair_and_two,
        _scalar_args,
    ),
    Case(
        "identity_0d",
        "TestJac::test_dimensionality",
        lambda x: x,
        lambda d: (randn(dtype=d),),
    ),
    Case(
        "identity_1_element",
        "TestJac::test_dimensionality",
        lambda x: x,
        lambda d: (randn(1, dtype=d),),
    ),
    Case(
        "list_output",
        "TestJac::test_outputs_can_any_pytree",
        lambda x: [x, x.sum()],
        lambda d: (randn(2, 3, dtype=d),),
    ),
    Case(
        "dict_output",
        "TestJac::test_outputs_can_any_pytree",
        lambda x: {"x": x, "xsum": x.sum()},
        lambda d: (randn(2, 3, dtype=d),),
    ),
    Case(
        "nested_output",
        "TestJac::test_outputs_can_any_pytree",
        _composite_output,
        lambda d: (randn(2, 3, dtype=d),),
    ),
    Case(
        "pytree_in_out_default_argnums",
        "TestJac::test_multiple_inputs_outputs_pytree",
        _pair_and_two_pytree_out,
        _scalar_args,
    ),
    Case(
        "pytree_in_out_tuple_argnums",
        "TestJac::test_multiple_inputs_outputs_pytree",
        _pair_and_two_pytree_out,
        _scalar_args,
        argnums=(0,),
    ),
    Case(
        "pytree_in_out_two_argnums",
        "TestJac::test_multiple_inputs_outputs_pytree",
        _pair_and_two_pytree_out,
        _scalar_args,
        argnums=(0, 1),
    ),
    Case(
        "dict_in_dict_out",
        "TestJac::test_multiple_inputs_outputs_pytree_multidim",
        lambda d: {"c": d["a"].sin(), "d": d["b"].cos()},
        lambda d: ({"a": randn(3, dtype=d), "b": randn(3, dtype=d)},),
    ),
    Case(
        "unrelated_input",
        "TestJac::test_unrelated_input",
        lambda x, y: x,
        lambda d: (randn(2, 3, dtype=d), randn(2, 3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "argnums_tuple",
        "TestJac::test_argnums_tuple",
        torch.multiply,
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "argnums_reordered",
        "TestSliceArgnums::test_argnums_reorders",
        lambda x, y: x * y.exp(),
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=(1, 0),
    ),
    Case(
        "argnums_negative",
        "TestSliceArgnums::test_flat_args_with_negative_int_argnum",
        lambda x, y: x * y.exp(),
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=-1,
    ),
    Case(
        "argnums_default_zero",
        "TestJac::test_argnums_defaults_to_zero",
        lambda x, y: x * 2 + y * 3,
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
    ),
    Case(
        "square_3d",
        "TestJac::test_against_reference_simple",
        lambda x: 3 * x**2,
        lambda d: (randn(2, 3, 2, dtype=d),),
    ),
    Case(
        "matmul_two_inputs",
        "TestJac::test_against_reference_multi_input",
        lambda x, y: (x.cos() * x) @ y.sin(),
        lambda d: (randn(2, 3, dtype=d), randn(3, 4, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "matmul_three_outputs",
        "TestJac::test_against_reference_multi_input_multi_output",
        lambda x, y: ((x * x) @ y, x @ (x.sum(1) * y), y.sum()),
        lambda d: (randn(4, 3, dtype=d), randn(3, 4, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "repeated_unrelated_outputs",
        "TestJac::test_against_reference_unrelated_outputs",
        lambda x, y: (x, y, x, y),
        lambda d: (randn(2, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "zero_dim_outputs",
        "TestJac::test_against_reference_zero_dim",
        lambda x, y: (x.sum(), y.sum(), x * y),
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "zero_dim_input",
        "TestJac::test_against_reference_zero_dim",
        lambda x: torch.stack([x, x, x]),
        lambda d: (randn(dtype=d),),
    ),
    Case(
        "zero_dim_mixed",
        "TestJac::test_against_reference_zero_dim",
        lambda x, y: (y.sum(), x * y),
        lambda d: (randn(dtype=d), randn(1, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "default_argument",
        "TestJac::test_against_reference_default_arg",
        lambda x, y, z=3.0: x * y * z,
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "non_tensor_argument",
        "TestJac::test_jac_with_non_tensor_args",
        lambda t, n: t + n,
        lambda d: (randn(3, 3, dtype=d), 3),
    ),
    Case(
        "chunked_tuple_of_tuples",
        "TestJac::test_chunk_jacrev",
        _chunked_outputs,
        lambda d: (randn(5, 2, dtype=d), randn(1, 2, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "output_dtype_differs",
        "test_functional.py::TestAutogradFunctional::"
        "test_jacobian_vectorize_correctness_different_dtype",
        lambda x: (x * 2).to(x.dtype if x.dtype == F32 else F32),
        lambda d: (randn(3, dtype=d),),
    ),
    Case(
        "scalar_to_scalar",
        "test_functional.py::TestAutogradFunctional::test_jacobian_scalar",
        lambda x: 3 * x.sin() * x,
        lambda d: (randn(dtype=d),),
    ),
    Case(
        "vector_to_scalar",
        "test_functional.py::TestAutogradFunctional::test_jacobian_scalar",
        lambda x: x.exp().sum(),
        lambda d: (randn(4, dtype=d),),
    ),
    Case(
        "captured_output_only",
        "TestJac::test_unrelated_output",
        lambda x, _c=torch.arange(6.0).reshape(2, 3): _c.to(x.dtype),
        lambda d: (randn(2, 3, dtype=d),),
    ),
]


# Cases where torch.func's jacfwd is wrong, compared with jacrev (and the oracle) instead.
JACFWD_WRONG = {
    # torch 2.13: jacfwd(f, argnums=-1) returns zeros (its wrapper resolves the negative
    # index against another argument list); jacrev and the oracle agree with torchcurv.
    "argnums_negative",
}


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", JACOBIAN_CASES, ids=repr)
def test_jacobian_matches_torch_func(
    case: Case, dtype: torch.dtype, mode: str, chunk: int | None
) -> None:
    """jacobian == jacrev/jacfwd, with the same nesting; in float64 also == the oracle.

    The case's `follows` names the test_eager_transforms.py (or test_functional.py) case.
    """
    args = case.make_args(dtype)
    actual = torchcurv.jacobian(case.func, case.argnums, mode=mode, chunk_size=chunk)(*args)
    transform = jacrev if case.name in JACFWD_WRONG else TORCH_JACOBIAN[mode]
    assert_tree_close(actual, transform(case.func, case.argnums)(*args))
    if dtype == F64:
        expected = reference.jacobian(case.func, case.argnums)(*args)
        if mode == "fwd":  # forward mode gives the output's dtype, as jacfwd does
            expected = tree_map(lambda e, a: e.to(a.dtype), expected, actual)
        assert_tree_close(actual, expected)


def test_jacobian_cases_follow_named_pytorch_tests() -> None:
    """Every Jacobian case says which PyTorch test it paraphrases."""
    assert all(case.follows for case in JACOBIAN_CASES)
    assert len({case.name for case in JACOBIAN_CASES}) == len(JACOBIAN_CASES)


# --------------------------------------------------------------------------------------
# Jacobians: API cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_closed_forms(mode: str) -> None:
    """follows TestJac::test_simple, test_multiple_outputs_multiple_argnums,
    test_unrelated_input, test_argnums_effect_on_return: exact values and return types."""
    x, y = randn(3), randn(3)
    jac = partial(torchcurv.jacobian, mode=mode)
    torch.testing.assert_close(jac(torch.sin)(x), torch.diagflat(x.cos()))
    z = jac(_two_linear, argnums=(0, 1))(x, y)
    assert isinstance(z, tuple)
    assert all(isinstance(row, tuple) for row in z)
    for (block_x, block_y), (a, b) in zip(z, [(2, 3), (4, 5)], strict=True):
        torch.testing.assert_close(block_x, torch.diagflat(torch.full_like(x, a)))
        torch.testing.assert_close(block_y, torch.diagflat(torch.full_like(y, b)))
    assert isinstance(jac(torch.multiply, argnums=0)(x, y), torch.Tensor)
    single = jac(torch.multiply, argnums=(0,))(x, y)
    assert isinstance(single, tuple)
    assert len(single) == 1
    unrelated = jac(lambda x, y: x, argnums=(0, 1))(x, y)
    assert torch.equal(unrelated[1], torch.zeros(3, 3, dtype=F64))


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_aux_tensor(mode: str, chunk: int | None) -> None:
    """follows TestJac::test_aux_tensor: aux comes back untouched, next to the Jacobian."""

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.clone()
        return y, y.cos()

    x = randn(3)
    result, aux = torchcurv.jacobian(f, mode=mode, chunk_size=chunk, has_aux=True)(x)
    assert_tree_close((result, aux), TORCH_JACOBIAN[mode](f, has_aux=True)(x))
    assert_tree_close((result, aux), (torch.eye(3, dtype=F64), x.cos()))


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_aux_pytree(mode: str, chunk: int | None) -> None:
    """follows TestJac::test_aux_pytree: a pytree aux keeps its structure."""

    def f(x: torch.Tensor) -> Any:
        y = x.clone()
        return y, {"a": y.cos(), "b": [y.tan()]}

    x = randn(3)
    actual = torchcurv.jacobian(f, mode=mode, chunk_size=chunk, has_aux=True)(x)
    assert_tree_close(actual, TORCH_JACOBIAN[mode](f, has_aux=True)(x))


@pytest.mark.parametrize("aux", [1, 1.0, "abc"], ids=repr)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_non_tensor_aux_raises(mode: str, aux: Any) -> None:
    """follows TestJac::test_aux_pytree (its error half): aux must be tensors."""
    x = randn(3)
    with pytest.raises(TORCH_ERRORS):
        TORCH_JACOBIAN[mode](lambda x: (x, aux), has_aux=True)(x)
    with pytest.raises(TORCH_ERRORS):
        torchcurv.jacobian(lambda x: (x, aux), mode=mode, has_aux=True)(x)
    with pytest.raises(TORCH_ERRORS):
        torchcurv.jacobian(lambda x: (x, [x, aux]), mode=mode, has_aux=True)(x)


@pytest.mark.parametrize("output", [None, (), 1, True, 12.2, "abc"], ids=repr)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_non_tensor_output_raises(mode: str, output: Any) -> None:
    """follows TestJac::test_outputs_can_any_pytree and TestJac::test_empty_output."""
    x = randn(2, 3)
    with pytest.raises(TORCH_ERRORS):
        TORCH_JACOBIAN[mode](lambda _: output)(x)
    with pytest.raises(TorchcurvError):
        torchcurv.jacobian(lambda _: output, mode=mode)(x)


BAD_ARGNUMS = [
    pytest.param((), (randn(3),), torch.sin, id="empty"),
    pytest.param(2, (randn(3),), torch.sin, id="out_of_bounds"),
    pytest.param(-2, (randn(3),), torch.sin, id="negative_out_of_bounds"),
    pytest.param((0, 0), (randn(3),), torch.sin, id="repeated"),
    pytest.param((0, -2), (randn(3), randn(3)), torch.multiply, id="repeated_via_negative"),
    pytest.param(0.0, (randn(3),), torch.sin, id="float"),
    pytest.param((1, 0.0), (randn(3), randn(3)), torch.multiply, id="float_in_tuple"),
    pytest.param([0], (randn(3),), torch.sin, id="list"),
]


@pytest.mark.parametrize(("argnums", "args", "func"), BAD_ARGNUMS)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_bad_argnums_raise(mode: str, argnums: Any, args: Any, func: Any) -> None:
    """follows TestJac::test_empty_argnums, test_out_of_bounds_argnums,
    test_negative_argnums, test_repeated_argnums, test_float_argnums and
    TestSliceArgnums::test_invalid_argnum_type / test_duplicate_argnums.

    torch raises when the Jacobian is called; torchcurv as early as it can (when the
    transform is built, or for range checks when it is called)."""
    with pytest.raises(TORCH_ERRORS):
        TORCH_JACOBIAN[mode](func, argnums=argnums)(*args)
    with pytest.raises(TorchcurvError):
        torchcurv.jacobian(func, argnums=argnums, mode=mode)(*args)


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5, True], ids=repr)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_bad_chunk_size_raises_value_error(mode: str, chunk_size: Any) -> None:
    """follows TestJac::test_chunk_jacrev (its error half): a ValueError, as in jacrev."""
    with pytest.raises(ValueError):
        jacrev(torch.sin, chunk_size=0)(randn(3))
    with pytest.raises(ValueError):
        torchcurv.jacobian(torch.sin, mode=mode, chunk_size=chunk_size)


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 7, 10, 1000], ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_any_chunk_size_agrees(mode: str, chunk: int) -> None:
    """follows TestJac::test_chunk_jacrev: every chunk size gives jacrev's result."""
    x, y = randn(10, 2), randn(1, 2)
    expected = jacrev(_chunked_outputs, argnums=(0, 1))(x, y)
    actual = torchcurv.jacobian(_chunked_outputs, (0, 1), mode=mode, chunk_size=chunk)(x, y)
    assert_tree_close(actual, expected)


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_chunked_jacobian_of_chunked_jacobian_per_sample(mode: str) -> None:
    """follows TestJac::test_chunk_jacrev_composition: vmap(jac(jac(f))), chunked."""

    def f(x: torch.Tensor) -> Any:
        return (x.sin(), x), (x + 2, x.sum())

    x = randn(4, 2)
    expected = torch.vmap(jacrev(jacrev(f)))(x)
    inner = torchcurv.jacobian(f, mode=mode, chunk_size=3)
    outer = torchcurv.jacobian(inner, mode=mode, chunk_size=3)
    assert_tree_close(torchcurv.per_sample(outer, chunk_size=3)(x), expected)


class _IdentityWithDynamicBackward(torch.autograd.Function):
    """Identity whose backward calls an op with a data-dependent output shape."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        grad_output.nonzero()  # cannot be vmapped
        return grad_output


def test_reverse_jacobian_chunk_size_one_is_a_plain_loop() -> None:
    """follows TestJac::test_chunk_jacrev_chunksize_one: with chunk_size=1 nothing is
    vmapped, so a backward that vmap cannot batch still works, as in jacrev."""
    x = randn(3, 3)
    f = _IdentityWithDynamicBackward.apply
    expected = jacrev(f, chunk_size=1)(x)
    torch.testing.assert_close(expected, AF.jacobian(f, x, vectorize=False))
    torch.testing.assert_close(torchcurv.jacobian(f, mode="rev", chunk_size=1)(x), expected)
    with pytest.raises(RuntimeError):
        jacrev(f, chunk_size=2)(x)


def _branchy(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # data-dependent Python control flow: vmap cannot batch it
        return x.sin() * x
    return x.cos()


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_chunk_size_one_allows_data_dependent_control_flow(mode: str) -> None:
    """follows TestJac::test_chunk_jacrev_chunksize_one: chunk_size=1 is a plain loop,
    so a function that branches on its values works, as it does in jacrev."""
    for x in (randn(3).abs(), -randn(3).abs()):
        actual = torchcurv.jacobian(_branchy, mode=mode, chunk_size=1)(x)
        torch.testing.assert_close(actual, jacrev(_branchy)(x))
        torch.testing.assert_close(actual, reference.jacobian(_branchy)(x))


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_chunk_size_one_allows_data_dependent_control_flow(mode: str) -> None:
    """follows TestJac::test_chunk_jacrev_chunksize_one, for both stages of a Hessian."""
    x = randn(3).abs()
    actual = torchcurv.hessian(lambda x: _branchy(x).sum(), mode=mode, chunk_size=1)(x)
    torch.testing.assert_close(actual, reference.hessian(lambda x: _branchy(x).sum())(x))


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_complex_input_raises(mode: str) -> None:
    """follows TestJac::test_complex_error (C -> C): refused in every mode, with an
    error that names the function."""
    z = torch.randn(1, dtype=torch.cfloat)
    with pytest.raises(RuntimeError):
        TORCH_JACOBIAN[mode](torch.conj)(z)
    with pytest.raises(TorchcurvError, match=r"^jacobian"):
        torchcurv.jacobian(torch.conj, mode=mode)(z)


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_complex_output_raises(mode: str) -> None:
    """follows TestJac::test_complex_error (R -> C)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.conj(x * 0.5j)

    x = torch.randn(1)
    with pytest.raises(RuntimeError):
        TORCH_JACOBIAN[mode](f)(x)
    with pytest.raises(TorchcurvError, match=r"^jacobian"):
        torchcurv.jacobian(f, mode=mode)(x)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_complex_input_and_output_raise(mode: str) -> None:
    """follows TestJac::test_complex_error, for hessian."""
    with pytest.raises(TorchcurvError, match=r"^hessian"):
        torchcurv.hessian(lambda z: z.abs().sum(), mode=mode)(torch.randn(2, dtype=torch.cfloat))
    with pytest.raises(TorchcurvError, match=r"^hessian"):
        torchcurv.hessian(lambda x: (x * 0.5j).sum(), mode=mode)(torch.randn(2))


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_mutating_a_non_differentiated_argument(mode: str, chunk: int | None) -> None:
    """follows TestJac::test_inplace: y.copy_(x) on an argument not in argnums works, and
    y is left mutated, as torch.func leaves it."""

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y.copy_(x)
        return y * x

    x = randn(3)
    y_torch, y_ours = randn(3), randn(3)
    expected = TORCH_JACOBIAN[mode](f)(x, y_torch)
    actual = torchcurv.jacobian(f, mode=mode, chunk_size=chunk)(x, y_ours)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual, torch.diagflat(2 * x))
    torch.testing.assert_close(y_ours, y_torch)
    torch.testing.assert_close(y_ours, x)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_copy_into_argument_returned(mode: str, chunk: int | None) -> None:
    """follows TestJac::test_inplace (first half): d(y.copy_(x))/dx is the identity."""

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y.copy_(x)
        return y

    x, y = randn(2), randn(2)
    actual = torchcurv.jacobian(f, mode=mode, chunk_size=chunk)(x, y)
    torch.testing.assert_close(actual, torch.eye(2, dtype=F64))


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_slice_assignment_into_argument(mode: str, chunk: int | None) -> None:
    """follows TestJac::test_inplace (second half): x[:2] = y with argnums=(1, 2)."""

    def g(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x[:2] = y
        return torch.vstack([(x**2).sum(), (z**3).sum()])

    y, z = randn(2), randn(2)
    expected = TORCH_JACOBIAN[mode](g, argnums=(1, 2))(randn(3), y, z)
    actual = torchcurv.jacobian(g, (1, 2), mode=mode, chunk_size=chunk)(randn(3), y, z)
    assert_tree_close(actual, expected)
    assert_tree_close(actual, reference.jacobian(g, (1, 2))(randn(3), y, z))


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_passes_keyword_arguments(mode: str) -> None:
    """follows TestGradTransform::test_fn_with_kwargs: keywords reach func, undifferentiated.

    (torch 2.13's jacrev and jacfwd raise "f() got an unexpected keyword argument 'y'"
    here; the closed form is the reference.)"""
    x, y = randn(3), randn(3)

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y.exp()

    expected = torch.diag(y.exp())
    torch.testing.assert_close(torchcurv.jacobian(f, mode=mode)(x, y=y), expected)
    torch.testing.assert_close(torchcurv.jacobian(f, mode=mode)(x, y), expected)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_of_empty_input(mode: str, chunk: int | None) -> None:
    """An input with no entries gives an empty Jacobian of shape y.shape + (0,), as in
    jacrev (TestJac::test_diff_numel asks the same shape question)."""
    x = randn(0)
    f = lambda x: x.sum() + torch.ones(2, dtype=F64)  # noqa: E731
    actual = torchcurv.jacobian(f, mode=mode, chunk_size=chunk)(x)
    assert_tree_close(actual, jacrev(f)(x))
    assert actual.shape == (2, 0)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_of_empty_output(mode: str, chunk: int | None) -> None:
    """An output with no entries gives an empty Jacobian of shape (0,) + x.shape."""
    x = randn(2, 3)
    f = lambda x: x[:0]  # noqa: E731
    actual = torchcurv.jacobian(f, mode=mode, chunk_size=chunk)(x)
    assert_tree_close(actual, TORCH_JACOBIAN[mode](f)(x))
    assert actual.shape == (0, 3, 2, 3)


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_under_vmap_and_per_sample(mode: str) -> None:
    """follows TestJac::test_vmap_on_jac_simple: torch.vmap and per_sample over jacobian."""
    x = randn(2, 3)
    expected = torch.stack([torch.diagflat(row.cos()) for row in x])
    jac = torchcurv.jacobian(torch.sin, mode=mode)
    torch.testing.assert_close(torch.vmap(jac)(x), expected)
    torch.testing.assert_close(torchcurv.per_sample(jac, chunk_size=1)(x), expected)
    torch.testing.assert_close(torch.vmap(TORCH_JACOBIAN[mode](torch.sin))(x), expected)


@pytest.mark.parametrize("outer", JACOBIAN_MODES)
@pytest.mark.parametrize("inner", JACOBIAN_MODES)
def test_nested_jacobian(inner: str, outer: str) -> None:
    """follows TestJac::test_nested_jac_simple: jac(jac(f)) is the Hessian."""
    x = randn(3)
    nested = torchcurv.jacobian(
        torchcurv.jacobian(lambda x: x.sin().sum(), mode=inner), mode=outer
    )
    torch.testing.assert_close(nested(x), torch.diagflat(-x.sin()))


def test_jacobian_under_no_grad() -> None:
    """follows test_functional.py::TestAutogradFunctional::test_jacobian_no_grad: the
    Jacobian is computed under torch.no_grad and does not require grad."""
    x = randn(3)
    expected = torch.diag(x.exp())
    with torch.no_grad():
        for mode in JACOBIAN_MODES:
            actual = torchcurv.jacobian(torch.exp, mode=mode)(x)
            torch.testing.assert_close(actual, expected)
            assert not actual.requires_grad


# torch.func.linearize traces with make_fx, which warns about its own graph
@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning")
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_as_a_linear_map_matches_linearize(mode: str) -> None:
    """follows TestLinearize::test_basic and test_nested_input_output: the Jacobian,
    applied to tangents, equals torch.func.linearize's jvp function."""

    def f(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.sin() * y, (x * y).sum().reshape(1)

    x, y = randn(3, 2), randn(3, 2)
    tx, ty = randn(3, 2), randn(3, 2)
    value, jvp_fn = torch.func.linearize(f, x, y)
    J = torchcurv.jacobian(f, (0, 1), mode=mode)(x, y)
    applied = tuple(
        torch.einsum("...ij,ij->...", J[k][0], tx) + torch.einsum("...ij,ij->...", J[k][1], ty)
        for k in range(2)
    )
    assert_tree_close(applied, jvp_fn(tx, ty))
    assert_tree_close(f(x, y), value)


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_matches_autograd_functional_jacobian(mode: str) -> None:
    """follows test_functional.py::TestAutogradFunctional::test_jacobian_output: one
    input gives a tensor, a tuple of inputs a tuple, tuple outputs a tuple of tuples."""
    x, y = randn(4), randn(4)

    def one(x: torch.Tensor) -> torch.Tensor:
        return 3 * x.pow(2)

    def two(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y.sin()

    def two_out(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.exp() * y, x + 2 * y

    jac = partial(torchcurv.jacobian, mode=mode)
    assert_tree_close(jac(one)(x), AF.jacobian(one, x))
    assert_tree_close(jac(two, (0, 1))(x, y), AF.jacobian(two, (x, y)))
    assert_tree_close(jac(two_out, (0, 1))(x, y), AF.jacobian(two_out, (x, y)))
    assert_tree_close(jac(two_out, 0)(x, y), AF.jacobian(lambda x: two_out(x, y), x))


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_matches_jvp_and_vjp(mode: str) -> None:
    """follows test_functional.py::TestAutogradFunctional::test_jacobian_match_vjp_jvp."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return x**2 + x.sum()

    x, v = randn(4), randn(4)
    J = torchcurv.jacobian(f, mode=mode)(x)
    torch.testing.assert_close(J @ v, AF.jvp(f, x, v)[1])
    torch.testing.assert_close(v @ J, AF.vjp(f, x, v)[1])


def test_jacobian_bad_func_raises() -> None:
    """follows test_functional.py::TestAutogradFunctional::test_jacobian_err_check: a
    non-callable func and non-tensor inputs are refused."""
    with pytest.raises(TORCH_ERRORS):
        AF.jacobian("not callable", randn(3))  # type: ignore[arg-type]
    with pytest.raises(TorchcurvError):
        torchcurv.jacobian("not callable")  # type: ignore[arg-type]
    with pytest.raises(TORCH_ERRORS):
        AF.jacobian(torch.sin, [1.0, 2.0])  # type: ignore[arg-type]
    for mode in JACOBIAN_MODES:
        with pytest.raises(TorchcurvError):
            torchcurv.jacobian(torch.sin, mode=mode)([1.0, 2.0])
        with pytest.raises(TorchcurvError):
            torchcurv.jacobian(lambda n: n * 2.0, mode=mode)(torch.arange(3))


@pytest.mark.parametrize("mode", ["fwd", "auto"])
def test_forward_jacobian_randomness(mode: str) -> None:
    """follows TestJac / TestRandomness: jacfwd refuses random ops under
    randomness='error' and accepts randomness='same'."""
    x = torch.rand(3, 4)
    with pytest.raises(RuntimeError):
        jacfwd(torch.bernoulli)(x)
    with pytest.raises(TorchcurvError):
        torchcurv.jacobian(lambda x: torch.bernoulli(x) * x, mode="fwd")(x)
    expected = jacfwd(lambda x: torch.bernoulli(x) * x, randomness="same")
    actual = torchcurv.jacobian(lambda x: torch.bernoulli(x) * x, mode=mode, randomness="same")
    assert actual(x).shape == expected(x).shape == (3, 4, 3, 4)


# --------------------------------------------------------------------------------------
# Hessians: cases as data
# --------------------------------------------------------------------------------------


def _relu_chain(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return ((x.relu() * x) @ y.sin() @ z).sum()


HESSIAN_CASES = [
    Case(
        "sum_of_squares",
        "TestHessian::test_hessian_vectorize_correctness_simple",
        lambda x: (3 * x**2).sum(),
        lambda d: (randn(2, 3, 2, dtype=d),),
    ),
    Case(
        "three_inputs",
        "TestHessian::test_hessian_vectorize_correctness_multi_input",
        _relu_chain,
        lambda d: (randn(2, 3, dtype=d), randn(3, 2, dtype=d), randn(2, 2, dtype=d)),
        argnums=(0, 1, 2),
    ),
    Case(
        "three_inputs_as_one_tuple",
        "TestHessian::test_hessian_vectorize_correctness_multi_input",
        lambda inputs: _relu_chain(*inputs),
        lambda d: ((randn(2, 3, dtype=d), randn(3, 2, dtype=d), randn(2, 2, dtype=d)),),
    ),
    Case(
        "output_unrelated_to_one_input",
        "TestHessian::test_hessian_vectorize_correctness_unrelated_outputs",
        lambda x, y: (x**2).sum(),
        lambda d: (randn(2, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "output_unrelated_to_all_inputs",
        "TestHessian::test_hessian_vectorize_correctness_unrelated_outputs",
        lambda x, y: torch.ones([], dtype=x.dtype),
        lambda d: (randn(2, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "vector_output",
        "TestJac::test_hessian_simple",
        torch.sin,
        lambda d: (randn(3, dtype=d),),
    ),
    Case(
        "cross_terms",
        "test_functional.py::TestAutogradFunctional::test_hessian_output",
        lambda x, y: (x.pow(2) * y.exp()).sum() + (x * y).prod(),
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "second_argument_only",
        "test_functional.py::TestAutogradFunctional::test_hessian_output",
        lambda x, y: (x * y.tanh()).sum(),
        lambda d: (randn(3, dtype=d), randn(3, dtype=d)),
        argnums=1,
    ),
    Case(
        "scalar_input",
        "test_functional.py::TestAutogradFunctional::test_hessian_scalar",
        lambda x: 3 * x.sin() * x,
        lambda d: (randn(dtype=d),),
    ),
    Case(
        "one_element_input",
        "test_functional.py::TestAutogradFunctional::test_hessian_scalar",
        lambda x: (x.exp() * x).sum(),
        lambda d: (randn(1, dtype=d),),
    ),
    Case(
        "dict_input",
        "TestJac::test_multiple_inputs_outputs_pytree_multidim (for hessian)",
        lambda p: (p["a"].sin() * p["b"]).sum() + p["b"].pow(3).sum(),
        lambda d: ({"a": randn(2, dtype=d), "b": randn(2, dtype=d)},),
    ),
    Case(
        "pytree_output",
        "TestJac::test_multiple_outputs_pytree (for hessian)",
        lambda x: {"sum": x.pow(3).sum(), "parts": [x.sin(), x.prod()]},
        lambda d: (randn(3, dtype=d),),
    ),
    Case(
        "log_softmax_matrix",
        "TestGradTransform::test_log_softmax (second order)",
        lambda x, w: torch.log_softmax(w @ x, dim=-1)[0],
        lambda d: (randn(3, dtype=d), randn(4, 3, dtype=d)),
        argnums=(0, 1),
    ),
    Case(
        "non_tensor_argument",
        "TestJac::test_jac_with_non_tensor_args (for hessian)",
        lambda t, n: (t**n).sum(),
        lambda d: (randn(2, 2, dtype=d), 3),
    ),
]


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", HESSIAN_CASES, ids=repr)
def test_hessian_matches_torch_func(
    case: Case, dtype: torch.dtype, mode: str, chunk: int | None
) -> None:
    """hessian == torch.func.hessian, with the same nesting; in float64 also == the oracle.

    The case's `follows` names the test_eager_transforms.py (or test_functional.py) case.
    """
    args = case.make_args(dtype)
    actual = torchcurv.hessian(case.func, case.argnums, mode=mode, chunk_size=chunk)(*args)
    assert_tree_close(actual, torch_hessian(case.func, case.argnums)(*args))
    if dtype == F64:
        assert_tree_close(actual, reference.hessian(case.func, case.argnums)(*args))


def test_hessian_cases_follow_named_pytorch_tests() -> None:
    assert all(case.follows for case in HESSIAN_CASES)
    assert len({case.name for case in HESSIAN_CASES}) == len(HESSIAN_CASES)


# --------------------------------------------------------------------------------------
# Hessians: API cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 2, (1, 2), (2, None)], ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_matches_autograd_functional(mode: str, chunk: Any) -> None:
    """follows test_functional.py::TestAutogradFunctional::test_hessian_output and
    TestHessian::_test_against_reference: a tuple of inputs gives a tuple of tuples."""

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x.pow(2).sum() * y.sin()).sum() + (x.sum() * y.pow(2)).sum()

    x, y = randn(3), randn(2)
    hess = partial(torchcurv.hessian, mode=mode, chunk_size=chunk)
    assert_tree_close(hess(f, (0, 1))(x, y), AF.hessian(f, (x, y)))
    assert_tree_close(hess(f)(x, y), AF.hessian(lambda x: f(x, y), x))
    assert_tree_close(hess(lambda t: f(*t))((x, y)), AF.hessian(f, (x, y)))


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_scalar_shapes(mode: str) -> None:
    """follows test_functional.py::TestAutogradFunctional::test_hessian_scalar: a 0-d
    input gives a 0-d Hessian, a (1,) input a (1, 1) one."""
    x = randn()
    f = lambda x: x.pow(3).sum()  # noqa: E731
    assert torchcurv.hessian(f, mode=mode)(x).shape == AF.hessian(f, x).shape == ()
    assert torchcurv.hessian(f, mode=mode)(x.reshape(1)).shape == (1, 1)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_of_linear_function_is_zeros_not_none(mode: str) -> None:
    """follows TestHessian::test_hessian_vectorize_correctness_unrelated_outputs: a
    function linear in (or independent of) an input has a zero block, never None."""
    x, y = randn(3), randn(2)
    H = torchcurv.hessian(lambda x, y: (x * 2).sum() + y.pow(2).sum(), (0, 1), mode=mode)(x, y)
    assert torch.equal(H[0][0], torch.zeros(3, 3, dtype=F64))
    assert torch.equal(H[0][1], torch.zeros(3, 2, dtype=F64))
    torch.testing.assert_close(H[1][1], 2 * torch.eye(2, dtype=F64))


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_negative_argnums(mode: str, chunk: int | None) -> None:
    """follows TestSliceArgnums::test_flat_args_with_negative_int_argnum, for hessian.

    Deliberate difference: torch 2.13's torch.func.hessian(argnums=-1) returns zeros
    (its inner and outer jacobians see different argument lists); torchcurv gives the
    Hessian with respect to the last argument, as the oracle and argnums=1 do."""

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b**3).sum()

    a, b = randn(3), randn(3)
    actual = torchcurv.hessian(f, -1, mode=mode, chunk_size=chunk)(a, b)
    torch.testing.assert_close(actual, torch_hessian(f, 1)(a, b))
    torch.testing.assert_close(actual, reference.hessian(f, -1)(a, b))
    torch.testing.assert_close(actual, torch.diag(6 * a * b))


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_has_aux(mode: str, chunk: int | None) -> None:
    """follows TestJac::test_aux_pytree, for hessian: aux returned once, untouched."""

    def f(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return x.pow(3).sum(), {"value": x.sum(), "list": [x.cos()]}

    x = randn(3)
    actual = torchcurv.hessian(f, mode=mode, chunk_size=chunk, has_aux=True)(x)
    # torch.func.hessian has no has_aux; its definition, jacfwd(jacrev), does
    expected = jacfwd(jacrev(f, has_aux=True), has_aux=True)(x)
    assert_tree_close(actual, expected)
    torch.testing.assert_close(actual[0], torch.diag(6 * x))


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_per_sample_hessian_of_loss(mode: str, chunk: int | None) -> None:
    """follows TestHessian::test_jacfwd_different_levels: vmap(hessian(loss)) over a batch
    of (A, x1, x2) == vmap(jacrev(jacrev(loss)))."""

    def loss(A: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x2_hat = (A @ x1.T).T
        return ((x2 - x2_hat) ** 2).sum()

    x1 = randn(3, 5, 2)
    A = 0.1 * randn(3, 2, 2)
    expected = torch.vmap(jacrev(jacrev(loss)))(A, x1, x1)
    hess = torchcurv.hessian(loss, mode=mode, chunk_size=chunk)
    torch.testing.assert_close(torchcurv.per_sample(hess, chunk_size=chunk)(A, x1, x1), expected)
    torch.testing.assert_close(torch.vmap(hess)(A, x1, x1), expected)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_of_empty_input(mode: str, chunk: int | None) -> None:
    """An input with no entries gives an empty Hessian of the right shape."""
    x = randn(0, 2)
    actual = torchcurv.hessian(lambda x: x.pow(2).sum(), mode=mode, chunk_size=chunk)(x)
    assert_tree_close(actual, torch_hessian(lambda x: x.pow(2).sum())(x))
    assert actual.shape == (0, 2, 0, 2)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_of_empty_output(mode: str, chunk: int | None) -> None:
    """An output with no entries gives an empty Hessian of shape (0,) + x.shape * 2."""
    x = randn(3)
    actual = torchcurv.hessian(lambda x: x[:0] ** 2, mode=mode, chunk_size=chunk)(x)
    assert_tree_close(actual, torch_hessian(lambda x: x[:0] ** 2)(x))
    assert actual.shape == (0, 3, 3)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_hessian_mutating_a_non_differentiated_argument(mode: str, chunk: int | None) -> None:
    """follows TestJac::test_inplace, for hessian: y.copy_(x) on an argument outside
    argnums works and leaves y mutated.

    Deliberate difference: when a reverse stage sits over a chunked forward stage, func
    runs once per chunk and each run overwrites what the earlier runs' graphs saved;
    torchcurv says so (torch.func has no chunked forward stage)."""

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y.copy_(x)
        return (y * x**2).sum()

    x, y = randn(3), randn(3)
    if mode == "rev-over-fwd" and chunk is not None:
        with pytest.raises(TorchcurvError, match=r"^hessian: .*in place.*chunk_size=None"):
            torchcurv.hessian(f, mode=mode, chunk_size=chunk)(x, y)
        return
    actual = torchcurv.hessian(f, mode=mode, chunk_size=chunk)(x, y)
    torch.testing.assert_close(actual, torch_hessian(f)(x, randn(3)))
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize(("argnums", "args", "func"), BAD_ARGNUMS)
def test_hessian_bad_argnums_raise(argnums: Any, args: Any, func: Any) -> None:
    """follows TestJac::test_empty_argnums ... test_float_argnums, for hessian."""
    with pytest.raises(TORCH_ERRORS):
        torch_hessian(func, argnums=argnums)(*args)
    with pytest.raises(TorchcurvError):
        torchcurv.hessian(func, argnums=argnums)(*args)


def test_hessian_under_no_grad() -> None:
    """follows test_functional.py::TestAutogradFunctional::test_hessian_no_grad (its
    create_graph=False half)."""
    x = randn(3)
    f = lambda x: x.exp().sum() * x.sum()  # noqa: E731
    expected = reference.hessian(f)(x)
    with torch.no_grad():
        for mode in HESSIAN_MODES:
            actual = torchcurv.hessian(f, mode=mode)(x)
            torch.testing.assert_close(actual, expected)
            assert not actual.requires_grad


def test_hessian_accepts_vector_outputs_unlike_autograd_functional() -> None:
    """follows test_functional.py::TestAutogradFunctional::test_hessian_err_check.

    Deliberate difference from torch.autograd.functional.hessian, which requires a
    single-element output: torchcurv.hessian follows torch.func.hessian and gives one
    Hessian per output entry."""
    x = randn(3)
    with pytest.raises(RuntimeError):
        AF.hessian(torch.sin, x)
    torch.testing.assert_close(torchcurv.hessian(torch.sin)(x), torch_hessian(torch.sin)(x))


# --------------------------------------------------------------------------------------
# hvp / vhp: jvp- and vjp-style calls
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProductCase:
    """A scalar function and its primals (a tuple, one entry per argument)."""

    name: str
    follows: str
    func: Callable[..., torch.Tensor]
    make_primals: Callable[[], tuple[Any, ...]]
    tensors_only: bool = True  # torch.autograd.functional takes tuples of tensors only

    def __repr__(self) -> str:
        return self.name


PRODUCT_CASES = [
    ProductCase(
        "one_input",
        "TestJvp::test_simple / test_functional.py::test_hvp_output",
        lambda x: x.sin().sum() * x.pow(2).sum(),
        lambda: (randn(2, 3),),
    ),
    ProductCase(
        "two_inputs",
        "TestJvp::test_multiple_inputs / test_functional.py::test_vhp_output",
        lambda x, y: (x * y).pow(2).sum() + x.exp().sum(),
        lambda: (randn(2, 3), randn(2, 3)),
    ),
    ProductCase(
        "pytree_inputs",
        "TestJvp::test_pytree_inputs",
        lambda xy, y, z: ((xy[0] + 2 * xy[1]) * 3 * y * z).pow(2).sum(),
        lambda: ((randn(), randn()), randn(), randn()),
        tensors_only=False,
    ),
    ProductCase(
        "unrelated_input",
        "TestJvp::test_unrelated_input",
        lambda x, y: x.pow(3).sum(),
        lambda: (randn(2, 3), randn(2, 3)),
    ),
    ProductCase(
        "unrelated_output",
        "TestJvp::test_unrelated_output",
        lambda x, _c=randn(2, 3): _c.sum(),
        lambda: (randn(2, 3),),
    ),
    ProductCase(
        "scalar_input",
        "test_functional.py::TestAutogradFunctional::test_hvp_scalar",
        lambda x: x.exp() * x,
        lambda: (randn(),),
    ),
    ProductCase(
        "one_element_output",
        "test_functional.py::TestAutogradFunctional::test_vhp_scalar",
        lambda x: (x.pow(3) * 2).sum().reshape(1),
        lambda: (randn(4),),
    ),
]


def _torch_func_hvp(func: Callable[..., Any], primals: Any, tangents: Any) -> Any:
    """The torch.func recipe: jvp of grad (forward-over-reverse), all arguments."""
    grads = torch.func.grad(lambda *p: func(*p).sum(), argnums=tuple(range(len(primals))))
    return torch.func.jvp(grads, primals, tangents)[1]


@pytest.mark.parametrize("product", ["hvp", "vhp"])
@pytest.mark.parametrize("case", PRODUCT_CASES, ids=repr)
def test_hessian_vector_products_match_torch(case: ProductCase, product: str) -> None:
    """hvp/vhp == jvp(grad(f)) from torch.func, == torch.autograd.functional.hvp/vhp, and
    == the float64 oracle's Hessian times the vector."""
    primals = case.make_primals()
    tangents = tree_map(torch.randn_like, primals)
    value, result = getattr(torchcurv, product)(case.func, primals, tangents)
    assert isinstance(result, tuple)
    assert len(result) == len(primals)
    torch.testing.assert_close(value, case.func(*primals))
    assert_tree_close(result, _torch_func_hvp(case.func, primals, tangents))
    if case.tensors_only:
        expected_value, expected = getattr(AF, product)(case.func, primals, tangents)
        torch.testing.assert_close(value, expected_value)
        assert_tree_close(result, expected)
    argnums = tuple(range(len(primals)))
    H = reference.hessian(lambda *p: case.func(*p).sum(), argnums)(*primals)
    for i, block_row in enumerate(H):
        if not isinstance(primals[i], torch.Tensor):
            continue  # rows of a pytree primal are checked against torch.func above
        flat = sum(
            block.reshape(primals[i].numel(), -1) @ v.reshape(-1)
            for j, column in enumerate(block_row)
            for block, v in zip(tree_flatten(column)[0], tree_flatten(tangents[j])[0], strict=True)
        )
        torch.testing.assert_close(result[i], flat.reshape(primals[i].shape))


@pytest.mark.parametrize("product", ["hvp", "vhp"])
def test_hessian_vector_products_has_aux(product: str) -> None:
    """follows TestJvp::test_jvp_aux_tensor / test_jvp_aux_pytree: (value, hvp, aux)."""

    def f(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return x.pow(3).sum(), {"cos": x.cos()}

    x, v = randn(3), randn(3)
    value, result, aux = getattr(torchcurv, product)(f, (x,), (v,), has_aux=True)
    torch.testing.assert_close(value, x.pow(3).sum())
    torch.testing.assert_close(result[0], 6 * x * v)
    assert_tree_close(aux, {"cos": x.cos()})


def test_hvp_matches_vhp_and_hessian() -> None:
    """follows test_functional.py::TestAutogradFunctional::test_hessian_match_vhp_hvp."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return x.pow(3).sum() + (x[:-1] * x[1:]).exp().sum()

    x, v = randn(4), randn(4)
    H = torchcurv.hessian(f)(x)
    torch.testing.assert_close(torchcurv.hvp(f, (x,), (v,))[1][0], H @ v)
    torch.testing.assert_close(torchcurv.vhp(f, (x,), (v,))[1][0], v @ H)
    torch.testing.assert_close(AF.hvp(f, x, v)[1], H @ v)


ONE = torch.tensor(1.0, dtype=F64)
BAD_PRODUCT_CALLS = [
    pytest.param(lambda x: x, ONE, ONE, id="primals_not_a_tuple"),
    pytest.param(lambda x: x, ((ONE, ONE), ONE), (ONE, ONE), id="structure_mismatch"),
    pytest.param(lambda x, n: x * n, (ONE, 1), (ONE, ONE), id="non_tensor_primal"),
    pytest.param(lambda x, n: x * n, (ONE, ONE), (ONE, 1), id="non_tensor_tangent"),
    pytest.param(lambda x: x, ((),), ((),), id="no_tensors"),
    pytest.param(lambda x: x.sum(), (randn(3),), (randn(4),), id="tangent_shape"),
    pytest.param(lambda x: x, (randn(3),), (randn(3),), id="non_scalar_output"),
    pytest.param(lambda x: (x, x), (randn(1),), (randn(1),), id="tuple_output"),
]


@pytest.mark.parametrize(("func", "primals", "tangents"), BAD_PRODUCT_CALLS)
@pytest.mark.parametrize("product", ["hvp", "vhp"])
def test_hessian_vector_products_bad_calls_raise(
    product: str, func: Any, primals: Any, tangents: Any
) -> None:
    """follows TestJvp::test_pytree_inputs_error_cases and test_functional.py::
    TestAutogradFunctional::test_vhp_err_check / test_hvp_err_check: torch refuses these
    jvp/vjp calls (or, for non-scalar outputs, the Hessian-vector product), so does
    torchcurv."""
    with pytest.raises(TorchcurvError):
        getattr(torchcurv, product)(func, primals, tangents)


@pytest.mark.parametrize("product", ["hvp", "vhp"])
def test_hessian_vector_products_complex_raise(product: str) -> None:
    """follows TestJac::test_complex_error, for hvp/vhp."""
    z = torch.randn(2, dtype=torch.cfloat)
    with pytest.raises(TorchcurvError, match=rf"^{product}"):
        getattr(torchcurv, product)(lambda z: z.abs().sum(), (z,), (z,))


# --------------------------------------------------------------------------------------
# per_sample: the vmap API, cases as data
# --------------------------------------------------------------------------------------

Vmap = Callable[..., Callable[..., Any]]


@dataclass(frozen=True)
class VmapCase:
    """`build(vmap)` makes the batched function from a vmap-like transform; it is called
    on `make_args()` (and `make_kwargs()`), once with torch.vmap and once with
    torchcurv.per_sample."""

    name: str
    follows: str
    build: Callable[[Vmap], Callable[..., Any]]
    make_args: Callable[[], tuple[Any, ...]]
    make_kwargs: Callable[[], dict[str, Any]] = field(default=dict)

    def __repr__(self) -> str:
        return self.name


def _square(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _ident(x: torch.Tensor) -> torch.Tensor:
    return x


def _x_xy_xyy(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x, x * y, x * y * y


def _sin_tree(x: torch.Tensor) -> Any:
    y = x.sin()
    return y, (y, y)


def _nested_sum(z: Any) -> torch.Tensor:
    return z["x"][0] + z["x"][1][0] + z["y"][0] + z["y"][1]


def _args(*shapes: tuple[int, ...]) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: tuple(torch.randn(*shape) for shape in shapes)


VMAP_CASES = [
    VmapCase("single_input", "test_single_input", lambda vm: vm(_square), _args((2, 3))),
    VmapCase(
        "two_inputs", "test_multiple_inputs", lambda vm: vm(torch.mul), _args((2, 3), (2, 3))
    ),
    VmapCase(
        "two_outputs",
        "test_multiple_outputs",
        lambda vm: vm(lambda x: (x * x, x * x * x)),
        _args((3,)),
    ),
    VmapCase(
        "list_output", "test_multiple_outputs2", lambda vm: vm(lambda x: [x, x]), _args((3,))
    ),
    VmapCase(
        "list_of_one_output", "test_multiple_outputs2", lambda vm: vm(lambda x: [x]), _args((3,))
    ),
    VmapCase(
        "constant_function",
        "test_constant_function",
        lambda vm: vm(lambda x: torch.tensor(3.14)),
        _args((3,)),
    ),
    VmapCase("out_dims_1", "test_nonzero_out_dims", lambda vm: vm(_ident, 0, 1), _args((2, 3))),
    VmapCase("out_dims_2", "test_nonzero_out_dims", lambda vm: vm(_ident, 0, 2), _args((2, 3, 5))),
    VmapCase(
        "out_dims_negative",
        "test_nonzero_out_dims",
        lambda vm: vm(_ident, 0, -1),
        _args((2, 3, 5)),
    ),
    VmapCase(
        "out_dims_all_outputs",
        "test_nonzero_out_dims",
        lambda vm: vm(lambda x, y: (x, y), 0, 2),
        _args((2, 3, 5), (2, 3, 5)),
    ),
    VmapCase(
        "out_dims_not_identity",
        "test_nonzero_out_dims",
        lambda vm: vm(_x_xy_xyy, 0, 1),
        _args((2, 3, 5), (2, 3, 5)),
    ),
    VmapCase(
        "out_dims_per_output",
        "test_multiple_out_dims",
        lambda vm: vm(lambda x: (x, x), 0, (0, 1)),
        _args((2, 3, 5)),
    ),
    VmapCase(
        "out_dims_four_outputs",
        "test_multiple_out_dims",
        lambda vm: vm(lambda x, y: (x, x, x, x * y), 0, (-1, 0, 1, 2)),
        _args((2, 3, 5), (2, 3, 5)),
    ),
    VmapCase(
        "out_dims_one_tuple",
        "test_out_dims_edge_case",
        lambda vm: vm(_ident, 0, (1,)),
        _args((2, 3)),
    ),
    VmapCase(
        "pytree_returns",
        "test_pytree_returns",
        lambda vm: vm(lambda x: (x.sin(), (x.sin(), x), [x, (x, x.cos())])),
        _args((2, 3)),
    ),
    VmapCase(
        "ordered_dict_returns",
        "test_pytree_odict_returns",
        lambda vm: vm(lambda t: OrderedDict([("sin", t.sin()), ("cos", t.cos())])),
        _args((2, 3)),
    ),
    VmapCase(
        "pytree_out_dims",
        "test_pytree_returns_outdims",
        lambda vm: vm(_sin_tree, 0, (0, (0, 1))),
        _args((2, 3)),
    ),
    VmapCase(
        "out_dims_broadcast",
        "test_pytree_returns_broadcast_simple",
        lambda vm: vm(_sin_tree, 0, 1),
        _args((2, 3)),
    ),
    VmapCase(
        "out_dims_broadcast_nested",
        "test_pytree_returns_broadcast_nested",
        lambda vm: vm(_sin_tree, 0, (0, 1)),
        _args((2, 3)),
    ),
    VmapCase("in_dims_1", "test_non_zero_in_dims", lambda vm: vm(_ident, (1,)), _args((2, 3, 5))),
    VmapCase(
        "in_dims_0_1",
        "test_non_zero_in_dims",
        lambda vm: vm(torch.mul, (0, 1)),
        _args((2, 3), (3, 2)),
    ),
    VmapCase(
        "in_dims_1_0",
        "test_non_zero_in_dims",
        lambda vm: vm(torch.mul, (1, 0)),
        _args((2, 3), (3, 2)),
    ),
    VmapCase(
        "in_dims_none_tensor",
        "test_none_in_dims",
        lambda vm: vm(torch.mul, (0, None)),
        _args((2, 3), (2, 3)),
    ),
    VmapCase(
        "in_dims_none_number",
        "test_none_in_dims",
        lambda vm: vm(torch.mul, (0, None)),
        lambda: (torch.randn(2, 3), 2),
    ),
    VmapCase(
        "in_dims_negative",
        "test_nested_negative_in_dims",
        lambda vm: vm(torch.mul, (-1, -1)),
        _args((2, 3), (2, 3)),
    ),
    VmapCase(
        "in_dims_1_out_dims_1",
        "test_non_default_in_dims_out_dims",
        lambda vm: vm(lambda x: x * 2, 1, 1),
        _args((2, 3, 5)),
    ),
    VmapCase(
        "in_dims_2_out_dims_1",
        "test_non_default_in_dims_out_dims",
        lambda vm: vm(lambda x: x * 2, 2, 1),
        _args((2, 3, 5)),
    ),
    VmapCase(
        "tuple_input",
        "test_accepts_nested_inputs",
        lambda vm: vm(lambda z: z[0] + z[1]),
        lambda: ((torch.randn(2, 3), torch.randn(2, 3)),),
    ),
    VmapCase(
        "tuple_input_nested_in_dims",
        "test_accepts_nested_inputs",
        lambda vm: vm(lambda z: z[0] + z[1], ((0, 1),)),
        lambda: ((torch.randn(2, 3), torch.randn(3, 2)),),
    ),
    VmapCase(
        "list_input_list_in_dims",
        "test_accepts_nested_inputs",
        lambda vm: vm(lambda z: z[0] + z[1], ([0, 0],)),
        lambda: ([torch.randn(2, 3), torch.randn(2, 3)],),
    ),
    VmapCase(
        "dict_input_dict_in_dims",
        "test_accepts_nested_inputs",
        lambda vm: vm(lambda z: z["x"] + z["y"], ({"x": 0, "y": 1},)),
        lambda: ({"x": torch.randn(2, 3), "y": torch.randn(3, 2)},),
    ),
    VmapCase(
        "deeply_nested_input",
        "test_accepts_nested_inputs",
        lambda vm: vm(_nested_sum),
        lambda: (
            {
                "x": [torch.randn(2, 3), (torch.randn(2, 3),)],
                "y": [torch.randn(2, 3), torch.randn(2, 3)],
            },
        ),
    ),
    VmapCase(
        "nested_same_map_dim",
        "test_nested_with_same_map_dim",
        lambda vm: vm(vm(torch.mul)),
        _args((2, 3, 5), (2, 3, 5)),
    ),
    VmapCase(
        "nested_three_levels",
        "test_nested_with_same_map_dim",
        lambda vm: vm(vm(vm(torch.mul))),
        _args((2, 3, 5), (2, 3, 5)),
    ),
    VmapCase(
        "nested_diag_embed",
        "test_nested_with_diag_embed",
        lambda vm: vm(vm(torch.diag_embed)),
        _args((3, 3, 5)),
    ),
    VmapCase(
        "nested_different_map_dims",
        "test_nested_with_different_map_dim",
        lambda vm: lambda x, y: vm(lambda x: vm(lambda y: x * y)(y))(x),
        _args((2, 3), (5, 3)),
    ),
    VmapCase(
        "nested_noop_inner",
        "test_noop_in_inner_vmap",
        lambda vm: lambda x, y: vm(lambda x: vm(lambda y: x)(y))(x),
        _args((3,), (5,)),
    ),
    VmapCase(
        "nested_out_dims",
        "test_nested_out_dims",
        lambda vm: vm(lambda y: vm(_ident, 0, -1)(y), 0, -1),
        _args((2, 3, 5, 7)),
    ),
    VmapCase(
        "nested_in_dims",
        "test_nested_non_default_in_dims",
        lambda vm: vm(vm(vm(torch.mul), (1, 0)), (1, 2)),
        _args((5, 2, 3), (3, 5, 2)),
    ),
    VmapCase(
        "keyword_argument_not_batched",
        "torch.vmap's rule: keyword arguments are passed through, not mapped",
        lambda vm: vm(lambda x, scale: x * scale),
        _args((4, 3)),
        lambda: {"scale": torch.randn(3)},
    ),
    VmapCase(
        "out_dims_none",
        "test_out_dims_normal_tensor",
        lambda vm: vm(lambda x: torch.arange(3.0), 0, None),
        _args((2, 3)),
    ),
    VmapCase(
        "out_dims_none_for_one_output",
        "test_out_dims_none_tuple",
        lambda vm: vm(lambda x: (x * 2, torch.arange(3.0)), 0, (0, None)),
        _args((4, 3)),
    ),
    VmapCase(
        "empty_batch",
        "test_fallback_zero_dim (a batch of size 0, for batchable ops)",
        lambda vm: vm(lambda x: (x.sin(), x.sum())),
        _args((0, 3)),
    ),
    VmapCase(
        "empty_batch_in_dims_1",
        "test_fallback_zero_dim (a batch of size 0, for batchable ops)",
        lambda vm: vm(torch.mul, (1, None), 1),
        _args((3, 0), (3,)),
    ),
    VmapCase(
        "empty_batch_of_jacobians",
        "TestJac::test_vmap_on_jac_simple, on an empty batch",
        lambda vm: vm(jacrev(torch.sin)),
        _args((0, 3)),
    ),
]


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("case", VMAP_CASES, ids=repr)
def test_per_sample_matches_vmap(case: VmapCase, chunk: int | None) -> None:
    """per_sample == torch.vmap, structure included, for every chunk size.

    The case's `follows` names the test_vmap.py::TestVmapAPI case."""
    args, kwargs = case.make_args(), case.make_kwargs()
    expected = case.build(torch.vmap)(*args, **kwargs)
    actual = case.build(partial(torchcurv.per_sample, chunk_size=chunk))(*args, **kwargs)
    assert_tree_close(actual, expected)


def test_vmap_cases_follow_named_pytorch_tests() -> None:
    assert all(case.follows for case in VMAP_CASES)
    assert len({case.name for case in VMAP_CASES}) == len(VMAP_CASES)


BAD_VMAP_CALLS = [
    pytest.param(lambda vm: vm(lambda x: 3.14)(torch.ones(3)), id="float_output"),
    pytest.param(lambda vm: vm(lambda x: (x, 3))(torch.ones(3)), id="int_among_outputs"),
    pytest.param(lambda vm: vm(torch.mul)(torch.randn(2), torch.randn(3)), id="batch_sizes"),
    pytest.param(
        lambda vm: vm(lambda z: z[0] + z[1], ((0, 0),))((torch.randn(2), torch.randn(3))),
        id="batch_sizes_in_pytree",
    ),
    pytest.param(lambda vm: vm(lambda: torch.ones(3))(), id="no_inputs"),
    pytest.param(lambda vm: vm(lambda x: torch.ones(3), (None,))(1), id="no_tensors"),
    pytest.param(lambda vm: vm(torch.sum)(torch.randn(2, 3), 0), id="in_dim_for_a_number"),
    pytest.param(lambda vm: vm(torch.mul, [0, 0])(torch.randn(3), torch.randn(3)), id="list"),
    pytest.param(lambda vm: vm(torch.mul, (0,))(torch.randn(3), torch.randn(3)), id="few_dims"),
    pytest.param(
        lambda vm: vm(torch.mul, (0, 0, 0))(torch.randn(3), torch.randn(3)), id="many_dims"
    ),
    pytest.param(lambda vm: vm(_square)(torch.randn([])), id="in_dim_of_0d"),
    pytest.param(lambda vm: vm(_square, (-3,))(torch.randn(2, 3)), id="in_dim_negative_range"),
    pytest.param(lambda vm: vm(_square, (2,))(torch.randn(2, 3)), id="in_dim_range"),
    pytest.param(lambda vm: vm(_ident, 0, "lol")(torch.randn(2, 3)), id="out_dims_str"),
    pytest.param(lambda vm: vm(_ident, 0, (0, 0))(torch.randn(2, 3)), id="out_dims_many"),
    pytest.param(lambda vm: vm(lambda x: (x, x), 0, (0,))(torch.randn(2, 3)), id="out_dims_few"),
    pytest.param(lambda vm: vm(_ident, 0, 3)(torch.randn(2, 3, 5)), id="out_dim_range"),
    pytest.param(lambda vm: vm(_ident, 0, -4)(torch.randn(2, 3, 5)), id="out_dim_negative"),
    pytest.param(lambda vm: vm(_ident, 0, None)(torch.randn(2, 3)), id="out_dims_none_batched"),
    # per_sample falls back to a loop where vmap cannot batch (a deliberate difference,
    # with a warning); the loop's Python number is then refused.
    pytest.param(
        lambda vm: vm(lambda x: x.item())(torch.randn(3)),
        id="item",
        marks=pytest.mark.filterwarnings("ignore::torchcurv.TorchcurvFallbackWarning"),
    ),
]


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("call", BAD_VMAP_CALLS)
def test_per_sample_refuses_what_vmap_refuses(call: Any, chunk: int | None) -> None:
    """follows test_vmap.py::TestVmapAPI::test_non_tensor_output_raises,
    test_different_map_dim_size_raises, test_func_with_no_inputs,
    test_func_with_no_tensors, test_integer_in_dim_but_not_tensor_input_err_msg,
    test_in_dims_wrong_type_err_msg, test_not_enough_in_dims_err_msg,
    test_in_dim_not_in_tensor_err_msg, test_out_dims_must_be_int_or_collection_of_int_err_msg,
    test_out_dims_and_num_outputs_mismatch_err_msg, test_out_dim_out_of_bounds_err_msg,
    test_out_dims_none and test_item_throws: both raise (the texts differ)."""
    with pytest.raises(TORCH_ERRORS):
        call(torch.vmap)
    with pytest.raises(TORCH_ERRORS):
        call(partial(torchcurv.per_sample, chunk_size=chunk))


def test_per_sample_auto_chunk_matches_vmap() -> None:
    """follows test_vmap.py::TestVmapAPI::test_nonzero_out_dims with a memory budget:
    chunk_size='auto' changes nothing but the chunking."""
    x, y = torch.randn(6, 3, 5), torch.randn(6, 3, 5)
    expected = torch.vmap(_x_xy_xyy, 0, 1)(x, y)
    actual = torchcurv.per_sample(_x_xy_xyy, 0, 1, memory_budget="64MiB")(x, y)
    assert_tree_close(actual, expected)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
def test_per_sample_gradients(chunk: int | None) -> None:
    """follows TestGradTransform::test_per_sample_grads_simple: vmap(grad) == a loop."""

    def loss(weight: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((x @ weight - t) ** 2).sum()

    weight, x, t = randn(4, 2), randn(5, 4), randn(5, 2)
    grad = torch.func.grad(loss)
    batched = torchcurv.per_sample(grad, (None, 0, 0), chunk_size=chunk)(weight, x, t)
    expected = torch.stack([grad(weight, x[i], t[i]) for i in range(5)])
    torch.testing.assert_close(batched, expected)
    torch.testing.assert_close(batched, torch.vmap(grad, (None, 0, 0))(weight, x, t))


# --------------------------------------------------------------------------------------
# deliberate differences from torch.func (each one tested as torchcurv behaves)
# --------------------------------------------------------------------------------------


def test_difference_errors_are_torchcurv_errors() -> None:
    """torch raises RuntimeError for bad argnums; torchcurv raises TorchcurvError, which
    is a ValueError and a TypeError, with a message naming the function and argument."""
    assert issubclass(TorchcurvError, ValueError)
    assert issubclass(TorchcurvError, TypeError)
    with pytest.raises(RuntimeError):
        jacrev(torch.sin, argnums=(0, 0))(randn(3))
    with pytest.raises(TorchcurvError, match=r"^jacobian: argnums"):
        torchcurv.jacobian(torch.sin, argnums=(0, 0))


def test_difference_jacobian_randomness_different_is_refused() -> None:
    """torch.func.jacfwd accepts randomness='different' (each column its own draw);
    torchcurv.jacobian offers 'error' and 'same' only: a Jacobian whose columns see
    different random functions is not the Jacobian of any one function."""
    x = torch.rand(3)
    assert jacfwd(torch.bernoulli, randomness="different")(x).shape == (3, 3)
    with pytest.raises(TorchcurvError):
        torchcurv.jacobian(torch.bernoulli, mode="fwd", randomness="different")


def test_difference_forward_jacobian_chunks() -> None:
    """torch.func.jacfwd has no chunk_size; torchcurv chunks forward mode too."""
    x = randn(5)
    torch.testing.assert_close(
        torchcurv.jacobian(torch.sin, mode="fwd", chunk_size=2)(x), jacfwd(torch.sin)(x)
    )


def test_difference_empty_input_in_forward_mode() -> None:
    """torch.func.jacfwd fails on an input with no entries (an IndexError from inside
    vmap); torchcurv returns the empty Jacobian, as jacrev does."""
    x = randn(0)
    f = lambda x: x.sum() + torch.ones(2, dtype=F64)  # noqa: E731
    with pytest.raises(IndexError):
        jacfwd(f)(x)
    assert_tree_close(torchcurv.jacobian(f, mode="fwd")(x), jacrev(f)(x))


def test_difference_per_sample_falls_back_to_a_loop() -> None:
    """torch.vmap refuses data-dependent control flow; per_sample warns
    (TorchcurvFallbackWarning) and loops over the samples instead."""
    x = randn(4)
    f = lambda x: x if x > 0 else -x  # noqa: E731
    with pytest.raises(RuntimeError):
        torch.vmap(f)(x)
    with pytest.warns(torchcurv.TorchcurvFallbackWarning):
        actual = torchcurv.per_sample(f)(x)
    torch.testing.assert_close(actual, x.abs())


def test_difference_hvp_takes_tuples_like_torch_func() -> None:
    """torch.autograd.functional.hvp takes a bare tensor and returns (value, tensor);
    torchcurv.hvp follows torch.func.jvp: primals and tangents are tuples and the product
    is a tuple with one entry per primal."""
    x, v = randn(3), randn(3)
    f = lambda x: x.pow(3).sum()  # noqa: E731
    _, expected = AF.hvp(f, x, v)
    _, (actual,) = torchcurv.hvp(f, (x,), (v,))
    torch.testing.assert_close(actual, expected)
    with pytest.raises(TorchcurvError):
        torchcurv.hvp(f, x, v)  # type: ignore[arg-type]
