"""The batch runner: vmap over a batch in chunks, with one rule for randomness,
out-of-memory halving and a loop fallback; and `per_sample`, its public face.

Every module-level call ends here: an engine supplies a `Work` (how to run a slice of
the batch, and one sample for the loop fallback) and `run_batches` runs the slices.

Randomness, decided once for every caller: a call with random operations draws one
seed ``s`` from torch's global generator. ``randomness="same"`` seeds every batch chunk
with ``s``, so all samples (and all rows of their derivatives) see one draw, whatever
the chunking. ``randomness="different"`` seeds sample ``i`` with ``(s, i)``, its global
index in the batch, so each sample has its own draw and the same seed gives the same
result for every chunking; samples then run one at a time (each still vectorised over
its basis). The global generator advances by the one draw of ``s`` only.

Concurrency: torch.func's transform levels are process-wide, so the derivative section
of every call holds `torchcurv._compat.DERIVATIVE_LOCK`; calls from several threads
are serialised and correct.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ._checks import check_batch_chunk_size, check_randomness
from ._compat import (
    DERIVATIVE_LOCK,
    OutOfMemoryError,
    TreeSpec,
    broadcast_to_and_flatten,
    is_functorch_wrapped,
    release_free_memory,
    tree_flatten,
    tree_map,
    tree_unflatten,
)
from ._errors import (
    MemoryBudgetError,
    TorchcurvError,
    TorchcurvFallbackWarning,
    argument_error,
)
from ._memory import (
    Plan,
    fit,
    format_bytes,
    heap_slack,
    measure_peak,
    parse_budget,
    plan,
    resident_memory,
)
from ._transforms import hessian, jacobian, probing
from ._types import BATCH_RANDOMNESS, BatchChunk

__all__ = [
    "TORCH_SETUP_BYTES",
    "Batch",
    "Work",
    "budget_after_setup",
    "cuda_devices",
    "initialize",
    "measure_work",
    "per_sample",
    "plan_batch",
    "random_error",
    "result_bytes",
    "run_batches",
    "seeded",
    "unbatchable",
    "vmapped",
]

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
_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: (s, i) -> distinct seeds


@dataclass(frozen=True)
class Work:
    """How an engine computes a batch slice.

    Attributes:
        batched: ``batched(*args)`` computes the result of a slice of the batch (the
            arguments carry their batch dims, as given by ``in_dims``).
        single: ``single(*args)`` computes one sample (batch dims removed), for the
            loop fallback when an operator cannot be vectorised; None if the engine
            has no such fallback.
    """

    batched: Callable[..., Any]
    single: Callable[..., Any] | None = None


def _is_wrapped(leaves: Sequence[Any]) -> bool:
    """True inside an enclosing torch.func transform (tensors are functorch wrappers)."""
    return any(is_functorch_wrapped(x) for x in leaves)


def cuda_devices(leaves: Sequence[Any]) -> list[int]:
    """Indices of the CUDA devices of the tensors in `leaves` (for `fork_rng`)."""
    return sorted(
        {
            x.device.index or 0
            for x in leaves
            if isinstance(x, torch.Tensor) and x.device.type == "cuda"
        }
    )


@contextmanager
def seeded(seed: int, key: int, leaves: Sequence[Any]) -> Iterator[None]:
    """Run with torch's generators seeded by ``(seed, key)``; restored afterwards."""
    with torch.random.fork_rng(devices=cuda_devices(leaves)):
        torch.manual_seed((seed ^ ((key + 1) * _SEED_MIX)) % 2**63)
        yield


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it when it is a view into a larger storage.

    Torch's forward mode gives each tangent the layout of its primal *including the
    primal's whole storage* (``_new_zeros_with_same_feature_meta``): vmapped over a
    basis of ``k`` tangents, a slice of a batch would make every chunk allocate ``k``
    copies of the whole batch (measured: 206 instead of 80 MiB on a chunk of an MLP
    256-64-1). A copy of the slice costs the slice's bytes once. Tensors of an
    enclosing transform are left alone (their storage cannot be read).
    """
    if is_functorch_wrapped(tensor):
        return tensor
    try:
        storage = tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
        return tensor
    if storage <= tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


#: Flat batch dims per argument structure and ``in_dims`` (torch's broadcast costs
#: about 20 µs a call).
_FLAT_DIMS: dict[tuple[TreeSpec, str], list[Any]] = {}


class Batch:
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
        key = (self.spec, repr(dims))
        flat_dims = _FLAT_DIMS.get(key)
        if flat_dims is None:
            flat_dims = broadcast_to_and_flatten(dims, self.spec)
            if flat_dims is not None and len(_FLAT_DIMS) < 256:
                _FLAT_DIMS[key] = flat_dims
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
            leaf if dim is None else compact(leaf.narrow(dim, start, length))
            for leaf, dim in zip(self.leaves, self.dims, strict=True)
        ]
        return tuple(tree_unflatten(leaves, self.spec))

    def first(self, length: int) -> tuple[Any, ...]:
        """The first `length` samples, repeating sample 0 (or zeros) when there are fewer."""
        if self.size >= length:
            return self.narrow(0, length)

        def repeat(leaf: torch.Tensor, dim: int) -> torch.Tensor:
            shape = (*leaf.shape[:dim], length, *leaf.shape[dim + 1 :])
            if leaf.shape[dim] == 0:
                return leaf.new_zeros(shape)
            return leaf.narrow(dim, 0, 1).expand(shape)

        leaves = [
            leaf if dim is None else repeat(leaf, dim)
            for leaf, dim in zip(self.leaves, self.dims, strict=True)
        ]
        return tuple(tree_unflatten(leaves, self.spec))

    def select(self, index: int) -> tuple[Any, ...]:
        leaves = [
            leaf if dim is None else compact(leaf.select(dim, index))
            for leaf, dim in zip(self.leaves, self.dims, strict=True)
        ]
        return tuple(tree_unflatten(leaves, self.spec))


class _Output:
    """Assembles chunk results along their out dims (preallocated when possible)."""

    def __init__(self, function: str, out_dims: Any, size: int, preallocate: bool) -> None:
        self.function, self.out_dims, self.size = function, out_dims, size
        self.preallocate = preallocate
        self.spec: TreeSpec | None = None
        self.dims: list[int | None] = []  # None: not batched (vmap's out_dims=None)
        self.buffers: list[torch.Tensor] = []
        self.pieces: list[list[torch.Tensor]] = []

    def _layout(self, result: Any) -> list[torch.Tensor]:
        leaves, spec = tree_flatten(result)
        self._check_tensors(leaves)
        if self.spec is None:
            out_dims = self.out_dims
            if isinstance(out_dims, tuple) and len(out_dims) == 1 and spec.num_leaves == 1:
                out_dims = out_dims[0]  # vmap reads a one-tuple as the single output's dim
            dims = broadcast_to_and_flatten(out_dims, spec)  # entries checked by per_sample
            if dims is None:
                argument_error(
                    self.function,
                    "out_dims",
                    "does not match the structure of the outputs",
                    self.out_dims,
                    "Give out_dims the structure of the outputs (a prefix), or pass an int.",
                )
            self.spec, self.dims = (
                spec,
                [
                    None if d is None else d % (leaf.dim()) if leaf.dim() else 0
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
                if dim is None:  # not batched: the first chunk's value is the value
                    self.buffers.append(leaf)
                    continue
                shape = list(leaf.shape)
                shape[dim] = self.size
                self.buffers.append(leaf.new_empty(shape))
        for buffer, leaf, dim in zip(self.buffers, leaves, self.dims, strict=True):
            if dim is not None:
                buffer.narrow(dim, start, leaf.shape[dim]).copy_(leaf)

    def whole(self, result: Any) -> Any:
        """The result of the whole batch in one chunk, checked."""
        self._check_tensors(tree_flatten(result)[0])
        return result

    def _check_tensors(self, leaves: Sequence[Any]) -> None:
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                argument_error(
                    self.function,
                    "func",
                    "must return tensors (or pytrees of tensors)",
                    leaf,
                    "Return a tensor, e.g. torch.as_tensor(value), not a Python number.",
                )

    def add_loop(self, start: int, results: list[Any]) -> None:
        flat = [tree_flatten(r)[0] for r in results]
        for leaves in flat:
            self._check_tensors(leaves)
        groups = list(zip(*flat, strict=True))
        spec = tree_flatten(results[0])[1]
        stacked = [torch.stack(group, dim=0) for group in groups]
        self._layout(tree_unflatten(stacked, spec))
        moved = [
            group[0] if d is None else s.movedim(0, d)
            for group, s, d in zip(groups, stacked, self.dims, strict=True)
        ]
        self.add(start, tree_unflatten(moved, spec))

    def result(self) -> Any:
        assert self.spec is not None
        if self.preallocate:
            return tree_unflatten(self.buffers, self.spec)
        if len(self.pieces) == 1:
            return tree_unflatten(self.pieces[0], self.spec)
        merged = [
            group[0] if d is None else torch.cat(group, dim=d)
            for group, d in zip(zip(*self.pieces, strict=True), self.dims, strict=True)
        ]
        return tree_unflatten(merged, self.spec)


def _empty_result(work: Work, batch: Batch, output: _Output) -> Any:
    """B=0: the result of one zero sample, cut to no samples (shapes are right)."""
    leaves = [
        leaf if dim is None else leaf.new_zeros((*leaf.shape[:dim], 1, *leaf.shape[dim + 1 :]))
        for leaf, dim in zip(batch.leaves, batch.dims, strict=True)
    ]
    result = work.batched(*tree_unflatten(leaves, batch.spec))
    output._layout(result)
    empty = [
        leaf if dim is None else leaf.narrow(dim, 0, 0)
        for leaf, dim in zip(tree_flatten(result)[0], output.dims, strict=True)
    ]
    return tree_unflatten(empty, tree_flatten(result)[1])


def run_batches(
    function: str,
    work: Work,
    args: tuple[Any, ...],
    *,
    in_dims: Any,
    out_dims: Any,
    randomness: str,
    chunk: int | None,
    looped: bool = False,
) -> Any:
    """Run `work` over the batch of `args`, `chunk` samples at a time.

    Falls back to smaller chunks when memory runs out, and to a loop over samples when
    an operator cannot be batched (with a `TorchcurvFallbackWarning` naming it; with
    ``looped=True`` the planner found that out already and the loop starts at once).
    Random operations follow the rule in the module docstring.
    """
    batch = Batch(function, args, in_dims)
    with DERIVATIVE_LOCK:
        return _run(function, work, batch, out_dims, randomness, chunk, looped)


def _run(
    function: str,
    work: Work,
    batch: Batch,
    out_dims: Any,
    randomness: str,
    chunk: int | None,
    looped: bool = False,
) -> Any:
    size = batch.size
    step = max(1, size if chunk is None else min(chunk, size))
    if randomness == "different":
        step = 1  # each sample its own seed: one at a time
    several = step < size
    output = _Output(
        function, out_dims, size, preallocate=several and not _is_wrapped(batch.leaves)
    )
    if size == 0:
        return _empty_result(work, batch, output)
    seed = int(torch.randint(0, 2**62, ())) if randomness != "error" else 0
    start = 0
    looping = looped and work.single is not None
    while start < size:
        length = min(step, size - start)
        try:
            if looping:
                assert work.single is not None
                results = []
                for i in range(start, start + length):
                    with _maybe_seeded(randomness, seed, i, batch.leaves):
                        results.append(work.single(*batch.select(i)))
                output.add_loop(start, results)
            else:
                with _maybe_seeded(randomness, seed, start, batch.leaves):
                    result = work.batched(*batch.narrow(start, length))
                if length == size:  # one chunk: vmap laid out the result already
                    return output.whole(result)
                output.add(start, result)
                if several:
                    release_free_memory()  # the next chunk starts from live bytes
        except TorchcurvError as error:
            if randomness == "error" and "called a random operation" in str(error):
                raise TorchcurvError(random_error(function)) from None
            raise
        except Exception as error:
            text = str(error).lower()
            if "randomness error mode" in text:
                raise TorchcurvError(random_error(function)) from None
            if any(s in text for s in _OUT_OF_MEMORY) or isinstance(error, OutOfMemoryError):
                if length == 1:
                    raise MemoryBudgetError(
                        f"{function}: out of memory on a single sample (sample {start}); "
                        "pass a smaller chunk_size for the basis (e.g. chunk_size=(1, 1, 8)) "
                        "or a memory_budget, or free memory."
                    ) from error
                step = max(1, length // 2)
                warnings.warn(
                    f"{function}: out of memory on a chunk of {length} samples; "
                    f"retrying with chunks of {step}.",
                    TorchcurvFallbackWarning,
                    stacklevel=4,
                )
                continue
            reason = unbatchable(error)
            if not looping and work.single is not None and reason is not None:
                warnings.warn(
                    f"{function}: vmap cannot batch an operator ({reason}); "
                    "falling back to a loop over samples.",
                    TorchcurvFallbackWarning,
                    stacklevel=4,
                )
                looping = True
                continue
            if type(error) not in (RuntimeError, ValueError, TypeError, IndexError):
                raise
            raise type(error)(
                f"{function}: failed on samples {start}:{start + length} of {size} "
                f"(chunk_size={chunk}): {error}"
            ) from error
        start += length
    return output.result()


def unbatchable(error: BaseException) -> str | None:
    """The first line of `error` when it means "vmap cannot batch an operator", else None."""
    text = str(error)
    if isinstance(error, TorchcurvError) or not any(s in text.lower() for s in _UNBATCHABLE):
        return None
    return text.strip().splitlines()[0]


def random_error(function: str) -> str:
    return (
        f"{function}: the function called a random operation (e.g. dropout in training "
        "mode, or the probes of a function-level estimate such as torchcurv.laplacian(f, "
        "method='hutchinson')) while randomness='error'. Pass randomness='different' "
        "(each sample its own draw) or randomness='same' (one draw for all), or call "
        "model.eval(); module-level estimates (per_sample_laplacian) seed each sample's "
        "probes themselves."
    )


@contextmanager
def _maybe_seeded(randomness: str, seed: int, index: int, leaves: Sequence[Any]) -> Iterator[None]:
    """The randomness rule: "same" seeds every chunk alike, "different" by sample index."""
    if randomness == "error":
        yield
        return
    with seeded(seed, 0 if randomness == "same" else index, leaves):
        yield


def vmapped(
    func: Callable[..., Any],
    in_dims: Any,
    out_dims: Any,
    randomness: str,
    absent: tuple[int, ...] = (),
) -> Work:
    """`Work` for a single-sample function: vmap for slices, the function for the loop.

    ``absent``: positions of the arguments that are always None (no targets, no written
    buffers...); they are left out before vmap (`func` takes the others), whose
    flattening of them, and of every transform inside, costs more than the rest of its
    set-up on small models.
    """
    inner = "error" if randomness == "error" else "same" if randomness == "same" else "different"
    if not absent:
        return Work(torch.vmap(func, in_dims=in_dims, out_dims=out_dims, randomness=inner), func)
    present_dims = tuple(d for i, d in enumerate(in_dims) if i not in absent)
    vectorised = torch.vmap(func, in_dims=present_dims, out_dims=out_dims, randomness=inner)

    def batched(*args: Any) -> Any:
        return vectorised(*(a for i, a in enumerate(args) if i not in absent))

    def single(*args: Any) -> Any:
        return func(*(a for i, a in enumerate(args) if i not in absent))

    return Work(batched, single)


def sample_seeds(size: int, generator: torch.Generator | None) -> torch.Tensor:
    """One seed per sample, ``[size]`` int64 on the CPU: sample ``i``'s is a hash of
    ``(seed, i)``, the seed drawn from `generator` (the global generator when None), so
    a sample's random draws depend on neither the chunking nor the batch size."""
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    mask = 2**63 - 1
    seeds = []
    for i in range(size):  # splitmix64 of (seed, i)
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        seeds.append((z ^ (z >> 31)) & mask)
    return torch.tensor(seeds, dtype=torch.int64)


