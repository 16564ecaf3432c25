"""Function transforms: `jacobian`, `hessian`, `hvp`, `vhp`.

Second derivatives are computed under `torchcurv._decompositions.corrected_ops`, which
routes the ops whose upstream second-order rules are wrong (layer norm, batch norm, ...)
through primitive decompositions, and under the process-wide derivative lock
(`torchcurv._compat.DERIVATIVE_LOCK`), so threads do not corrupt torch.func's levels.

One mechanism does all the work: `_map_basis` pushes chunks of a standard basis
through a linear map (a `jvp` for forward mode, a `vjp` for reverse mode) under
`vmap`, a chunk at a time. A Jacobian is one such map; a Hessian is a Jacobian of a
Jacobian, so both of its stages are chunked by the same code.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from ._checks import (
    check_argnums,
    check_callable,
    check_chunk_size,
    check_differentiable,
    check_estimator,
    check_flag,
    check_hessian_chunk_size,
    check_mode,
    check_randomness,
    resolve_argnums,
)
from ._compat import (
    DERIVATIVE_LOCK,
    TreeSpec,
    jvp_with_argnums,
    release_free_memory,
    tree_flatten,
    tree_map,
    tree_unflatten,
    vjp_with_argnums,
)
from ._decompositions import corrected_ops
from ._errors import TorchcurvError, argument_error, describe
from ._types import (
    HESSIAN_MODES,
    JACOBIAN_MODES,
    HessianChunk,
    HessianMode,
    JacobianMode,
    Randomness,
)

__all__ = [
    "HESSIAN_MODES",
    "HESSIAN_STAGES",
    "JACOBIAN_MODES",
    "hessian",
    "hessian_basis_sizes",
    "hessian_diagonal",
    "hvp",
    "jacobian",
    "numel",
    "probing",
    "vectorised_chunks",
    "vhp",
]

# --------------------------------------------------------------------------------------
# call-time helpers
# --------------------------------------------------------------------------------------

_PROBING: ContextVar[bool] = ContextVar("torchcurv_probing", default=False)


@contextmanager
def probing() -> Any:
    """Run transforms in probe mode: only the first and the last basis chunks of every
    stage are computed; the chunks between are copies of the first.

    The allocations are those of the real computation (the same chunk sizes, the same
    results kept and concatenated), at the cost of two or three chunks per stage (the
    last full chunk too when the last chunk is short), so the memory planner can
    measure the real peak of a plan cheaply. The values are meaningless.
    """
    token = _PROBING.set(True)
    try:
        yield
    finally:
        _PROBING.reset(token)


def copied_chunks(count: int, short_last: bool) -> range:
    """The chunks of a stage of `count` chunks that probe mode copies from the first
    (none outside it): the middle ones, the last full chunk kept when the last is
    short (see `probing`)."""
    return range(1, count - (2 if short_last else 1)) if _PROBING.get() else range(0)


_VECTORISED: ContextVar[bool] = ContextVar("torchcurv_vectorised", default=False)


@contextmanager
def vectorised_chunks() -> Any:
    """Run transforms with chunks of one basis vector vmapped, not looped.

    For engines whose chunk sizes come from a plan: the plain loop of ``chunk_size=1``
    is torch.func's rule for a caller who asks for it, while a planned chunk of one is
    a memory decision, and some torch rules (e.g. forward mode over the double backward
    of ``F.mse_loss``) fail on an unbatched basis vector.
    """
    token = _VECTORISED.set(True)
    try:
        yield
    finally:
        _VECTORISED.reset(token)


def _flat_output(function: str, out: Any) -> tuple[list[torch.Tensor], TreeSpec]:
    leaves, spec = tree_flatten(out)
    if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        argument_error(
            function,
            "func",
            "must return a Tensor or a pytree of Tensors",
            out,
            "Return tensors only; use has_aux=True to return extra values.",
        )
    for leaf in leaves:
        if leaf.is_complex():
            argument_error(
                function,
                "func",
                "must return real tensors: complex outputs are not differentiated "
                "(as in torch.func)",
                leaf,
                "Return torch.view_as_real(y) (real and imaginary parts as a last dim of 2).",
            )
        if not leaf.is_floating_point():
            argument_error(
                function,
                "func",
                "must return floating-point tensors to be differentiated",
                leaf,
                "Return y.to(torch.float64) (or .float()); integer results have no "
                "derivative; use has_aux=True to return them beside the output.",
            )
    return leaves, spec


def _split_aux(function: str, result: Any) -> tuple[Any, Any]:
    if not (isinstance(result, tuple) and len(result) == 2):
        argument_error(
            function,
            "func",
            "must return a pair (output, aux) when has_aux=True",
            result,
            "Return (output, aux) or pass has_aux=False.",
        )
    return result[0], result[1]


def _cuda_indices(leaves: Sequence[torch.Tensor]) -> list[int]:
    return sorted({leaf.device.index or 0 for leaf in leaves if leaf.device.type == "cuda"})


def _rng_states(leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The CPU generator's state and those of the CUDA devices that `leaves` live on."""
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in _cuda_indices(leaves))]


def _random_error(name: str) -> TorchcurvError:
    return TorchcurvError(
        f"{name}: func called a random operation (e.g. dropout in training mode) "
        "while randomness='error'. Pass randomness='same' to share one random draw "
        "across the rows of the result, or call model.eval() to switch dropout off."
    )


def _looped(push: Callable[..., Any], randomness: str, name: str) -> Callable[..., Any]:
    """`push` applied to one basis vector at a time, as a plain call (no vmap).

    torch.func's rule for ``chunk_size=1``: functions without batching rules work. The
    result gets the leading dim of one that a vmapped chunk has. Under
    ``randomness="error"`` a push that draws random numbers is refused, as vmap would.
    """

    def push_one(*basis: torch.Tensor) -> Any:
        before = _rng_states(basis) if randomness == "error" else None
        result = push(*(vector[0] for vector in basis))
        if before is not None and any(
            not torch.equal(a, b) for a, b in zip(before, _rng_states(basis), strict=True)
        ):
            raise _random_error(name)
        return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, result)

    return push_one


class _RNGReplay:
    """Replays the random draws of the first basis chunk in every later chunk.

    With ``randomness="same"`` every row of a derivative must see the same dropout mask,
    also when the rows are computed in several chunks.
    """

    def __init__(self, leaves: Sequence[torch.Tensor]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in _cuda_indices(leaves)}

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


