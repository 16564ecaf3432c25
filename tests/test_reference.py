"""The loop oracle `torchcurv.reference`: closed forms, torch's own references, modes.

The oracle checks every other transform, so it is checked here only against closed
forms, `torch.autograd.functional`, `torch.func` and finite differences, never against
torchcurv itself.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.autograd.functional import hessian as autograd_hessian
from torch.autograd.functional import jacobian as autograd_jacobian
from torch.utils._pytree import tree_flatten

import torchcurv
from torchcurv import reference

D = torch.float64


def assert_same_tree(actual: Any, expected: Any) -> None:
    """Same nesting, same leaf shapes and dtypes, values within float64 tolerance."""
    actual_leaves, actual_spec = tree_flatten(actual)
    expected_leaves, expected_spec = tree_flatten(expected)
    assert actual_spec == expected_spec
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
        torch.testing.assert_close(a, e)


def central_difference(g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``d g / d x`` for a scalar `g` by central differences (float64)."""
    flat = x.reshape(-1)
    grad = torch.zeros_like(flat)
    for j in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[j] = torch.finfo(D).eps ** (1 / 3) * max(1.0, abs(float(flat[j])))
        grad[j] = (g((flat + step).reshape(x.shape)) - g((flat - step).reshape(x.shape))) / (
            2 * step[j]
        )
    return grad.reshape(x.shape)


# --------------------------------------------------------------------------------------
# closed forms
# --------------------------------------------------------------------------------------


def test_quadratic_form() -> None:
    A, x = torch.randn(5, 5, dtype=D), torch.randn(5, dtype=D)
    torch.testing.assert_close(reference.hessian(lambda x: x @ A @ x)(x), A + A.T)
    torch.testing.assert_close(reference.jacobian(lambda x: x @ A @ x)(x), (A + A.T) @ x)


def test_sum_of_sines() -> None:
    x = torch.randn(6, dtype=D)
    torch.testing.assert_close(reference.hessian(lambda x: x.sin().sum())(x), torch.diag(-x.sin()))
    torch.testing.assert_close(reference.jacobian(lambda x: x.sin().sum())(x), x.cos())


def test_elementwise_square_per_output_hessians() -> None:
    x = torch.randn(3, dtype=D)
    H = reference.hessian(lambda x: x**2)(x)
    expected = torch.zeros(3, 3, 3, dtype=D)
    for k in range(3):
        expected[k, k, k] = 2.0
    assert torch.equal(H, expected)


def test_linear_function_has_exact_zero_hessian_and_its_matrix_as_jacobian() -> None:
    W, b, x = torch.randn(3, 4, dtype=D), torch.randn(3, dtype=D), torch.randn(4, dtype=D)
    H = reference.hessian(lambda x: W @ x + b)(x)
    assert torch.equal(H, torch.zeros(3, 4, 4, dtype=D))
    torch.testing.assert_close(reference.jacobian(lambda x: W @ x + b)(x), W)


@pytest.mark.parametrize(
    "func",
    [lambda x: torch.ones(2, dtype=D), lambda x: x.detach() ** 2, lambda x: (x > 0).long()],
    ids=["constant", "detached", "integer-output"],
)
def test_output_independent_of_the_input_gives_zeros(func: Callable[..., Any]) -> None:
    x = torch.randn(2, dtype=D)
    assert torch.equal(reference.jacobian(func)(x), torch.zeros(2, 2, dtype=D))
    assert torch.equal(reference.hessian(func)(x), torch.zeros(2, 2, 2, dtype=D))


def test_scalar_input_and_output() -> None:
    x = torch.tensor(0.7, dtype=D)
    torch.testing.assert_close(reference.hessian(torch.sin)(x), -x.sin())
    torch.testing.assert_close(reference.jacobian(torch.sin)(x), x.cos())


def test_dtype_of_the_input_is_kept() -> None:
    x = torch.randn(3)
    H = reference.hessian(lambda x: (x**3).sum())(x)
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, torch.diag(6 * x))


# --------------------------------------------------------------------------------------
# layout: pytrees and argnums, against torch.autograd.functional and torch.func
# --------------------------------------------------------------------------------------


def two_argument_scalar(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.sin() * y[:3]).sum() * y.exp().sum() + (x**3).sum()