def draws(
    seeds: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    law: str = "rademacher",
) -> torch.Tensor:
    """``[len(seeds), *shape]`` random numbers, each sample's from its seed: Rademacher
    signs (+-1), standard normal numbers (``law="gaussian"``: never parallel, as sign
    vectors of a small dimension often are) or standard Gumbel numbers
    (``law="gumbel"``: ``argmax(log p + g)`` draws a class with probability ``p``)."""
    rows = []
    for seed in seeds.tolist():
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if law == "gaussian":
            rows.append(torch.randn(shape, generator=generator, dtype=torch.float64))
        elif law == "gumbel":
            uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
            tiny = torch.finfo(torch.float64).tiny
            rows.append(-torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-16))))
        else:
            signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
            rows.append((signs * 2 - 1).to(torch.float64))
    drawn = torch.stack(rows) if rows else torch.zeros(0, *shape, dtype=torch.float64)
    return drawn.to(dtype=dtype, device=device)


def with_draws(work: Work, draw: Callable[[torch.Tensor], torch.Tensor]) -> Work:
    """`work` whose last argument, the samples' seeds (or a tuple of them and more
    per-sample data), has its seeds replaced by `draw(seeds)` (``[b, ...]``, one row per
    sample) before it runs: random numbers are drawn outside vmap, sample ``i``'s from
    its own seed, so the chunking never changes them."""

    def drawn(vectors: Any) -> Any:
        if isinstance(vectors, tuple):
            return (draw(vectors[0]), *vectors[1:])
        return draw(vectors)

    def batched(*args: Any) -> Any:
        return work.batched(*args[:-1], drawn(args[-1]))

    def single(*args: Any) -> Any:
        assert work.single is not None
        one = tree_map(lambda t: t.unsqueeze(0), args[-1])
        return work.single(*args[:-1], tree_map(lambda t: t[0], drawn(one)))

    return Work(batched, single)


