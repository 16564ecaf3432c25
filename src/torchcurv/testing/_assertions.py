"""Assertions for curvature code, with one tolerance policy.

The policy (`tolerances`): relative and absolute tolerances come from the dtype, as in
`torch.testing.assert_close`; the absolute one is scaled by the size of the expected
values, ``atol * max(1, max|expected|)``, because Hessian entries that cancel to zero
carry rounding errors of the size of the large entries, not of zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .. import reference
from .._checks import check_differentiable, resolve_argnums
from .._layout import to_matrix
from .._transforms import _assemble, _columns_to_blocks, _flat_output

__all__ = [
    "assert_chunk_invariant",
    "assert_matches_finite_differences",
    "assert_matches_reference",
    "assert_per_sample_matches_loop",
    "assert_symmetric",
    "assert_trees_close",
    "tolerances",
]

# (rtol, atol) by dtype: the defaults of torch.testing.assert_close.
_BASE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.complex128: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
}

#: Central-difference settings: the step is ``eps ** (1/3)`` of float64 times
#: ``max(1, |x|)``; the error is ``O(step^2)`` plus rounding ``O(eps / step)``.
FD_STEP = float(torch.finfo(torch.float64).eps) ** (1 / 3)
FD_RTOL = 1e-6
FD_ATOL = 1e-6


def tolerances(dtype: torch.dtype, scale: float = 1.0) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing tensors of `dtype` whose entries reach `scale`.

    Args:
        dtype: The dtype of the values compared.
        scale: The largest magnitude among the expected values.

    Returns:
        ``(rtol, atol)`` with ``atol`` scaled by ``max(1, scale)``.

    Example:
        >>> import torch
        >>> from torchcurv.testing import tolerances
        >>> tolerances(torch.float64)
        (1e-07, 1e-07)
        >>> rtol, atol = tolerances(torch.float32, scale=1000.0)
        >>> atol == 1e-5 * 1000.0
        True
    """
    rtol, atol = _BASE.get(dtype, (0.0, 0.0))
    return rtol, atol * max(1.0, float(scale))


def _path_name(path: Sequence[Any]) -> str:
    return "".join(f"[{p!r}]" for p in path)


def _leaves_with_paths(tree: Any, path: tuple[Any, ...] = ()) -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves_with_paths(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _leaves_with_paths(value, (*path, index))
    else:
        yield _path_name(path), tree


def _worst_entries(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, count: int = 5
) -> str:
    diff = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    allowed = atol + rtol * expected.detach().to(torch.float64).abs()
    excess = (diff - allowed).flatten()
    order = torch.argsort(excess, descending=True)[:count]
    lines = []
    for flat_index in order.tolist():
        index = (
            tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), actual.shape))
            if actual.dim()
            else ()
        )
        lines.append(
            f"    at {index}: actual {actual.flatten()[flat_index].item():.10g}, "
            f"expected {expected.flatten()[flat_index].item():.10g}, "
            f"|diff| {diff.flatten()[flat_index].item():.3g}, "
            f"allowed {allowed.flatten()[flat_index].item():.3g}"
        )
    bad = int((diff > allowed).sum())
    return f"  {bad} of {diff.numel()} entries out of tolerance; worst:\n" + "\n".join(lines)


