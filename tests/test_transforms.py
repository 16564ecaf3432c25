"""Function transforms: closed forms, agreement with torch.func and the oracle, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import torchcurv
from torchcurv import reference
from torchcurv.testing import (
    assert_chunk_invariant,
    assert_matches_finite_differences,
    assert_matches_reference,
    assert_symmetric,
    assert_trees_close,
)

D = torch.float64
HESSIAN_MODES = ["fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd", "auto"]
JACOBIAN_MODES = ["rev", "fwd", "auto"]
CHUNKS = [None, 1, 3, (2, 1), (None, 2), (1, None)]


def chunk_id(chunk: Any) -> str:
    return f"chunk({chunk})"


# --------------------------------------------------------------------------------------
# closed forms, every mode and chunk size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_per_output_hessians_of_weighted_squares(mode: str, chunk: Any) -> None:
    # f(x) = x * x * arange(4): output k is k x_k^2, its Hessian 2k e_k e_k^T.
    x = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=D)
    H = torchcurv.hessian(lambda x: x * x * torch.arange(4, dtype=D), mode=mode, chunk_size=chunk)(
        x
    )
    expected = torch.stack([torch.diag(2.0 * k * torch.eye(4, dtype=D)[k]) for k in range(4)])
    assert H.shape == (4, 4, 4)
    assert_trees_close(H, expected)


@pytest.mark.parametrize("chunk", CHUNKS, ids=chunk_id)
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_quadratic_form_gives_a_plus_a_transpose(mode: str, chunk: Any) -> None:
    A = torch.randn(5, 5, dtype=D)
    x = torch.randn(5, dtype=D)
    H = torchcurv.hessian(lambda x: x @ A @ x, mode=mode, chunk_size=chunk)(x)
    assert_trees_close(H, A + A.T)
    assert_symmetric(H)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_sum_of_sines_gives_minus_sine_diagonal(mode: str) -> None:
    x = torch.randn(6, dtype=D)
    H = torchcurv.hessian(lambda x: torch.sin(x).sum(), mode=mode, chunk_size=(1, 4))(x)
    assert_trees_close(H, torch.diag(-torch.sin(x)))


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_linear_prediction_has_exact_zero_hessian(mode: str) -> None:
    layer = torch.nn.Linear(4, 3).double()
    x = torch.randn(4, dtype=D)
    H = torchcurv.hessian(lambda x: layer(x), mode=mode)(x)
    assert H.shape == (3, 4, 4)
    assert torch.equal(H, torch.zeros(3, 4, 4, dtype=D))
    assert torch.equal(reference.hessian(lambda x: layer(x))(x), H)


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_squared_loss_of_linear_layer_is_constant(mode: str) -> None:
    W = torch.randn(3, 4, dtype=D)
    b, y = torch.randn(3, dtype=D), torch.randn(3, dtype=D)
    for x in torch.randn(3, 4, dtype=D):
        H = torchcurv.hessian(lambda x: ((W @ x + b - y) ** 2).sum(), mode=mode)(x)
        assert_trees_close(H, 2 * W.T @ W)


@pytest.mark.parametrize("chunk", [None, 1, 2, 5], ids=chunk_id)
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_of_matrix_product_is_the_matrix(mode: str, chunk: Any) -> None:
    A = torch.randn(3, 5, dtype=D)
    x = torch.randn(5, dtype=D)
    assert_trees_close(torchcurv.jacobian(lambda x: A @ x, mode=mode, chunk_size=chunk)(x), A)


# --------------------------------------------------------------------------------------
# pytrees, argnums, has_aux: agreement with torch.func and the loop oracle
# --------------------------------------------------------------------------------------


def tree_function(x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "scalar": torch.tanh(x.sum() * y["a"]).sum() * y["b"].exp().sum(),
        "vector": torch.sin(x[:2] * y["a"]) @ y["b"],
    }


def tree_args() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return torch.randn(3, dtype=D), {"a": torch.randn(2, dtype=D), "b": torch.randn(2, 2, dtype=D)}


@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0), -1], ids=lambda a: f"argnums({a})")
@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_pytree_hessian_matches_torch_func_and_oracle(mode: str, argnums: Any) -> None:
    x, y = tree_args()
    H = assert_matches_reference(
        torchcurv.hessian, tree_function, x, y, argnums=argnums, mode=mode, chunk_size=(2, 3)
    )
    # torch.func.hessian returns zeros for negative argnums (torch 2.13); jacrev of
    # jacrev does not, so it is the torch.func reference here.
    expected = torch.func.jacrev(
        torch.func.jacrev(tree_function, argnums=argnums), argnums=argnums
    )(x, y)
    assert_trees_close(H, expected)
    if argnums != -1:
        assert_trees_close(H, torch.func.hessian(tree_function, argnums=argnums)(x, y))


def test_negative_argnums_is_not_silently_zero() -> None:
    # torch.func.hessian(f, argnums=-1) returns zeros here; torchcurv must not.
    x, y = torch.ones(2, dtype=D), torch.full((2,), 2.0, dtype=D)
    H = torchcurv.hessian(lambda x, y: (x * y**3).sum(), argnums=-1)(x, y)
    assert_trees_close(H, torch.diag(6 * x * y))


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)], ids=lambda a: f"argnums({a})")
@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_pytree_jacobian_matches_torch_func_and_oracle(mode: str, argnums: Any) -> None:
    x, y = tree_args()
    J = assert_matches_reference(
        torchcurv.jacobian, tree_function, x, y, argnums=argnums, order=1, mode=mode, chunk_size=2
    )
    assert_trees_close(J, torch.func.jacrev(tree_function, argnums=argnums)(x, y))


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_scalar_input_and_scalar_output(mode: str) -> None:
    x = torch.tensor(0.7, dtype=D)
    assert_trees_close(torchcurv.hessian(torch.sin, mode=mode)(x), -torch.sin(x))
    assert_trees_close(
        torchcurv.jacobian(torch.sin, mode=mode[:3] if mode != "auto" else mode)(x), torch.cos(x)
    )
    assert_trees_close(reference.hessian(torch.sin)(x), -torch.sin(x))


def test_unused_argument_gives_zero_blocks_not_none() -> None:
    x, z = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    for mode in HESSIAN_MODES:
        H = torchcurv.hessian(lambda x, z: (x**3).sum(), argnums=(0, 1), mode=mode)(x, z)
        assert torch.equal(H[1][1], torch.zeros(2, 2, dtype=D))
        assert torch.equal(H[0][1], torch.zeros(3, 2, dtype=D))
        assert_trees_close(H[0][0], torch.diag(6 * x))
    oracle = reference.hessian(lambda x, z: (x**3).sum(), argnums=(0, 1))(x, z)
    assert torch.equal(oracle[1][0], torch.zeros(2, 3, dtype=D))


@pytest.mark.parametrize("mode", HESSIAN_MODES)
def test_has_aux_returns_aux_untouched(mode: str) -> None:
    x = torch.randn(3, dtype=D)
    H, aux = torchcurv.hessian(
        lambda x: ((x**3).sum(), {"twice": 2 * x}), mode=mode, has_aux=True, chunk_size=1
    )(x)
    assert_trees_close(H, torch.diag(6 * x))
    assert_trees_close(aux, {"twice": 2 * x})


@pytest.mark.parametrize("mode", JACOBIAN_MODES)
def test_jacobian_has_aux(mode: str) -> None:
    x = torch.randn(3, dtype=D)
    J, aux = torchcurv.jacobian(lambda x: (x**2, x.sum()), mode=mode, has_aux=True)(x)
    assert_trees_close(J, torch.diag(2 * x))
    assert_trees_close(aux, x.sum())


def test_matches_autograd_functional_hessian() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x).prod() + F.softplus(x).pow(3).sum()

    x = torch.randn(5, dtype=D)
    expected = torch.autograd.functional.hessian(f, x)
    for mode in HESSIAN_MODES:
        assert_trees_close(torchcurv.hessian(f, mode=mode)(x), expected)


def test_chunking_and_finite_differences_on_a_smooth_function() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.exp(torch.sin(x) @ torch.arange(1.0, 7.0, dtype=D).reshape(6, 1)).sum()

    x = torch.randn(6, dtype=D)
    H = assert_chunk_invariant(torchcurv.hessian, f, x, chunk_sizes=[1, 2, 5, 6, 7, (1, 3)])
    assert_matches_finite_differences(f, H, x)
    J = torchcurv.jacobian(torch.sin, mode="fwd", chunk_size=4)(x)
    assert_matches_finite_differences(torch.sin, J, x, order=1)


def test_inside_vmap_matches_torch_func() -> None:
    X = torch.randn(5, 3, dtype=D)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x).prod()

    expected = torch.vmap(torch.func.hessian(f))(X)
    for mode in HESSIAN_MODES:
        batched = torch.vmap(torchcurv.hessian(f, chunk_size=(1, 2), mode=mode))(X)
        assert_trees_close(batched, expected)


# --------------------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------------------


def dropped_square(x: torch.Tensor) -> torch.Tensor:
    return (F.dropout(x, 0.5, training=True) ** 2).sum()


@pytest.mark.parametrize("mode", HESSIAN_MODES[:4])
def test_randomness_same_shares_one_mask_across_chunks(mode: str) -> None:
    x = torch.randn(8, dtype=D)
    torch.manual_seed(3)
    H = torchcurv.hessian(dropped_square, randomness="same", mode=mode, chunk_size=1)(x)
    # (mask * x / (1 - p))^2 has Hessian 2 * mask / (1 - p)^2 = 8 * mask: one mask, all rows.
    diag = torch.diagonal(H)
    assert set(diag.tolist()) <= {0.0, 8.0}
    assert torch.equal(H, torch.diag(diag))
    torch.manual_seed(3)
    unchunked = torchcurv.hessian(dropped_square, randomness="same", mode=mode)(x)
    assert torch.equal(unchunked, H)


def test_randomness_error_is_a_clear_error() -> None:
    with pytest.raises(
        torchcurv.TorchcurvError,
        match=r"hessian: .*random operation.*"
        r"randomness='same'.*model\.eval\(\)",
    ):
        torchcurv.hessian(dropped_square)(torch.randn(4, dtype=D))


# --------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------


def test_hvp_and_vhp_closed_form() -> None:
    A = torch.randn(4, 4, dtype=D)
    A = A + A.T
    x, v = torch.randn(4, dtype=D), torch.randn(4, dtype=D)
    value, (hv,) = torchcurv.hvp(lambda x: 0.5 * x @ A @ x, (x,), (v,))
    assert_trees_close(hv, A @ v)
    assert_trees_close(value, 0.5 * x @ A @ x)
    value, (vh,), aux = torchcurv.vhp(
        lambda x: (0.5 * x @ A @ x, x.sum()), (x,), (v,), has_aux=True
    )
    assert_trees_close(vh, A @ v)
    assert_trees_close(aux, x.sum())


def test_hvp_of_two_arguments_matches_full_hessian() -> None:
    x, y = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    vx, vy = torch.randn(3, dtype=D), torch.randn(2, dtype=D)

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sin(x.sum() * y).sum()

    _, (hx, hy) = torchcurv.hvp(f, (x, y), (vx, vy))
    H = torchcurv.hessian(f, argnums=(0, 1))(x, y)
    assert_trees_close(hx, H[0][0] @ vx + H[0][1] @ vy)
    assert_trees_close(hy, H[1][0] @ vx + H[1][1] @ vy)


# --------------------------------------------------------------------------------------
# bad input: clear errors naming the function, the argument and the fix
# --------------------------------------------------------------------------------------

BUILD_ERRORS = [
    ("hessian", dict(chunk_size=0), r"hessian: chunk_size must be positive, got 0\. Pass"),
    ("hessian", dict(chunk_size=-3), r"hessian: chunk_size must be positive, got -3"),
    ("hessian", dict(chunk_size=(1, 0)), r"chunk_size\[1\] \(outer\) must be None or a positive"),
    ("hessian", dict(chunk_size=(1, 2, 3)), r"chunk_size must be a pair \(inner, outer\)"),
    ("hessian", dict(chunk_size=1.5), r"chunk_size must be None, a positive int or a pair"),
    ("hessian", dict(mode="fwd"), r"hessian: mode must be one of 'fwd-over-rev'.*got 'fwd'"),
    ("hessian", dict(argnums="0"), r"hessian: argnums must be an int or a non-empty tuple"),
    ("hessian", dict(argnums=(0, 0)), r"hessian: argnums must not repeat an index"),
    ("hessian", dict(argnums=()), r"hessian: argnums must be an int or a non-empty tuple"),
    ("hessian", dict(has_aux=1), r"hessian: has_aux must be a bool, got 1"),
    ("hessian", dict(randomness="different"), r"hessian: randomness must be one of 'error'"),
    ("jacobian", dict(mode="fwd-over-rev"), r"jacobian: mode must be one of 'rev', 'fwd'"),
    ("jacobian", dict(chunk_size=0), r"jacobian: chunk_size must be None or a positive int"),
    ("jacobian", dict(chunk_size=True), r"jacobian: chunk_size must be None or a positive int"),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    BUILD_ERRORS,
    ids=[f"{n}-{next(iter(k))}={k[next(iter(k))]!r}" for n, k, _ in BUILD_ERRORS],
)
def test_bad_arguments_fail_when_the_transform_is_built(
    name: str, kwargs: dict[str, Any], message: str
) -> None:
    transform = getattr(torchcurv, name)
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        transform(torch.sin, **kwargs)


def test_func_must_be_callable() -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=r"hessian: func must be callable"):
        torchcurv.hessian(3)  # type: ignore[arg-type]


CALL_ERRORS = [
    (
        lambda: torchcurv.hessian(lambda x: x.sum())(torch.arange(3)),
        r"hessian: the argument\(s\) at argnums=0 must be floating-point.*int64.*to\(torch",
    ),
    (
        lambda: torchcurv.hessian(lambda x, y: x.sum(), argnums=2)(torch.ones(2), torch.ones(2)),
        r"hessian: argnums is out of range for a call with 2 positional argument\(s\), got 2",
    ),
    (
        lambda: torchcurv.jacobian(lambda x: 3.0)(torch.ones(2)),
        r"jacobian: func must return a Tensor or a pytree of Tensors, got 3\.0",
    ),
    (
        lambda: torchcurv.hessian(lambda x: x.sum(), has_aux=True)(torch.ones(2)),
        r"hessian: func must return a pair \(output, aux\) when has_aux=True",
    ),
    (
        lambda: torchcurv.hvp(lambda x: x, (torch.ones(3),), (torch.ones(3),)),
        r"hvp: func must return a scalar \(one-element\) tensor.*Reduce the output",
    ),
    (
        lambda: torchcurv.hvp(lambda x: x.sum(), torch.ones(3), (torch.ones(3),)),
        r"hvp: primals must be a non-empty tuple.*\(x,\)",
    ),
    (
        lambda: torchcurv.vhp(lambda x: x.sum(), (torch.ones(3),), (torch.ones(2),)),
        r"vhp: tangents must match the primals' shapes",
    ),
    (
        lambda: torchcurv.vhp(lambda x: x.sum(), (torch.ones(3),), ()),
        r"vhp: tangents must be a tuple of 1 item",
    ),
    (
        lambda: reference.hessian(lambda x: x.sum())(torch.arange(2)),
        r"reference\.hessian: the argument\(s\) at argnums=0 must be floating-point",
    ),
]


@pytest.mark.parametrize(
    ("call", "message"), CALL_ERRORS, ids=[f"call-error-{i}" for i in range(len(CALL_ERRORS))]
)
def test_bad_calls_give_clear_errors(call: Any, message: str) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=message):
        call()


def test_errors_are_value_and_type_errors() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        torchcurv.hessian(torch.sin, chunk_size=0)
    with pytest.raises(TypeError, match="argnums"):
        torchcurv.hessian(torch.sin, argnums=1.0)  # type: ignore[arg-type]