def _basis_chunk(like: Sequence[torch.Tensor], start: int, rows: int) -> tuple[torch.Tensor, ...]:
    """Basis vectors ``e_start .. e_(start+rows-1)`` of the space of `like`.

    Laid out as ``(rows, *leaf.shape)`` per leaf: the one-hot entries that fall into the
    leaf. Built one chunk at a time, so the basis never exists whole.
    """
    pieces = []
    offset = 0
    for leaf in like:
        size = leaf.numel()
        piece = torch.zeros(rows, size, dtype=leaf.dtype, device=leaf.device)
        lo, hi = max(start, offset), min(start + rows, offset + size)
        if lo < hi:
            idx = torch.arange(lo - start, hi - start, device=leaf.device)
            piece[idx, idx + start - offset] = 1
        pieces.append(piece.view(rows, *leaf.shape))
        offset += size
    return tuple(pieces)


def _selected_basis_chunk(
    like: Sequence[torch.Tensor], indices: Sequence[int]
) -> tuple[torch.Tensor, ...]:
    """The basis vectors ``e_i`` for `indices` (flat, over all leaves of `like`), laid
    out as `_basis_chunk` lays them out."""
    pieces = []
    offset = 0
    rows = len(indices)
    for leaf in like:
        size = leaf.numel()
        piece = torch.zeros(rows, size, dtype=leaf.dtype, device=leaf.device)
        hits = [(r, i - offset) for r, i in enumerate(indices) if offset <= i < offset + size]
        if hits:
            r, c = zip(*hits, strict=True)
            piece[list(r), list(c)] = 1
        pieces.append(piece.view(rows, *leaf.shape))
        offset += size
    return tuple(pieces)


#: Seconds between two hand-backs of free heap pages inside a chunked basis loop.
_TRIM_INTERVAL = 0.05


def _map_basis(
    push: Callable[..., Any],
    like: Sequence[torch.Tensor],
    chunk_size: int | None,
    randomness: str,
    name: str,
    shared: tuple[bool, ...] | None = None,
    coordinates: Sequence[int] | None = None,
    rows: Sequence[torch.Tensor] | None = None,
) -> Any:
    """``vmap(push)`` over the standard basis of `like`, a chunk at a time.

    `rows` (one ``[S, *leaf.shape]`` tensor per leaf) replaces the basis by ``S`` given
    vectors (the probes of an estimator); the results are then summed over them, chunk
    by chunk, instead of concatenated.

    `push` returns a tuple when `shared` is given: parts flagged True do not depend on
    the basis vector (primal values, aux); they are taken once, from the first row of
    the first chunk. Other outputs are concatenated over chunks along dim 0.
    `coordinates` (flat indices over the leaves) restricts the basis to those vectors,
    in that order.
    """
    total = sum(leaf.numel() for leaf in like) if coordinates is None else len(coordinates)
    if rows is not None:
        total = rows[0].shape[0]
    step = max(1, total if chunk_size is None else min(chunk_size, total))
    starts = range(0, total, step)
    replay = _RNGReplay(like) if randomness == "same" and len(starts) > 1 else None
    if chunk_size == 1 and not _VECTORISED.get():  # a plain loop, as torch.func loops
        mapped = _looped(push, randomness, name)
    else:
        mapped = torch.vmap(push, in_dims=0, out_dims=0, randomness=randomness)
    # In probe mode a copy stands in for a middle chunk. The last full chunk is computed
    # too when the last chunk is short, so the probe sees a full chunk with the pieces
    # of the others already kept, as the real call does.
    copied = copied_chunks(len(starts), total % step != 0)
    results: list[Any] = []
    trimmed = time.perf_counter()
    for index, start in enumerate(starts):
        if index and time.perf_counter() - trimmed > _TRIM_INTERVAL:
            # Chunks free their working set, which glibc keeps resident for reuse: over
            # many chunks the heap's free pages would pile up far above the live bytes
            # (a P = 26,122 diagonal: 5 GB resident for 80 MB live). Handed back to
            # the OS every few milliseconds, so cheap chunks do not pay for it.
            release_free_memory()
            trimmed = time.perf_counter()
        count = min(step, total - start)
        if index in copied:
            if shared is None:
                results.append(tree_map(torch.clone, results[0]))
            else:
                results.append(
                    tuple(
                        None if is_shared else tree_map(torch.clone, part)
                        for part, is_shared in zip(results[0], shared, strict=True)
                    )
                )
            continue
        if replay is not None and index > 0:
            replay.replay()
        try:
            if rows is not None:
                basis = tuple(r[start : start + count] for r in rows)
            elif coordinates is None:
                basis = _basis_chunk(like, start, count)
            else:
                basis = _selected_basis_chunk(like, coordinates[start : start + count])
            result = mapped(*basis)
            if rows is not None:  # summed as it goes: O(chunk) numbers, never O(S)
                result = result.sum(0)
            if shared is not None and index > 0:  # shared parts: the first chunk's only
                result = tuple(
                    None if is_shared else r for r, is_shared in zip(result, shared, strict=True)
                )
            results.append(result)
        except RuntimeError as error:
            if "modified by an inplace operation" in str(error):
                raise TorchcurvError(
                    f"{name}: autograd found a tensor that func wrote in place after the "
                    "derivative had recorded it. With chunks, func runs once per chunk "
                    "of a forward stage, so an in-place write into an argument (or a "
                    "captured tensor) lands on values an earlier chunk's graph still "
                    "needs. Pass chunk_size=None for that stage, use a reverse inner "
                    "mode (mode='fwd-over-rev' or 'rev-over-rev'), or write out of place."
                ) from error
            if "randomness error mode" not in str(error):
                raise
            raise _random_error(name) from None
    if rows is not None:
        return functools.reduce(torch.add, results)
    if shared is None:
        return results[0] if len(results) == 1 else _concat(results)
    return tuple(
        tree_map(lambda t: t[0], results[0][k])
        if is_shared
        else results[0][k]
        if len(results) == 1
        else _concat([r[k] for r in results])
        for k, is_shared in enumerate(shared)
    )


def _concat(parts: Sequence[Any]) -> Any:
    """Concatenate matching pytrees of tensors along dim 0."""
    flat = [tree_flatten(p)[0] for p in parts]
    spec = tree_flatten(parts[0])[1]
    return tree_unflatten([torch.cat(group, dim=0) for group in zip(*flat, strict=True)], spec)


# --------------------------------------------------------------------------------------
# jacobian
# --------------------------------------------------------------------------------------