def assert_trees_close(
    actual: Any,
    expected: Any,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    what: str = "result",
) -> None:
    """Assert two pytrees of tensors are equal up to the tolerance policy.

    Checks the structure first (same nesting, keys, no None where a tensor is
    expected), then shapes and dtypes, then values with `torch.testing.assert_close`.
    A failure names the leaf, shows the worst entries with their indices and the
    tolerances used.

    Args:
        actual: The computed pytree.
        expected: The reference pytree.
        rtol: Relative tolerance; default from the dtype (`tolerances`).
        atol: Absolute tolerance; default from the dtype, scaled by the largest
            expected magnitude.
        what: A name for the compared quantity, used in messages.

    Raises:
        AssertionError: On any difference beyond the tolerances.

    Example:
        >>> import torch
        >>> from torchcurv.testing import assert_trees_close
        >>> a = {"w": torch.ones(2, dtype=torch.float64)}
        >>> assert_trees_close(a, {"w": torch.ones(2, dtype=torch.float64) + 1e-12})
    """
    actual_leaves = list(_leaves_with_paths(actual))
    expected_leaves = list(_leaves_with_paths(expected))
    _, actual_spec = tree_flatten(actual)
    _, expected_spec = tree_flatten(expected)
    if actual_spec != expected_spec or len(actual_leaves) != len(expected_leaves):
        raise AssertionError(
            f"{what}: structure differs.\n  actual:   {_structure(actual)}\n"
            f"  expected: {_structure(expected)}"
        )
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves, strict=True):
        if not isinstance(a, torch.Tensor) or not isinstance(e, torch.Tensor):
            raise AssertionError(
                f"{what}{path}: expected a tensor, got {type(a).__name__} "
                f"(reference: {type(e).__name__})."
            )
        if a.shape != e.shape:
            raise AssertionError(
                f"{what}{path}: shape {tuple(a.shape)} != expected {tuple(e.shape)}."
            )
        if a.dtype != e.dtype:
            raise AssertionError(f"{what}{path}: dtype {a.dtype} != expected {e.dtype}.")
        scale = float(e.detach().abs().max()) if e.numel() else 0.0
        base_rtol, base_atol = tolerances(e.dtype, scale)
        r = base_rtol if rtol is None else rtol
        t = base_atol if atol is None else atol
        try:
            torch.testing.assert_close(a, e, rtol=r, atol=t, equal_nan=False)
        except AssertionError:
            raise AssertionError(
                f"{what}{path}: values differ (rtol={r:.3g}, atol={t:.3g}, dtype {e.dtype}).\n"
                + _worst_entries(a, e, r, t)
            ) from None


def _structure(tree: Any) -> str:
    def show(leaf: Any) -> str:
        if isinstance(leaf, torch.Tensor):
            return f"Tensor{tuple(leaf.shape)}"
        return repr(leaf)

    text = str(tree_map(show, tree))
    return text if len(text) < 400 else text[:397] + "..."


