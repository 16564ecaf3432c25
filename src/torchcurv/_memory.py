"""Measured live-byte peaks and the chunk planner.

Three steps turn a memory budget into chunk sizes:

1. `measure_peak` runs a function and returns the peak of its *live* tensor bytes
   (allocations minus frees) above what was live when it started. On CPU the
   profiler's allocator events give every allocation and free in order, those inside
   ``vmap``/``jvp``/``vjp`` and kernel workspaces included; on CUDA the caching
   allocator's peak statistic does.
2. `fit` measures the real derivative at a few chunk sizes and returns a
   `MemoryModel`. The peak of one vectorised call is the maximum of a few phases,
   each affine in the number of samples ``b`` (``F + b * s``: ``vmap`` batches all
   per-sample memory) and in the chunk sizes: a *result* phase (the pieces of every
   chunk kept for concatenation, plus a per-chunk overhead that falls like ``1/c``)
   and a *work* phase (activations, tangents, cotangents: growing like ``c``). The
   maximum is convex, so two measurements extrapolate too low. At small chunk
   sizes the result phase hides the work phase completely (a 784x784 CNN Hessian:
   7.4 MB flat up to ``c = 32``, then +160 KB per basis vector), so a model fitted at
   ``c in {1, 2}`` cannot see the slope that matters. `fit` therefore measures a
   geometric ladder of chunk sizes (``1, 4, 16, ...``, then the full size) and stops
   once a measurement passes the working-set cap or the next one could pass the
   limit, with one and two samples at every rung. Predictions between two measured
   points use the chord, an upper bound of a convex function; beyond them, bounds
   that hold for every phase with ``F, s >= 0`` (multiplying the samples or a chunk
   size by ``t`` multiplies the peak by at most ``t``).
3. `plan` picks, among chunk sizes whose predicted peak (plus the preallocated
   result) fits the budget, the fastest: fewest vectorised calls with a working set
   no larger than `DEFAULT_WORKING_SET` (larger calls are memory-bandwidth bound).
   It raises `MemoryBudgetError` before any large allocation if even one sample with
   the smallest chunks does not fit.

`benchmarks/memory_model_check.py` checks the numbers this module relies on: the
measured live peak against the resident memory growth of a fresh process, the model's
predictions against the real peaks, and the speed of calls by working-set size.
"""

from __future__ import annotations

import ctypes
import math
import numbers
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ._errors import MemoryBudgetError, argument_error

__all__ = [
    "ALLOCATOR_MMAP_THRESHOLD",
    "DEFAULT_BUDGET_FRACTION",
    "DEFAULT_WORKING_SET",
    "LADDER_RATIO",
    "SAFETY_MARGIN",
    "Measurement",
    "MemoryModel",
    "Plan",
    "available_memory",
    "fit",
    "format_bytes",
    "heap_reserve",
    "heap_slack",
    "limit_allocator_slack",
    "measure_peak",
    "measure_peak_on",
    "parse_budget",
    "plan",
    "resident_memory",
]

#: The default memory budget is this fraction of the memory available to the process
#: (`available_memory`). The planner keeps the live peak within the budget, but the
#: resident memory of a process grows by more: with glibc's default (adaptive) malloc
#: by up to 1.73x the live peak after a first call (`limit_allocator_slack`;
#: `benchmarks/memory_model_check.py`), plus about 100 MiB once per process for
#: torch's lazy initialisation (forward-AD decompositions) on the first derivative.
#: At 0.4 the default call touches at most ``0.7 * available + 100 MiB``, which leaves
#: the process alive unless other processes take most of the rest meanwhile. The same
#: fraction is used on CUDA (not measured there; a CUDA out-of-memory error is raised,
#: not a kill, and the runner retries with smaller chunks).
DEFAULT_BUDGET_FRACTION = 0.4

#: Preferred bytes of working memory of one vectorised call (its peak less its result
#: pieces). Time per sample is flat from about 10 MiB to 120 MiB and then rises: the
#: 28x28 CNN input Hessian took 200-230 ms per sample with calls of 20-120 MiB and
#: 360-380 ms with 230-470 MiB; a 784-256-256-1 tanh MLP 11-13 ms up to 150 MiB and
#: 16 ms at 300 MiB (2 cores, one thread; `benchmarks/memory_model_check.py`). 64 MiB
#: stays inside the flat part with room for machines with smaller caches.
DEFAULT_WORKING_SET = 64 * 2**20

#: Predicted peaks are the model's value times ``1 + SAFETY_MARGIN``. The measured real
#: peaks of planned calls stayed within 1.06x the unmargined model (probe measurements,
#: chunks that do not divide the basis, the batch term).
SAFETY_MARGIN = 0.10

#: On the CPU the planner reserves the working set of a call twice over. glibc's heap
#: (it serves blocks below its adaptive mmap threshold, up to 32 MiB) fragments inside
#: a call, and the resident memory a budgeted call added reached 1.6-1.8x its live
#: bytes (MLP 64-256-256-1 input Hessian, B=256, at half its unchunked live peak:
#: 70-90 MiB resident for 44 MiB live, over the promised 1.10x budget + 16 MiB; with
#: the reservation 32-35 MiB, and no slower). On CUDA the caching allocator's
#: statistics are what is promised, so nothing is reserved.
CPU_HEAP_SLACK = 2.0