def with_nones(func: Callable[..., Any], absent: tuple[int, ...], count: int) -> Any:
    """`func` of `count` arguments as a function of those not at the positions `absent`
    (None is passed there)."""
    if not absent:
        return func

    def call(*present: Any) -> Any:
        given = iter(present)
        return func(*(None if i in absent else next(given) for i in range(count)))

    return call


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
        out_dims: Where the batch dim goes in each output: an int, or None for an
            output that does not depend on the batched arguments (returned once), or a
            pytree of them, as in `torch.vmap`.
        chunk_size: None (all samples at once), a positive int, or ``"auto"``: as many
            samples as fit `memory_budget`, measured on the first sample.
        memory_budget: Bytes or a size such as ``"2GiB"``; implies ``chunk_size="auto"``.
            Default: a fraction (0.4) of the memory available on the device.
        randomness: ``"error"`` refuses random operations; ``"different"`` gives each
            sample its own draw; ``"same"`` gives all samples one draw.

    Returns:
        The batched function. Keyword arguments of a call are passed to every sample
        unchanged (not batched), as `torch.vmap` passes them.

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
    _check_out_dims(name, out_dims)
    chunk = check_batch_chunk_size(name, chunk_size, memory_budget)
    randomness = check_randomness(name, randomness, BATCH_RANDOMNESS)  # type: ignore[assignment]

    def batched(*args: Any, **kwargs: Any) -> Any:
        work = vmapped(
            functools.partial(func, **kwargs) if kwargs else func, in_dims, out_dims, randomness
        )
        step: int | None
        if chunk != "auto":
            step = chunk
        else:
            budget = memory_budget
            if memory_budget is not None:  # before anything is measured
                budget = budget_after_setup(name, memory_budget, args)
            batch = Batch(name, args, in_dims)
            step = plan_batch(name, work, batch, randomness, budget).batch
        return run_batches(
            name,
            work,
            args,
            in_dims=in_dims,
            out_dims=out_dims,
            randomness=randomness,
            chunk=step,
        )

    return batched