def assert_symmetric(
    hessian: Any,
    like: Any = None,
    *,
    batch_dims: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert a Hessian (tensor, pytree of blocks, batched or not) is symmetric.

    The Hessian is laid out as a matrix with `torchcurv.to_matrix` and compared with its
    transpose under the tolerance policy.

    Args:
        hessian: A scalar function's Hessian: ``x.shape + x.shape`` or nested blocks.
        like: The differentiated input, to lay out blocks (see `torchcurv.to_matrix`).
        batch_dims: Leading batch dims (1 for per-sample results).
        rtol: Relative tolerance; default from the dtype.
        atol: Absolute tolerance; default from the dtype and scale.

    Raises:
        AssertionError: If an entry differs from its mirror beyond the tolerances.

    Example:
        >>> import torch, torchcurv
        >>> from torchcurv.testing import assert_symmetric
        >>> x = torch.randn(4, dtype=torch.float64)
        >>> assert_symmetric(torchcurv.hessian(lambda x: x.prod())(x))
    """
    matrix = to_matrix(hessian, like, batch_dims=batch_dims)
    if matrix.shape[-1] != matrix.shape[-2]:
        raise AssertionError(
            f"Hessian laid out as {tuple(matrix.shape)} is not square; is it "
            "the Hessian of a scalar function? Pass like= for pytrees."
        )
    assert_trees_close(
        matrix,
        matrix.transpose(-1, -2).contiguous(),
        rtol=rtol,
        atol=atol,
        what="Hessian vs its transpose",
    )


def _reference_for(order: int) -> Callable[..., Callable[..., Any]]:
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (Jacobian) or 2 (Hessian), got {order!r}.")
    return reference.jacobian if order == 1 else reference.hessian


def assert_matches_reference(
    transform: Callable[..., Callable[..., Any]],
    func: Callable[..., Any],
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    order: int = 2,
    rtol: float | None = None,
    atol: float | None = None,
    **transform_kwargs: Any,
) -> Any:
    """Assert ``transform(func, argnums=argnums, **kw)(*args)`` equals the loop oracle.

    The oracle is `torchcurv.reference` (one autograd call per row, no vmap).

    Args:
        transform: A transform like `torchcurv.hessian`: ``transform(func, argnums=...,
            **transform_kwargs)`` returns a function of ``*args``.
        func: The function differentiated.
        *args: Its arguments.
        argnums: Which arguments are differentiated.
        order: 1 to compare with `reference.jacobian`, 2 with `reference.hessian`.
        rtol: Relative tolerance; default from the dtype.
        atol: Absolute tolerance; default from the dtype and scale.
        **transform_kwargs: Passed to `transform` (mode, chunk_size, ...).

    Returns:
        The transform's result, for further checks.

    Raises:
        AssertionError: If the results differ in structure, shape, dtype or value.

    Example:
        >>> import torch, torchcurv
        >>> from torchcurv.testing import assert_matches_reference
        >>> x = torch.randn(3, dtype=torch.float64)
        >>> H = assert_matches_reference(torchcurv.hessian, lambda x: x.exp().sum(), x,
        ...                              mode="rev-over-rev")
        >>> torch.allclose(H, torch.diag(x.exp()))
        True
    """
    result = transform(func, argnums=argnums, **transform_kwargs)(*args)
    expected = _reference_for(order)(func, argnums)(*args)
    assert_trees_close(
        result,
        expected,
        rtol=rtol,
        atol=atol,
        what=f"{getattr(transform, '__name__', 'transform')} vs reference",
    )
    return result


def assert_matches_finite_differences(
    func: Callable[..., Any],
    result: Any,
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    order: int = 2,
    step: float | None = None,
    rtol: float = FD_RTOL,
    atol: float = FD_ATOL,
) -> None:
    """Assert a computed Jacobian or Hessian matches central finite differences.

    Float64 only. For ``order=1`` the Jacobian is compared with
    ``(f(x + h e_j) - f(x - h e_j)) / 2h``; for ``order=2`` the Hessian with central
    differences of the autograd gradient (`torchcurv.reference.jacobian`). The step is
    ``h = step * max(1, |x_j|)`` with ``step = eps ** (1/3) ≈ 6e-6`` by default; the
    tolerance is ``atol * max(1, max|FD|) + rtol * |FD|`` with ``rtol = atol = 1e-6``,
    which covers the ``O(h^2)`` truncation and ``O(eps / h)`` rounding errors of smooth
    functions.

    Args:
        func: The function.
        result: The derivative to check, laid out as torchcurv lays it out.
        *args: The point (float64 tensors).
        argnums: Which arguments were differentiated.
        order: 1 (Jacobian) or 2 (Hessian).
        step: Relative step; default ``eps ** (1/3)``.
        rtol: Relative tolerance.
        atol: Absolute tolerance, scaled by the largest finite-difference magnitude.

    Raises:
        AssertionError: If the derivative and the finite differences disagree.
        ValueError: If the differentiated arguments are not float64.

    Example:
        >>> import torch, torchcurv
        >>> from torchcurv.testing import assert_matches_finite_differences
        >>> x = torch.randn(3, dtype=torch.float64)
        >>> f = lambda x: torch.sin(x).sum()
        >>> assert_matches_finite_differences(f, torchcurv.hessian(f)(x), x)
    """
    indices = resolve_argnums("assert_matches_finite_differences", argnums, len(args))
    flat_in, in_spec = tree_flatten(tuple(args[i] for i in indices))
    check_differentiable("assert_matches_finite_differences", flat_in, indices)
    if any(x.dtype != torch.float64 for x in flat_in):
        raise ValueError(
            "assert_matches_finite_differences: finite differences need float64 "
            "arguments; convert them with .double()."
        )
    inner = func if order == 1 else _reference_for(1)(func, argnums)
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}.")
    h_rel = FD_STEP if step is None else step

    def evaluate(leaves: list[torch.Tensor]) -> Any:
        new_args = list(args)
        for index, value in zip(indices, tree_unflatten(leaves, in_spec), strict=True):
            new_args[index] = value
        return inner(*new_args)

    columns: list[list[torch.Tensor]] = []
    base = [x.detach().clone() for x in flat_in]
    out_spec = None
    for k, leaf in enumerate(base):
        for j in range(leaf.numel()):
            h = h_rel * max(1.0, abs(float(leaf.flatten()[j])))
            plus = [x.clone() for x in base]
            minus = [x.clone() for x in base]
            plus[k].view(-1)[j] += h
            minus[k].view(-1)[j] -= h
            f_plus, out_spec = tree_flatten(evaluate(plus))
            f_minus, _ = tree_flatten(evaluate(minus))
            columns.append([(p - m) / (2 * h) for p, m in zip(f_plus, f_minus, strict=True)])
    assert out_spec is not None
    flat_out = [torch.zeros_like(c) for c in columns[0]]
    stacked = [torch.stack([col[i] for col in columns]) for i in range(len(flat_out))]
    blocks = _columns_to_blocks(stacked, flat_out, base)
    expected = _assemble(blocks, in_spec, out_spec, isinstance(argnums, int))
    leaves = tree_flatten(expected)[0]
    scale = max((float(x.abs().max()) for x in leaves if x.numel()), default=0.0)
    _flat_output("assert_matches_finite_differences", result)
    assert_trees_close(
        result,
        expected,
        rtol=rtol,
        atol=atol * max(1.0, scale),
        what="derivative vs central finite differences",
    )


def assert_chunk_invariant(
    transform: Callable[..., Callable[..., Any]],
    func: Callable[..., Any],
    *args: Any,
    chunk_sizes: Sequence[Any] = (1, 2, 3),
    rtol: float | None = None,
    atol: float | None = None,
    **transform_kwargs: Any,
) -> Any:
    """Assert a transform gives the same result for every chunk size.

    Compares ``transform(func, chunk_size=c, **kw)(*args)`` for each ``c`` in
    `chunk_sizes` with the unchunked ``chunk_size=None`` result.

    Args:
        transform: A transform taking ``chunk_size=`` (e.g. `torchcurv.hessian`).
        func: The function.
        *args: Its arguments.
        chunk_sizes: Chunk sizes to try.
        rtol: Relative tolerance; default from the dtype.
        atol: Absolute tolerance; default from the dtype and scale.
        **transform_kwargs: Passed to `transform`.

    Returns:
        The unchunked result.

    Raises:
        AssertionError: If any chunk size changes the result.

    Example:
        >>> import torch, torchcurv
        >>> from torchcurv.testing import assert_chunk_invariant
        >>> x = torch.randn(4, dtype=torch.float64)
        >>> H = assert_chunk_invariant(torchcurv.hessian, lambda x: x.exp().prod(), x,
        ...                            chunk_sizes=[1, 3, (1, 2)])
    """
    expected = transform(func, chunk_size=None, **transform_kwargs)(*args)
    for chunk in chunk_sizes:
        actual = transform(func, chunk_size=chunk, **transform_kwargs)(*args)
        assert_trees_close(
            actual, expected, rtol=rtol, atol=atol, what=f"chunk_size={chunk!r} vs chunk_size=None"
        )
    return expected


def assert_per_sample_matches_loop(
    batched: Callable[..., Any],
    single: Callable[..., Any],
    *args: Any,
    in_dims: int | Sequence[int | None] = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> Any:
    """Assert a batched computation equals a Python loop over single samples.

    Computes ``batched(*args)`` and, for each sample ``i``, ``single(*args_i)`` where
    ``args_i`` selects sample ``i`` along `in_dims` (None: passed whole); stacks the
    loop's results along dim 0 and compares. Catches results in the wrong order and
    samples that leak into each other (e.g. normalisation over the batch).

    Args:
        batched: The function of the batch, returning results with a leading batch dim.
        single: The function of one sample.
        *args: The batched arguments.
        in_dims: The batch dim of each argument (an int for all, or one per argument).
        rtol: Relative tolerance; default from the dtype.
        atol: Absolute tolerance; default from the dtype and scale.

    Returns:
        The batched result.

    Raises:
        AssertionError: If any sample differs from its loop result.

    Example:
        >>> import torch, torchcurv
        >>> from torchcurv.testing import assert_per_sample_matches_loop
        >>> f = lambda x: (x ** 3).sum()
        >>> X = torch.randn(4, 3, dtype=torch.float64)
        >>> H = assert_per_sample_matches_loop(
        ...     torchcurv.per_sample(torchcurv.hessian(f)), torchcurv.hessian(f), X)
    """
    dims = [in_dims] * len(args) if isinstance(in_dims, int) else list(in_dims)
    if len(dims) != len(args):
        raise ValueError(f"in_dims has {len(dims)} entries for {len(args)} arguments.")
    sizes = {a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None}
    if len(sizes) != 1:
        raise ValueError(f"the batched arguments have batch sizes {sorted(sizes)}; need one.")
    size = sizes.pop()
    result = batched(*args)
    loop = [
        single(*(a if d is None else a.select(d, i) for a, d in zip(args, dims, strict=True)))
        for i in range(size)
    ]
    leaves = [tree_flatten(r)[0] for r in loop]
    stacked = tree_unflatten(
        [torch.stack(group) for group in zip(*leaves, strict=True)], tree_flatten(loop[0])[1]
    )
    assert_trees_close(result, stacked, rtol=rtol, atol=atol, what="batched vs loop over samples")
    return result
