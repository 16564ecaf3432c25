"""Per-sample quantities at scale: the exact parameter diagonal of a 26,122-parameter MLP.

The cross-entropy tanh MLP 64-128-128-10 (P = 26,122), B = 64: its full per-sample
parameter Hessians would take 64 x 26,122^2 x 4 bytes = 174 GB; the diagonal, the
Hutchinson estimate, the Hutch++ trace of the input Hessian and the top eigenvalue by
Lanczos need none of it. Each measurement runs in a fresh process (this script with
``--worker NAME``), glibc defaults, after `torchcurv.initialize()`, with the default
memory budget; it reports the time of the call and the peak resident memory above the
resident memory before it (``VmHWM`` after resetting it, minus ``VmRSS``).

Usage::

    python benchmarks/quantities.py [--out PATH] [--only NAME ...]

Writes a markdown report (default ``benchmarks/quantities_results.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any

WORKLOADS = {
    "diag-exact": "per_sample_hessian_diag(wrt='params', loss=cross_entropy): exact",
    "diag-hutchinson-64": "the same, method='hutchinson', num_samples=64",
    "eigvalsh-lanczos-k1": "per_sample_hessian_eigvalsh(k=1, wrt='params'): Lanczos, "
    "default iterations (21)",
    "hvp": "per_sample_hvp(wrt='params'): one product per sample",
}


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(name: str) -> dict[str, Any]:
    import ctypes
    import gc

    import torch
    import torch.nn.functional as F

    import torchcurv

    torchcurv.initialize()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.Tanh(),
        torch.nn.Linear(128, 128), torch.nn.Tanh(),
        torch.nn.Linear(128, 10),
    )  # fmt: skip
    X, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    options: dict[str, Any] = {"wrt": "params", "loss": F.cross_entropy, "targets": y}
    calls = {
        "diag-exact": lambda: torchcurv.per_sample_hessian_diag(model, X, **options),
        "diag-hutchinson-64": lambda: torchcurv.per_sample_hessian_diag(
            model,
            X,
            method="hutchinson",
            num_samples=64,
            generator=torch.Generator().manual_seed(0),
            **options,
        ),
        "eigvalsh-lanczos-k1": lambda: torchcurv.per_sample_hessian_eigvalsh(
            model, X, k=1, **options
        ),
        "hvp": lambda: torchcurv.per_sample_hvp(
            model,
            X,
            {n: torch.randn(64, *p.shape) for n, p in model.named_parameters()},
            **options,
        ),
    }
    decision = None
    explained = {
        "diag-exact": (torchcurv.per_sample_hessian_diag, {}),
        "diag-hutchinson-64": (
            torchcurv.per_sample_hessian_diag,
            {"method": "hutchinson", "num_samples": 64},
        ),
    }
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    result = calls[name]()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    if name in explained:
        function, extra = explained[name]
        decision = str(torchcurv.explain(function, model, X, **options, **extra))
    leaves = torch.utils._pytree.tree_leaves(result)
    return {
        "seconds": seconds,
        "peak": peak,
        "parameters": sum(p.numel() for p in model.parameters()),
        "result": sum(t.numel() for t in leaves),
        "finite": bool(all(torch.isfinite(t).all() for t in leaves)),
        "decision": decision,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker")
    parser.add_argument("--only", action="append")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "quantities_results.md"))  # fmt: skip
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    rows = []
    for name, what in WORKLOADS.items():
        if args.only and name not in args.only:
            continue
        print(f"[quantities.py] {name} ...", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--worker", name], capture_output=True, text=True,
            env=env, timeout=1800, check=False,
        )  # fmt: skip
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            rows.append((name, what, None, done.stderr.strip().splitlines()[-1:]))
            continue
        rows.append((name, what, json.loads(lines[-1]), None))
    import torch

    text = [
        "# Per-sample quantities at scale",
        "",
        f"Generated by `python benchmarks/quantities.py` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch "
        f"{torch.__version__}, {os.cpu_count()} cores, glibc defaults, each row a fresh "
        "process after `torchcurv.initialize()`, default memory budget.",
        "",
        "Model: cross-entropy tanh MLP 64-128-128-10 (P = 26,122 parameters), B = 64, "
        "float32. Its full per-sample parameter Hessians would take 174 GB.",
        "",
        "| workload | what | time [s] | peak above pre-call RSS | result entries | finite |",
        "|---|---|--:|--:|--:|---|",
    ]
    notes = []
    for name, what, r, error in rows:
        if r is None:
            text.append(f"| {name} | {what} | failed | | | {error} |")
            continue
        text.append(
            f"| {name} | {what} | {r['seconds']:.1f} | {r['peak'] / 2**20:.0f} MiB "
            f"| {r['result']:,} | {r['finite']} |"
        )
        if r["decision"]:
            notes.append(f"- {name}: `{r['decision']}`")
    text += ["", "Decisions (`torchcurv.explain`):", "", *notes, ""]
    with open(args.out, "w") as out:
        out.write("\n".join(text))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
