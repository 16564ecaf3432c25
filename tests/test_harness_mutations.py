"""The harness catches bugs: deliberately broken transforms fail its assertions.

Each test builds a mutant of a correct transform (a Jacobian transposed, a Hessian with
a tiny asymmetric error, chunks concatenated in the wrong order, a block returned as
None, argnums ignored, samples leaking into each other, the last chunk dropped, a
Hessian off by 0.1%) and checks that the matching `torchcurv.testing` assertion fails
with a message that says what went wrong. Each test also runs the correct transform
through the same assertion (the positive control), so no test can pass because an
assertion always fails. Where a mutation is only visible for some inputs, the property
is "whenever the mutant's result differs, the harness says so" (`assume`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import torchcurv
from torchcurv.testing import (
    assert_chunk_invariant,
    assert_matches_finite_differences,
    assert_matches_reference,
    assert_per_sample_matches_loop,
    assert_symmetric,
    assert_trees_close,
)
from torchcurv.testing import strategies as tcst

D = torch.float64
Transform = Callable[..., Callable[..., Any]]

#: The relative size of the asymmetric error in `perturbed_hessian`.
PERTURBATION = 1e-4


def at_most(examples: int) -> settings:
    """The loaded profile's settings, with at most `examples` examples (a cap for slow
    tests that never raises the ``dev`` profile's count)."""
    return settings(max_examples=min(settings.default.max_examples, examples))


def says(what: str, problem: str) -> str:
    """A regex for the harness's message ``<what><leaf path>: <problem>``; the leaf path
    is ``<root>`` for a single tensor, ``[0][1]`` for a block of a pytree."""
    return re.escape(what) + r"(<root>|(\[\d+\])*): " + problem


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a mutation is observable: the results differ well beyond rounding."""
    return a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# the mutants
# --------------------------------------------------------------------------------------


def transposed_jacobian(func: Any, argnums: Any = 0, **kwargs: Any) -> Callable[..., Any]:
    """Bug: returns ``J^T`` (``x.shape + y.shape``) instead of ``J``."""
    jacobian = torchcurv.jacobian(func, argnums, **kwargs)
    return lambda *args: jacobian(*args).mT


def perturbed_hessian(func: Any, argnums: Any = 0, **kwargs: Any) -> Callable[..., Any]:
    """Bug: entry ``(0, n-1)`` is off by `PERTURBATION` relative to the largest entry."""
    hessian = torchcurv.hessian(func, argnums, **kwargs)

    def broken(*args: Any) -> torch.Tensor:
        H = hessian(*args).clone()
        H[0, -1] += PERTURBATION * max(1.0, float(H.abs().max()))
        return H

    return broken


def none_for_unused(func: Any, argnums: Any = 0, **kwargs: Any) -> Callable[..., Any]:
    """Bug: the blocks of the (unused) second argument come back as None, as with
    ``torch.autograd.grad(..., allow_unused=True)``."""
    hessian = torchcurv.hessian(func, argnums, **kwargs)

    def broken(*args: Any) -> Any:
        H = hessian(*args)
        return tuple(
            tuple(None if 1 in (i, j) else block for j, block in enumerate(row))
            for i, row in enumerate(H)
        )

    return broken


def drops_unused(func: Any, argnums: Any = 0, **kwargs: Any) -> Callable[..., Any]:
    """Bug: the blocks of the (unused) second argument are left out."""
    hessian = torchcurv.hessian(func, argnums, **kwargs)
    return lambda *args: ((hessian(*args)[0][0],),)


def ignores_argnums(func: Any, argnums: Any = 0, **kwargs: Any) -> Callable[..., Any]:
    """Bug: always differentiates argument 0."""
    return torchcurv.hessian(func, 0, **kwargs)


def ignores_argnums_in_one_mode(
    func: Any, argnums: Any = 0, *, mode: str = "fwd-over-rev", **kwargs: Any
) -> Callable[..., Any]:
    """Bug: ``mode="rev-over-fwd"`` differentiates argument 0 whatever `argnums` says."""
    return torchcurv.hessian(func, 0 if mode == "rev-over-fwd" else argnums, mode=mode, **kwargs)


def reversed_chunks(single: Callable[..., Any], chunk_size: int) -> Callable[..., Any]:
    """Bug: a batched `single` that concatenates its chunks of samples in reverse order."""
    batched = torchcurv.per_sample(single)
    return lambda X: torch.cat([batched(chunk) for chunk in X.split(chunk_size)][::-1])


def batch_centred(single: Callable[..., Any]) -> Callable[..., Any]:
    """Bug: centres the inputs over the batch before the per-sample computation, so each
    sample's result depends on the others."""
    batched = torchcurv.per_sample(single)
    return lambda X: batched(X - X.mean(dim=0, keepdim=True))