def jacobian(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: JacobianMode = "rev",
    chunk_size: int | None = None,
    has_aux: bool = False,
    randomness: Randomness = "error",
) -> Callable[..., Any]:
    """The Jacobian of `func` with respect to the arguments at `argnums`.

    Drop-in for `torch.func.jacrev` / `torch.func.jacfwd`, with chunking in both modes.
    For a single input ``x`` and output ``y`` the result has shape
    ``y.shape + x.shape``; for pytrees it nests as torch.func does: the output's
    structure outside, the structure of the differentiated arguments inside (a tuple
    when `argnums` is a tuple). Batch it over samples with `torchcurv.per_sample`.

    Args:
        func: A function of tensors returning a tensor or a pytree of tensors (and an
            auxiliary value when `has_aux` is True).
        argnums: Which positional argument(s) to differentiate: an int or a tuple.
        mode: ``"rev"`` (one vector-Jacobian product per output entry), ``"fwd"`` (one
            Jacobian-vector product per input entry) or ``"auto"``: reverse when the
            output has no more entries than the differentiated input, forward otherwise.
            Auto runs ``func`` once in reverse mode to see the output size and reuses that
            run when reverse mode wins.
        chunk_size: How many basis vectors (rows in reverse mode, columns in forward mode)
            to push through at once; None pushes all of them in one vectorised call.
            Smaller chunks use less memory and give the same result.
        has_aux: If True, `func` returns ``(output, aux)`` and the transform returns
            ``(jacobian, aux)``; aux is not differentiated.
        randomness: ``"error"`` refuses random operations inside forward-mode
            vectorisation; ``"same"`` lets every column see the same random draw (the
            same dropout mask), across chunks too.

    Returns:
        A function with the signature of `func` returning the Jacobian (and aux).

    Raises:
        TorchcurvError: On a bad argument, when the transform is built where possible,
            otherwise when it is called (non-floating inputs, `argnums` out of range,
            outputs that are not tensors).

    Example:
        >>> import torch, torchcurv
        >>> A = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
        >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> J = torchcurv.jacobian(lambda x: A @ x)(x)
        >>> torch.equal(J, A)
        True
        >>> J = torchcurv.jacobian(torch.sin, mode="fwd", chunk_size=1)(x)
        >>> torch.allclose(J, torch.diag(torch.cos(x)))
        True
    """
    name = "jacobian"
    check_callable(name, func)
    argnums = check_argnums(name, argnums)
    mode = check_mode(name, mode, JACOBIAN_MODES)  # type: ignore[assignment]
    chunk_size = check_chunk_size(name, chunk_size)
    check_flag(name, "has_aux", has_aux)
    randomness = check_randomness(name, randomness)  # type: ignore[assignment]
    return _jacobian(func, argnums, mode, chunk_size, has_aux, randomness, name)


def _jacobian(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...],
    mode: str,
    chunk_size: int | None,
    has_aux: bool,
    randomness: str,
    name: str,
) -> Callable[..., Any]:
    """`jacobian` without the argument checks (the caller made them)."""

    def jacobian_of_func(*args: Any, **kwargs: Any) -> Any:
        with DERIVATIVE_LOCK, corrected_ops():
            return _jacobian_call(args, kwargs)

    def _jacobian_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        indices = resolve_argnums(name, argnums, len(args))
        diff_args = tuple(args[i] for i in indices)
        flat_in, in_spec = tree_flatten(diff_args)
        check_differentiable(name, flat_in, indices)
        out_specs: list[TreeSpec] = []

        # Every positional argument goes through the transform (torch.func's rule: the
        # ones not differentiated are wrapped too, so func may write into them).
        def flat_func(*all_args: Any) -> Any:
            result = func(*all_args, **kwargs)
            out, aux = _split_aux(name, result) if has_aux else (result, None)
            flat_out, spec = _flat_output(name, out)
            out_specs.append(spec)
            return (tuple(flat_out), aux) if has_aux else tuple(flat_out)

        n_in = sum(leaf.numel() for leaf in flat_in)
        aux = None
        chosen = mode
        if mode in ("rev", "auto"):
            vjp_out: Any = vjp_with_argnums(flat_func, *args, argnums=indices, has_aux=has_aux)
            flat_out = vjp_out[0]
            n_out = sum(o.numel() for o in flat_out)
            if mode == "auto":
                chosen = "rev" if n_out <= n_in else "fwd"
        if chosen == "rev":
            vjp_fn = vjp_out[1]
            aux = vjp_out[2] if has_aux else None
            if n_out == 0:
                rows: Any = tuple(leaf.new_zeros((0, *leaf.shape)) for leaf in flat_in)
            else:
                rows = _map_basis(
                    lambda *cts: tuple(tree_flatten(vjp_fn(cts))[0]),
                    flat_out,
                    chunk_size,
                    "error",
                    name,
                )
            blocks = _rows_to_blocks(rows, flat_out, flat_in)
        else:
            flat_out, cols, aux = _forward_columns(
                flat_func, args, indices, in_spec, flat_in, chunk_size, randomness, has_aux, name
            )
            blocks = _columns_to_blocks(cols, flat_out, flat_in)
        jac = _assemble(blocks, in_spec, out_specs[-1], isinstance(argnums, int))
        return (jac, aux) if has_aux else jac

    return jacobian_of_func


def _forward_columns(
    flat_func: Callable[..., Any],
    args: tuple[Any, ...],
    indices: tuple[int, ...],
    in_spec: TreeSpec,
    flat_in: Sequence[torch.Tensor],
    chunk_size: int | None,
    randomness: str,
    has_aux: bool,
    name: str,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], Any]:
    """Jacobian columns ``J e_i`` for every input basis vector, stacked on dim 0.

    `flat_func` takes all of `args`; those at `indices` (flattened: `flat_in`, with
    structure `in_spec`) are differentiated.
    """
    if sum(leaf.numel() for leaf in flat_in) == 0:
        result = flat_func(*args)
        out, aux = result if has_aux else (result, None)
        cols = tuple(o.new_zeros((0, *o.shape)) for o in out)
        return out, cols, aux

    def push(*tangents: torch.Tensor) -> Any:
        jvp_out: Any = jvp_with_argnums(
            flat_func, args, tree_unflatten(list(tangents), in_spec), indices, has_aux=has_aux
        )
        return (jvp_out[1], jvp_out[0], jvp_out[2]) if has_aux else (jvp_out[1], jvp_out[0])

    shared = (False, True, True) if has_aux else (False, True)
    mapped = _map_basis(push, flat_in, chunk_size, randomness, name, shared)
    return mapped[1], mapped[0], mapped[2] if has_aux else None


