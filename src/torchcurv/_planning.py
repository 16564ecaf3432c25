"""Memory model and chunk planner.

The model of one vectorised derivative call is

    peak(b, c_1, ..., c_k) = B * R  +  2 * b * R  +  b * c_1 * ... * c_k * W

where ``B`` is the batch size, ``R`` the bytes of one sample's result (the full result
is kept; a chunk's pieces are concatenated, hence the 2), ``c_i`` the chunk sizes of
the basis axes (rows of the inner Jacobian, columns of the outer one) and ``W`` the
working memory of one basis vector of one sample: the bytes allocated by one
Hessian-vector (or vector-Jacobian) product of one sample.

``W`` is modelled from a measurement: `count_allocations` runs one single-sample
forward under a dispatch mode that adds up the bytes of every tensor an operator
creates (the activations, ``A``), and ``W = WORK_PER_FORWARD[order] * A``. A
Hessian-vector product runs a forward with tangents and a backward with tangents:
about four forwards' worth of tensors, live at once at worst; the factor 5 leaves
room for temporaries. Measured on tanh MLPs (``benchmarks/``), real peaks stay under
the prediction. Measurements are cached by the caller per model and shape.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ._errors import MemoryBudgetError, argument_error

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "WORK_PER_FORWARD",
    "Plan",
    "available_memory",
    "count_allocations",
    "parse_budget",
    "plan_chunks",
]

#: The default memory budget: this fraction of the memory available on the device
#: (free device memory on CUDA, ``MemAvailable`` of ``/proc/meminfo`` on CPU).
DEFAULT_BUDGET_FRACTION = 0.5

#: Working memory of one basis vector of one sample, in forwards' worth of activations,
#: by derivative order (1: a vector-Jacobian product, 2: a Hessian-vector product).
WORK_PER_FORWARD = {1: 3, 2: 5}

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


def available_memory(device: torch.device) -> int:
    """Bytes available for new allocations on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - non-Linux
        pass
    import os

    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 8 * 2**30


def parse_budget(function: str, budget: Any, device: torch.device) -> int:
    """A budget in bytes from None (the default), an int or a string like ``"2GiB"``."""
    if budget is None:
        return int(DEFAULT_BUDGET_FRACTION * available_memory(device))
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget
    if isinstance(budget, float) and budget > 0 and math.isfinite(budget):
        return int(budget)
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if match and match.group(2).lower() in _UNITS:
            value = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if value > 0:
                return int(value)
    argument_error(
        function,
        "memory_budget",
        "must be None, a positive number of bytes or a size such as '2GiB' or '500MB'",
        budget,
        "Pass memory_budget='2GiB' (units: B, KB, MB, GB, KiB, MiB, GiB).",
    )


def format_bytes(size: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


class _AllocationCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Adds up the bytes of the storages that operators create (frees not subtracted)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        inputs = {
            _storage_key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        out = func(*args, **(kwargs or {}))
        counted = set()
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                key = _storage_key(tensor)
                if key is not None and key not in inputs and key not in counted:
                    counted.add(key)
                    self.total += tensor.untyped_storage().nbytes()
        return out


def _storage_key(tensor: Any) -> int | None:
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def count_allocations(func: Callable[..., Any], *args: Any) -> tuple[int, Any]:
    """Run ``func(*args)``; return the bytes its operators allocated, and its result."""
    with _AllocationCounter() as counter:
        result = func(*args)
    return counter.total, result


@dataclass(frozen=True)
class Plan:
    """Chunk sizes chosen by the planner and the peak memory it predicts."""

    batch: int
    axes: tuple[int, ...]
    predicted_peak: int
    budget: int

    def describe(self) -> str:
        return (
            f"batch chunk {self.batch}, basis chunks {self.axes}, predicted peak "
            f"{format_bytes(self.predicted_peak)} of a {format_bytes(self.budget)} budget"
        )


def plan_chunks(
    function: str,
    *,
    batch: int,
    axes: Sequence[int],
    result_bytes: int,
    work_bytes: int,
    budget: int,
) -> Plan:
    """Largest chunks whose predicted peak fits the budget.

    Chunks shrink in the order that costs least speed: first the batch, then the basis
    axes from the first (innermost) to the last. A call that fits whole is not chunked.

    Args:
        function: The public function planning, for messages.
        batch: Number of samples.
        axes: Sizes of the basis axes (e.g. ``(m, n)``: inner rows, outer columns).
        result_bytes: Bytes of one sample's result.
        work_bytes: Working bytes of one basis vector of one sample.
        budget: Bytes allowed.

    Returns:
        The plan.

    Raises:
        MemoryBudgetError: If not even chunks of one fit; the message says what would.
    """
    axes = tuple(max(a, 1) for a in axes)

    def peak(b: int, chunks: Sequence[int]) -> int:
        chunked = b < batch or tuple(chunks) != axes
        return (
            batch * result_bytes
            + (2 * b * result_bytes if chunked else 0)
            + b * math.prod(chunks) * work_bytes
        )

    smallest = peak(1, (1,) * len(axes))
    if smallest > budget:
        raise MemoryBudgetError(
            f"{function}: memory_budget of {format_bytes(budget)} cannot be met: the result "
            f"alone takes {format_bytes(batch * result_bytes)} and the smallest chunks (one "
            f"sample, one basis vector) need {format_bytes(smallest)} in all. Pass "
            f"memory_budget of at least {format_bytes(smallest * 1.1)}, or fewer samples, "
            "inputs or outputs per call."
        )
    if peak(batch, axes) <= budget:
        return Plan(batch, axes, peak(batch, axes), budget)
    per_sample = 2 * result_bytes + math.prod(axes) * work_bytes
    b = (budget - batch * result_bytes) // per_sample
    if b >= 1:
        b = min(int(b), batch)
        return Plan(b, axes, peak(b, axes), budget)
    chunks = list(axes)
    for index in range(len(chunks)):
        chunks[index] = 1
        rest = math.prod(chunks) * work_bytes
        room = budget - batch * result_bytes - 2 * result_bytes
        c = max(1, min(axes[index], room // rest))
        chunks[index] = int(c)
        if peak(1, chunks) <= budget:
            break
    return Plan(1, tuple(chunks), peak(1, chunks), budget)
