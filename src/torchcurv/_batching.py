"""`per_sample`: vmap over a batch, in chunks, with a memory budget and a loop fallback."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.utils._pytree import (
    TreeSpec,
    _broadcast_to_and_flatten,
    tree_flatten,
    tree_unflatten,
)

from ._errors import (
    MemoryBudgetError,
    TorchcurvError,
    TorchcurvFallbackWarning,
    argument_error,
)
from ._planning import count_allocations, parse_budget, plan_chunks
from ._transforms import check_randomness

__all__ = ["BATCH_RANDOMNESS", "check_batch_chunk_size", "per_sample", "run_chunked"]

BatchChunk = int | Literal["auto"] | None
BATCH_RANDOMNESS: tuple[str, ...] = ("error", "different", "same")
logger = logging.getLogger("torchcurv")

# Messages of torch errors that mean "vmap cannot batch this operator" (a loop can).
_UNBATCHABLE = (
    "batching rule not implemented",
    "we do not support batching operators that can output dynamic shape",
    "data-dependent control flow",
    "calling .item() on a tensor",
    "does not have a batching rule",
    "vmap: inplace arithmetic",
    "is not supported with vmap",
)
_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "not enough memory")


def check_batch_chunk_size(function: str, chunk_size: Any, memory_budget: Any) -> BatchChunk:
    """Validate a batch chunk size (None, a positive int or "auto") against a budget."""
    if chunk_size == "auto" or chunk_size is None:
        if memory_budget is not None:
            parse_budget(function, memory_budget, torch.device("cpu"))
            return "auto"
        return chunk_size  # type: ignore[no-any-return]
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size > 0:
        if memory_budget is not None:
            argument_error(
                function,
                "chunk_size",
                "must be 'auto' or None when memory_budget is given",
                chunk_size,
                "Pass either chunk_size=<int> or memory_budget=..., not both.",
            )
        return chunk_size
    argument_error(
        function,
        "chunk_size",
        "must be None, a positive int or 'auto'",
        chunk_size,
        "Pass chunk_size='auto' to plan from the memory budget, or an int such as 32.",
    )


def _is_wrapped(leaves: Sequence[Any]) -> bool:
    """True inside an enclosing torch.func transform (tensors are functorch wrappers)."""
    return any(
        isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)
        for x in leaves
    )


class _Batch:
    """The batched arguments of one call: flat leaves, their batch dims and the size."""

    def __init__(self, function: str, args: tuple[Any, ...], in_dims: Any) -> None:
        self.leaves, self.spec = tree_flatten(args)
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
        if isinstance(in_dims, tuple) and len(in_dims) != len(args):
            argument_error(
                function,
                "in_dims",
                f"must have one entry per argument ({len(args)})",
                in_dims,
                "Pass an int, or a tuple with one entry per argument.",
            )
        flat_dims = _broadcast_to_and_flatten(dims, tree_flatten(args)[1])
        if flat_dims is None:
            argument_error(
                function,
                "in_dims",
                "does not match the structure of the arguments",
                in_dims,
                "Give in_dims the structure of the arguments (a prefix).",
            )
        self.dims: list[int | None] = list(flat_dims)
        sizes = set()
        for leaf, dim in zip(self.leaves, self.dims, strict=True):
            if dim is None:
                continue
            if not isinstance(leaf, torch.Tensor) or not -leaf.dim() <= dim < leaf.dim():
                argument_error(
                    function,
                    "in_dims",
                    f"maps dim {dim} of an argument that has no such dim",
                    leaf,
                    "Use None for arguments shared by all samples.",
                )
            sizes.add(leaf.shape[dim])
        if len(sizes) != 1:
            argument_error(
                function,
                "in_dims",
                "must map at least one tensor, and all mapped "
                "tensors must have the same batch size",
                sorted(sizes),
                "Check that inputs and targets have the same number of samples.",
            )
        self.size: int = sizes.pop()

    def narrow(self, start: int, length: int) -> tuple[Any, ...]:
        leaves = [
            leaf if dim is None else leaf.narrow(dim, start, length)
            for leaf, dim in zip(self.leaves, self.dims, strict=True)
        ]
        return tuple(tree_unflatten(leaves, self.spec))

    def select(self, index: int) -> tuple[Any, ...]:
        leaves = [
            leaf if dim is None else leaf.select(dim, index)
            for leaf, dim in zip(self.leaves, self.dims, strict=True)
        ]
        return tuple(tree_unflatten(leaves, self.spec))


class _Output:
    """Assembles chunk results along their out dims (preallocated when possible)."""

    def __init__(self, function: str, out_dims: Any, size: int, preallocate: bool) -> None:
        self.function, self.out_dims, self.size = function, out_dims, size
        self.preallocate = preallocate
        self.spec: TreeSpec | None = None
        self.dims: list[int] = []
        self.buffers: list[torch.Tensor] = []
        self.pieces: list[list[torch.Tensor]] = []

    def _layout(self, result: Any) -> list[torch.Tensor]:
        leaves, spec = tree_flatten(result)
        if self.spec is None:
            dims = _broadcast_to_and_flatten(self.out_dims, spec)
            if dims is None or any(not isinstance(d, int) for d in dims):
                argument_error(
                    self.function,
                    "out_dims",
                    "must be an int or a pytree of ints matching the outputs",
                    self.out_dims,
                    "Pass out_dims=0.",
                )
            self.spec, self.dims = (
                spec,
                [
                    d % (leaf.dim()) if leaf.dim() else 0
                    for d, leaf in zip(dims, leaves, strict=True)
                ],
            )
        return leaves

    def add(self, start: int, result: Any) -> None:
        leaves = self._layout(result)
        if not self.preallocate:
            self.pieces.append(leaves)
            return
        if not self.buffers:
            for leaf, dim in zip(leaves, self.dims, strict=True):
                shape = list(leaf.shape)
                shape[dim] = self.size
                self.buffers.append(leaf.new_empty(shape))
        for buffer, leaf, dim in zip(self.buffers, leaves, self.dims, strict=True):
            buffer.narrow(dim, start, leaf.shape[dim]).copy_(leaf)

    def add_loop(self, start: int, results: list[Any]) -> None:
        stacked = [
            torch.stack(group, dim=0)
            for group in zip(*(tree_flatten(r)[0] for r in results), strict=True)
        ]
        self._layout(tree_unflatten(stacked, tree_flatten(results[0])[1]))
        moved = [s.movedim(0, d) for s, d in zip(stacked, self.dims, strict=True)]
        assert self.spec is not None
        self.add(start, tree_unflatten(moved, self.spec))

    def result(self) -> Any:
        assert self.spec is not None
        if self.preallocate:
            return tree_unflatten(self.buffers, self.spec)
        if len(self.pieces) == 1:
            return tree_unflatten(self.pieces[0], self.spec)
        merged = [
            torch.cat(group, dim=d)
            for group, d in zip(zip(*self.pieces, strict=True), self.dims, strict=True)
        ]
        return tree_unflatten(merged, self.spec)


def run_chunked(
    function: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    in_dims: Any,
    out_dims: Any,
    randomness: str,
    chunk: int | None,
    first: tuple[int, Any] | None = None,
) -> Any:
    """vmap `func` over the batch of `args`, `chunk` samples at a time.

    Falls back to smaller chunks when memory runs out, and to a loop over samples when
    an operator cannot be batched (with a `TorchcurvFallbackWarning` naming it).
    `first` is an already computed ``(length, result)`` for the leading samples.
    """
    batch = _Batch(function, args, in_dims)
    step = batch.size if chunk is None else min(chunk, batch.size)
    several = first is not None or step < batch.size
    output = _Output(
        function, out_dims, batch.size, preallocate=several and not _is_wrapped(batch.leaves)
    )
    mapped = torch.vmap(func, in_dims=in_dims, out_dims=out_dims, randomness=randomness)
    start = 0
    if first is not None:
        output.add(0, first[1])
        start = first[0]
    looping = False
    while start < batch.size:
        length = min(step, batch.size - start)
        try:
            if looping:
                output.add_loop(
                    start, [func(*batch.select(i)) for i in range(start, start + length)]
                )
            else:
                output.add(start, mapped(*batch.narrow(start, length)))
        except TorchcurvError:
            raise
        except Exception as error:
            text = str(error).lower()
            if "randomness error mode" in text:
                raise TorchcurvError(
                    f"{function}: the function called a random operation (e.g. dropout in "
                    "training mode) while randomness='error'. Pass randomness='different' "
                    "(each sample its own draw) or randomness='same', or call model.eval()."
                ) from None
            if any(s in text for s in _OUT_OF_MEMORY) or isinstance(error, torch.OutOfMemoryError):
                if length == 1:
                    raise MemoryBudgetError(
                        f"{function}: out of memory on a single sample (sample {start}); "
                        "pass a smaller chunk_size for the basis (e.g. chunk_size=(1, 8)) or "
                        "free memory."
                    ) from error
                step = max(1, length // 2)
                warnings.warn(
                    f"{function}: out of memory on a chunk of {length} samples; "
                    f"retrying with chunks of {step}.",
                    TorchcurvFallbackWarning,
                    stacklevel=3,
                )
                continue
            if not looping and any(s in text for s in _UNBATCHABLE):
                first_line = str(error).strip().splitlines()[0]
                warnings.warn(
                    f"{function}: vmap cannot batch an operator ({first_line}); "
                    "falling back to a loop over samples.",
                    TorchcurvFallbackWarning,
                    stacklevel=3,
                )
                looping = True
                continue
            if type(error) not in (RuntimeError, ValueError, TypeError, IndexError):
                raise
            raise type(error)(
                f"{function}: failed on samples {start}:{start + length} of {batch.size} "
                f"(chunk_size={chunk}): {error}"
            ) from error
        start += length
    return output.result()


def per_sample(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    *,
    chunk_size: BatchChunk = None,
    memory_budget: int | float | str | None = None,
    randomness: Literal["error", "different", "same"] = "error",
) -> Callable[..., Any]:
    """Vectorise a single-sample function over a batch, in chunks.

    `torch.vmap` with a chunk size, a memory budget and a fallback: write `func` for
    one sample (``x.shape == (n,)``), call the result on a batch (``X.shape == (B, n)``).
    Chunks are concatenated in order; chunking never changes the result beyond
    rounding. Operators without a batching rule fall back to a loop over samples, with
    a `TorchcurvFallbackWarning` that names them.

    Args:
        func: The single-sample function.
        in_dims: Which dim of each argument is the batch dim (None: shared by all
            samples); an int or a pytree prefix of the arguments, as in `torch.vmap`.
        out_dims: Where the batch dim goes in each output.
        chunk_size: None (all samples at once), a positive int, or ``"auto"``: as many
            samples as fit `memory_budget`, measured on the first sample.
        memory_budget: Bytes or a size such as ``"2GiB"``; implies ``chunk_size="auto"``.
            Default: half the memory available on the device.
        randomness: ``"error"`` refuses random operations; ``"different"`` gives each
            sample its own draw; ``"same"`` gives all samples one draw.

    Returns:
        The batched function.

    Raises:
        TorchcurvError: On bad arguments, or random operations under ``"error"``.
        MemoryBudgetError: If even one sample does not fit `memory_budget`.

    Example:
        >>> import torch, torchcurv
        >>> X = torch.randn(5, 3, dtype=torch.float64)
        >>> H = torchcurv.per_sample(torchcurv.hessian(lambda x: (x ** 3).sum()),
        ...                          chunk_size=2)(X)
        >>> H.shape
        torch.Size([5, 3, 3])
        >>> torch.allclose(H, torch.diag_embed(6 * X))
        True
    """
    name = "per_sample"
    if not callable(func):
        argument_error(
            name,
            "func",
            "must be callable",
            func,
            "Pass a single-sample function, e.g. torchcurv.hessian(f).",
        )
    chunk = check_batch_chunk_size(name, chunk_size, memory_budget)
    randomness = check_randomness(name, randomness, BATCH_RANDOMNESS)  # type: ignore[assignment]
    probes: dict[Any, tuple[int, int]] = {}

    def batched(*args: Any) -> Any:
        if chunk != "auto":
            return run_chunked(
                name,
                func,
                args,
                in_dims=in_dims,
                out_dims=out_dims,
                randomness=randomness,
                chunk=chunk,
            )
        batch = _Batch(name, args, in_dims)
        device = next(
            (x.device for x in batch.leaves if isinstance(x, torch.Tensor)), torch.device("cpu")
        )
        budget = parse_budget(name, memory_budget, device)
        key = tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else id(x)
            for x in batch.leaves
        )
        first = None
        if key not in probes:
            mapped = torch.vmap(func, in_dims=in_dims, out_dims=out_dims, randomness=randomness)
            work, result = count_allocations(mapped, *batch.narrow(0, 1))
            result_bytes = sum(x.numel() * x.element_size() for x in tree_flatten(result)[0])
            probes[key] = (work, result_bytes)
            first = (1, result)
        work, result_bytes = probes[key]
        plan = plan_chunks(
            name,
            batch=batch.size,
            axes=(),
            result_bytes=result_bytes,
            work_bytes=work,
            budget=budget,
        )
        logger.debug("%s: %s", name, plan.describe())
        return run_chunked(
            name,
            func,
            args,
            in_dims=in_dims,
            out_dims=out_dims,
            randomness=randomness,
            chunk=plan.batch,
            first=first,
        )

    return batched