def _rows_to_blocks(
    rows: Sequence[torch.Tensor], flat_out: Sequence[torch.Tensor], flat_in: Sequence[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """Split reverse-mode rows ``[M, *x_j.shape]`` into blocks ``y_i.shape + x_j.shape``."""
    blocks = []
    offset = 0
    for out in flat_out:
        size = out.numel()
        blocks.append(
            [
                row[offset : offset + size].reshape((*out.shape, *leaf.shape))
                for row, leaf in zip(rows, flat_in, strict=True)
            ]
        )
        offset += size
    return blocks


def _columns_to_blocks(
    cols: Sequence[torch.Tensor], flat_out: Sequence[torch.Tensor], flat_in: Sequence[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """Split forward-mode columns ``[N, *y_i.shape]`` into blocks ``y_i.shape + x_j.shape``."""
    blocks = []
    for col, out in zip(cols, flat_out, strict=True):
        row_blocks = []
        offset = 0
        for leaf in flat_in:
            size = leaf.numel()
            block = col[offset : offset + size].reshape((*leaf.shape, *out.shape))
            row_blocks.append(
                block.movedim(
                    tuple(range(leaf.dim())), tuple(range(block.dim() - leaf.dim(), block.dim()))
                )
            )
            offset += size
        blocks.append(row_blocks)
    return blocks


def _assemble(
    blocks: list[list[torch.Tensor]], in_spec: TreeSpec, out_spec: TreeSpec, single: bool
) -> Any:
    """Nest blocks as torch.func does: output structure outside, inputs inside."""
    per_output = []
    for row in blocks:
        inner = tree_unflatten(row, in_spec)
        per_output.append(inner[0] if single else inner)
    return tree_unflatten(per_output, out_spec)


# --------------------------------------------------------------------------------------
# hessian
# --------------------------------------------------------------------------------------

#: A Hessian mode's (inner, outer) Jacobian modes.
HESSIAN_STAGES = {
    "fwd-over-rev": ("rev", "fwd"),
    "rev-over-rev": ("rev", "rev"),
    "rev-over-fwd": ("fwd", "rev"),
    "fwd-over-fwd": ("fwd", "fwd"),
    "auto": ("auto", "fwd"),
}


def hessian_basis_sizes(mode: str, n_out: int, n_in: int) -> tuple[int, int]:
    """How many basis vectors the two stages of `hessian` push: ``(inner, outer)``.

    A reverse stage pushes one vector per output entry of the function it
    differentiates, a forward stage one per input entry; the outer stage differentiates
    the inner Jacobian, which has ``n_out * n_in`` entries.
    """
    inner_mode, outer_mode = HESSIAN_STAGES[mode]
    if inner_mode == "auto":
        inner_mode = "rev" if n_out <= n_in else "fwd"
    inner = n_out if inner_mode == "rev" else n_in
    outer = n_in if outer_mode == "fwd" else n_out * n_in
    return inner, outer


def hessian(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: HessianMode = "fwd-over-rev",
    chunk_size: HessianChunk = None,
    has_aux: bool = False,
    randomness: Randomness = "error",
) -> Callable[..., Any]:
    """The Hessian of `func` with respect to the arguments at `argnums`.

    The Jacobian of the Jacobian, like `torch.func.hessian`, with chunking on both
    stages, every mode and `has_aux`. For one input ``x`` and output ``y`` the result
    has shape ``y.shape + x.shape + x.shape``; with pytrees it nests as output, then the
    row argument, then the column argument. A function that is linear in ``x`` (or does
    not use it) gets a tensor of zeros, never None. Batch over samples with
    `torchcurv.per_sample`; the per-sample shape is then ``(B, *y, *x, *x)``.

    Args:
        func: A function of tensors returning a tensor or a pytree of tensors.
        argnums: Which positional argument(s) to differentiate: an int or a tuple.
        mode: ``"<outer>-over-<inner>"``: the inner stage differentiates `func`, the
            outer stage differentiates the inner Jacobian. ``"fwd-over-rev"`` (default)
            is the usual best; ``"auto"`` takes a forward outer stage and an inner stage
            chosen at call time (reverse unless `func` has more outputs than inputs).
        chunk_size: None (no chunking), an int used for both stages, or
            ``(inner, outer)``: rows of the inner Jacobian and columns of the outer one
            computed at once. Results do not depend on it beyond rounding.
        has_aux: If True, `func` returns ``(output, aux)``; the result is
            ``(hessian, aux)``.
        randomness: ``"error"`` (default) refuses random operations; ``"same"`` lets all
            rows and columns of the Hessian share one random draw (one dropout mask).

    Returns:
        A function with the signature of `func` returning the Hessian (and aux).

    Raises:
        TorchcurvError: On bad arguments (unknown mode, non-positive chunk sizes, argnums
            that are not ints, non-floating inputs, argnums out of range).

    Example:
        >>> import torch, torchcurv
        >>> A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
        >>> x = torch.tensor([1.0, -2.0], dtype=torch.float64)
        >>> H = torchcurv.hessian(lambda x: x @ A @ x)(x)
        >>> torch.equal(H, A + A.T)
        True
        >>> H = torchcurv.hessian(lambda x: torch.sin(x).sum(), mode="rev-over-rev",
        ...                       chunk_size=(1, 1))(x)
        >>> torch.allclose(H, torch.diag(-torch.sin(x)))
        True
    """
    name = "hessian"
    check_callable(name, func)
    argnums = check_argnums(name, argnums)
    mode = check_mode(name, mode, HESSIAN_MODES)  # type: ignore[assignment]
    inner_chunk, outer_chunk = check_hessian_chunk_size(name, chunk_size)
    check_flag(name, "has_aux", has_aux)
    randomness = check_randomness(name, randomness)  # type: ignore[assignment]
    inner_mode, outer_mode = HESSIAN_STAGES[mode]
    inner = _jacobian(func, argnums, inner_mode, inner_chunk, has_aux, randomness, name)
    return _jacobian(inner, argnums, outer_mode, outer_chunk, has_aux, randomness, name)


# --------------------------------------------------------------------------------------
# the Hessian's diagonal, one basis chunk at a time
# --------------------------------------------------------------------------------------


def hessian_diagonal(
    func: Callable[..., Any],
    argnums: int = 0,
    *,
    mode: str = "fwd-over-rev",
    chunk_size: tuple[int | None, int | None] = (None, None),
    randomness: str = "error",
    trace: bool = False,
    coordinates: Sequence[int] | None = None,
    weights: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    estimate: bool = False,
) -> Callable[..., Any]:
    """The diagonal of the Hessian of a tensor-valued `func` with respect to the pytree
    at `argnums` (or its trace, ``trace=True``), without forming the Hessian.

    ``estimate=True`` gives Hutchinson's estimate instead: the returned function takes
    the probes as one more, last, argument (``[S, N]``, flat over the differentiated
    entries, Rademacher in practice), pushes them through in chunks of the outer chunk
    size and returns the mean over them of ``v * (H_y v)`` (the diagonal) or of
    ``(w * v) . (H_y v)`` (the trace; probes zeroed outside `coordinates`).

    With ``trace=True``, `coordinates` (flat indices over the differentiated entries)
    restricts the trace to those entries and `weights` (one per coordinate, or per entry
    without coordinates) weighs them: ``sum_i w_i d^2 y / d x_i^2``; only the selected
    basis vectors are pushed through. `sigma` (``[n, K]``, over all differentiated
    entries) gives ``tr(sigma^T H_y sigma) = sum_k d_k^T H_y d_k`` instead, its columns
    ``d_k`` pushed through as the basis would be; estimated (``estimate=True``) from
    probes ``z`` of ``K`` entries, ``d = sigma z``.

    The outer stage pushes the input's standard basis through, a chunk of vectors ``v``
    at a time (`_map_basis`), and reduces each chunk at once to ``v^T H_y v`` for every
    output entry ``y``: a forward outer stage takes the Jacobian-vector product of the
    inner Jacobian (``H_y v`` for all ``y``), a reverse one the Jacobian of
    ``J(x) v``; either way the chunk keeps ``[chunk, Y]`` numbers, never ``Y x N x N``.
    For a one-hot ``v = e_i`` that is the diagonal entry ``H_y[i, i]``.

    Returns a function of `func`'s arguments giving ``y.shape + x.shape`` per leaf ``x``
    of the differentiated pytree (nested like it), or ``y.shape`` for the trace.
    Argument checks are the caller's (the module-level functions make them).
    """
    name = "hessian_diagonal"
    inner_mode, outer_mode = HESSIAN_STAGES[mode]
    inner_chunk, outer_chunk = chunk_size
    inner = _jacobian(func, argnums, inner_mode, inner_chunk, False, randomness, name)

    def diagonal(*given: Any) -> Any:
        args, probes = (given[:-1], given[-1]) if estimate else (given, None)
        with DERIVATIVE_LOCK, corrected_ops():
            flat_in, in_spec = tree_flatten(args[argnums])
            shapes: list[tuple[int, ...]] = []

            def flat_jacobian(x: Any) -> torch.Tensor:
                """The inner Jacobian at `x` as ``[Y, N]``."""
                jac = inner(*args[:argnums], x, *args[argnums + 1 :])
                leaves = tree_flatten(jac)[0]
                rows = leaves[0].numel() // max(flat_in[0].numel(), 1) if leaves else 0
                if not shapes:
                    shapes.append(tuple(leaves[0].shape[: leaves[0].dim() - flat_in[0].dim()]))
                return torch.cat([leaf.reshape(rows, -1) for leaf in leaves], dim=-1)

            def column_of(basis: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
                """``H_y v`` for every output entry ``y``: ``[Y, N]``."""
                tangent = tree_unflatten(list(basis), in_spec)
                if outer_mode == "fwd":
                    column: torch.Tensor = torch.func.jvp(
                        flat_jacobian, (args[argnums],), (tangent,)
                    )[1]
                    return column
                rows = torch.func.jacrev(lambda x: flat_jacobian(x) @ v)(args[argnums])
                return torch.cat([r.reshape(r.shape[0], -1) for r in tree_flatten(rows)[0]], -1)

            def quadratic(*basis: torch.Tensor) -> torch.Tensor:
                """``v^T H_y v`` for every output entry ``y``, for one basis vector ``v``."""
                v = torch.cat([b.reshape(-1) for b in basis])
                quadratic_form: torch.Tensor = column_of(basis, v) @ v
                return quadratic_form

            if sigma is not None:  # its columns, or sigma z for the probes z
                rows = sigma.T if probes is None else probes @ sigma.T
                return _hutchinson(column_of, rows, flat_in, in_spec, shapes, outer_chunk,
                                   randomness, True, None, mean=probes is not None)  # fmt: skip
            if probes is not None:
                scale = _trace_scale(probes.shape[-1], trace, coordinates, weights, probes)
                return _hutchinson(
                    column_of, probes, flat_in, in_spec, shapes, outer_chunk, randomness,
                    trace, scale,
                )  # fmt: skip
            quads = _map_basis(  # [N, Y]
                quadratic, flat_in, outer_chunk, randomness, name, coordinates=coordinates
            )
            if not shapes:  # no basis vectors: an empty input
                out = func(*args)
                shapes.append(tuple(out.shape))
            y_shape = shapes[0]
            if trace:
                if weights is not None:
                    quads = quads * weights.reshape(-1, *([1] * (quads.dim() - 1)))
                return quads.sum(0).reshape(y_shape)
            per_y = quads.transpose(0, 1) if quads.dim() == 2 else quads
            leaves, offset = [], 0
            for leaf in flat_in:
                size = leaf.numel()
                leaves.append(per_y[..., offset : offset + size].reshape((*y_shape, *leaf.shape)))
                offset += size
            return tree_unflatten(leaves, in_spec)

    return diagonal


def _trace_scale(
    n: int,
    trace: bool,
    coordinates: Sequence[int] | None,
    weights: torch.Tensor | None,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """The weight of each of the `n` entries in a Hutchinson trace (zero outside the
    coordinates), or None for all ones."""
    if not trace or (coordinates is None and weights is None):
        return None
    index = list(coordinates) if coordinates is not None else slice(None)
    if weights is None:
        scale = like.new_zeros(n)
        scale[index] = 1.0
        return scale
    if coordinates is None:
        return weights
    # out of place: a sample's weights may be batched
    rows = torch.eye(n, dtype=like.dtype, device=like.device)[index]
    return weights @ rows


def _hutchinson(
    column_of: Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor],
    probes: torch.Tensor,
    flat_in: Sequence[torch.Tensor],
    in_spec: TreeSpec,
    shapes: list[tuple[int, ...]],
    chunk: int | None,
    randomness: str,
    trace: bool,
    scale: torch.Tensor | None,
    mean: bool = True,
) -> Any:
    """Hutchinson's estimate of the diagonal or the (weighted: `scale`) trace from
    `probes`, their mean; ``mean=False``: the sum over them (sigma's exact trace)."""
    count = probes.shape[0]
    if scale is not None:
        probes = probes * (scale != 0)  # zero outside the coordinates

    def sample(*basis: torch.Tensor) -> torch.Tensor:
        v = torch.cat([b.reshape(-1) for b in basis])
        column = column_of(basis, v)  # [Y, N]
        if trace:
            estimate: torch.Tensor = column @ (v if scale is None else v * scale)
            return estimate
        return column * v

    rows, offset = [], 0
    for leaf in flat_in:
        size = leaf.numel()
        rows.append(probes[:, offset : offset + size].reshape(count, *leaf.shape))
        offset += size
    total = _map_basis(sample, flat_in, chunk, randomness, "hutchinson", rows=rows)
    if mean:
        total = total / count
    y_shape = shapes[0]
    if trace:
        return total.reshape(y_shape)
    leaves, offset = [], 0
    for leaf in flat_in:
        size = leaf.numel()
        leaves.append(total[..., offset : offset + size].reshape((*y_shape, *leaf.shape)))
        offset += size
    return tree_unflatten(leaves, in_spec)


def _flat_product(
    product: Callable[..., Any], x: Any, others: Sequence[Any]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> H v`` at ``x`` for a flat ``v`` (over the entries of the pytree ``x``), flat."""
    flat_x, spec = tree_flatten(x)

    def times_h(v: torch.Tensor) -> torch.Tensor:
        leaves, offset = [], 0
        for leaf in flat_x:
            leaves.append(v[offset : offset + leaf.numel()].reshape(leaf.shape))
            offset += leaf.numel()
        result = product(x, *others, tree_unflatten(leaves, spec))
        return torch.cat([r.reshape(-1) for r in tree_flatten(result)[0]])

    return times_h


def hutchpp_trace(func: Callable[..., Any], mode: str, k: int) -> Callable[..., Any]:
    """Hutch++'s estimate of the trace of the Hessian of a scalar `func` (first argument),
    from ``3 k`` Hessian-vector products: ``product(x, *rest, probes)`` with ``probes``
    ``[2 k, N]`` (flat over the entries of ``x``): the first ``k`` sketch the range of
    ``H`` (``Q`` = an orthonormal basis of ``H S``), ``tr(Q^T H Q)`` is exact on it, and
    Hutchinson with the last ``k``, projected off ``Q``, estimates the rest (Meyer, Musco,
    Musco and Woodruff, 2021)."""
    product = hessian_vector_product(func, mode)

    def estimate(x: Any, *rest: Any) -> torch.Tensor:
        *others, probes = rest
        products = torch.vmap(_flat_product(product, x, others))
        sketch, test = probes[:k], probes[k:]
        # An orthonormal basis of the sketch's numerical range: the left singular vectors
        # of H S above rounding (a rank-deficient sketch is likely in small dimensions:
        # parallel sign vectors, or H itself). Held fixed (detached): any Q independent
        # of the test probes keeps the estimate, and its gradient, unbiased, and the
        # derivative of a rank-deficient factorisation is not needed.
        u, singular, _ = torch.linalg.svd(products(sketch).transpose(0, 1).detach(),
                                          full_matrices=False)  # fmt: skip
        tolerance = max(u.shape) * torch.finfo(u.dtype).eps * singular.max()
        q = u * (singular > tolerance)  # [N, k]
        exact = (q.transpose(0, 1) * products(q.transpose(0, 1))).sum()
        residual = test - (test @ q) @ q.transpose(0, 1)
        rest_estimate = (residual * products(residual)).sum() / k
        total: torch.Tensor = exact + rest_estimate
        return total

    return estimate


def lanczos_eigvalsh(
    func: Callable[..., Any], mode: str, k: int, iterations: int
) -> Callable[..., Any]:
    """The `k` algebraically largest eigenvalues of the Hessian of a scalar `func` (first
    argument), ascending, by `iterations` steps of Lanczos with full reorthogonalization:
    ``estimate(x, *rest, starts)`` with ``starts`` ``[iterations, N]`` (flat over the
    entries of ``x``; row 0 starts the iteration, the next rows restart it on a
    breakdown, when the Krylov space is exhausted). The values are the Rayleigh
    quotients ``y^T H y`` of the Ritz vectors ``y``, held fixed: differentiated (with
    ``create_graph``), they give ``y^T dH y``. With ``iterations == N`` they are exact up
    to rounding.
    """
    product = hessian_vector_product(func, mode)

    def estimate(x: Any, *rest: Any) -> torch.Tensor:
        *others, starts = rest
        times_h = _flat_product(product, x, others)

        def orthogonal(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
            for _ in range(2):  # twice is enough (Kahan, Parlett)
                v = v - basis.transpose(0, 1) @ (basis @ v)
            return v

        eps = torch.finfo(starts.dtype).eps
        q = starts[0] / starts[0].norm()
        basis = q[None]
        alphas: list[torch.Tensor] = []
        betas: list[torch.Tensor] = []
        scale = starts.new_zeros(())
        for j in range(iterations):
            w = times_h(q).detach()
            alpha = q @ w
            w = orthogonal(w, basis)
            beta = w.norm()
            alphas.append(alpha)
            if j == iterations - 1:
                break
            fresh = starts[j + 1]
            for _ in range(2):  # normalised twice: it may cancel down to rounding noise too
                fresh = orthogonal(fresh, basis)
                fresh = fresh / fresh.norm().clamp_min(torch.finfo(fresh.dtype).tiny)
            # Breakdown relative to the norm of H seen so far (not to this step's numbers:
            # in an exhausted space they are all rounding noise together).
            step = alpha.abs() + beta
            scale = step if j == 0 else torch.maximum(scale, step)
            broken = beta <= starts.shape[-1] * eps * scale
            q = w / beta.clamp_min(torch.finfo(w.dtype).tiny)
            # Once more, normalised: where w cancelled down to rounding noise (an
            # exhausted Krylov space just above the breakdown threshold), twice was not
            # enough relative to what was left; the coupling beta is then that small.
            q = orthogonal(q, basis)
            q = q / q.norm().clamp_min(torch.finfo(q.dtype).tiny)
            q = torch.where(broken, fresh, q)
            betas.append(torch.where(broken, torch.zeros_like(beta), beta))
            basis = torch.cat([basis, q[None]])
        tridiagonal = torch.diag(torch.stack(alphas))
        if betas:
            off = torch.stack(betas)
            tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
        _, vectors = torch.linalg.eigh(tridiagonal)
        ritz = (vectors[:, -k:].transpose(0, 1) @ basis).detach()  # [k, N], ascending
        values: torch.Tensor = torch.sort((ritz * torch.vmap(times_h)(ritz)).sum(-1)).values
        return values

    return estimate


def hessian_diag(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: HessianMode = "fwd-over-rev",
    chunk_size: HessianChunk = None,
    randomness: Randomness = "error",
    method: str = "exact",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Callable[..., Any]:
    """The diagonal of the Hessian of `func`, without forming the Hessian.

    For one input ``x`` and output ``y`` the result has shape ``y.shape + x.shape``:
    entry ``[j, i]`` is ``d^2 y_j / d x_i^2``. With a pytree input the leaves of the
    result nest like it (the diagonal of each leaf's own block); with tuple `argnums` a
    tuple. The outer stage pushes chunks of basis vectors ``e_i`` through and keeps
    ``e_i^T H e_i`` of each chunk at once, so a call holds ``O(n x chunk)`` numbers,
    never ``n x n``. Composes with `torchcurv.per_sample` (``(B, *y, *x)`` per sample)
    and with the other transforms.

    Args:
        func: A function of tensors returning a tensor.
        argnums: Which positional argument(s) to differentiate: an int or a tuple.
        mode: As in `torchcurv.hessian`.
        chunk_size: As in `torchcurv.hessian`: ``(inner, outer)``, the outer axis
            running over the basis vectors of the input (the probes of an estimate).
        randomness: As in `torchcurv.hessian`.
        method: ``"exact"`` or ``"hutchinson"``: the mean of ``v * (H v)`` over
            `num_samples` Rademacher probes ``v``, drawn at each call from `generator`
            (the global generator when None; under `torchcurv.per_sample` random
            draws follow its `randomness`: the module-level
            `torchcurv.per_sample_hessian_diag` seeds each sample's own).
        num_samples: Probes (Hessian-vector products) of an estimate.
        generator: A CPU `torch.Generator` for the probes.

    Returns:
        A function with the signature of `func` returning the diagonal.

    Raises:
        TorchcurvError: On bad arguments, as `torchcurv.hessian`.

    Example:
        Output ``i`` of ``x * x * [0, 1, 2]`` has the Hessian ``2 i e_i e_i^T``:

        >>> import torch, torchcurv
        >>> x = torch.randn(3, dtype=torch.float64)
        >>> d = torchcurv.hessian_diag(lambda x: x * x * torch.arange(3.0, dtype=x.dtype))(x)
        >>> torch.equal(d, torch.diag(torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64)))
        True
    """
    return _diagonal_transform(
        "hessian_diag", func, argnums, mode, chunk_size, randomness, method, num_samples, generator
    )


def laplacian(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    *,
    mode: HessianMode = "fwd-over-rev",
    chunk_size: HessianChunk = None,
    randomness: Randomness = "error",
    method: str = "exact",
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Callable[..., Any]:
    """The Laplacian of `func`: the trace of its Hessian, without forming the Hessian.

    ``y.shape`` for an output ``y`` (a scalar for a scalar function): entry ``j`` is
    ``sum_i d^2 y_j / d x_i^2``, the sum running over every entry of the differentiated
    argument(s). Computed as `torchcurv.hessian_diag` is, summed. Composes with
    `torchcurv.per_sample` (``(B, *y)``) and with the other transforms.

    Args:
        func: A function of tensors returning a tensor.
        argnums: Which positional argument(s) to differentiate: an int or a tuple.
        mode: As in `torchcurv.hessian`.
        chunk_size: As in `torchcurv.hessian`.
        randomness: As in `torchcurv.hessian`.
        method: ``"exact"``, ``"hutchinson"`` or ``"hutch++"`` (one-entry outputs), as
            in `torchcurv.per_sample_laplacian`; the probes are drawn at each call from
            `generator` (see `hessian_diag`).
        num_samples: Hessian-vector products of an estimate.
        generator: A CPU `torch.Generator` for the probes.

    Returns:
        A function with the signature of `func` returning the Laplacian.

    Raises:
        TorchcurvError: On bad arguments, as `torchcurv.hessian`.

    Example:
        The Laplacian of ``|x|^2`` is ``2 n``; that of ``sin(x_1) sin(x_2)`` is
        ``-2 sin(x_1) sin(x_2)``:

        >>> import torch, torchcurv
        >>> x = torch.randn(4, dtype=torch.float64)
        >>> torchcurv.laplacian(lambda x: (x * x).sum())(x).item()
        8.0
        >>> u = lambda x: torch.sin(x[0]) * torch.sin(x[1])
        >>> torch.allclose(torchcurv.laplacian(u)(x[:2]), -2 * u(x[:2]))
        True
    """
    return _diagonal_transform(
        "laplacian", func, argnums, mode, chunk_size, randomness, method, num_samples, generator
    )


def _diagonal_transform(
    name: str,
    func: Callable[..., Any],
    argnums: Any,
    mode: Any,
    chunk_size: Any,
    randomness: Any,
    method: Any = "exact",
    num_samples: Any = None,
    generator: Any = None,
) -> Callable[..., Any]:
    check_callable(name, func)
    argnums = check_argnums(name, argnums)
    mode = check_mode(name, mode, HESSIAN_MODES)
    chunks = check_hessian_chunk_size(name, chunk_size)
    randomness = check_randomness(name, randomness)
    trace = name == "laplacian"
    methods = ("exact", "hutchinson", "hutch++") if trace else ("exact", "hutchinson")
    check_estimator(name, method, methods, num_samples, generator)
    single = isinstance(argnums, int)
    positions = (argnums,) if single else tuple(argnums)

    def estimated(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        """Hutchinson's or Hutch++'s estimate, the differentiated pytree first in args."""
        leaves = tree_flatten(args[0])[0]
        n = sum(leaf.numel() for leaf in leaves)
        rows = 2 * (num_samples // 3) if method == "hutch++" else num_samples
        signs = torch.randint(0, 2, (rows, n), generator=generator, dtype=torch.int8)
        probes = (signs * 2 - 1).to(dtype=leaves[0].dtype, device=leaves[0].device)
        if method == "hutchinson":
            return hessian_diagonal(
                fn, 0, mode=mode, chunk_size=chunks, randomness=randomness, trace=trace,
                estimate=True,
            )(*args, probes)  # fmt: skip

        def scalar(*given: Any) -> torch.Tensor:
            value = fn(*given)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                argument_error(
                    name, "func", "must return one entry with method='hutch++'", value,
                    "Reduce the output, or use method='hutchinson'.",
                )  # fmt: skip
            return value

        return hutchpp_trace(scalar, mode, num_samples // 3)(*args, probes)

    def call(*args: Any) -> Any:
        for i in positions:
            if not -len(args) <= i < len(args):
                argument_error(
                    name,
                    "argnums",
                    f"must index the {len(args)} positional argument(s)",
                    argnums,
                    f"Use indices from 0 to {len(args) - 1}.",
                )
        picked = [i % len(args) for i in positions]
        # The differentiated argument(s) in front (a tuple of them for tuple argnums),
        # the others after, in order.
        rest = [a for i, a in enumerate(args) if i not in picked]

        def packed(diff: Any, *others: Any) -> Any:
            full, given = list(args), iter(others)
            for i in range(len(args)):
                if i in picked:
                    full[i] = diff if single else diff[picked.index(i)]
                else:
                    full[i] = next(given)
            return func(*full)

        front = args[picked[0]] if single else tuple(args[i] for i in picked)
        if method != "exact":
            return estimated(packed, (front, *rest))
        transform = hessian_diagonal(
            packed, 0, mode=mode, chunk_size=chunks, randomness=randomness, trace=trace
        )
        return transform(front, *rest)

    return call


# --------------------------------------------------------------------------------------
# Hessian-vector products
# --------------------------------------------------------------------------------------


def hessian_vector_product(func: Callable[..., Any], mode: str = "fwd-over-rev") -> Any:
    """``H v`` of a scalar `func` with respect to its first argument, for the vector
    ``v`` given as the last argument: ``product(x, *rest, v) = H_x func(x, *rest) v``.

    One product, never the matrix: ``"fwd-over-rev"`` is the JVP of the gradient,
    ``"rev-over-rev"`` the VJP of the gradient, ``"rev-over-fwd"`` the gradient of the
    directional derivative ``grad f . v``. The result has the structure of ``x``.
    Argument checks are the caller's (`torchcurv.per_sample_hvp` makes them).
    """
    inner, outer = HESSIAN_STAGES[mode]

    def product(x: Any, *rest: Any) -> Any:
        *others, v = rest

        def f(y: Any) -> torch.Tensor:
            value: torch.Tensor = func(y, *others)
            return value.reshape(())

        if inner == "fwd":  # rev-over-fwd

            def directional(y: Any) -> torch.Tensor:
                derivative: torch.Tensor = torch.func.jvp(f, (y,), (v,))[1]
                return derivative

            return torch.func.grad(directional)(x)
        # The gradient as the Jacobian of the scalar (a vjp vmapped over a batch of one
        # cotangent): forward mode over torch.func.grad fails on some double backwards
        # (F.mse_loss: "ZeroTensors are immutable"), over the vmapped vjp it does not.
        gradient = torch.func.jacrev(f)
        if outer == "fwd":
            return torch.func.jvp(gradient, (x,), (v,))[1]
        pull = torch.func.vjp(gradient, x)[1]
        return pull(v)[0]

    return product


def _scalar_grad(
    name: str, func: Callable[..., Any], nargs: int, has_aux: bool
) -> Callable[..., Any]:
    """``(*primals) -> (grads, (value, aux))`` for a scalar-valued `func`."""

    def checked(*primals: Any) -> Any:
        result = func(*primals)
        value, aux = _split_aux(name, result) if has_aux else (result, ())
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            argument_error(
                name,
                "func",
                "must return a scalar (one-element) tensor",
                value,
                "Reduce the output (e.g. .sum()) or use torchcurv.hessian for "
                "vector-valued functions.",
            )
        return value.reshape(()), (value, aux)

    return torch.func.grad(checked, argnums=tuple(range(nargs)), has_aux=True)


def _check_primals(name: str, primals: Any, tangents: Any) -> None:
    if not isinstance(primals, tuple) or not primals:
        argument_error(
            name,
            "primals",
            "must be a non-empty tuple of arguments",
            primals,
            "Wrap a single tensor as (x,).",
        )
    if not isinstance(tangents, tuple) or len(tangents) != len(primals):
        argument_error(
            name,
            "tangents",
            f"must be a tuple of {len(primals)} item(s) matching primals",
            tangents,
            "Pass one tangent per primal, e.g. (v,).",
        )
    (primal_leaves, primal_spec), (tangent_leaves, tangent_spec) = map(
        tree_flatten, (primals, tangents)
    )
    if not any(isinstance(p, torch.Tensor) for p in primal_leaves):
        argument_error(
            name,
            "primals",
            "must contain at least one tensor",
            primals,
            "Pass the point as a tuple of tensors, e.g. (x,).",
        )
    for argument, leaves, problem, fix in (
        (
            "primals",
            primal_leaves,
            "must contain only tensors (every argument is differentiated)",
            "Capture other values in func (functools.partial or a closure).",
        ),
        (
            "tangents",
            tangent_leaves,
            "must contain only tensors",
            "Give one tensor per primal tensor, e.g. (torch.ones_like(x),).",
        ),
    ):
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                argument_error(name, argument, problem, leaf, fix)
    for p, t in zip(primal_leaves, tangent_leaves, strict=False):
        if p.shape != t.shape:
            argument_error(
                name,
                "tangents",
                f"must match the primals' shapes ({describe(p)})",
                t,
                "Give each tangent the shape of its primal.",
            )
    check_differentiable(name, primal_leaves, tuple(range(len(primals))))
    if primal_spec != tangent_spec:
        argument_error(
            name,
            "tangents",
            "must have the same pytree structure as primals",
            tangents,
            "Give one tangent per primal leaf.",
        )


def hvp(
    func: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    has_aux: bool = False,
) -> tuple[Any, ...]:
    """Hessian-vector product ``H v`` of a scalar function, forward-over-reverse.

    Costs a small constant times one gradient and never forms the Hessian. Like
    `torch.func.jvp`, `primals` and `tangents` are tuples with one entry per argument
    of `func`, and every argument is differentiated.

    Args:
        func: A function returning a scalar tensor (and aux when `has_aux`).
        primals: The point, a tuple of arguments (tensors or pytrees).
        tangents: The vector, with the structure and shapes of `primals`.
        has_aux: If True, `func` returns ``(value, aux)``.

    Returns:
        ``(value, hvp)`` or ``(value, hvp, aux)``; `hvp` is a tuple with one entry per
        primal.

    Raises:
        TorchcurvError: If `func` does not return a scalar, or `tangents` does not
            match `primals`.

    Example:
        >>> import torch, torchcurv
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> v = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> value, (Hv,) = torchcurv.hvp(lambda x: 0.5 * x @ A @ x, (x,), (v,))
        >>> torch.equal(Hv, A @ v)
        True
    """
    name = "hvp"
    check_callable(name, func)
    check_flag(name, "has_aux", has_aux)
    _check_primals(name, primals, tangents)
    grad_fn = _scalar_grad(name, func, len(primals), has_aux)
    with DERIVATIVE_LOCK, corrected_ops():
        result: Any = torch.func.jvp(grad_fn, primals, tangents, has_aux=True)
    _, product, (value, aux) = result
    return (value, product, aux) if has_aux else (value, product)


def vhp(
    func: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    has_aux: bool = False,
) -> tuple[Any, ...]:
    """Vector-Hessian product ``v^T H`` of a scalar function, reverse-over-reverse.

    Equal to `hvp` for the symmetric Hessians of twice continuously differentiable
    functions; it is here for functions whose operators lack forward-mode rules.

    Args:
        func: A function returning a scalar tensor (and aux when `has_aux`).
        primals: The point, a tuple of arguments.
        tangents: The vector, with the structure and shapes of `primals`.
        has_aux: If True, `func` returns ``(value, aux)``.

    Returns:
        ``(value, vhp)`` or ``(value, vhp, aux)``; `vhp` is a tuple with one entry per
        primal.

    Raises:
        TorchcurvError: If `func` does not return a scalar, or `tangents` does not
            match `primals`.

    Example:
        >>> import torch, torchcurv
        >>> x = torch.tensor([0.5, 1.5], dtype=torch.float64)
        >>> v = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> value, (vH,) = torchcurv.vhp(lambda x: torch.exp(x).sum(), (x,), (v,))
        >>> torch.allclose(vH, torch.exp(x))
        True
    """
    name = "vhp"
    check_callable(name, func)
    check_flag(name, "has_aux", has_aux)
    _check_primals(name, primals, tangents)
    grad_fn = _scalar_grad(name, func, len(primals), has_aux)
    with DERIVATIVE_LOCK, corrected_ops():
        result: Any = torch.func.vjp(grad_fn, *primals, has_aux=True)
        _, vjp_fn, (value, aux) = result
        product = vjp_fn(tangents)
    return (value, product, aux) if has_aux else (value, product)


def numel(tree: Any) -> int:
    """Total number of entries of the tensors in a pytree."""
    return sum(math.prod(leaf.shape) for leaf in tree_flatten(tree)[0])
