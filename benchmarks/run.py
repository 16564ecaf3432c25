"""Benchmarks: torchcurv against the ways people compute per-sample Hessians today.

Every workload runs these methods side by side in one process, on the same model and data:

* ``torchcurv``: ``torchcurv.per_sample_hessian(model, X, ...)`` with default settings
  (``chunk_size="auto"``, default memory budget);
* ``vmap(hessian)``: raw ``torch.vmap(torch.func.hessian(f))(X)``;
* ``autograd.functional``: ``torch.autograd.functional.hessian(f, x, vectorize=True)``
  per sample in a Python loop;
* ``loop``: ``torchcurv.reference.hessian(f)(x)`` per sample in a Python loop (the
  classic one ``autograd.grad`` per row).

The slow loops may be timed on the first ``k`` samples only; their time is then
extrapolated linearly to the whole batch (the table says so). Each method's result is
compared with torchcurv's on the samples it computed, so that the benchmark cannot
silently compare different things.

Also: a chunk-size sweep for the CNN workload, and a memory-budget check (budget = half
the unchunked peak) for the largest MLP and the CNN.

Usage::

    python benchmarks/run.py [--quick] [--only NAME ...] [--out PATH] [--strict]
                             [--retries N] [--threads N]

Writes a markdown report (default ``benchmarks/results.md``) and exits 0 even when a
target fails, unless ``--strict`` is given. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import datetime
import gc
import itertools
import json
import logging
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import torchcurv
except ImportError:  # a source checkout without an installed package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    import torchcurv

HERE = pathlib.Path(__file__).resolve().parent
MiB = 2**20

# --------------------------------------------------------------------------------------
# memory: additional peak RSS of one call
# --------------------------------------------------------------------------------------

_libc_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_libc_name) if _libc_name else None
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)


def _status_kib() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def release_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc malloc_trim)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_supported() -> tuple[bool, str]:
    """Whether VmHWM can be reset (``/proc/self/clear_refs``) and tracks a fresh allocation."""
    try:
        release_memory()
        _reset_hwm()
        before = _status_kib()
        if before["VmHWM"] > before["VmRSS"] + 1024:
            return False, "VmHWM was not reset by writing 5 to /proc/self/clear_refs"
        block = torch.ones(64 * MiB // 4)
        grown = _status_kib()["VmHWM"] - before["VmRSS"]
        del block
        release_memory()
        _reset_hwm()
        after = _status_kib()
        if not 60 * 1024 <= grown <= 80 * 1024 or after["VmHWM"] > after["VmRSS"] + 1024:
            return False, f"a 64 MiB tensor raised VmHWM by {grown / 1024:.1f} MiB"
        return True, "ok"
    except (OSError, KeyError, ValueError) as error:
        return False, f"{type(error).__name__}: {error}"


PEAK_OK = False


def measure_peak(fn: Callable[[], Any]) -> tuple[int | None, Any]:
    """``(bytes, result)``: VmHWM after ``fn()`` minus VmRSS before it (None if unsupported)."""
    peak, _, result = timed_peak(fn)
    return peak, result


def timed_peak(fn: Callable[[], Any]) -> tuple[int | None, float, Any]:
    """``(peak bytes, seconds, result)`` of one call; only ``fn()`` itself is timed."""
    if not PEAK_OK:
        t0 = time.perf_counter()
        result = fn()
        return None, time.perf_counter() - t0, result
    release_memory()
    _reset_hwm()
    before = _status_kib()["VmRSS"]
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = _status_kib()["VmHWM"] - before
    return peak * 1024, seconds, result


def median_peak(fn: Callable[[], Any], n: int) -> int | None:
    """Median of `n` peak measurements of ``fn()`` (None if unsupported)."""
    got = [p for p in (measure_peak(fn)[0] for _ in range(n)) if p is not None]
    return int(statistics.median(got)) if got else None


#: glibc adapts its mmap threshold to the sizes freed so far (up to 32 MiB), so how much a
#: call adds to RSS depends on what the process did before: the same call measured 54-74
#: MiB or 32 MiB, 82-115 MiB or 82 MiB, in one state or the other. Peaks are therefore
#: measured in a fresh child process with a fixed threshold: every block of 128 KiB or
#: more is its own mapping, returned to the OS when freed, so RSS follows the live tensors.
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def spawn_peaks(section: str, quick: bool) -> dict[str, Any]:
    """Peaks for `section`, measured by this script in a fresh child process (PEAK_ENV)."""
    script = str(pathlib.Path(__file__).resolve())
    command = [sys.executable, script, "--child", section, "--threads",
               str(torch.get_num_threads()), *(["--quick"] if quick else [])]  # fmt: skip
    try:
        done = subprocess.run(command, env={**os.environ, **PEAK_ENV}, capture_output=True,
                              text=True, timeout=900, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if done.returncode != 0 or not done.stdout.strip():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {done.returncode}: {tail[:200]}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def child_main(section: str, quick: bool) -> int:
    """Measure the peaks of `section` in this (child) process; print them as JSON."""
    global PEAK_OK
    PEAK_OK, note = peak_rss_supported()
    if not PEAK_OK:
        print(json.dumps({"error": f"peak RSS not measurable: {note}"}))
        return 0
    global_warmup()
    if section == "sweep":
        result = sweep_peaks(quick)
    elif section == "budget":
        result = budget_peaks(quick)
    elif section == "overhead":
        result = {}  # times only
    else:
        result = workload_peaks(dict(zip(WORKLOAD_NAMES, all_workloads(quick), strict=True))[
            section]())  # fmt: skip
    print(json.dumps(result))
    return 0


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def torchcurv_log() -> Iterator[list[str]]:
    """Collect torchcurv's debug log (the path ``mode="auto"`` chose, the chunk plan)."""
    logger = logging.getLogger("torchcurv")
    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def describe_log(messages: list[str]) -> str:
    """torchcurv's debug messages for one call, without the function-name prefixes."""
    cleaned = [m.split(": ", 1)[-1] if m.startswith("per_sample") else m for m in messages]
    return "; ".join(dict.fromkeys(cleaned)) or "(nothing logged)"


def seeded(seed: int) -> None:
    torch.manual_seed(seed)


