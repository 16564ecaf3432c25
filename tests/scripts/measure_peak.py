"""Measure the memory of one per_sample_hessian call the way the promise is defined.

Run in a fresh process (the test suite does, once per call). After a warm-up call (the
same call), the peak resident memory of the call above the resident memory just before
it: VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS. Prints one
JSON line: that peak, the live-byte peak (`torchcurv._memory.measure_peak`), the time
and the budget.

    python measure_peak.py WIDTH BATCH MODE [BUDGET_BYTES]

Without a budget the call is unchunked (``chunk_size=None``).
"""

from __future__ import annotations

import gc
import json
import sys
import time

import torch

import torchcurv
from torchcurv._memory import measure_peak


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def resident_peak(call):  # type: ignore[no-untyped-def]
    """``(VmHWM - VmRSS before, seconds, result)`` of ``call()``."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    result = call()
    elapsed = time.perf_counter() - start
    return _status("VmHWM") - before, elapsed, result


def main() -> None:
    width, batch, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    budget = int(sys.argv[4]) if len(sys.argv) > 4 else None
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, 1),
    ).eval()
    X = torch.randn(batch, 64)
    options = {"chunk_size": None} if budget is None else {"memory_budget": budget}

    def call() -> torch.Tensor:
        return torchcurv.per_sample_hessian(model, X, mode=mode, **options)  # type: ignore[arg-type]

    call()  # warm-up: planning, lazy initialisation, kernel choice
    peak, elapsed, result = resident_peak(call)
    live, _ = measure_peak(call)
    print(
        json.dumps(
            {
                "peak": peak,
                "live_peak": live,
                "budget": budget,
                "seconds": elapsed,
                "checksum": float(result.double().sum()),
            }
        )
    )


if __name__ == "__main__":
    main()