def two_argument_vector(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.cat([x * y[:3], y.tanh()])


def test_argnums_tuple_matches_autograd_functional() -> None:
    x, y = torch.randn(3, dtype=D), torch.randn(4, dtype=D)
    assert_same_tree(
        reference.hessian(two_argument_scalar, argnums=(0, 1))(x, y),
        autograd_hessian(two_argument_scalar, (x, y)),
    )
    assert_same_tree(
        reference.jacobian(two_argument_vector, argnums=(0, 1))(x, y),
        autograd_jacobian(two_argument_vector, (x, y)),
    )


def test_single_argnums_is_unwrapped_and_a_one_tuple_is_not() -> None:
    x, y = torch.randn(3, dtype=D), torch.randn(4, dtype=D)
    full = autograd_hessian(two_argument_scalar, (x, y))
    torch.testing.assert_close(reference.hessian(two_argument_scalar, argnums=1)(x, y), full[1][1])
    torch.testing.assert_close(
        reference.hessian(two_argument_scalar, argnums=-2)(x, y), full[0][0]
    )
    one = reference.hessian(two_argument_scalar, argnums=(1,))(x, y)
    assert isinstance(one, tuple)
    assert len(one) == 1
    assert isinstance(one[0], tuple)
    torch.testing.assert_close(one[0][0], full[1][1])


def test_tuple_output_nests_outside_the_arguments() -> None:
    x, y = torch.randn(3, dtype=D), torch.randn(4, dtype=D)

    def pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return two_argument_vector(x, y), two_argument_scalar(x, y)

    assert_same_tree(
        reference.jacobian(pair, argnums=(0, 1))(x, y), autograd_jacobian(pair, (x, y))
    )


def dict_function(params: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    h = torch.tanh(params["w"] @ x + params["b"])
    return {"sum": h.sum(), "h": h}


@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)], ids=lambda a: f"argnums({a})")
def test_dict_pytrees_match_torch_func(argnums: int | tuple[int, ...]) -> None:
    params = {"w": torch.randn(2, 3, dtype=D), "b": torch.randn(2, dtype=D)}
    x = torch.randn(3, dtype=D)
    assert_same_tree(
        reference.jacobian(dict_function, argnums=argnums)(params, x),
        torch.func.jacrev(dict_function, argnums=argnums)(params, x),
    )
    assert_same_tree(
        reference.hessian(dict_function, argnums=argnums)(params, x),
        torch.func.hessian(dict_function, argnums=argnums)(params, x),
    )


def test_other_arguments_and_keywords_pass_through_untouched() -> None:
    x = torch.randn(3, dtype=D)
    seen: dict[str, Any] = {}

    def func(x: torch.Tensor, label: str, *, scale: torch.Tensor) -> torch.Tensor:
        seen.update(label=label, scale=scale)
        return scale * (x**2).sum()

    scale = torch.tensor(1.5, dtype=D)
    H = reference.hessian(func)(x, "tag", scale=scale)
    torch.testing.assert_close(H, 3.0 * torch.eye(3, dtype=D))
    assert seen["label"] == "tag"
    assert seen["scale"] is scale


def test_the_callers_tensors_are_not_written() -> None:
    x = torch.randn(3, dtype=D)
    before = x.clone()
    reference.hessian(lambda x: (x**3).sum())(x)
    assert torch.equal(x, before)
    assert not x.requires_grad
    assert x.grad is None


# --------------------------------------------------------------------------------------
# grad modes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "context", [torch.no_grad, torch.inference_mode], ids=lambda c: c.__name__
)
def test_works_under_no_grad_and_inference_mode(context: Callable[[], Any]) -> None:
    layer = torch.nn.Linear(3, 2).double()
    with context():
        x = torch.randn(3, dtype=D)
        H = reference.hessian(lambda x: torch.tanh(layer(x)).sum())(x)
        J = reference.jacobian(lambda x: x.sin())(x)
        zero = reference.hessian(lambda x: layer(x))(x)
    W, b = layer.weight.detach(), layer.bias.detach()
    t = torch.tanh(W @ x + b)
    torch.testing.assert_close(H, W.T @ torch.diag(-2 * t * (1 - t**2)) @ W)
    assert H.abs().max() > 0
    torch.testing.assert_close(J, torch.diag(x.cos()))
    assert torch.equal(zero, torch.zeros(2, 3, 3, dtype=D))


