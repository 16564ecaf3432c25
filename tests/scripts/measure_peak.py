"""Measure the memory of one per_sample_hessian call the way the promise is defined.

Run in a fresh process (the test suite does, once per call), with no warm-up of the
same call: the first call of the process, after ``PRIOR``: ``initialize``
(`torchcurv.initialize`), ``tiny`` (one small default call on another model, which
does not pay torch's one-time set-up) or ``none``. Its peak resident memory above the
resident memory just before it: VmHWM after resetting it through /proc/self/clear_refs,
minus VmRSS. Then, as a second call, its live-byte peak
(`torchcurv._memory.measure_peak`). Prints one JSON line: both peaks, the time, the
budget and a checksum of the result.

    python measure_peak.py WIDTH BATCH MODE PRIOR [BUDGET_BYTES]

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
    width, batch, mode, prior = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    budget = int(sys.argv[5]) if len(sys.argv) > 5 else None
    if prior == "initialize":
        torchcurv.initialize()
    elif prior == "tiny":
        tiny = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        torchcurv.per_sample_hessian(tiny, torch.randn(3, 4))
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