def _check_out_dims(function: str, out_dims: Any) -> None:
    def valid(dims: Any) -> bool:
        if dims is None or (isinstance(dims, int) and not isinstance(dims, bool)):
            return True
        if isinstance(dims, (tuple, list)):
            return all(valid(d) for d in dims)
        if isinstance(dims, dict):
            return all(valid(d) for d in dims.values())
        return False

    if not valid(out_dims):
        argument_error(
            function,
            "out_dims",
            "must be an int, None or a pytree of them matching the outputs",
            out_dims,
            "Pass out_dims=0 (None for outputs that do not depend on the batch).",
        )


def measure_work(
    work: Work,
    batch: Batch,
    length: int,
    chunks: tuple[int, ...] | None = None,
    *,
    single: bool = False,
) -> tuple[int, Any]:
    """Peak live bytes of `work` on the first `length` samples, and its result.

    RNG-neutral (the generators are restored). Under `torchcurv._transforms.probing`
    (when `chunks` is given) only two basis chunks per stage are computed. ``single``
    measures `work.single` on the first sample (the loop over samples), whatever
    `length` is.
    """
    run, args = work.batched, batch.first(length)
    if single:
        assert work.single is not None
        run, args = work.single, batch.select(0)
    with DERIVATIVE_LOCK, torch.random.fork_rng(devices=cuda_devices(batch.leaves)):
        try:
            if chunks is None:
                return measure_peak(run, *args)
            with probing():
                return measure_peak(run, *args)
        finally:
            # Free heap pages back to the OS: a measurement's freed memory would
            # otherwise stay resident under the next one (the planning of an LSTM's
            # parameter Hessian retained 78 MiB over 14 measurements, its peak 199 MiB
            # for a 128 MiB budget).
            release_free_memory()