def test_inference_mode_result_is_usable_outside_it() -> None:
    with torch.inference_mode():
        x = torch.randn(3, dtype=D)
        H = reference.hessian(lambda x: (x**3).sum())(x)
    assert not H.is_inference()
    H += 1  # an inference tensor could not be written outside inference mode
    torch.testing.assert_close(H, torch.diag(6 * x) + 1)


def test_inference_tensor_captured_by_func_gets_a_clear_error() -> None:
    with torch.inference_mode():
        w = torch.randn(3, dtype=D)
    with pytest.raises(
        torchcurv.TorchcurvError,
        match=r"reference\.hessian: func uses a tensor created under torch\.inference_mode",
    ):
        reference.hessian(lambda x: (w * x.sin()).sum())(torch.randn(3, dtype=D))


def test_other_runtime_errors_of_func_pass_through() -> None:
    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        reference.jacobian(broken)(torch.randn(2, dtype=D))


# --------------------------------------------------------------------------------------
# create_graph: results you can train through
# --------------------------------------------------------------------------------------


def cubic(A: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(x) = sum((A x)^3) / 6, whose Hessian is A^T diag(A x) A."""
    return lambda x: ((A @ x) ** 3).sum() / 6


def test_create_graph_gradient_of_the_hessian_trace_in_closed_form() -> None:
    # trace(H) = sum_k (A x)_k r_k with r_k = |A_k|^2, so
    # d/dx trace(H) = A^T r and d/dA trace(H) = r x^T + 2 diag(A x) A.
    A = torch.randn(4, 3, dtype=D, requires_grad=True)
    x = torch.randn(3, dtype=D, requires_grad=True)
    H = reference.hessian(cubic(A), create_graph=True)(x)
    with torch.no_grad():
        torch.testing.assert_close(H, A.T @ torch.diag(A @ x) @ A)
    grad_A, grad_x = torch.autograd.grad(H.trace(), (A, x))
    with torch.no_grad():
        r = (A**2).sum(1)
        torch.testing.assert_close(grad_x, A.T @ r)
        torch.testing.assert_close(grad_A, torch.outer(r, x) + torch.diag(A @ x) @ A * 2)


def test_create_graph_gradient_of_a_quadratic_forms_hessian_trace() -> None:
    # H(x^T A x) = A + A^T, so d/dA trace(H) = 2 I and d/dA <H, M> = M + M^T.
    A = torch.randn(3, 3, dtype=D, requires_grad=True)
    M = torch.randn(3, 3, dtype=D)
    H = reference.hessian(lambda x: x @ A @ x, create_graph=True)(torch.randn(3, dtype=D))
    (grad_trace,) = torch.autograd.grad(H.trace(), A, retain_graph=True)
    torch.testing.assert_close(grad_trace, 2 * torch.eye(3, dtype=D))
    (grad_inner,) = torch.autograd.grad((H * M).sum(), A)
    torch.testing.assert_close(grad_inner, M + M.T)


def test_create_graph_gradient_matches_finite_differences() -> None:
    A0 = torch.randn(3, 3, dtype=D)
    x = torch.randn(3, dtype=D)
    weights = torch.randn(3, 3, dtype=D)

    def loss_of_hessian(A: torch.Tensor, create_graph: bool) -> torch.Tensor:
        H = reference.hessian(lambda x: torch.sin(A @ x).sum(), create_graph=create_graph)(x)
        return (weights * H).sum()

    A = A0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of_hessian(A, True), A)
    fd = central_difference(lambda A: loss_of_hessian(A, False), A0)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-6)


def test_create_graph_matches_autograd_double_backward() -> None:
    x = torch.randn(3, dtype=D, requires_grad=True)
    y = torch.randn(4, dtype=D, requires_grad=True)
    ours = reference.hessian(two_argument_scalar, argnums=(0, 1), create_graph=True)(x, y)
    theirs = autograd_hessian(two_argument_scalar, (x, y), create_graph=True)

    def loss(H: Any) -> torch.Tensor:
        return H[0][0].sum() + 2 * H[0][1].sum() + 3 * H[1][1].sin().sum()

    assert_same_tree(
        torch.autograd.grad(loss(ours), (x, y)), torch.autograd.grad(loss(theirs), (x, y))
    )


def test_create_graph_jacobian_trains_through() -> None:
    A = torch.randn(2, 3, dtype=D, requires_grad=True)
    x = torch.randn(3, dtype=D, requires_grad=True)
    J = reference.jacobian(lambda x: A @ x**2, create_graph=True)(x)  # A diag(2x)
    M = torch.randn(2, 3, dtype=D)
    grad_A, grad_x = torch.autograd.grad((J * M).sum(), (A, x))
    torch.testing.assert_close(grad_A, M * 2 * x.detach())
    torch.testing.assert_close(grad_x, 2 * (A.detach() * M).sum(0))


def test_create_graph_flows_to_what_the_argument_was_computed_from() -> None:
    p = torch.randn(3, dtype=D, requires_grad=True)
    H = reference.hessian(lambda x: (x**3).sum() / 6, create_graph=True)(2 * p)  # diag(2p)
    (grad,) = torch.autograd.grad(H.trace(), p)
    torch.testing.assert_close(grad, torch.full((3,), 2.0, dtype=D))


def test_create_graph_works_under_no_grad() -> None:
    A = torch.randn(3, 3, dtype=D, requires_grad=True)
    with torch.no_grad():
        H = reference.hessian(lambda x: x @ A @ x, create_graph=True)(torch.randn(3, dtype=D))
    (grad,) = torch.autograd.grad(H.trace(), A)
    torch.testing.assert_close(grad, 2 * torch.eye(3, dtype=D))


def test_create_graph_keeps_derivatives_partial_for_a_tensor_passed_twice() -> None:
    # f(a, b) = sum(a b^2): d2f/da db = diag(2 b), whatever a and b are the same tensor.
    x = torch.randn(3, dtype=D, requires_grad=True)
    H = reference.hessian(lambda a, b: (a * b**2).sum(), argnums=(0, 1), create_graph=True)(x, x)
    detached = reference.hessian(lambda a, b: (a * b**2).sum(), argnums=(0, 1))(x, x)
    assert_same_tree(tuple(tuple(h.detach() for h in row) for row in H), detached)
    torch.testing.assert_close(detached[0][1], torch.diag(2 * x.detach()))
    (grad,) = torch.autograd.grad(H[0][1].trace(), x)  # trace = 2 sum(b)
    torch.testing.assert_close(grad, torch.full((3,), 2.0, dtype=D))


def test_without_create_graph_results_are_detached_and_grads_untouched() -> None:
    A = torch.randn(3, 3, dtype=D, requires_grad=True)
    x = torch.randn(3, dtype=D, requires_grad=True)
    H = reference.hessian(lambda x: ((A @ x) ** 3).sum(), create_graph=False)(x)
    J = reference.jacobian(lambda x: (A @ x) ** 3)(x)
    assert not H.requires_grad
    assert not J.requires_grad
    assert A.grad is None
    assert x.grad is None


# --------------------------------------------------------------------------------------
# empty inputs and outputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("create_graph", [False, True], ids=lambda c: f"create_graph({c})")
def test_empty_input(create_graph: bool) -> None:
    x = torch.zeros(0, dtype=D)
    J = reference.jacobian(lambda x: x.sum() + x.new_ones(2), create_graph=create_graph)(x)
    H = reference.hessian(lambda x: (x**2).sum(), create_graph=create_graph)(x)
    assert J.shape == (2, 0)
    assert H.shape == (0, 0)
    assert H.dtype == D


@pytest.mark.parametrize("create_graph", [False, True], ids=lambda c: f"create_graph({c})")
def test_empty_output(create_graph: bool) -> None:
    x = torch.randn(3, dtype=D)
    J = reference.jacobian(lambda x: x[:0] ** 2, create_graph=create_graph)(x)
    H = reference.hessian(lambda x: {"e": (x**2)[:0], "s": x.sum()}, create_graph=create_graph)(x)
    assert J.shape == (0, 3)
    assert H["e"].shape == (0, 3, 3)
    assert torch.equal(H["s"], torch.zeros(3, 3, dtype=D))


def test_empty_pytree_leaf_among_arguments() -> None:
    params = {"w": torch.randn(2, dtype=D), "empty": torch.zeros(0, 2, dtype=D)}
    H = reference.hessian(lambda p: (p["w"] ** 3).sum() + p["empty"].sum())(params)
    assert H["empty"]["empty"].shape == (0, 2, 0, 2)
    assert H["w"]["empty"].shape == (2, 0, 2)
    torch.testing.assert_close(H["w"]["w"], torch.diag(6 * params["w"]))


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_complex_input_is_refused() -> None:
    z = torch.randn(3, dtype=torch.complex128)
    for transform, name in [(reference.jacobian, "jacobian"), (reference.hessian, "hessian")]:
        with pytest.raises(
            torchcurv.TorchcurvError,
            match=rf"reference\.{name}: the argument\(s\) at argnums=0 must be real.*view_as_real",
        ):
            transform(lambda z: (z * z).abs().sum())(z)


def test_complex_output_is_refused() -> None:
    with pytest.raises(
        torchcurv.TorchcurvError, match=r"reference\.jacobian: func must return real"
    ):
        reference.jacobian(lambda x: x * 1j)(torch.randn(2, dtype=D))


BUILD_ERRORS = [
    ((3,), {}, r"reference\.{name}: func must be callable, got 3\. Pass a function"),
    ((torch.sin, True), {}, r"argnums must be an int or a non-empty tuple of ints, got True"),
    ((torch.sin, 1.0), {}, r"argnums must be an int or a non-empty tuple of ints, got 1\.0"),
    ((torch.sin, ()), {}, r"argnums must be an int or a non-empty tuple of ints, got \(\)"),
    ((torch.sin, [0]), {}, r"argnums must be an int or a non-empty tuple of ints, got \[0\]"),
    ((torch.sin, (0, 0)), {}, r"argnums must not repeat an index, got \(0, 0\)"),
    ((torch.sin,), {"create_graph": 1}, r"create_graph must be a bool, got 1\. Pass"),
]


@pytest.mark.parametrize("name", ["jacobian", "hessian"])
@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    BUILD_ERRORS,
    ids=[f"build-error-{i}" for i in range(len(BUILD_ERRORS))],
)
def test_bad_arguments_are_refused_when_the_transform_is_built(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message.format(name=name)):
        getattr(reference, name)(*args, **kwargs)


CALL_ERRORS = [
    (2, (torch.ones(2, dtype=D),), r"argnums is out of range for a call with 1 positional"),
    (0, (), r"argnums is out of range for a call with 0 positional.*Call the transformed"),
    ((0, -2), (torch.ones(2, dtype=D),) * 2, r"argnums names the same argument twice"),
    (
        0,
        (torch.arange(2),),
        r"the argument\(s\) at argnums=0 must be floating-point to be differentiated",
    ),
    (
        (0, 1),
        (torch.ones(1, dtype=D), "a"),
        r"the argument\(s\) at argnums=\(0, 1\) must be tensors",
    ),
]


@pytest.mark.parametrize(
    ("argnums", "args", "message"),
    CALL_ERRORS,
    ids=[f"call-error-{i}" for i in range(len(CALL_ERRORS))],
)
def test_bad_calls_are_refused(argnums: Any, args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=r"reference\.hessian: " + message):
        reference.hessian(lambda *a: a[0].sum(), argnums=argnums)(*args)


@pytest.mark.parametrize("out", [3.0, None, (), {"a": 1}], ids=repr)
def test_func_returning_non_tensors_is_refused(out: Any) -> None:
    with pytest.raises(
        torchcurv.TorchcurvError,
        match=r"reference\.jacobian: func must return a Tensor or a pytree of Tensors",
    ):
        reference.jacobian(lambda x: out)(torch.ones(2, dtype=D))


# --------------------------------------------------------------------------------------
# independence
# --------------------------------------------------------------------------------------


def test_reference_imports_nothing_from_torchcurv_but_its_errors() -> None:
    path = Path(reference.__file__)
    assert path.name == "reference.py"
    source = path.read_text()
    imported: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level > 0:
                imported.append("." * node.level + module)
            elif module.split(".")[0] == "torchcurv":
                imported.append(module)
        elif isinstance(node, ast.Import):
            imported += [a.name for a in node.names if a.name.split(".")[0] == "torchcurv"]
    assert imported
    assert set(imported) <= {"._errors", "torchcurv._errors"}, imported
