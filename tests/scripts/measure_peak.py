"""Measure the peak memory of per_sample_hessian with and without a memory budget.

Run in a fresh process (the test suite does): prints one JSON line with the measured
peaks (bytes above the resident size before the call, from VmHWM after resetting it
through /proc/self/clear_refs), the budget and the planner's choice.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import time

import torch

import torchcurv
import torchcurv.testing


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _trim() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(call):  # type: ignore[no-untyped-def]
    _trim()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - start
    return _status("VmHWM") - before, elapsed, result


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    try:
        torchcurv.testing.assert_trees_close(actual, expected)
    except AssertionError:
        return False
    return True


def main() -> None:
    width, batch, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    ).eval()
    X = torch.randn(batch, 64)
    whole = lambda: torchcurv.per_sample_hessian(model, X, chunk_size=None, mode=mode)  # noqa: E731
    whole()  # warm-up: lazy initialisation, kernel choice
    peak, t_whole, expected = measure(whole)
    budget = peak // 2
    budgeted = lambda: torchcurv.per_sample_hessian(model, X, memory_budget=budget, mode=mode)  # noqa: E731
    budgeted()  # the first call probes the model (cached afterwards)
    peak_b, t_budget, result = measure(budgeted)
    print(
        json.dumps(
            {
                "unchunked_peak": peak,
                "budget": budget,
                "budgeted_peak": peak_b,
                "time_ratio": t_budget / t_whole,
                "close": _close(result, expected),
            }
        )
    )


if __name__ == "__main__":
    main()