def result_bytes(result: Any, length: int) -> int:
    """Bytes of one sample's result in `result`, computed for `length` samples."""
    total = sum(int(x.numel()) * int(x.element_size()) for x in tree_flatten(result)[0])
    return total // max(length, 1)


def plan_batch(
    function: str, work: Work, batch: Batch, randomness: str, memory_budget: Any
) -> Plan:
    """Samples per vectorised call for `work` within the budget, from measurements."""
    device = next(
        (x.device for x in batch.leaves if isinstance(x, torch.Tensor)), torch.device("cpu")
    )
    budget = parse_budget(function, memory_budget, device)
    per_sample_result: list[int] = []

    def measure(length: int, chunks: tuple[int, ...]) -> int:
        peak, result = measure_work(work, batch, length)
        per_sample_result.append(result_bytes(result, length))
        return peak

    limit = 1 if randomness == "different" else None
    model = fit(measure, (), max_batch=1 if limit else 2, limit=budget)
    return plan(
        function,
        batch=batch.size,
        axes=(),
        model=model,
        result_bytes=max(per_sample_result),
        budget=budget,
        batch_limit=limit,
        slack=heap_slack(device),
    )


# --------------------------------------------------------------------------------------
# torch's one-time set-up
# --------------------------------------------------------------------------------------

