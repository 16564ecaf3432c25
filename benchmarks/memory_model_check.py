"""Checks of the numbers `torchcurv._memory` relies on.

Sections (``--only`` picks some; all run by default):

``rss``       The live peak from `measure_peak` against the growth of the resident
              memory of a fresh process (``VmHWM`` after a reset through
              ``/proc/self/clear_refs``, less ``VmRSS`` before), per workload, warm (a
              call already ran in the process) and cold (the first call of a process).
``overhead``  The time of `measure_peak(f)` against ``f()``.
``model``     `fit` on probe measurements, then `plan` for several budgets: the real
              live peak of the planned call against the prediction.
``speed``     Time per sample against the working set of one call: the CNN 28x28
              input Hessian and a tanh MLP, for batch and basis chunk sizes.

Run ``OMP_NUM_THREADS=1 python benchmarks/memory_model_check.py [--only rss ...]``.
Each line is printed as it is measured; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

MiB = 2**20


# --------------------------------------------------------------------------------------
# workloads: single-sample functions and their batched derivative calls
# --------------------------------------------------------------------------------------


def _mlp(d: int, w: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(), nn.Linear(w, 1))
    return model.eval().requires_grad_(False)


def _cnn(side: int = 28) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * (side - 4) ** 2, 1),
    )
    return model.eval().requires_grad_(False)


def _block(s: int = 16, d: int = 32) -> Callable[[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    wq, wk, wv, wo = (torch.randn(d, d) / d**0.5 for _ in range(4))
    w1, w2 = torch.randn(d, 64) / d**0.5, torch.randn(64, d) / 8

    def f(x: torch.Tensor) -> torch.Tensor:
        q, k, v = x @ wq, x @ wk, x @ wv
        a = torch.softmax(q @ k.T / d**0.5, dim=-1)
        h = x + (a @ v) @ wo
        h = h + torch.tanh(h @ w1) @ w2
        return h.pow(2).sum()

    return f


def workload(name: str) -> Callable[[], Any]:
    """A call computing per-sample Hessians (the thing whose memory is checked)."""
    from torch.func import functional_call, hessian

    if name.startswith("mlp-input"):
        batch = 16 if name.endswith("small") else 256
        model = _mlp(64, 256)
        X = torch.randn(batch, 64)
        return lambda: torch.vmap(hessian(lambda x: model(x[None]).squeeze()))(X)
    if name == "cnn":
        model = _cnn()
        X = torch.randn(2, 1, 28, 28)
        return lambda: torch.vmap(hessian(lambda x: model(x[None]).squeeze()))(X)
    if name == "cnn-chunked":
        import torchcurv

        model = _cnn()
        X = torch.randn(8, 1, 28, 28)
        h = torchcurv.hessian(lambda x: model(x[None]).squeeze(), chunk_size=(1, 64))
        return lambda: torch.vmap(h)(X)
    if name == "block":
        X = torch.randn(32, 16, 32)
        return lambda: torch.vmap(hessian(_block()))(X)
    if name.startswith("param"):
        batch = 8 if name.endswith("small") else 64
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        params = {k: v.detach() for k, v in model.named_parameters()}
        X = torch.randn(batch, 16)

        def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            return functional_call(model, p, (x[None],)).squeeze()

        return lambda: torch.vmap(hessian(loss), in_dims=(None, 0))(params, X)
    raise KeyError(name)


RSS_WORKLOADS = (
    "mlp-input-small",
    "mlp-input",
    "cnn",
    "cnn-chunked",
    "block",
    "param-small",
    "param",
)


# --------------------------------------------------------------------------------------
# rss: live peak against resident growth, in fresh processes
# --------------------------------------------------------------------------------------


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_growth(call: Callable[[], Any]) -> int:
    """Peak resident growth of ``call()`` (bytes above the resident size before it)."""
    _trim()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = _status("VmRSS")
    result = call()
    growth = _status("VmHWM") - before
    del result
    return growth


def child(name: str, cold: bool, limited: bool) -> dict[str, Any]:
    """Run in a fresh process: the live peak and the resident growth of one workload."""
    from torchcurv._memory import limit_allocator_slack, measure_peak

    if limited:
        limit_allocator_slack()

    call = workload(name)
    if cold:
        rss = rss_growth(call)
        live, _ = measure_peak(call)
    else:
        call()  # lazy initialisation (forward-AD decompositions, kernels, thread pools)
        live, _ = measure_peak(call)
        rss = rss_growth(call)
    return {"workload": name, "cold": cold, "live": live, "rss": rss}


def run_child(name: str, cold: bool, limited: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name]
    command += (["--cold"] if cold else []) + (["--limited"] if limited else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def section_rss(report: dict[str, Any], limited: bool) -> None:
    allocator = "limit_allocator_slack()" if limited else "glibc's default malloc"
    print(
        f"\n## rss: live peak (measure_peak) vs resident growth of a fresh process ({allocator})"
    )
    print(f"{'workload':16} {'state':5} {'live MiB':>9} {'RSS MiB':>9} {'RSS/live':>8}  promise")
    rows = []
    for name in RSS_WORKLOADS:
        for cold in (False, True):
            row = run_child(name, cold, limited)
            live, rss = row["live"], row["rss"]
            row["ratio"] = rss / max(live, 1)
            row["promise"] = rss <= 1.10 * live + 16 * MiB
            row["live_within_rss"] = live <= rss + 16 * MiB
            rows.append(row)
            print(
                f"{name:16} {'cold' if cold else 'warm':5} {live / MiB:9.1f} {rss / MiB:9.1f} "
                f"{row['ratio']:8.3f}  {'holds' if row['promise'] else 'BROKEN'}",
                flush=True,
            )
    report["rss"] = rows


# --------------------------------------------------------------------------------------
# overhead of measure_peak
# --------------------------------------------------------------------------------------


def _best(call: Callable[[], Any], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def section_overhead(report: dict[str, Any]) -> None:
    from torchcurv._memory import measure_peak

    print("\n## overhead: measure_peak(f) against f()")
    rows = []
    for name in ("mlp-input-small", "mlp-input", "cnn-chunked", "block", "param-small"):
        call = workload(name)
        call()
        plain = _best(call)
        measured = _best(lambda call=call: measure_peak(call))  # type: ignore[misc]
        rows.append({"workload": name, "plain_s": plain, "measured_s": measured})
        print(
            f"{name:16} plain {plain * 1e3:8.1f} ms  measured {measured * 1e3:8.1f} ms  "
            f"x{measured / plain:.2f}",
            flush=True,
        )
    report["overhead"] = rows


# --------------------------------------------------------------------------------------
# model: predictions against real peaks of planned calls
# --------------------------------------------------------------------------------------


def _hessian_case(name: str) -> tuple[Callable[..., Any], tuple[Any, ...], Any, tuple[int, int]]:
    """(single-sample f, batched args, in_dims, (inner, outer) basis sizes)."""
    from torch.func import functional_call

    if name == "mlp":
        model = _mlp(64, 256)
        return (lambda x: model(x[None]).squeeze()), (torch.randn(64, 64),), 0, (1, 64)
    if name == "mlp-vector":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 10))
        model = model.eval().requires_grad_(False)
        return (lambda x: model(x[None]).squeeze(0)), (torch.randn(64, 32),), 0, (10, 32)
    if name == "cnn":
        model = _cnn()
        return (lambda x: model(x[None]).squeeze()), (torch.randn(16, 1, 28, 28),), 0, (1, 784)
    if name == "block":
        return _block(8, 32), (torch.randn(64, 8, 32),), 0, (1, 256)
    if name == "param":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
        shapes = [(k, v.shape, v.numel()) for k, v in model.named_parameters()]
        theta = torch.cat([v.detach().reshape(-1) for v in model.parameters()])

        def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            params, offset = {}, 0
            for key, shape, size in shapes:
                params[key] = t[offset : offset + size].view(shape)
                offset += size
            return functional_call(model, params, (x[None],)).squeeze()

        return f, (theta, torch.randn(64, 16)), (None, 0), (1, theta.numel())
    raise KeyError(name)


def section_model(report: dict[str, Any]) -> None:
    import torchcurv
    from torchcurv._memory import fit, measure_peak, plan
    from torchcurv._transforms import probing

    print("\n## model: fit on probes, plan, then the real live peak of the planned call")
    rows = []
    for name in ("mlp", "mlp-vector", "cnn", "block", "param"):
        f, args, in_dims, axes = _hessian_case(name)
        size = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() > 1).shape[0]
        dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)

        def first(b: int, args: tuple[Any, ...] = args, dims: tuple[Any, ...] = dims) -> list[Any]:
            return [a if d is None else a[:b] for a, d in zip(args, dims, strict=True)]

        def call(
            b: int, chunks: tuple[int, ...], probe: bool, f: Any = f, d: Any = in_dims
        ) -> int:
            h = torch.vmap(torchcurv.hessian(f, chunk_size=chunks), in_dims=d)
            if probe:
                with probing():
                    return measure_peak(h, *first(b))[0]
            return measure_peak(h, *first(b))[0]

        result_bytes = axes[0] * axes[1] ** 2 * 4  # fwd-over-rev: out x in x in, float32
        start = time.perf_counter()
        model = fit(lambda b, c: call(b, c, True), axes, result_bytes=result_bytes)
        fit_s = time.perf_counter() - start
        whole = model.predict(size, axes)
        for fraction in (2.0, 0.5, 0.1, 0.02):
            budget = int(fraction * whole)
            try:
                chosen = plan(
                    name,
                    batch=size,
                    axes=axes,
                    model=model,
                    result_bytes=result_bytes,
                    budget=budget,
                )
            except torchcurv.MemoryBudgetError:
                print(f"{name:10} budget {budget / MiB:8.2f} MiB: refused")
                continue
            real = call(chosen.batch, chosen.axes, False)
            buffer = size * result_bytes if chosen.batch < size else 0
            model_call = chosen.predicted_peak - buffer
            unmargined = model.unmargined(chosen.batch, chosen.axes)
            row = {
                "case": name,
                "budget": budget,
                "batch": chosen.batch,
                "chunks": chosen.axes,
                "predicted_call": model_call,
                "unmargined_call": unmargined,
                "real_call": real,
                "measurements": len(model.measurements),
                "fit_s": fit_s,
            }
            row["real_over_unmargined"] = real / unmargined
            rows.append(row)
            print(
                f"{name:10} budget {budget / MiB:8.2f} MiB -> b={chosen.batch:3} "
                f"chunks={chosen.axes!s:11} predicted {model_call / MiB:8.2f} MiB, real "
                f"{real / MiB:8.2f} MiB, real/unmargined {row['real_over_unmargined']:.3f} "
                f"({len(model.measurements)} measurements, fit {fit_s:.2f} s; {chosen.reason})",
                flush=True,
            )
    report["model"] = rows


# --------------------------------------------------------------------------------------
# speed: time per sample against the working set of one call
# --------------------------------------------------------------------------------------


def section_speed(report: dict[str, Any], repeats: int) -> None:
    import torchcurv
    from torchcurv._memory import measure_peak
    from torchcurv._transforms import probing

    print("\n## speed: time per sample against the working set of one call")
    print("(configurations timed in interleaved rounds, best of --repeats rounds)")
    cases = {
        "cnn": (_cnn(), torch.randn(16, 1, 28, 28), 784),
        "mlp": (_mlp(784, 256), torch.randn(64, 784), 784),
    }
    grid = {
        "cnn": [(1, 256), (1, 784), (2, 392), (4, 16), (4, 64), (4, 128), (4, 392), (4, 784),
                (16, 16), (16, 64)],
        "mlp": [(1, 784), (4, 784), (16, 196), (16, 784), (32, 784), (64, 64), (64, 196),
                (64, 784)],
    }  # fmt: skip
    rows = []
    for name, (model, X, n) in cases.items():

        def f(x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            return model(x[None]).squeeze()

        calls = {}
        for b, c in grid[name]:
            h = torch.vmap(torchcurv.hessian(f, chunk_size=(1, c)))
            calls[(b, c)] = (h, X[:b])
            h(X[:b])
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(repeats):
            for key, (h, xb) in calls.items():
                best[key] = min(best[key], _best(lambda h=h, xb=xb: h(xb), 1) / key[0])  # type: ignore[misc]
        for (b, c), (h, xb) in calls.items():
            with probing():
                peak = measure_peak(h, xb)[0]
            working = max(0, peak - b * n * n * 4 * (2 if c < n else 1))
            rows.append(
                {"case": name, "batch": b, "chunk": c, "per_sample_s": best[(b, c)],
                 "peak": peak, "working_set": working}
            )  # fmt: skip
            print(
                f"{name:4} b={b:3} c={c:4}  {best[(b, c)] * 1e3:8.2f} ms/sample  "
                f"working set {working / MiB:8.1f} MiB  peak {peak / MiB:8.1f} MiB",
                flush=True,
            )
    report["speed"] = rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=["rss", "overhead", "model", "speed"])
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--limited", action="store_true", help="rss: call limit_allocator_slack() first"
    )
    options = parser.parse_args()
    if options.child:
        print(json.dumps(child(options.child, options.cold, options.limited)))
        return
    sections = options.only or ["rss", "overhead", "model", "speed"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    report: dict[str, Any] = {}
    if "rss" in sections:
        section_rss(report, options.limited)
    if "overhead" in sections:
        section_overhead(report)
    if "model" in sections:
        section_model(report)
    if "speed" in sections:
        section_speed(report, options.repeats)
    if options.json:
        with open(options.json, "w") as out:
            json.dump(report, out, indent=1, default=str)


if __name__ == "__main__":
    main()