def mlp(widths: Sequence[int]) -> nn.Sequential:
    """A tanh MLP with the given widths (no activation after the last layer), eval mode."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).eval()


def cnn() -> nn.Sequential:
    """The MNIST-shaped CNN: 1x28x28 -> 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.Tanh(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.Tanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 10),
    ).eval()  # fmt: skip


def fmt_ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / MiB:.1f}"


def fmt_ratio(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def passfail(ok: bool | None) -> str:
    return "n/a" if ok is None else "**PASS**" if ok else "**FAIL**"


class CpuMeter:
    """Cores used by other processes (from ``/proc/stat`` minus this process) over a span."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        own = sum(os.times()[:4])  # this process and its finished children
        return busy / os.sysconf("SC_CLK_TCK"), own, time.perf_counter()

    def others(self) -> float | None:
        """Average number of cores other processes kept busy since the meter started."""
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end, strict=True))
        return max(0.0, (busy - own) / wall)


def fmt_others(cores: float | None) -> str:
    if cores is None:
        return "other processes: n/a"
    return f"other processes kept {cores:.2f} of {usable_cores()} cores busy on average"


def load() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


# --------------------------------------------------------------------------------------
# methods and workloads
# --------------------------------------------------------------------------------------


@dataclass
class Method:
    """One way to compute the workload's Hessians.

    ``run()`` computes the Hessians of the first ``samples`` samples (all of them when
    ``samples`` equals the batch size); ``as_tensor`` turns its result into a
    ``[samples, ...]`` tensor laid out like ``Workload.as_tensor`` of torchcurv's result.
    """

    name: str
    run: Callable[[], Any]
    samples: int
    as_tensor: Callable[[Any], Tensor]
    note: str = ""


@dataclass
class Row:
    method: Method
    batch: int
    first: float = math.nan
    times: list[float] = field(default_factory=list)
    peak: int | None = None
    diff: float = math.nan
    error: str | None = None
    log: str = ""

    @property
    def scale(self) -> float:
        return self.batch / self.method.samples

    @property
    def median(self) -> float:
        return statistics.median(self.times) * self.scale if self.times else math.nan

    @property
    def fastest(self) -> float:
        return min(self.times) * self.scale if self.times else math.nan


@dataclass
class Workload:
    name: str
    group: str
    title: str
    description: str
    batch: int
    methods: list[Method]
    as_tensor: Callable[[Any], Tensor]


def per_sample_loop(one: Callable[[Tensor], Any], X: Tensor, k: int) -> Callable[[], list[Any]]:
    def run() -> list[Any]:
        return [one(X[i]) for i in range(k)]

    return run


def stack(results: list[Tensor]) -> Tensor:
    return torch.stack(list(results))


def input_workload(
    name: str, group: str, title: str, description: str, model: nn.Module, X: Tensor,
    output: int | None, *, loop_k: int, agf_k: int, n_outputs: int = 1,
) -> Workload:  # fmt: skip
    """Per-sample input Hessians of ``model(x)[output]`` (all outputs when None)."""
    model.requires_grad_(False)  # no method records a graph towards the parameters
    B = X.shape[0]

    def f(x: Tensor) -> Tensor:
        out = model(x.unsqueeze(0))[0]
        return out if output is None else out[output]

    def agf_one(x: Tensor) -> Tensor:
        hess = torch.autograd.functional.hessian
        if output is not None:
            return hess(f, x, vectorize=True)
        # autograd.functional.hessian needs a scalar: one call per output entry
        return torch.stack([hess(lambda z, j=j: f(z)[j], x, vectorize=True)
                            for j in range(n_outputs)])  # fmt: skip

    loop_one = torchcurv.reference.hessian(f)
    vmapped = torch.vmap(torch.func.hessian(f))
    agf_note = "" if output is not None else f"{n_outputs} scalar calls per sample"
    methods = [
        Method("torchcurv", lambda: torchcurv.per_sample_hessian(model, X, output=output),
               B, lambda r: r),
        Method("vmap(hessian)", lambda: vmapped(X), B, lambda r: r),
        Method("autograd.functional", per_sample_loop(agf_one, X, agf_k), agf_k, stack,
               agf_note),
        Method("loop", per_sample_loop(loop_one, X, loop_k), loop_k, stack),
    ]  # fmt: skip
    return Workload(name, group, title, description, B, methods, lambda r: r)


def params_matrix(H: Any, names: Sequence[str], batch_dims: int) -> Tensor:
    """``[*batch, P, P]`` from nested blocks ``H[a][b]: [*batch, *p_a, *p_b]``."""
    lead = H[names[0]][names[0]].shape[:batch_dims]
    sizes = {a: math.isqrt(math.prod(H[a][a].shape[batch_dims:])) for a in names}
    return torch.cat(
        [torch.cat([H[a][b].reshape(*lead, sizes[a], sizes[b]) for b in names], dim=-1)
         for a in names],
        dim=-2,
    )  # fmt: skip


def params_workload(quick: bool) -> Workload:
    """Workload 4: per-sample parameter Hessian of the cross-entropy loss of a small MLP."""
    seeded(4)
    model = mlp([16, 32, 10])
    B = 64
    X = torch.randn(B, 16)
    y = torch.randint(0, 10, (B,))
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    def loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(out, t.unsqueeze(0))

    vmapped = torch.vmap(torch.func.hessian(loss), in_dims=(None, 0, 0))
    flat = tuple(params.values())

    def agf_one(i: int) -> Any:
        def f(*ps: Tensor) -> Tensor:
            return loss(dict(zip(names, ps, strict=True)), X[i], y[i])

        H = torch.autograd.functional.hessian(f, flat, vectorize=True)
        return {a: {b: H[i_a][i_b] for i_b, b in enumerate(names)} for i_a, a in
                enumerate(names)}  # fmt: skip

    loop_hessian = torchcurv.reference.hessian(loss)
    loop_k, agf_k = (1, 2) if quick else (2, 8)

    def as_matrix(batched: Any) -> Tensor:
        return params_matrix(batched, names, 1)

    def stack_matrices(results: list[Any]) -> Tensor:
        return torch.stack([params_matrix(r, names, 0) for r in results])

    methods = [
        Method("torchcurv",
               lambda: torchcurv.per_sample_hessian(model, X, wrt="params", loss=F.cross_entropy,
                                                    targets=y),
               B, as_matrix),
        Method("vmap(hessian)", lambda: vmapped(params, X, y), B, as_matrix),
        Method("autograd.functional", lambda: [agf_one(i) for i in range(agf_k)], agf_k,
               stack_matrices),
        Method("loop", lambda: [loop_hessian(params, X[i], y[i]) for i in range(loop_k)], loop_k,
               stack_matrices),
    ]  # fmt: skip
    P = sum(p.numel() for p in params.values())
    return Workload(
        "params", "params", "4. Parameter Hessian of the cross-entropy loss",
        f"MLP 16->32->10 (tanh), P={P} parameters, B={B}, float32; `per_sample_hessian(model, "
        "X, wrt='params', loss=F.cross_entropy, targets=y)` -> blocks `[B, *p_i, *p_j]` "
        f"(compared as `[B, {P}, {P}]`). Raw baseline: `vmap(hessian(loss), in_dims=(None, 0, "
        "0))(params, X, y)` with `loss` a `functional_call` of the model.",
        B, methods, as_matrix,
    )  # fmt: skip


MLP_SIZES = [([8, 64, 64, 1], 128), ([32, 128, 128, 1], 64), ([128, 256, 256, 1], 16)]


def mlp_workload(widths: list[int], B: int, quick: bool) -> Workload:
    seeded(1)
    model = mlp(widths)
    X = torch.randn(B, widths[0])
    n = widths[0]
    label = "-".join(map(str, widths))
    loop_k = {8: 16, 32: 4, 128: 1}[n] if quick else {8: 64, 32: 16, 128: 2}[n]
    agf_k = {8: 16, 32: 8, 128: 2}[n] if quick else {8: 32, 32: 16, 128: 4}[n]
    return input_workload(
        f"mlp-{label}", "mlp", f"1. Input Hessian of a tanh MLP {label.replace('-', '->')}",
        f"MLP {label.replace('-', '->')} (tanh), scalar output (`output=0`), B={B}, float32; "
        f"result `[B, {n}, {n}]`.",
        model, X, 0, loop_k=loop_k, agf_k=agf_k,
    )  # fmt: skip


def cnn_data() -> tuple[nn.Module, Tensor]:
    seeded(2)
    return cnn(), torch.randn(8, 1, 28, 28)


def cnn_workload(quick: bool) -> Workload:
    model, X = cnn_data()
    return input_workload(
        "cnn", "cnn", "2. Input Hessian of an MNIST-shaped CNN",
        "Conv2d(1,8,3)-Tanh-MaxPool2d(2)-Conv2d(8,16,3)-Tanh-MaxPool2d(2)-Flatten-"
        "Linear(400,10); Hessian of class 2's logit (`output=2`) w.r.t. the 1x28x28 input, "
        "B=8, float32; result `[8, 1, 28, 28, 1, 28, 28]` (784x784 per sample).",
        model, X, 2, loop_k=1, agf_k=1 if quick else 2,
    )  # fmt: skip


def pinn_workload(quick: bool) -> Workload:
    seeded(3)
    widths = [2, *[512] * 6, 3]
    B = 1000
    return input_workload(
        "pinn", "pinn", "3. PINN-style: all output Hessians of a deep tanh MLP",
        f"MLP 2->512x6->3 (tanh), Hessians of all 3 outputs (`output=None`), B={B}, float32; "
        "result `[B, 3, 2, 2]`.",
        mlp(widths), torch.randn(B, 2), None,
        loop_k=10 if quick else 50, agf_k=3 if quick else 10, n_outputs=3,
    )  # fmt: skip


def all_workloads(quick: bool) -> list[Callable[[], Workload]]:
    """Workload builders (built lazily, one at a time, so that memory is not held)."""
    builders: list[Callable[[], Workload]] = [
        lambda widths=widths, B=B: mlp_workload(widths, B, quick) for widths, B in MLP_SIZES
    ]
    return [*builders, lambda: cnn_workload(quick), lambda: pinn_workload(quick),
            lambda: params_workload(quick)]  # fmt: skip


WORKLOAD_NAMES = [
    *(f"mlp-{'-'.join(map(str, w))}" for w, _ in MLP_SIZES), "cnn", "pinn", "params",
]  # fmt: skip
GROUPS = {"mlp": WORKLOAD_NAMES[:3]}
SECTIONS = ["sweep", "budget", "overhead"]


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------


ALLOWANCE = {"mlp": 20.0, "cnn": 60.0, "pinn": 40.0, "params": 40.0, "sweep": 90.0,
             "budget": 60.0, "overhead": 60.0}  # fmt: skip


@dataclass
class Settings:
    repeats: int  # most timed repeats per method
    min_repeats: int
    seconds_per_method: float  # fewer repeats (down to min_repeats) for slow methods
    slow_seconds: float  # methods slower than this per call get only slow_repeats
    slow_repeats: int
    quick: bool

    def allowance(self, name: str) -> float:
        """Seconds a workload or section may spend before it stops adding repeats (after
        the current round; at least one): keeps the run bounded on a busy machine."""
        seconds = ALLOWANCE.get(name.split("-")[0], 30.0)
        return seconds * (0.4 if self.quick else 1.0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def max_diff(result: Tensor, reference: Tensor) -> tuple[float, float]:
    """``(max |result - reference|, max |reference|)``."""
    if result.shape != reference.shape:
        raise ValueError(f"shape {tuple(result.shape)} != torchcurv's {tuple(reference.shape)}")
    return float((result - reference).abs().max()), float(reference.abs().max())


def run_workload(w: Workload, s: Settings) -> tuple[list[Row], float]:
    """Time every method of `w` (interleaved) and check its result against torchcurv's."""
    started = time.perf_counter()
    rows = [Row(m, w.batch) for m in w.methods]
    outputs: dict[str, Tensor] = {}
    first: dict[int, float] = {}
    for row in rows:  # first call: includes per-model/shape one-time costs
        result = None
        try:
            with torchcurv_log() as messages:
                seconds, result = timed(row.method.run)
            if row.method.name == "torchcurv":
                row.log = describe_log(messages)
            first[id(row)] = seconds
            outputs[row.method.name] = row.method.as_tensor(result).detach()
            row.first = seconds * row.scale
        except Exception as error:  # reported in the table
            row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            log(traceback.format_exc())
        del result
    reference = outputs.get("torchcurv")
    scale = math.nan
    for row in rows:
        if row.error is None and reference is not None:
            try:
                row.diff, scale = max_diff(outputs[row.method.name],
                                           reference[: row.method.samples])  # fmt: skip
            except ValueError as error:
                row.error = str(error)
    outputs.clear()
    active = [row for row in rows if row.error is None]
    counts = {}
    for row in active:
        if first[id(row)] < s.slow_seconds:  # warm-up call; it also sizes the repeats
            warm, _ = timed(row.method.run)
            counts[id(row)] = max(s.min_repeats,
                                  min(s.repeats, int(s.seconds_per_method / warm)))  # fmt: skip
        else:  # slow: the first call is the warm-up and one timed repeat
            row.times.append(first[id(row)])
            counts[id(row)] = s.slow_repeats
    for r in range(s.repeats):  # interleaved, so that disturbances hit all methods alike
        if r and time.perf_counter() - started > s.allowance(w.name):
            break
        for row in active:
            if r < counts[id(row)]:
                row.times.append(timed(row.method.run)[0])
    return rows, scale


def workload_table(w: Workload, rows: list[Row], scale: float) -> list[str]:
    by_name = {row.method.name: row for row in rows}
    tc = by_name["torchcurv"].median
    lines = [
        f"### {w.title}", "", w.description, "",
        "| method | samples timed | median [ms] | min [ms] | first call [ms] | repeats "
        "| peak RSS [MiB] | time / torchcurv | max abs diff vs torchcurv | note |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]  # fmt: skip
    for row in rows:
        m = row.method
        if row.error is not None:
            lines.append(f"| {m.name} | | | | | | | | | ERROR: {row.error} |")
            continue
        timed_on = f"{m.samples} of {w.batch}" if m.samples < w.batch else f"all {w.batch}"
        notes = [m.note] if m.note else []
        if row.log:
            notes.append(f"torchcurv log: {row.log}")
        if m.samples < w.batch:
            notes.append(f"times x{row.scale:g} (extrapolated); peak of the {m.samples}-sample "
                         "call")  # fmt: skip
        lines.append(
            f"| {m.name} | {timed_on} | {fmt_ms(row.median)} | {fmt_ms(row.fastest)} "
            f"| {fmt_ms(row.first)} | {len(row.times)} | {fmt_mib(row.peak)} "
            f"| {fmt_ratio(row.median / tc)} | {row.diff:.2e} | {'; '.join(notes)} |"
        )
    lines += ["", f"Largest |H| entry (torchcurv): {scale:.3g}.", ""]
    return lines


@dataclass
class Target:
    name: str
    workload: str
    measured: str
    threshold: str
    ok: bool | None


def workload_targets(w: Workload, rows: list[Row], scale: float) -> list[Target]:
    by_name = {row.method.name: row for row in rows}

    def ratios(a: str, b: str) -> tuple[float, float] | None:
        """(ratio of medians, ratio of minimums) of methods `a` and `b`."""
        ra, rb = by_name.get(a), by_name.get(b)
        if ra is None or rb is None or ra.error or rb.error:
            return None
        return ra.median / rb.median, ra.fastest / rb.fastest

    def target(name: str, a: str, b: str, limit: float, at_most: bool) -> Target:
        r = ratios(a, b)
        if r is None:
            return Target(name, w.name, "n/a", "", None)
        ok = r[0] <= limit if at_most else r[0] >= limit
        return Target(name, w.name, f"{fmt_ratio(r[0])} (of minimums: {fmt_ratio(r[1])})",
                      f"{'<=' if at_most else '>='} {limit:g}x", ok)  # fmt: skip

    if w.name != "cnn":
        targets = [
            target("overhead: torchcurv / vmap(hessian)", "torchcurv", "vmap(hessian)", 1.05,
                   True),
            target("speed-up over the loop: loop / torchcurv", "loop", "torchcurv", 20, False),
        ]  # fmt: skip
    else:
        targets = [target("speed-up: autograd.functional / torchcurv", "autograd.functional",
                          "torchcurv", 2, False)]  # fmt: skip
    worst = max((row.diff for row in rows if row.error is None), default=math.nan)
    errors = [row.method.name for row in rows if row.error is not None]
    rel = worst / scale if scale > 0 else worst
    targets.append(Target(
        "agreement: every method's max abs diff vs torchcurv <= 1e-4 x max|H|", w.name,
        f"{rel:.1e} x max abs H" + (f"; errors: {', '.join(errors)}" if errors else ""),
        "<= 1e-4", not errors and rel <= 1e-4,
    ))  # fmt: skip
    return targets


def sweep_configs(quick: bool) -> list[Any]:
    if quick:
        return ["auto", None, (8, 1, 196), (8, 1, 64), (1, 1, 784)]
    return ["auto", None, (8, 1, 784), (8, 1, 196), (8, 1, 64), (8, 1, 16), (1, 1, 784),
            (1, 1, 64)]  # fmt: skip


def sweep_call(model: nn.Module, X: Tensor, cfg: Any) -> Callable[[], Tensor]:
    return lambda: torchcurv.per_sample_hessian(model, X, output=2, chunk_size=cfg)


def sweep_peaks(quick: bool) -> dict[str, Any]:
    """(child process) Peak of each chunk-size configuration of the sweep."""
    model, X = cnn_data()
    model.requires_grad_(False)
    sweep_call(model, X, "auto")()  # the probe, so that no measured call includes it
    return {repr(cfg): median_peak(sweep_call(model, X, cfg), 1) for cfg in sweep_configs(quick)}


def chunk_sweep(s: Settings, peaks: dict[str, Any]) -> tuple[list[str], list[Target]]:
    """Workload 2 with explicit (batch, inner, outer) chunk sizes."""
    model, X = cnn_data()
    model.requires_grad_(False)
    configs = sweep_configs(s.quick)
    repeats = 1 if s.quick else 3
    started = time.perf_counter()
    reference = sweep_call(model, X, None)()
    firsts = []
    for cfg in configs:
        fn = sweep_call(model, X, cfg)
        first, H = timed(fn)
        diff = float((H - reference).abs().max())
        del H
        if not s.quick and time.perf_counter() - started < s.allowance("sweep") / 3:
            timed(fn)  # warm-up
        firsts.append((first, diff))
    del reference
    times: list[list[float]] = [[] for _ in configs]
    for r in range(repeats):  # interleaved across configurations
        if r and time.perf_counter() - started > s.allowance("sweep"):
            break
        for cfg, ts in zip(configs, times, strict=True):
            ts.append(timed(sweep_call(model, X, cfg))[0])
    repeats = len(times[0])
    base_time = statistics.median(times[configs.index(None)])
    base_peak = peaks.get(repr(None))
    lines = [
        "### Chunk-size sweep (workload 2, the CNN)", "",
        "`per_sample_hessian(model, X, output=2, chunk_size=c)` with `c = (batch, inner, "
        "outer)`: samples per vmap call, rows of the inner (reverse) Jacobian and columns of "
        "the outer (forward) Jacobian per call. The input has 784 entries and the output 1, "
        f"so `(8, 1, 784)` is one unchunked call. Median of {repeats} repeat(s) after the "
        "first call, interleaved across configurations; peaks from the measuring child "
        "process (see Method).", "",
        "| chunk_size | median [ms] | min [ms] | first call [ms] | peak RSS [MiB] "
        "| time / unchunked (medians) | peak / unchunked | max abs diff vs unchunked |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]  # fmt: skip
    for cfg, (first, diff), ts in zip(configs, firsts, times, strict=True):
        peak = peaks.get(repr(cfg))
        peak_ratio = f"{peak / base_peak:.2f}" if peak and base_peak else "n/a"
        lines.append(f"| `{cfg!r}` | {fmt_ms(statistics.median(ts))} | {fmt_ms(min(ts))} "
                     f"| {fmt_ms(first)} | {fmt_mib(peak)} "
                     f"| {fmt_ratio(statistics.median(ts) / base_time)} | {peak_ratio} "
                     f"| {diff:.1e} |")  # fmt: skip
    if "error" in peaks:
        lines.append(f"\nPeak memory: the measuring child process failed: {peaks['error']}")
    lines.append("")
    return lines, []


def budget_cases() -> list[tuple[str, nn.Module, Tensor, int]]:
    """(name, model, X, output) of the memory-budget check."""
    cases = []
    seeded(1)
    widths, B = MLP_SIZES[-1]
    label = f"mlp-{'-'.join(map(str, widths))}"
    cases.append((label, mlp(widths), torch.randn(B, widths[0]), 0))
    model, X = cnn_data()
    cases.append(("cnn", model, X, 2))
    # the largest MLP's peak is only a few MiB; the same MLP with a larger batch gives a
    # case well above the resolution of RSS measurements
    seeded(1)
    cases.append((f"{label}, B=256 (extra)", mlp(widths), torch.randn(256, widths[0]), 0))
    for _, model, _, _ in cases:
        model.requires_grad_(False)
    return cases


#: The documented promise of a memory budget: the peak a call adds is at most 1.10 x the
#: budget + 16 MiB (docs/tutorials/memory.rst; the 16 MiB cover the allocator's
#: granularity, which dominates budgets of a few MiB).
PROMISE = "memory budget: measured peak <= 1.10 x budget + 16 MiB (the documented promise)"
PROMISE_RATIO, PROMISE_SLACK = 1.10, 16 * MiB


def budget_peaks(quick: bool) -> dict[str, Any]:
    """(child process) Unchunked peak P, then the peaks with ``memory_budget=P // 2``."""
    results: dict[str, Any] = {}
    n = 1 if quick else 3
    for name, model, X, output in budget_cases():

        def unchunked(model: nn.Module = model, X: Tensor = X, output: int = output) -> Tensor:
            return torchcurv.per_sample_hessian(model, X, output=output, chunk_size=None)

        unchunked()  # warm-up
        P = median_peak(unchunked, n)
        if P is None:
            results[name] = {"error": "peak RSS not measurable here"}
            continue
        budget = P // 2

        def budgeted(model: nn.Module = model, X: Tensor = X, output: int = output,
                     budget: int = budget) -> Tensor:  # fmt: skip
            return torchcurv.per_sample_hessian(model, X, output=output, memory_budget=budget)

        with torchcurv_log() as messages:
            try:
                budgeted()  # first call: the probe and the plan
            except torchcurv.MemoryBudgetError as error:
                results[name] = {"P": P, "budget": budget, "error": f"MemoryBudgetError: {error}"}
                continue
        got = [p for p in (measure_peak(budgeted)[0] for _ in range(n)) if p is not None]
        results[name] = {"P": P, "budget": budget, "peak": int(statistics.median(got)),
                         "max": max(got), "plan": describe_log(messages)}  # fmt: skip
    return results


def budget_check(s: Settings, peaks: dict[str, Any]) -> tuple[list[str], list[Target]]:
    """memory_budget = half the unchunked peak: measured peak and time vs unchunked."""
    lines = [
        "### Memory budget (half the unchunked peak)", "",
        "In the measuring child process (see Method): `P` = median peak of "
        "`per_sample_hessian(..., chunk_size=None)`, then `memory_budget=P // 2` (with the "
        "default `chunk_size='auto'`): median and largest measured peak (the target uses the "
        "median) and the planner's choice from torchcurv's debug log. In this process: times "
        "with the same budget, medians of interleaved repeats after warm-up.", "",
        "| workload | unchunked peak P [MiB] | budget [MiB] | budgeted peak, median (max) "
        "[MiB] | peak / budget | within the promise (1.10 x budget + 16 MiB) | unchunked [ms] "
        "| budgeted [ms] | time ratio | repeats | max abs diff | torchcurv log (budgeted call) |",
        "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|---|",
    ]  # fmt: skip
    targets = []
    started = time.perf_counter()
    for name, model, X, output in budget_cases():
        got = peaks.get(name, {"error": peaks.get("error", "no measurement")})
        if "peak" not in got:
            budget = got.get("budget")
            lines.append(f"| {name} | {fmt_mib(got.get('P'))} | {fmt_mib(budget)} "
                         f"| {got['error']} |" + " |" * 8)  # fmt: skip
            if budget is not None:
                raised = f"not measured: raised {got['error'].split(':')[0]}"
                targets.append(
                    Target(
                        PROMISE,
                        name,
                        raised,
                        "<= 1.10x + 16 MiB",
                        False,
                    )
                )
                targets.append(Target("memory budget: time / unchunked time", name, raised,
                                      "<= 1.5x", None))  # fmt: skip
            continue
        P, budget, peak = got["P"], got["budget"], got["peak"]

        def unchunked(model: nn.Module = model, X: Tensor = X, output: int = output) -> Tensor:
            return torchcurv.per_sample_hessian(model, X, output=output, chunk_size=None)

        def budgeted(model: nn.Module = model, X: Tensor = X, output: int = output,
                     budget: int = budget) -> Tensor:  # fmt: skip
            return torchcurv.per_sample_hessian(model, X, output=output, memory_budget=budget)

        diff = float((budgeted() - unchunked()).abs().max())  # also the warm-up
        seconds = min(timed(unchunked)[0], timed(budgeted)[0])
        repeats = max(3, min(25 if s.quick else 51, int((1 if s.quick else 3) / seconds)))
        t_un, t_bu = [], []
        for r in range(repeats):
            if r and time.perf_counter() - started > s.allowance("budget"):
                break
            t_un.append(timed(unchunked)[0])
            t_bu.append(timed(budgeted)[0])
        repeats = len(t_un)
        ratio = statistics.median(t_bu) / statistics.median(t_un)
        within = peak <= PROMISE_RATIO * budget + PROMISE_SLACK
        lines.append(
            f"| {name} | {fmt_mib(P)} | {fmt_mib(budget)} | {fmt_mib(peak)} "
            f"({fmt_mib(got['max'])}) | {peak / budget:.2f} | {passfail(within)} "
            f"| {fmt_ms(statistics.median(t_un))} | {fmt_ms(statistics.median(t_bu))} "
            f"| {fmt_ratio(ratio)} | {repeats} | {diff:.1e} | {got['plan']} |"
        )
        targets.append(Target(PROMISE, name, f"{peak / MiB:.1f} MiB of {budget / MiB:.1f} MiB "
                              f"({peak / budget:.2f}x)", "<= 1.10x + 16 MiB", within))  # fmt: skip
        targets.append(Target("memory budget: time / unchunked time", name, fmt_ratio(ratio),
                              "<= 1.5x", ratio <= 1.5))  # fmt: skip
    lines.append("")
    return lines, targets


# --------------------------------------------------------------------------------------
# fixed cost per call
# --------------------------------------------------------------------------------------

#: (title, widths, batch, modes): generic engines against their own torch.func
#: compositions, unchunked. The tiny MLP measures the fixed cost per call; the larger one
#: (raw >= 5 ms) the proportional cost.
OVERHEAD_CASES = [
    ("MLP 4-8-1, B=8", [4, 8, 1], 8,
     ("fwd-over-rev", "rev-over-rev", "rev-over-fwd", "fwd-over-fwd", "rev", "fwd")),
    ("MLP 32-128-128-1, B=64", [32, 128, 128, 1], 64, ("fwd-over-rev", "rev-over-rev")),
]  # fmt: skip
#: The targets: at most OVERHEAD_RATIO x raw where raw takes OVERHEAD_SLOW_MS or more,
#: at most raw + OVERHEAD_MS below that.
OVERHEAD_RATIO, OVERHEAD_SLOW_MS, OVERHEAD_MS = 1.10, 5.0, 0.25
_STAGE = {"rev": torch.func.jacrev, "fwd": torch.func.jacfwd}


def overhead_check(s: Settings, peaks: dict[str, Any]) -> tuple[list[str], list[Target]]:
    """Each generic mode, explicitly requested and unchunked, against raw
    ``vmap(<its jacfwd/jacrev composition>(f))``, interleaved repeats."""
    del peaks  # nothing to measure in a child: times only
    lines = [
        "### Fixed cost per call: generic engines vs their torch.func compositions", "",
        "`torchcurv.per_sample_hessian(model, X, output=0, mode=m, chunk_size=None)` (or "
        "`per_sample_jacobian`), the whole public call (checks, cached first forward, "
        "engine, runner), against raw `vmap(outer(inner(f)))(X)` built once, `f` the "
        "single-sample function through `functional_call`; interleaved repeats, medians. "
        f"Target: <= {OVERHEAD_RATIO:g}x where raw takes >= {OVERHEAD_SLOW_MS:g} ms, else "
        f"<= raw + {OVERHEAD_MS:g} ms.", "",
        "| workload | mode | raw [ms] | torchcurv [ms] | difference [ms] | ratio | repeats "
        "| max abs diff | target |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]  # fmt: skip
    targets = []
    started = time.perf_counter()
    for title, widths, B, modes in OVERHEAD_CASES:
        seeded(0)
        model = mlp(widths).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        X = torch.randn(B, widths[0])
        params = {k: v.detach() for k, v in model.named_parameters()}

        def f(x: Tensor, model: nn.Module = model, params: dict[str, Tensor] = params) -> Tensor:
            return torch.func.functional_call(model, params, (x.unsqueeze(0),))[0, 0]

        for mode in modes:
            stages = mode.split("-over-")[::-1]  # inner first
            raw_fn: Callable[..., Any] = f
            for stage in stages:
                raw_fn = _STAGE[stage](raw_fn)
            raw = torch.vmap(raw_fn)
            public = torchcurv.per_sample_hessian if "-over-" in mode else (
                torchcurv.per_sample_jacobian)  # fmt: skip

            def ours(model: nn.Module = model, X: Tensor = X, mode: str = mode,
                     public: Callable[..., Any] = public) -> Tensor:  # fmt: skip
                return public(model, X, output=0, mode=mode, chunk_size=None)  # type: ignore[no-any-return]

            diff = float((ours() - raw(X)).abs().max())  # also the warm-up
            t_raw, t_ours = [], []
            repeats = 41 if s.quick else 201
            for r in range(repeats):
                if r > 20 and time.perf_counter() - started > s.allowance("overhead"):
                    break
                pair = [("raw", lambda raw=raw, X=X: raw(X)), ("ours", ours)]
                for name, fn in pair if r % 2 else pair[::-1]:
                    (t_raw if name == "raw" else t_ours).append(timed(fn)[0])
            m_raw, m_ours = statistics.median(t_raw) * 1e3, statistics.median(t_ours) * 1e3
            if m_raw >= OVERHEAD_SLOW_MS:
                ok, threshold = m_ours / m_raw <= OVERHEAD_RATIO, f"<= {OVERHEAD_RATIO:g}x"
            else:
                ok, threshold = m_ours - m_raw <= OVERHEAD_MS, f"<= raw + {OVERHEAD_MS:g} ms"
            lines.append(
                f"| {title} | {mode} | {m_raw:.3f} | {m_ours:.3f} | {m_ours - m_raw:+.3f} "
                f"| {fmt_ratio(m_ours / m_raw)} | {len(t_raw)} | {diff:.1e} "
                f"| {threshold}: {passfail(ok)} |"
            )
            targets.append(Target(f"fixed cost: {mode} vs its torch.func composition", title,
                                  f"{m_ours:.3f} vs {m_raw:.3f} ms ({m_ours / m_raw:.2f}x)",
                                  threshold, ok))  # fmt: skip
    lines.append("")
    return lines, targets


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def busy_during(others: float | None) -> list[str]:
    """A line for the report on how busy other processes kept the machine during the run."""
    if others is None:
        return []
    cores = usable_cores()
    line = f"- during the whole run, {fmt_others(others)}"
    if others > QUIET * cores:
        line += (
            " (**busy** at times: check the note under each table; where others kept a "
            "sizeable share of the cores busy, times are inflated, multi-threaded vectorised "
            "calls most, and time ratios are distorted)"
        )
    return [line]


def header(
    s: Settings, peak_note: str, start_load: str, busy: list[str], threads_set: bool
) -> list[str]:
    cores = usable_cores()
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "# torchcurv benchmarks", "",
        f"Generated by `python benchmarks/run.py {' '.join(sys.argv[1:])}` on {now}.", "",
        "## Machine", "",
        f"- CPU: {cpu_model()}, {cores} cores usable ({os.cpu_count()} online)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads "
        f"({'set by --threads' if threads_set else 'default'}), "
        f"{torch.get_num_interop_threads()} inter-op threads; "
        f"torchcurv {torchcurv.__version__}; Python {platform.python_version()}; "
        f"{platform.system()} {platform.release()}",
        f"- load average (1/5/15 min) at start: {start_load} (it lags: the line below, "
        "measured from `/proc/stat` during the run, says how busy other processes really "
        "kept the machine; each workload says it too)",
        f"- malloc environment: {malloc_env or 'glibc defaults (no MALLOC_* variables)'}",
        *busy,
        "",
        "## Method", "",
        "- **Time**: `time.perf_counter` around one call; median (and min) over repeats "
        f"(at most {s.repeats}, at least {s.min_repeats}) after a warm-up call, repeats "
        "interleaved across methods. Slow methods (first call over "
        f"{s.slow_seconds:g} s, typically the loops) get no separate warm-up: their first "
        f"call counts as one repeat, plus {s.slow_repeats} more. Float32, fixed seeds, models in "
        "eval mode; for input Hessians the parameters have `requires_grad=False`, so no "
        "method records a graph towards them.",
        "- **First call**: the first call on this model and shape, before the warm-up. For "
        "torchcurv it includes the memory probe (allocations of one single-sample forward) "
        "that is cached per model and shape. Process-wide one-time costs (torch's lazy "
        "initialisation of forward-mode AD and vmap) were paid by a global warm-up "
        "(`torchcurv.initialize()` and a tiny model) before the first workload.",
        "- **Slow loops**: the loop methods may be timed on the first `k` samples; their "
        "times are multiplied by `B / k` (linear extrapolation; marked in the table), their "
        "peak RSS is that of the `k`-sample call.",
        "- **Peak RSS**: additional peak resident memory of one call, measured in a fresh "
        "child process per workload or section (this script with `--child`), started with "
        "`MALLOC_MMAP_THRESHOLD_=131072`: glibc otherwise adapts its mmap threshold to the "
        "sizes freed earlier (up to 32 MiB), and the same call then adds 30-40 MiB more or "
        "less to RSS depending on what the process did before; with a fixed threshold every "
        "block of 128 KiB or more is its own mapping, returned to the OS when freed, so RSS "
        "follows the live tensors. Times are measured here, with glibc's defaults (the fixed "
        "threshold would slow large-tensor calls by 10-50%). In the child: a warm-up call "
        "(torchcurv's probe), then for each measurement `gc.collect()` and "
        "`malloc_trim(0)` (small blocks freed earlier go back to the OS), write `5` to "
        "`/proc/self/clear_refs` (resets `VmHWM`), read `VmRSS`, call, read `VmHWM`; peak "
        "= `VmHWM - VmRSS`, median of 3 (1 for calls over 0.5 s, and in the sweep; with the "
        "fixed threshold repeated measurements agree to 0.1 MiB). It includes the result. "
        f"Problems measuring peaks: {peak_note}.",
        "- **Agreement**: each method's result is compared with torchcurv's on the samples "
        "it computed (max abs difference).",
        "",
    ]  # fmt: skip


def targets_table(targets: list[Target]) -> list[str]:
    lines = [
        "## Targets", "",
        "Computed, not asserted (`--strict` makes a failure exit 1). Targets are judged on "
        "the ratio of median times; the ratio of minimum times is shown too, as it is less "
        "sensitive to other processes on a shared machine.", "",
        "| target | workload | measured | threshold | result |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for t in targets:
        lines.append(f"| {t.name} | {t.workload} | {t.measured} | {t.threshold} "
                     f"| {passfail(t.ok)} |")  # fmt: skip
    passed = sum(t.ok is True for t in targets)
    failed = sum(t.ok is False for t in targets)
    lines += ["", f"{passed} passed, {failed} failed, {len(targets) - passed - failed} n/a.", ""]
    return lines


def workload_peaks(w: Workload) -> dict[str, Any]:
    """(child process) Peak of one call of each method, after a warm-up call."""
    peaks: dict[str, Any] = {}
    for m in w.methods:
        try:
            seconds, _ = timed(m.run)  # warm-up (torchcurv's probe)
            peaks[m.name] = median_peak(m.run, 1 if seconds > 0.5 else 3)
        except Exception as error:  # reported as a missing peak
            peaks[m.name] = None
            log(f"{m.name}: {type(error).__name__}: {error}")
    return peaks


def workload_section(
    w: Workload, s: Settings, peaks: dict[str, Any]
) -> tuple[list[str], list[Target]]:
    rows, scale = run_workload(w, s)
    for row in rows:
        row.peak = peaks.get(row.method.name)
    lines = workload_table(w, rows, scale)
    if "error" in peaks:
        lines.insert(-1, f"Peak memory: the measuring child process failed: {peaks['error']}")
    return lines, workload_targets(w, rows, scale)


QUIET = 0.25  # a workload counts as disturbed when others keep this share of the cores busy


def wait_for_quiet(limit: float) -> None:
    """Wait (up to `limit` seconds) for a 1-second window in which others are nearly idle."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        meter = CpuMeter()
        time.sleep(1.0)
        others = meter.others()
        if others is None or others <= QUIET * usable_cores():
            return


def run_job(
    job: Callable[[], tuple[list[str], list[Target]]], retries: int, deadline: float
) -> tuple[list[str], list[Target], str]:
    """Run `job`; rerun it while other processes disturbed it; keep the least disturbed.

    No retry starts that would, at the pace of the last attempt, end after `deadline` (a
    `time.perf_counter` value), to bound the run time.
    """
    best: tuple[float, list[str], list[Target]] | None = None
    attempts = 0
    took = 0.0
    for attempt in range(1 + retries):
        if attempt:
            if time.perf_counter() + took + 15.0 > deadline:
                break
            release_memory()
            wait_for_quiet(15.0)
        attempts += 1
        meter = CpuMeter()
        t0 = time.perf_counter()
        lines, targets = job()
        took = time.perf_counter() - t0
        others = meter.others()
        if others is None:
            return lines, targets, fmt_others(None)
        if best is None or others < best[0]:
            best = (others, lines, targets)
        if others <= QUIET * usable_cores():
            break
        log(f"    other processes kept {others:.2f} cores busy during attempt {attempts}")
    assert best is not None
    note = fmt_others(best[0])
    if attempts > 1:
        note += f" (the least disturbed of {attempts} attempts)"
    return best[1], best[2], note


def global_warmup() -> None:
    """Pay process-wide one-time costs before timing anything (torch's set-up through
    `torchcurv.initialize`, as the docs advise before budgeted calls)."""
    if hasattr(torchcurv, "initialize"):
        torchcurv.initialize()
    seeded(0)
    model = mlp([3, 4, 1]).requires_grad_(False)
    X = torch.randn(2, 3)

    def f(x: Tensor) -> Tensor:
        return model(x.unsqueeze(0))[0, 0]

    torchcurv.per_sample_hessian(model, X, output=0)
    torch.vmap(torch.func.hessian(f))(X)
    torch.autograd.functional.hessian(f, X[0], vectorize=True)
    torchcurv.reference.hessian(f)(X[0])
    measure_peak(lambda: None)


def selected(name: str, only: list[str] | None) -> bool:
    if not only:
        return True
    return any(token == name or name in GROUPS.get(token, ()) for token in only)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="torchcurv benchmarks: per-sample Hessians vs torch.func / autograd."
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer repeats and smaller loop subsets (< 3 min)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        choices=[*WORKLOAD_NAMES, *GROUPS, *SECTIONS],
        help="run only this workload, group or section (repeatable): "
        f"{', '.join([*WORKLOAD_NAMES, *GROUPS, *SECTIONS])}",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=HERE / "results.md",
        help="markdown report (default: benchmarks/results.md)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        help="rerun a workload up to N times when other processes kept the machine busy "
        "while it ran, and report the least disturbed attempt (default: 1, 0 with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) (default: leave torch's default; 1 gives steadier "
        "times on a shared machine)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: peaks of one section
    args = parser.parse_args(argv)  # fmt: skip

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        return child_main(args.child, args.quick)
    if args.retries is None:
        args.retries = 0 if args.quick else 1
    if args.quick:
        s = Settings(repeats=15, min_repeats=3, seconds_per_method=1.0, slow_seconds=1.0,
                     slow_repeats=0, quick=True)  # fmt: skip
    else:
        s = Settings(repeats=51, min_repeats=5, seconds_per_method=4.0, slow_seconds=3.0,
                     slow_repeats=1, quick=False)  # fmt: skip
    start, start_load = time.perf_counter(), load()
    whole_run = CpuMeter()
    retry_deadline = start + (150.0 if args.quick else 480.0)  # keeps the run within limits
    global_warmup()
    body: list[str] = ["## Workloads", ""]
    targets: list[Target] = []
    Job = Callable[[dict[str, Any]], tuple[list[str], list[Target]]]
    jobs: list[tuple[str, str, Job]] = [
        (name, "workload", lambda peaks, build=build: workload_section(build(), s, peaks))
        for name, build in zip(WORKLOAD_NAMES, all_workloads(args.quick), strict=True)
    ]
    jobs += [("sweep", "section", lambda peaks: chunk_sweep(s, peaks)),
             ("budget", "section", lambda peaks: budget_check(s, peaks)),
             ("overhead", "section", lambda peaks: overhead_check(s, peaks))]  # fmt: skip
    peak_notes = []
    for name, kind, job in jobs:
        if not selected(name, args.only):
            continue
        log(f"[{time.perf_counter() - start:6.1f}s] {name}: peaks (child process) ...")
        peaks = spawn_peaks(name, args.quick)
        if "error" in peaks:
            peak_notes.append(f"{name}: {peaks['error']}")
        log(f"[{time.perf_counter() - start:6.1f}s] {name}: times ...")
        try:
            lines, more, note = run_job(lambda job=job, peaks=peaks: job(peaks), args.retries,
                                        retry_deadline)  # fmt: skip
            body += [*lines, f"While this {kind} ran, {note}.", ""]
            targets += more
        except Exception as error:  # reported, the run goes on
            log(traceback.format_exc())
            body += [f"### {name}", "", f"ERROR: {type(error).__name__}: {error}", ""]
            targets.append(Target("ran without error", name, "error", "", False))
        release_memory()
    elapsed = time.perf_counter() - start
    others = whole_run.others()
    footer = [f"Total run time {elapsed:.0f} s; load average at the end: {load()}.", ""]
    peak_note = "; ".join(peak_notes) or "none"
    head = header(s, peak_note, start_load, busy_during(others), args.threads is not None)
    text = "\n".join([*head, *targets_table(targets), *body, *footer])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    log(f"wrote {args.out} in {elapsed:.0f} s")
    failed = any(t.ok is False for t in targets)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