#: An upper bound of the resident memory torch's one-time set-up adds to a process
#: (`initialize`): 115-125 MiB measured at its peak on torch 2.13, CPU, whether or not
#: a call without forward mode (the structured engine) came first.
TORCH_SETUP_BYTES = 144 * 2**20

_SETUP: dict[str, Any] = {"state": "not done", "bytes": 0}


def initialize() -> int:
    """Pay torch's one-time set-up of its derivative machinery now, not inside a call.

    The first forward-mode derivative, ``vmap`` and memory measurement of a process make
    torch compile its forward-AD decompositions (TorchScript graphs, compiled again on
    their first runs: softmax, log-softmax and NLL backwards, norms) and build its
    transform machinery:
    115-125 MiB of resident memory (torch 2.13, CPU; `TORCH_SETUP_BYTES` bounds it) and
    5-8 s, paid once whatever the model, and kept for the life of the process. A
    call with a `memory_budget` in a process that has not paid it yet pays it first,
    within its budget: a budget smaller than `TORCH_SETUP_BYTES` raises
    `MemoryBudgetError` naming it, before anything is allocated. Call ``initialize()``
    once, before budgeted calls and before you read the process's memory, so that every
    budget is the call's own. Later calls do nothing and return 0.

    Returns:
        The resident bytes the set-up added to the process (0 if it was already done,
        or where resident memory cannot be read).

    Example:
        >>> import torchcurv
        >>> first = torchcurv.initialize()
        >>> torchcurv.initialize()  # once per process
        0
    """
    if _SETUP["state"] != "not done":
        return 0
    _SETUP["state"] = "running"
    before = resident_memory()
    try:
        weight = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 1, 3)
        target = torch.tensor([1])

        def f(x: torch.Tensor) -> torch.Tensor:
            """Ops whose forward-mode rules torch runs as TorchScript graphs, which its
            executor compiles on their first runs (log-softmax, NLL and softmax
            backwards under forward-over-reverse, log-sigmoid, norms' backwards)."""
            F = torch.nn.functional
            h = torch.tanh(F.conv1d(x[None, None], weight.to(x.dtype)))  # [1, 2, 2]
            logits = h.flatten(1)  # [1, 4]
            images = h[:, :, None, :].expand(1, 2, 2, 2)
            norm = (
                F.layer_norm(logits, (4,))
                + F.batch_norm(h, None, None, training=True)[..., 0].sum()
            )
            return (
                F.cross_entropy(logits, target)
                + F.cross_entropy(images, target.expand(1, 2, 2).contiguous())
                + (torch.softmax(logits, -1) * logits).sum()
                + F.logsigmoid(logits).sum()
                + F.mse_loss(logits, logits.detach() + 1)
                + norm.sum()
            )

        X = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(2, 4)
        transforms: list[Callable[..., Any]] = [
            hessian(f, mode=mode)
            for mode in ("fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd")
        ]
        transforms += [jacobian(f, mode="fwd"), jacobian(f, mode="rev")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own, about its internal buffers
            for transform in transforms:
                for _ in range(2):  # the TorchScript executor optimises on the second run
                    per_sample(transform, memory_budget=2**30)(X)
                    per_sample(transform)(X.float())
    finally:
        _SETUP["state"] = "done"
    after = resident_memory()
    _SETUP["bytes"] = 0 if before is None or after is None else max(0, after - before)
    return int(_SETUP["bytes"])


def budget_after_setup(function: str, memory_budget: Any, inputs: Any) -> int:
    """An explicit `memory_budget` in bytes, less torch's one-time set-up when this call
    pays it (`initialize`; on CPU: a CUDA budget counts the device's memory)."""
    leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor)]
    device = leaves[0].device if leaves else torch.device("cpu")
    budget = parse_budget(function, memory_budget, device)
    if _SETUP["state"] != "not done" or device.type != "cpu":
        return budget
    if budget <= TORCH_SETUP_BYTES:
        raise MemoryBudgetError(
            f"{function}: memory_budget of {format_bytes(budget)} cannot be met in this "
            "process yet: torch's one-time set-up of its derivative machinery adds up to "
            f"{format_bytes(TORCH_SETUP_BYTES)} on its first use in a process (it stays, "
            "and is paid once), and only torchcurv.initialize() pays it at a known moment "
            "(earlier calls may have paid part of it, or none). Call torchcurv.initialize() "
            "once before budgeted calls (and before you read the process's memory), or pass "
            "a larger memory_budget."
        )
    return max(1, budget - max(initialize(), 0))
