"""Measured live-byte peaks and the chunk planner.

Work in progress: budgets and byte formatting (final), measure_peak (final API);
the fitted model and the planner follow.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any

import torch

from ._errors import argument_error

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "available_memory",
    "format_bytes",
    "parse_budget",
]

#: The default memory budget: this fraction of the memory available on the device.
DEFAULT_BUDGET_FRACTION = 0.5

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
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 8 * 2**30


def parse_budget(function: str, budget: Any, device: torch.device) -> int:
    """A budget in bytes from None (the default), a number or a string like ``"2GiB"``."""
    if budget is None:
        return int(DEFAULT_BUDGET_FRACTION * available_memory(device))
    if isinstance(budget, numbers.Integral) and not isinstance(budget, bool) and budget > 0:
        return int(budget)
    if (
        isinstance(budget, numbers.Real)
        and not isinstance(budget, (bool, numbers.Integral))
        and math.isfinite(float(budget))
        and float(budget) >= 1
    ):
        return int(float(budget))
    if isinstance(budget, str):
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
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------


def measure_peak(func: Any, /, *args: Any, **kwargs: Any) -> tuple[int, Any]:
    device = _device_of((args, kwargs))
    if device.type == "cuda":
        return _cuda_peak(device, lambda: func(*args, **kwargs))
    return _cpu_peak(lambda: func(*args, **kwargs))


def _device_of(tree: Any) -> torch.device:
    from torch.utils._pytree import tree_flatten

    for leaf in tree_flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda":
            return leaf.device
    return torch.device("cpu")


def _cuda_peak(device: torch.device, call: Any) -> tuple[int, Any]:
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = call()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - start), result


def _cpu_peak(call: Any) -> tuple[int, Any]:
    from torch._C import _autograd
    from torch._C._profiler import ProfilerConfig, ProfilerState, _ExperimentalConfig

    config = ProfilerConfig(ProfilerState.CPU, False, True, False, False, False, _ExperimentalConfig())
    _autograd._enable_profiler_legacy(config)
    try:
        result = call()
    finally:
        threads = _autograd._disable_profiler_legacy()
    events = sorted(
        (e.start_us(), e.cpu_memory_usage()) for thread in threads for e in thread
        if e.kind() == "memory_alloc"
    ) if len(threads) > 1 else [
        (0, e.cpu_memory_usage()) for e in threads[0] if e.kind() == "memory_alloc"
    ] if threads else []
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak, result


# Temporary placeholders while the model is written (the API the lead integrates).
class Plan:  # pragma: no cover
    pass


def fit(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover
    raise NotImplementedError("torchcurv._memory.fit is being written")


def plan(*args: Any, **kwargs: Any) -> Any:  # pragma: no cover
    raise NotImplementedError("torchcurv._memory.plan is being written")