def _rows_chunk(n: int, chunk_size: Any) -> int:
    outer = chunk_size[1] if isinstance(chunk_size, tuple) else chunk_size
    return n if outer is None else min(outer, n)


def _hvp_rows(func: Any, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    def hvp(v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(torch.func.grad(func), (x,), (v,))[1]

    return torch.vmap(hvp)(basis)


def remainder_dropping_hessian(
    func: Any, argnums: Any = 0, *, chunk_size: Any = None, **kwargs: Any
) -> Callable[..., Any]:
    """Bug: a chunked Hessian whose loop ``range(0, n - n % k, k)`` skips the last,
    partial chunk of rows and concatenates what it computed."""

    def broken(x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        k = _rows_chunk(n, chunk_size)
        basis = torch.eye(n, dtype=x.dtype)
        return torch.cat(
            [_hvp_rows(func, x, basis[start : start + k]) for start in range(0, n - n % k, k)]
        )

    return broken


def remainder_zeroing_hessian(
    func: Any, argnums: Any = 0, *, chunk_size: Any = None, **kwargs: Any
) -> Callable[..., Any]:
    """Bug: like `remainder_dropping_hessian`, into a preallocated result: the rows of
    the last, partial chunk stay zero."""

    def broken(x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        k = _rows_chunk(n, chunk_size)
        basis = torch.eye(n, dtype=x.dtype)
        H = x.new_zeros(n, n)
        for start in range(0, n - n % k, k):
            H[start : start + k] = _hvp_rows(func, x, basis[start : start + k])
        return H

    return broken


# --------------------------------------------------------------------------------------
# a transposed Jacobian
# --------------------------------------------------------------------------------------


@st.composite
def linear_maps(draw: st.DrawFn, *, square: bool) -> torch.Tensor:
    """A matrix ``W`` (rows drawn as a batch), square or with as many rows as columns."""
    n = draw(st.integers(2, 4))
    m = n if square else draw(st.integers(1, 4).filter(lambda m: m != n))
    return draw(tcst.inputs_for((n,), batch_size=m))


@given(linear_maps(square=False), tcst.jacobian_modes())
def test_transposed_non_square_jacobian_fails_on_shape(W: torch.Tensor, mode: str) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(W @ x)

    x = torch.linspace(-1, 1, W.shape[1], dtype=D)
    m, n = W.shape
    shape = re.escape(f"shape {(n, m)} != expected {(m, n)}")
    with pytest.raises(AssertionError, match=says("transposed_jacobian vs reference", shape)):
        assert_matches_reference(transposed_jacobian, f, x, order=1, mode=mode)
    assert_matches_reference(torchcurv.jacobian, f, x, order=1, mode=mode)


@given(linear_maps(square=True), tcst.jacobian_modes())
def test_transposed_square_jacobian_fails_on_values(W: torch.Tensor, mode: str) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return W @ x + torch.sin(x)  # J = W + diag(cos x): J^T differs iff W is asymmetric

    assume(differs(W, W.T))
    x = torch.linspace(-1, 1, W.shape[1], dtype=D)
    with pytest.raises(
        AssertionError, match=says("transposed_jacobian vs reference", "values differ")
    ) as failure:
        assert_matches_reference(transposed_jacobian, f, x, order=1, mode=mode)
    assert "worst:" in str(failure.value)
    assert "entries out of tolerance" in str(failure.value)
    with pytest.raises(
        AssertionError, match=says("vs central finite differences", "values differ")
    ):
        assert_matches_finite_differences(f, transposed_jacobian(f, mode=mode)(x), x, order=1)
    J = assert_matches_reference(torchcurv.jacobian, f, x, order=1, mode=mode)
    assert_matches_finite_differences(f, J, x, order=1)


# --------------------------------------------------------------------------------------
# a tiny asymmetric error in a Hessian
# --------------------------------------------------------------------------------------


@given(tcst.functions(min_dim=2), tcst.hessian_modes())
def test_asymmetric_hessian_error_is_caught(f: tcst.TestFunction, mode: str) -> None:
    n = f.dim
    corner = re.escape(f"at {(0, n - 1)}:")
    H = perturbed_hessian(f.func, mode=mode)(f.x)
    with pytest.raises(
        AssertionError, match=says("Hessian vs its transpose", "values differ")
    ) as failure:
        assert_symmetric(H)
    assert re.search(corner, str(failure.value))
    with pytest.raises(
        AssertionError, match=says("perturbed_hessian vs reference", "values differ")
    ) as failure:
        assert_matches_reference(perturbed_hessian, f.func, f.x, mode=mode)
    assert re.search(corner, str(failure.value))
    assert "1 of" in str(failure.value)  # exactly one entry is wrong

    H = assert_matches_reference(torchcurv.hessian, f.func, f.x, mode=mode)
    assert_symmetric(H)
    assert_trees_close(H, f.hessian(f.x))


# --------------------------------------------------------------------------------------
# per-sample results: wrong chunk order, samples that leak into each other
# --------------------------------------------------------------------------------------

varying_functions = tcst.functions(kinds=["separable", "composition"])


@at_most(100)  # six batched Hessians per example
@given(varying_functions, st.data())
def test_chunks_in_the_wrong_order_are_caught(f: tcst.TestFunction, data: Any) -> None:
    X = data.draw(tcst.inputs_for((f.dim,), min_batch=2, max_batch=5), label="X")
    chunk = data.draw(st.integers(1, X.shape[0] - 1), label="chunk")
    single = torchcurv.hessian(f.func)
    broken = reversed_chunks(single, chunk)
    assume(differs(broken(X), torchcurv.per_sample(single)(X)))
    with pytest.raises(
        AssertionError, match=says("batched vs loop over samples", "values differ")
    ):
        assert_per_sample_matches_loop(broken, single, X)

    H = assert_per_sample_matches_loop(torchcurv.per_sample(single, chunk_size=chunk), single, X)
    assert_trees_close(H, torch.stack([f.hessian(x) for x in X]))


@at_most(100)  # four batched Hessians per example
@given(varying_functions, st.data())
def test_samples_leaking_into_each_other_are_caught(f: tcst.TestFunction, data: Any) -> None:
    X = data.draw(tcst.inputs_for((f.dim,), min_batch=2), label="X")
    single = torchcurv.hessian(f.func)
    broken = batch_centred(single)
    assume(differs(broken(X), torchcurv.per_sample(single)(X)))
    with pytest.raises(
        AssertionError, match=says("batched vs loop over samples", "values differ")
    ):
        assert_per_sample_matches_loop(broken, single, X)

    assert_per_sample_matches_loop(torchcurv.per_sample(single), single, X)


# --------------------------------------------------------------------------------------
# None or missing blocks for an unused argument; argnums ignored
# --------------------------------------------------------------------------------------


@given(tcst.functions(), st.integers(1, 3))
def test_none_blocks_for_an_unused_argument_are_caught(f: tcst.TestFunction, m: int) -> None:
    def g(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f.func(x)  # y is unused: its blocks are zeros

    y = torch.ones(m, dtype=D)
    with pytest.raises(
        AssertionError,
        match=says("none_for_unused vs reference", "expected a tensor, got NoneType"),
    ):
        assert_matches_reference(none_for_unused, g, f.x, y, argnums=(0, 1))
    with pytest.raises(
        AssertionError, match=says("drops_unused vs reference", "structure differs")
    ) as failure:
        assert_matches_reference(drops_unused, g, f.x, y, argnums=(0, 1))
    assert f"Tensor({m}, {m})" in str(failure.value)  # the missing block is shown

    H = assert_matches_reference(torchcurv.hessian, g, f.x, y, argnums=(0, 1))
    assert torch.equal(H[1][1], torch.zeros(m, m, dtype=D))
    assert torch.equal(H[0][1], torch.zeros(f.dim, m, dtype=D))


@given(tcst.functions(max_dim=2), tcst.functions(min_dim=3, max_dim=4), tcst.hessian_modes())
def test_ignored_argnums_are_caught(f: tcst.TestFunction, g: tcst.TestFunction, mode: str) -> None:
    def h(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f.func(x) + g.func(y)

    wrong = re.escape(f"shape {(f.dim, f.dim)} != expected {(g.dim, g.dim)}")
    with pytest.raises(AssertionError, match=says("ignores_argnums vs reference", wrong)):
        assert_matches_reference(ignores_argnums, h, f.x, g.x, argnums=1, mode=mode)
    with pytest.raises(
        AssertionError, match=says("ignores_argnums vs reference", "structure differs")
    ):
        assert_matches_reference(ignores_argnums, h, f.x, g.x, argnums=(0, 1), mode=mode)

    H = assert_matches_reference(torchcurv.hessian, h, f.x, g.x, argnums=1, mode=mode)
    assert_trees_close(H, g.hessian(g.x))
    assert_matches_reference(torchcurv.hessian, h, f.x, g.x, argnums=(0, 1), mode=mode)


@given(
    tcst.functions(min_dim=2, max_dim=2),
    tcst.functions(min_dim=2, max_dim=2),
    tcst.hessian_modes(),
)
def test_argnums_ignored_by_one_mode_is_caught_in_that_mode(
    f: tcst.TestFunction, g: tcst.TestFunction, mode: str
) -> None:
    def h(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f.func(x) + g.func(y)

    if mode == "rev-over-fwd" and differs(f.hessian(f.x), g.hessian(g.x)):
        with pytest.raises(
            AssertionError, match=says("ignores_argnums_in_one_mode vs reference", "values differ")
        ):
            assert_matches_reference(
                ignores_argnums_in_one_mode, h, f.x, g.x, argnums=1, mode=mode
            )
    elif mode != "rev-over-fwd":
        assert_matches_reference(ignores_argnums_in_one_mode, h, f.x, g.x, argnums=1, mode=mode)
    assert_matches_reference(torchcurv.hessian, h, f.x, g.x, argnums=1, mode=mode)


# --------------------------------------------------------------------------------------
# a chunked result that differs from the unchunked one
# --------------------------------------------------------------------------------------


@st.composite
def partial_chunks(draw: st.DrawFn) -> tuple[tcst.TestFunction, Any]:
    """A function of ``n`` variables and a chunk size whose row chunk ``k`` does not
    divide ``n``, so that the last chunk is partial."""
    n = draw(st.integers(3, 5))
    f = draw(tcst.functions(min_dim=n, max_dim=n))
    k = draw(st.sampled_from([k for k in range(2, n) if n % k]))
    chunk = draw(st.sampled_from([k, (None, k), (1, k), (n + 1, k)]))
    return f, chunk


@given(partial_chunks())
def test_dropped_last_chunk_is_caught(case: tuple[tcst.TestFunction, Any]) -> None:
    f, chunk = case
    n, k = f.dim, _rows_chunk(f.dim, chunk)
    shape = re.escape(f"shape {(n - n % k, n)} != expected {(n, n)}")
    with pytest.raises(
        AssertionError, match=says(f"chunk_size={chunk!r} vs chunk_size=None", shape)
    ):
        assert_chunk_invariant(remainder_dropping_hessian, f.func, f.x, chunk_sizes=[chunk])

    H = assert_chunk_invariant(torchcurv.hessian, f.func, f.x, chunk_sizes=[chunk])
    assert_trees_close(H, f.hessian(f.x))


@given(partial_chunks())
def test_zeroed_last_chunk_is_caught(case: tuple[tcst.TestFunction, Any]) -> None:
    f, chunk = case
    n, k = f.dim, _rows_chunk(f.dim, chunk)
    assume(differs(f.hessian(f.x)[n - n % k :], torch.zeros(n % k, n, dtype=D)))
    with pytest.raises(
        AssertionError,
        match=says(f"chunk_size={chunk!r} vs chunk_size=None", "values differ"),
    ):
        assert_chunk_invariant(remainder_zeroing_hessian, f.func, f.x, chunk_sizes=[chunk])
    assert_chunk_invariant(torchcurv.hessian, f.func, f.x, chunk_sizes=[chunk])


@at_most(100)  # eleven Hessians per example
@given(tcst.functions(min_dim=3, max_dim=3))
def test_chunk_bug_hidden_by_dividing_chunks_shows_with_the_defaults(
    f: tcst.TestFunction,
) -> None:
    # chunk_size=1 and 3 divide n = 3 and hide the bug; the default sizes include 2.
    assume(differs(f.hessian(f.x)[2:], torch.zeros(1, 3, dtype=D)))
    assert_chunk_invariant(remainder_zeroing_hessian, f.func, f.x, chunk_sizes=[1, 3])
    with pytest.raises(
        AssertionError, match=says("chunk_size=2 vs chunk_size=None", "values differ")
    ):
        assert_chunk_invariant(remainder_zeroing_hessian, f.func, f.x)
    assert_chunk_invariant(torchcurv.hessian, f.func, f.x)


# --------------------------------------------------------------------------------------
# finite differences
# --------------------------------------------------------------------------------------


@given(tcst.functions())
def test_hessian_off_by_a_tenth_of_a_percent_fails_finite_differences(
    f: tcst.TestFunction,
) -> None:
    H = torchcurv.hessian(f.func)(f.x)
    assume(float(H.abs().max()) > 1e-2)
    with pytest.raises(
        AssertionError, match=says("derivative vs central finite differences", "values differ")
    ) as failure:
        assert_matches_finite_differences(f.func, 1.001 * H, f.x)
    assert "worst:" in str(failure.value)
    assert_matches_finite_differences(f.func, H, f.x)
    assert_matches_finite_differences(f.func, f.hessian(f.x), f.x)
    assert_matches_finite_differences(f.func, torchcurv.jacobian(f.func)(f.x), f.x, order=1)


@pytest.mark.parametrize(
    ("mutant", "message"),
    [
        (perturbed_hessian, says("perturbed_hessian vs reference", "values differ")),
        (ignores_argnums, says("ignores_argnums vs reference", "values differ")),
    ],
    ids=["perturbed", "ignores-argnums"],
)
def test_mutants_fail_on_a_fixed_example(mutant: Transform, message: str) -> None:
    # A readable, non-random instance of the properties above.
    A = torch.tensor([[1.0, 2.0], [0.0, 3.0]], dtype=D)

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x @ A @ x + torch.exp(y).sum()

    x, y = torch.tensor([0.5, -1.0], dtype=D), torch.tensor([0.2, 0.1], dtype=D)
    with pytest.raises(AssertionError, match=message):
        assert_matches_reference(mutant, f, x, y, argnums=1)
    assert_matches_reference(torchcurv.hessian, f, x, y, argnums=1)