#: The promise allows the resident memory a call adds to exceed the budget by this
#: fraction of it plus `PROMISE_ALLOWANCE`; the heap reserve is needed only beyond that.
PROMISE_FRACTION = 0.10
PROMISE_ALLOWANCE = 16 * 2**20

#: The chunk sizes `fit` measures grow by this factor per rung.
LADDER_RATIO = 4

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


# --------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------


def available_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`.

    On CUDA: the device's free memory plus what PyTorch's caching allocator holds
    reserved but unused. On CPU: ``MemAvailable`` of ``/proc/meminfo``, lowered to the
    room left under the memory limit of the process's cgroup (v1 or v2) when it has
    one, since a container is OOM-killed at its own limit, whatever the host has; read
    at most once per `AVAILABLE_MEMORY_REFRESH` seconds.

    Args:
        device: The device.

    Returns:
        The bytes available.

    Example:
        >>> import torch
        >>> from torchcurv._memory import available_memory
        >>> available_memory(torch.device("cpu")) > 0
        True
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + max(0, int(cached))
    now = time.monotonic()
    read_at, value = _CPU_AVAILABLE
    if now - read_at > AVAILABLE_MEMORY_REFRESH:
        available = _meminfo_available()
        room = _cgroup_room()
        value = available if room is None else max(0, min(available, room))
        _CPU_AVAILABLE[:] = [now, value]
    return int(value)


#: How long (seconds) a reading of the CPU's available memory is reused: reading
#: ``/proc`` and the cgroup files costs about 0.15 ms, more than a small derivative.
AVAILABLE_MEMORY_REFRESH = 1.0
_CPU_AVAILABLE: list[float] = [-math.inf, 0]


def resident_memory() -> int | None:
    """The resident memory of this process in bytes (``VmRSS``), None where unknown.

    Example:
        >>> from torchcurv._memory import resident_memory
        >>> (resident_memory() or 1) > 0
        True
    """
    return _proc_field("/proc/self/status", "VmRSS")


def _proc_field(path: str, field: str) -> int | None:
    """Bytes of a ``field: <n> kB`` line of a ``/proc`` file, None where unreadable."""
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    return None  # pragma: no cover


def _meminfo_available() -> int:
    available = _proc_field("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    if hasattr(os, "sysconf"):  # pragma: no cover - non-Linux
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return 8 * 2**30  # pragma: no cover


def _read_int(path: str) -> int | None:
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroups, if any."""
    try:
        with open("/proc/self/cgroup") as cgroups:
            lines = cgroups.read().splitlines()
    except OSError:  # pragma: no cover - non-Linux
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            root, limit_file, usage_file = "/sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            root = "/sys/fs/cgroup/memory"
            limit_file, usage_file = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            directory = os.path.join(root, *parts[:depth])
            limit, usage = (
                _read_int(os.path.join(directory, limit_file)),
                _read_int(os.path.join(directory, usage_file)),
            )
            if limit is not None and usage is not None and limit < 2**60:
                rooms.append(limit - usage)
    return min(rooms) if rooms else None


def parse_budget(function: str, budget: Any, device: torch.device) -> int:
    """A budget in bytes from None (the default), a number or a size such as ``"2GiB"``.

    Numbers may be any `numbers.Real` (Python or NumPy scalars); booleans are refused.
    The default is `DEFAULT_BUDGET_FRACTION` of `available_memory`.

    Args:
        function: The public function, for messages.
        budget: None, a positive number of bytes, or a string with a unit (B, KB, MB,
            GB, TB, KiB, MiB, GiB, TiB; case-insensitive).
        device: Where the computation runs (for the default).

    Returns:
        The budget in bytes.

    Raises:
        TorchcurvError: For anything else, with the accepted forms.

    Example:
        >>> import torch
        >>> from torchcurv._memory import parse_budget
        >>> parse_budget("f", "1.5 KiB", torch.device("cpu"))
        1536
        >>> parse_budget("f", 2e6, torch.device("cpu"))
        2000000
    """
    if budget is None:
        return max(1, int(DEFAULT_BUDGET_FRACTION * available_memory(device)))
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool):
        if int(budget) > 0:
            return int(budget)
    elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        value = float(budget)
        if math.isfinite(value) and value >= 1:
            return int(value)
    elif isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if match and match.group(2).lower() in _UNITS:
            value = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if value >= 1:
                return int(value)
    argument_error(
        function,
        "memory_budget",
        "must be None, a positive number of bytes or a size such as '2GiB' or '500MB'",
        budget,
        "Pass memory_budget='2GiB' (units: B, KB, MB, GB, KiB, MiB, GiB).",
    )


def format_bytes(size: float) -> str:
    """A byte count for people: ``1536 -> '1.5 KiB'``.

    Example:
        >>> from torchcurv._memory import format_bytes
        >>> format_bytes(1536), format_bytes(100), format_bytes(3 * 2**30)
        ('1.5 KiB', '100 B', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


# --------------------------------------------------------------------------------------
# the allocator's slack
# --------------------------------------------------------------------------------------

#: The allocation size from which `limit_allocator_slack` makes glibc use ``mmap``.
ALLOCATOR_MMAP_THRESHOLD = 2**20

_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def heap_reserve(working_set: int, budget: int, slack: float) -> int:
    """Bytes to reserve beyond a call's live peak for the heap's slack: the working set
    again (``slack - 1`` times), less half of what the promise allows above the budget
    (the slack measured up to 1.15x the working set; the other half is the margin)."""
    allowed = (int(PROMISE_FRACTION * budget) + PROMISE_ALLOWANCE) // 2
    return max(0, math.ceil((slack - 1) * working_set) - allowed)


def heap_slack(device: torch.device) -> float:
    """How many times the planner counts a call's working set (`CPU_HEAP_SLACK` on
    the CPU, 1 on CUDA)."""
    return 1.0 if device.type == "cuda" else CPU_HEAP_SLACK


def limit_allocator_slack(threshold: int = ALLOCATOR_MMAP_THRESHOLD) -> bool:
    """Make glibc give freed tensor memory back at once, so resident memory follows
    the live bytes that the planner counts.

    glibc serves an allocation from ``mmap`` (returned to the system on free) only
    above a threshold that starts at 128 KiB and, by default, rises to the size of
    every ``mmap`` block freed, up to 32 MiB. After a first derivative call, tensors up
    to 32 MiB then come from the heap, which keeps freed memory resident and
    fragments: the resident memory of a process grew by up to 1.7x the live peak
    (tanh MLP input Hessians, 100 MiB live). A fixed threshold (this call: glibc's
    ``mallopt(M_MMAP_THRESHOLD)``, which also turns the adaptation off) keeps the growth
    within 1.06x the live peak (`benchmarks/memory_model_check.py`). It affects the
    whole process and cannot be undone; large allocations then cost an ``mmap`` each.

    Args:
        threshold: Allocations of at least this many bytes use ``mmap``.

    Returns:
        True if applied; False where the C library is not glibc.

    (No example: it changes the process; ``tests/test_memory.py`` runs it in a child.)
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


def measure_peak(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``func(*args, **kwargs)``; return its peak of live bytes, and its result.

    The peak counts tensor memory allocated and not yet freed, above what was live
    when the call started; the result is live at the end, so it counts. The device is
    the first CUDA device among the tensors of `args` and `kwargs`, else the CPU (use
    `measure_peak_on` for a function whose tensors are all in a closure).

    On CPU the allocator's events are recorded by the profiler, in order (every
    tensor, inside ``torch.func`` transforms too, and kernel workspaces such as a
    convolution's columns); it costs about 3 µs per operator (1.03x on a 130 ms MLP
    Hessian, 1.8x on a 14 ms one). Under an already running profiler, a dispatch mode
    counts the storages operators create instead: it misses kernel workspaces (17%
    of a convolution's peak) and may count a storage twice. On CUDA the caching
    allocator's peak statistic is used (this resets ``torch.cuda.max_memory_allocated``;
    nested measurements stay right).

    Args:
        func: The function to run.
        *args: Its positional arguments.
        **kwargs: Its keyword arguments.

    Returns:
        ``(peak_bytes, result)``.

    Example:
        >>> import torch
        >>> from torchcurv._memory import measure_peak
        >>> def f():
        ...     a = torch.ones(1000)           # 4000 bytes
        ...     del a
        ...     return torch.ones(2000)        # 8000 bytes, kept
        >>> measure_peak(f)[0]
        8000
    """
    return measure_peak_on(_device_of((args, kwargs)), func, *args, **kwargs)


def measure_peak_on(
    device: torch.device | str, func: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> tuple[int, Any]:
    """`measure_peak` on an explicit device (``"cpu"``, ``"cuda:0"``, ...).

    Example:
        >>> import torch
        >>> from torchcurv._memory import measure_peak_on
        >>> measure_peak_on("cpu", torch.zeros, 10, 10, dtype=torch.float64)[0]
        800
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(device, lambda: func(*args, **kwargs))
    return _cpu_peak(lambda: func(*args, **kwargs))


def _device_of(tree: Any) -> torch.device:
    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda":
            return leaf.device
    return torch.device("cpu")


@dataclass
class _CudaFrame:
    device: torch.device
    seen: int = 0


_CUDA_FRAMES = threading.local()


def _cuda_peak(device: torch.device, call: Callable[[], Any]) -> tuple[int, Any]:
    """Peak allocated bytes above the start; nested measurements keep the outer right."""
    frames: list[_CudaFrame] = _CUDA_FRAMES.__dict__.setdefault("stack", [])
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    current_peak = torch.cuda.max_memory_allocated(device)
    for frame in frames:  # an inner reset must not lose an outer measurement's peak
        if frame.device == device:
            frame.seen = max(frame.seen, current_peak)
    torch.cuda.reset_peak_memory_stats(device)
    frame = _CudaFrame(device)
    frames.append(frame)
    try:
        result = call()
        torch.cuda.synchronize(device)
    finally:
        frames.pop()
    peak = max(torch.cuda.max_memory_allocated(device), frame.seen)
    for outer in frames:
        if outer.device == device:
            outer.seen = max(outer.seen, peak)
    return max(0, peak - start), result


def _cpu_peak(call: Callable[[], Any]) -> tuple[int, Any]:
    if _profiler_running():
        return _dispatch_peak(call)
    try:
        config = _legacy_config()
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - other torch
        return _kineto_peak(call)
    return _legacy_peak(config, call)


# The profiler entry points are private torch APIs (to move to `_compat` with the rest).
def _profiler_running() -> bool:
    from torch._C import _autograd

    return bool(_autograd._profiler_enabled())


def _legacy_config() -> Any:
    from torch._C._profiler import ProfilerConfig, ProfilerState, _ExperimentalConfig

    # state, input shapes, memory, stacks, flops, modules, experimental config
    return ProfilerConfig(
        ProfilerState.CPU, False, True, False, False, False, _ExperimentalConfig()
    )


def _legacy_peak(config: Any, call: Callable[[], Any]) -> tuple[int, Any]:
    """The legacy (non-Kineto) profiler: quiet, and its events come in order per thread."""
    from torch._C import _autograd

    _autograd._enable_profiler_legacy(config)
    # Operator events off (RecordFunction, this thread): the allocator's events still
    # come, the same peak, while the profiler keeps a fraction of the events (a
    # transformer block's measurement held ~20 MiB of them beside 0.1 MiB of tensors).
    _autograd._enable_record_function(False)
    try:
        result = call()
    finally:
        _autograd._enable_record_function(True)
        threads = _autograd._disable_profiler_legacy()
    if len(threads) == 1:
        deltas = [e.cpu_memory_usage() for e in threads[0] if str(e.kind()) == "memory_alloc"]
    else:  # pragma: no cover - allocations on several threads (CPU autograd uses one)
        merged = sorted(
            (getattr(e, "start_us")(), e.cpu_memory_usage())  # noqa: B009 - not in the stubs
            for thread in threads
            for e in thread
            if str(e.kind()) == "memory_alloc"
        )
        deltas = [delta for _, delta in merged]
    return _running_peak(deltas), result


def _kineto_peak(call: Callable[[], Any]) -> tuple[int, Any]:
    """The Kineto profiler, for torch releases without the legacy entry points."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = call()
    events = profiler.profiler.kineto_results.events()
    memory = sorted(
        ((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events) if e.name() == "[memory]"),
    )
    return _running_peak([delta for _, _, delta in memory]), result


def _running_peak(deltas: Sequence[int]) -> int:
    live = peak = 0
    for delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def _dispatch_peak(call: Callable[[], Any]) -> tuple[int, Any]:
    counter = _LiveStorages()
    with counter:
        result = call()
    return counter.peak, result


def _storage_pointer(tensor: torch.Tensor) -> int | None:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


class _LiveStorages:
    """Live bytes of the storages operators create, freed through weak references.

    Used only while another profiler runs. It sees the outputs of every operator
    (under ``torch.func`` transforms too), not the workspaces kernels allocate inside.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):  # type: ignore[no-untyped-call]
            def __torch_dispatch__(
                self, func: Any, types: Any, args: Any = (), kwargs: Any = None
            ) -> Any:
                inputs = {
                    _storage_pointer(leaf)
                    for leaf in tree_flatten((args, kwargs))[0]
                    if isinstance(leaf, torch.Tensor)
                }
                out = func(*args, **(kwargs or {}))
                for leaf in tree_flatten(out)[0]:
                    if isinstance(leaf, torch.Tensor) and _storage_pointer(leaf) not in inputs:
                        counter.add(leaf)
                return out

        self.mode = Mode()  # type: ignore[no-untyped-call]
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def add(self, tensor: torch.Tensor) -> None:
        try:
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if size == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self.free, key, size)

    def free(self, key: int, size: int) -> None:
        if key in self.seen:
            self.seen.discard(key)
            self.live -= size

    def __enter__(self) -> _LiveStorages:
        self.mode.__enter__()  # type: ignore[no-untyped-call]
        return self

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------------------
# the fitted model
# --------------------------------------------------------------------------------------

Chunks = tuple[int, ...]
#: ``measure(b, chunks) -> bytes``: the live peak of one vectorised call on `b` samples
#: with `chunks` basis vectors per chunk on each axis (`measure_peak` of the real
#: derivative, or of its probe).
MeasureFunction = Callable[[int, Chunks], int]


@dataclass(frozen=True)
class Measurement:
    """One measured call: `batch` samples, `chunks` per basis axis, its live `peak`."""

    batch: int
    chunks: Chunks
    peak: int


@dataclass(frozen=True)
class MemoryModel:
    """Peak live bytes of one vectorised call, from measurements (see `fit`).

    The chunk sizes measured form a `path` from all ones towards `axes`, growing one
    axis at a time, the first (innermost) axis first. At path point ``j`` one sample
    peaks at ``single[j]`` bytes and `sampled` samples at ``batched[j]``.

    The peak of ``b`` samples is the largest of a few phases, each ``F + b * s`` with
    ``F, s >= 0`` (``F``: what ``vmap`` does not batch), so it is convex in ``b``: the
    chord is an upper bound between 1 and `sampled` samples, and ``b / sampled``
    times ``batched[j]`` beyond. (An affine fit through two batch sizes is not: the
    phase with the steepest slope can be hidden at small ``b``; a tanh MLP's
    unchunked Hessian, extrapolated from 1 and 2 samples, came out 8% low at 4.)

    Attributes:
        axes: The sizes of the basis axes, innermost first (``()`` for none).
        path: The chunk sizes measured with one sample, in order.
        single: The measured peak of one sample at each path point.
        batched: The measured peak of `sampled` samples at each path point (`sampled`
            times `single` where not measured).
        sampled: The number of samples of the batched measurements.
        result_bytes: Bytes of one sample's whole result (0: unknown; chunk sizes just
            below a whole axis are then not offered).
        margin: The relative safety margin of `predict`.
        limit: The bytes no measurement was allowed to exceed (None: no limit).
        working_set: The working-set size past which the ladder stopped.
        stopped: Why the ladder stopped: ``"complete"`` (it reached `axes`),
            ``"working set"``, ``"limit"`` or ``"out of memory"``.
        measurements: Every measurement, in the order taken.
    """

    axes: Chunks
    path: tuple[Chunks, ...]
    single: tuple[int, ...]
    batched: tuple[int, ...]
    sampled: int = 1
    result_bytes: int = 0
    margin: float = SAFETY_MARGIN
    limit: int | None = None
    working_set: int = DEFAULT_WORKING_SET
    stopped: str = "complete"
    measurements: tuple[Measurement, ...] = field(default=(), compare=False)

    def _chunks(self, chunks: Sequence[int | None]) -> Chunks:
        if len(chunks) != len(self.axes):
            raise ValueError(f"expected {len(self.axes)} chunk sizes, got {tuple(chunks)}")
        return tuple(
            size if c is None else min(max(int(c), 1), size)
            for c, size in zip(chunks, self.axes, strict=True)
        )

    def _at(self, index: int, batch: int) -> float:
        """The bound at path point `index` for `batch` samples (exact where measured)."""
        single, batched, sampled = self.single[index], self.batched[index], self.sampled
        if batch <= 1 or sampled <= 1:
            return float(batch * single)
        if batch <= sampled:
            return single + (batch - 1) / (sampled - 1) * (batched - single)
        return batch / sampled * batched

    def _whole_to_chunked(self, source: Chunks, target: Chunks) -> bool:
        """True when `target` chunks an axis that `source` leaves whole (a concat more)."""
        return any(t < n and s == n for s, t, n in zip(source, target, self.axes, strict=True))

    def unmargined(self, batch: int, chunks: Sequence[int | None]) -> float:
        """The model's peak of `batch` samples with `chunks`, without the margin.

        Exact at the measured points; the chord between two neighbouring path points
        (an upper bound, as the peak is convex in each chunk size); elsewhere the
        tightest scaling bound from a measured point (growing or shrinking a chunk
        size ``t``-fold multiplies the peak by at most ``t``), plus one more result
        when the point chunks an axis that the measured one leaves whole (a
        concatenation the whole call does not make; with `result_bytes` unknown, such
        measured points are not used).
        """
        if batch <= 0:
            return 0.0
        target = self._chunks(chunks)
        extra = batch * self.result_bytes
        best = math.inf
        for index, point in enumerate(self.path):
            scale = math.prod(max(t / p, p / t) for t, p in zip(target, point, strict=True))
            bound = scale * self._at(index, batch)
            if self._whole_to_chunked(point, target):
                if not self.result_bytes:
                    continue
                bound += extra
            best = min(best, bound)
        for index in range(len(self.path) - 1):
            low, high = self.path[index], self.path[index + 1]
            (axis,) = (a for a in range(len(low)) if low[a] != high[a])
            others = all(target[a] == low[a] for a in range(len(low)) if a != axis)
            if others and low[axis] <= target[axis] <= high[axis]:
                t = (target[axis] - low[axis]) / (high[axis] - low[axis])
                top = self._at(index + 1, batch)
                if self._whole_to_chunked(high, target):
                    if not self.result_bytes:
                        continue
                    top += extra
                best = min(best, (1 - t) * self._at(index, batch) + t * top)
        return best

    def predict(self, batch: int, chunks: Sequence[int | None]) -> int:
        """Predicted peak live bytes of one call: `unmargined` times ``1 + margin``.

        Args:
            batch: Samples in the call.
            chunks: Basis vectors per chunk on each axis (None: the whole axis).

        Returns:
            Bytes above the memory in use before the call, its result included.

        Example:
            >>> from torchcurv._memory import fit
            >>> model = fit(lambda b, chunks: 1000 + b * (200 + 50 * chunks[0]), (64,))
            >>> model.unmargined(2, (16,)), model.predict(2, (16,))      # measured
            (3000.0, 3300)
            >>> model.unmargined(8, (16,))   # 4x the two-sample peak bounds the 9000
            12000.0
        """
        return math.ceil(round(self.unmargined(batch, chunks) * (1 + self.margin), 6))

    def working_set_of(self, batch: int, chunks: Sequence[int | None]) -> int:
        """Bytes of working memory of one call: its peak less its result pieces."""
        target = self._chunks(chunks)
        chunked = any(c < n for c, n in zip(target, self.axes, strict=True))
        result = batch * self.result_bytes * (2 if chunked else 1)
        return max(0, math.ceil(self.unmargined(batch, target)) - result)

    def work_of(self, batch: int, chunks: Sequence[int | None]) -> int:
        """Bytes of one call's work, what the working-set cap bounds: its peak less its
        result held twice, chunked or not. A chunked call holds the pieces and their
        concatenation; an unchunked one torch.func's output and its final layout copy
        (the per-sample cross-entropy parameter Hessian of an MLP 16-32-10 peaks at
        7.7 MiB for a 2.9 MiB result). Copies of the result are the same in every plan,
        so they say nothing about cache-friendliness; counting them once for unchunked
        calls split the basis of that Hessian, which then took 1.5x raw torch.func."""
        target = self._chunks(chunks)
        return max(0, math.ceil(self.unmargined(batch, target)) - 2 * batch * self.result_bytes)

    def covers(self, budget: int) -> bool:
        """Whether the measurements reach as far as a plan within `budget` may go.

        False when the ladder stopped at the measurement limit and `budget` is larger:
        `fit` again with ``limit=budget`` for plans that use the larger budget fully.
        """
        return self.stopped != "limit" or self.limit is None or budget <= self.limit

    def candidates(self) -> list[Chunks]:
        """Chunk sizes a plan may choose: the path, and sizes on its segments (not
        below a whole axis when `result_bytes` is unknown)."""
        seen: dict[Chunks, None] = dict.fromkeys(self.path)
        for index in range(len(self.path) - 1):
            low, high = self.path[index], self.path[index + 1]
            (axis,) = (a for a in range(len(low)) if low[a] != high[a])
            if not self.result_bytes and high[axis] == self.axes[axis]:
                continue
            for value in _segment_sizes(self.axes[axis], low[axis], high[axis]):
                point = list(low)
                point[axis] = value
                seen.setdefault(tuple(point), None)
        return list(seen)


def _segment_sizes(size: int, low: int, high: int) -> list[int]:
    """Chunk sizes strictly between `low` and `high`: powers of two and even splits."""
    values = {2**e for e in range(1, max(1, size.bit_length()))}
    values |= {-(-size // count) for count in range(2, 65)}
    return sorted(v for v in values if low < v < high)


def _ladder(size: int, ratio: int) -> list[int]:
    values = [1]
    while values[-1] * ratio < size:
        values.append(values[-1] * ratio)
    if values[-1] < size:
        values.append(size)
    return values


def _path(axes: Chunks, ratio: int) -> list[Chunks]:
    """All ones, then each axis up its ladder in turn (the innermost axis first)."""
    point = [1] * len(axes)
    path = [tuple(point)]
    for axis, size in enumerate(axes):
        for value in _ladder(size, ratio)[1:]:
            point[axis] = value
            path.append(tuple(point))
    return path


def fit(
    measure: MeasureFunction,
    axes: Sequence[int],
    *,
    max_batch: int = 2,
    result_bytes: int = 0,
    limit: int | None = None,
    working_set: int | None = None,
    ratio: int = LADDER_RATIO,
    margin: float = SAFETY_MARGIN,
) -> MemoryModel:
    """Measure the peak of one vectorised call at a few chunk sizes; return the model.

    With one sample, the chunk sizes climb a ladder from all ones: the innermost axis
    ``1, ratio, ratio**2, ...`` up to its full size, then the next axis. The ladder
    stops at the full sizes, after the first measurement whose working set (peak less
    ``2 * result_bytes``) exceeds `working_set` (no plan goes past it), or before a
    measurement that could exceed `limit`: growing a chunk size ``t``-fold multiplies
    the peak by at most ``t``, so the next rung is not taken when ``t`` times the last
    peak passes the limit. Every rung is measured with `max_batch` samples as well
    (when ``max_batch`` times the one-sample peak fits the limit; otherwise the batched
    peak is taken as that product, an upper bound): the model bounds other batch sizes
    from the two (see `MemoryModel`).

    The measurements of live bytes are deterministic, so the model is exact at every
    measured point: ``predict`` there returns the measurement times ``1 + margin``.
    It takes two measurements per rung (one when ``max_batch == 1``); their cost grows
    with the chunk sizes (a probe computes about two chunks per stage), so the largest
    rung dominates.

    Args:
        measure: ``measure(b, chunks) -> peak bytes`` of one call on ``b`` samples with
            ``chunks[i]`` basis vectors per chunk on axis ``i``.
        axes: The sizes of the basis axes, innermost first (``(inner, outer)`` for a
            Hessian, ``()`` when there is no basis to chunk).
        max_batch: The samples of the batched measurements (1: none; a call's peak is
            then taken as the number of samples times the one-sample peak, an upper
            bound). Larger values give tighter predictions for large batches.
        result_bytes: Bytes of one sample's result, when known: it separates the
            result from the working set, and bounds chunking an axis measured whole.
        limit: Bytes no measurement may exceed (the budget); None for no limit.
        working_set: The working-set size past which no plan goes; default
            `DEFAULT_WORKING_SET`.
        ratio: The growth of the chunk sizes per rung.
        margin: The relative safety margin of the predictions.

    Returns:
        The model.

    Raises:
        ValueError: For axes, ratio or max_batch out of range.

    Example:
        >>> from torchcurv._memory import fit
        >>> def measure(b, chunks):      # a phase that hides the work at small chunks
        ...     inner, outer = chunks
        ...     work = 100 + 40 * outer + 8 * inner * outer
        ...     return 500 + b * max(work, 4000)
        >>> model = fit(measure, (2, 256))
        >>> model.path
        ((1, 1), (2, 1), (2, 4), (2, 16), (2, 64), (2, 256))
        >>> all(model.unmargined(m.batch, m.chunks) == m.peak for m in model.measurements)
        True
        >>> model.unmargined(7, (2, 256)) >= measure(7, (2, 256))
        True
    """
    sizes = tuple(int(a) for a in axes)
    if any(a < 1 for a in sizes):
        raise ValueError(f"fit: axes must be positive sizes, got {tuple(axes)}")
    if ratio < 2 or max_batch < 1:
        raise ValueError(f"fit: need ratio >= 2 and max_batch >= 1, got {ratio}, {max_batch}")
    cap = DEFAULT_WORKING_SET if working_set is None else int(working_set)
    measurements: list[Measurement] = []

    def take(batch: int, chunks: Chunks) -> int:
        peak = max(0, int(measure(batch, chunks)))
        measurements.append(Measurement(batch, chunks, peak))
        return peak

    path: list[Chunks] = []
    single: list[int] = []
    batched: list[int] = []
    stopped = "complete"
    ladder = _path(sizes, ratio)
    for index, point in enumerate(ladder):
        if index:
            growth = max(p / q for p, q in zip(point, path[-1], strict=True))
            if limit is not None and growth * single[-1] > limit:
                stopped = "limit"
                break
            try:
                peak = take(1, point)
            except (MemoryError, torch.OutOfMemoryError):
                stopped = "out of memory"
                break
        else:
            peak = take(1, point)
        path.append(point)
        single.append(peak)
        bound = max_batch * peak
        if max_batch > 1 and (limit is None or bound <= limit):
            try:
                bound = max(peak, take(max_batch, point))
            except (MemoryError, torch.OutOfMemoryError):
                if index == 0:
                    raise
        batched.append(bound)
        if peak - 2 * result_bytes > cap and index < len(ladder) - 1:  # see `work_of`
            stopped = "working set"
            break
    return MemoryModel(
        axes=sizes,
        path=tuple(path),
        single=tuple(single),
        batched=tuple(batched),
        sampled=max_batch,
        result_bytes=int(result_bytes),
        margin=float(margin),
        limit=limit,
        working_set=cap,
        stopped=stopped,
        measurements=tuple(measurements),
    )


# --------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The chunk sizes the planner chose, the peak it predicts and why.

    Attributes:
        batch: Samples per vectorised call.
        axes: Basis vectors per chunk on each axis (an axis's full size: unchunked).
        predicted_peak: Predicted bytes above the memory in use before the call: one
            call's peak plus the preallocated result of the whole batch.
        budget: The budget in bytes.
        reason: Why this plan, in a few words.
        working_set: Predicted working memory of one call.
        calls: Vectorised calls of the innermost stage over the whole batch.
        budget_bound: Whether the budget limited the choice (a larger budget could
            give a faster plan); when False the plan holds for any budget of at least
            its predicted peak.
    """

    batch: int
    axes: Chunks
    predicted_peak: int
    budget: int
    reason: str = ""
    working_set: int = 0
    calls: int = 0
    budget_bound: bool = False

    def describe(self) -> str:
        """One line for logs and `explain`.

        Example:
            >>> from torchcurv._memory import Plan
            >>> print(Plan(8, (1, 64), 3 * 2**20, 2**30, "fits whole").describe())
            batch chunk 8, basis chunks (1, 64), predicted peak 3.0 MiB of a 1.0 GiB
            budget (fits whole)
        """
        return (
            f"batch chunk {self.batch}, basis chunks {self.axes}, predicted peak "
            f"{format_bytes(self.predicted_peak)} of a {format_bytes(self.budget)} budget "
            f"({self.reason})"
        )


@dataclass(frozen=True)
class _Option:
    chunks: Chunks
    batch: int
    peak: int
    working_set: int
    calls: int


def plan(
    function: str,
    *,
    batch: int,
    axes: Sequence[int],
    model: MemoryModel,
    result_bytes: int,
    budget: int,
    preferred_working_set: int | None = None,
    batch_limit: int | None = None,
    preallocated: bool = True,
    slack: float = 1.0,
) -> Plan:
    """The fastest chunk sizes whose predicted peak fits `budget`.

    A plan's peak is the model's prediction for one call plus the result of the whole
    batch when the batch is split (preallocated by the runner; twice that when the
    pieces are concatenated instead, ``preallocated=False``). Among the plans that
    fit, the planner takes the fewest vectorised calls whose work (a call's peak less
    its result held twice, `MemoryModel.work_of`) stays within `preferred_working_set`;
    ties go to larger
    basis chunks (fewer forward passes), then to the smaller peak. When even one
    sample with the smallest chunks exceeds the working set, the cap is dropped and
    the fastest plan within the budget is taken.

    Args:
        function: The public function planning, for messages.
        batch: Number of samples.
        axes: Sizes of the basis axes, innermost first (as given to `fit`).
        model: The fitted `MemoryModel`.
        result_bytes: Bytes of one sample's result.
        budget: Bytes allowed.
        preferred_working_set: Working-set cap of one call; default
            `DEFAULT_WORKING_SET`.
        batch_limit: The most samples per call (1 for per-sample randomness).
        preallocated: Whether the runner writes chunk results into one buffer.
        slack: The working set of a call counts up to this many times in its peak
            (the C heap's fragmentation; `heap_slack`, `heap_reserve`).

    Returns:
        The plan.

    Raises:
        MemoryBudgetError: If not even one sample with the smallest chunks fits; the
            message says which budget would.

    Example:
        >>> from torchcurv._memory import fit, plan
        >>> measure = lambda b, chunks: b * (4096 + 1024 * chunks[0])
        >>> model = fit(measure, (256,), result_bytes=1024)
        >>> print(plan("f", batch=100, axes=(256,), model=model, result_bytes=1024,
        ...            budget=2**30).describe())
        batch chunk 100, basis chunks (256,), predicted peak 27.9 MiB of a 1.0 GiB
        budget (fits whole)
        >>> plan("f", batch=100, axes=(256,), model=model, result_bytes=1024,
        ...      budget=2**30, preferred_working_set=2**20).reason
        'capped at a working set of 1.0 MiB per call'
    """
    sizes = tuple(int(a) for a in axes)
    if sizes != model.axes:
        raise ValueError(f"plan: axes {sizes} differ from the model's {model.axes}")
    cap = DEFAULT_WORKING_SET if preferred_working_set is None else int(preferred_working_set)
    if batch <= 0:
        return Plan(1, model.path[-1], 0, budget, "empty batch", 0, 0)
    most = batch if batch_limit is None else max(1, min(batch, batch_limit))
    buffer = batch * result_bytes * (1 if preallocated else 2)

    def peak(b: int, chunks: Chunks) -> int:
        reserve = heap_reserve(model.working_set_of(b, chunks), budget, slack)
        return model.predict(b, chunks) + reserve + (buffer if b < batch else 0)

    def largest(fits: Callable[[int], bool]) -> int:
        """The largest b in [1, most] with fits(b), or 0 (fits is monotone)."""
        if not fits(1):
            return 0
        low, high = 1, most
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return low

    feasible: list[_Option] = []
    capped: list[_Option] = []
    for chunks in model.candidates():
        by_budget = largest(lambda b, c=chunks: peak(b, c) <= budget)  # type: ignore[misc]
        if not by_budget:
            continue
        by_cap = largest(lambda b, c=chunks: model.work_of(b, c) <= cap)  # type: ignore[misc]
        calls_per_sample = math.prod(-(-n // c) for n, c in zip(sizes, chunks, strict=True))

        def option(b: int, c: Chunks = chunks, k: int = calls_per_sample) -> _Option:
            return _Option(c, b, peak(b, c), model.working_set_of(b, c), -(-batch // b) * k)

        feasible.append(option(by_budget))
        if by_cap:
            capped.append(option(min(by_budget, by_cap)))
    if not feasible:
        smallest = min(peak(1, c) for c in model.candidates())
        whole = batch * result_bytes
        raise MemoryBudgetError(
            f"{function}: memory_budget of {format_bytes(budget)} cannot be met: one "
            f"sample with the smallest chunks {model.path[0]} needs "
            f"{format_bytes(smallest)} in all"
            + (
                f", of which the result of all {batch} samples takes {format_bytes(whole)}"
                if batch > 1 and whole
                else ""
            )
            + f". Pass memory_budget of at least {format_bytes(smallest)}, or fewer "
            "samples, inputs or outputs per call."
        )

    def speed(o: _Option) -> tuple[int, int, int]:
        return (o.calls, -math.prod(o.chunks), o.peak)

    # Over the cap even with the smallest calls (a large per-sample result, say):
    # shrinking chunks further only adds calls, so the fastest feasible plan wins.
    chosen = min(capped, key=speed) if capped else min(feasible, key=speed)
    unconstrained = min(feasible, key=speed)
    whole = chosen.batch == batch and chosen.chunks == sizes
    bound = False
    if whole:
        reason = "fits whole"
    elif not capped:
        reason = f"one sample exceeds the {format_bytes(cap)} working set; fastest within budget"
        bound = True
    elif speed(unconstrained) < speed(chosen):
        reason = f"capped at a working set of {format_bytes(cap)} per call"
    elif chosen.batch == most < batch and batch_limit is not None:
        reason = f"at most {most} sample{'s' if most > 1 else ''} per call"
    else:
        parts = []
        if chosen.batch < batch:
            parts.append("batch chunk")
        if chosen.chunks != sizes:
            parts.append("basis chunks")
        reason = " and ".join(parts) + " limited by the budget"
        bound = True
    return Plan(
        chosen.batch,
        chosen.chunks,
        chosen.peak,
        budget,
        reason,
        chosen.working_set,
        chosen.calls,
        bound,
    )
