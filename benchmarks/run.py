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

Writes a markdown report (default ``benchmarks/results.md``) and exits 0 even when a
target fails, unless ``--strict`` is given.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import itertools
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
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
    if not PEAK_OK:
        return None, fn()
    release_memory()
    _reset_hwm()
    before = _status_kib()["VmRSS"]
    result = fn()
    peak = _status_kib()["VmHWM"] - before
    return peak * 1024, result


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


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
    agf_k = {8: 32, 32: 16, 128: 4}[n] if quick else {8: 128, 32: 64, 128: 16}[n]
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
        model, X, 2, loop_k=1, agf_k=2 if quick else 8,
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
        loop_k=10 if quick else 50, agf_k=10 if quick else 50, n_outputs=3,
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
SECTIONS = ["sweep", "budget"]


# --------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------


@dataclass
class Settings:
    repeats: int  # most timed repeats per method
    min_repeats: int
    seconds_per_method: float  # fewer repeats (down to min_repeats) for slow methods
    quick: bool


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
    """Time every method of `w` (interleaved), measure its peak and check its result."""
    rows = [Row(m, w.batch) for m in w.methods]
    outputs: dict[str, Tensor] = {}
    for row in rows:  # first call: includes per-model/shape one-time costs
        result = None
        try:
            row.first, result = timed(row.method.run)
            outputs[row.method.name] = row.method.as_tensor(result).detach()
            row.first *= row.scale
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
    for row in active:  # warm-up call, also sizes the number of repeats
        warm, _ = timed(row.method.run)
        counts[id(row)] = max(s.min_repeats,
                              min(s.repeats, int(s.seconds_per_method / max(warm, 1e-9))))
    for r in range(s.repeats):  # interleaved, so that disturbances hit all methods alike
        for row in active:
            if r < counts[id(row)]:
                row.times.append(timed(row.method.run)[0])
    for row in active:
        row.peak, _ = measure_peak(row.method.run)
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

    def ratio(a: str, b: str) -> float | None:
        ra, rb = by_name.get(a), by_name.get(b)
        if ra is None or rb is None or ra.error or rb.error:
            return None
        return ra.median / rb.median

    targets = []
    if w.name != "cnn":
        r = ratio("torchcurv", "vmap(hessian)")
        targets.append(Target("overhead: torchcurv / vmap(hessian)", w.name, fmt_ratio(r),
                              "<= 1.05x", None if r is None else r <= 1.05))  # fmt: skip
        r = ratio("loop", "torchcurv")
        targets.append(Target("speed-up over the loop: loop / torchcurv", w.name,
                              fmt_ratio(r), ">= 20x", None if r is None else r >= 20))  # fmt: skip
    else:
        r = ratio("autograd.functional", "torchcurv")
        targets.append(Target("speed-up: autograd.functional / torchcurv", w.name,
                              fmt_ratio(r), ">= 2x", None if r is None else r >= 2))  # fmt: skip
    worst = max((row.diff for row in rows if row.error is None), default=math.nan)
    errors = [row.method.name for row in rows if row.error is not None]
    rel = worst / scale if scale > 0 else worst
    targets.append(Target(
        "agreement: every method's max abs diff vs torchcurv <= 1e-4 x max|H|", w.name,
        f"{rel:.1e} x max abs H" + (f"; errors: {', '.join(errors)}" if errors else ""),
        "<= 1e-4", not errors and rel <= 1e-4,
    ))  # fmt: skip
    return targets


def chunk_sweep(s: Settings) -> tuple[list[str], list[Target]]:
    """Workload 2 with explicit (batch, inner, outer) chunk sizes."""
    model, X = cnn_data()
    model.requires_grad_(False)
    configs: list[Any] = ["auto", None, (8, 1, 784), (8, 1, 196), (8, 1, 64), (8, 1, 16),
                          (1, 1, 784), (1, 1, 64)]  # fmt: skip
    repeats = 2 if s.quick else 3

    def call(cfg: Any) -> Callable[[], Tensor]:
        return lambda: torchcurv.per_sample_hessian(model, X, output=2, chunk_size=cfg)

    reference = call(None)()
    results = []
    for cfg in configs:
        fn = call(cfg)
        first, H = timed(fn)
        diff = float((H - reference).abs().max())
        del H
        times = [timed(fn)[0] for _ in range(repeats)]
        peak, _ = measure_peak(fn)
        results.append((cfg, first, statistics.median(times), peak, diff))
    base = next(r for r in results if r[0] is None)
    lines = [
        "### Chunk-size sweep (workload 2, the CNN)", "",
        "`per_sample_hessian(model, X, output=2, chunk_size=c)` with `c = (batch, inner, "
        "outer)`: samples per vmap call, rows of the inner (reverse) Jacobian and columns of "
        "the outer (forward) Jacobian per call. The input has 784 entries and the output 1, "
        f"so `(8, 1, 784)` is one unchunked call. Median of {repeats} repeats.", "",
        "| chunk_size | median [ms] | first call [ms] | peak RSS [MiB] | time / unchunked "
        "| peak / unchunked | max abs diff vs unchunked |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]  # fmt: skip
    for cfg, first, med, peak, diff in results:
        peak_ratio = (f"{peak / base[3]:.2f}" if peak is not None and base[3] else "n/a")
        lines.append(f"| `{cfg!r}` | {fmt_ms(med)} | {fmt_ms(first)} | {fmt_mib(peak)} "
                     f"| {fmt_ratio(med / base[2])} | {peak_ratio} | {diff:.1e} |")  # fmt: skip
    lines.append("")
    return lines, []


def planner_diagnostic(model: nn.Module, X: Tensor, budget: int) -> str:
    """The planner's chunks for `budget` (private API; diagnostics only)."""
    try:
        from torchcurv import _modules, _planning

        probes = list(_modules._PROBES.get(model, {}).values())
        if not probes:
            return "no probe cached"
        work, m = probes[-1]
        n = X[0].numel()
        plan = _planning.plan_chunks("per_sample_hessian", batch=X.shape[0], axes=(m, n),
                                     result_bytes=m * n * n * X.element_size(),
                                     work_bytes=work, budget=budget)  # fmt: skip
        return (f"probe W={work / MiB:.2f} MiB per HVP; plan (batch, inner, outer) = "
                f"({plan.batch}, {', '.join(map(str, plan.axes))}), predicted peak "
                f"{plan.predicted_peak / MiB:.1f} MiB")
    except Exception as error:  # diagnostics only
        return f"plan unavailable ({type(error).__name__}: {error})"


def budget_check(s: Settings) -> tuple[list[str], list[Target]]:
    """memory_budget = half the unchunked peak: measured peak and time vs unchunked."""
    cases = []
    seeded(1)
    widths, B = MLP_SIZES[-1]
    cases.append((f"mlp-{'-'.join(map(str, widths))}", mlp(widths), torch.randn(B, widths[0]),
                  0))  # fmt: skip
    model, X = cnn_data()
    cases.append(("cnn", model, X, 2))
    repeats = 3 if s.quick else 5
    lines = [
        "### Memory budget (half the unchunked peak)", "",
        "`P` = peak of `per_sample_hessian(..., chunk_size=None)` (median of 3 measurements); "
        "then `memory_budget=P // 2` (with the default `chunk_size='auto'`). The budgeted "
        "peak is the largest of 3 measurements. Times are medians of "
        f"{repeats} interleaved repeats after warm-up.", "",
        "| workload | unchunked peak P [MiB] | budget [MiB] | budgeted peak [MiB] "
        "| peak / budget | within budget (+10%) | unchunked [ms] | budgeted [ms] "
        "| time ratio | max abs diff | planner (diagnostic) |",
        "|---|--:|--:|--:|--:|---|--:|--:|--:|--:|---|",
    ]  # fmt: skip
    targets = []
    for name, model, X, output in cases:
        model.requires_grad_(False)

        def unchunked(model: nn.Module = model, X: Tensor = X, output: int = output) -> Tensor:
            return torchcurv.per_sample_hessian(model, X, output=output, chunk_size=None)

        reference = unchunked()
        peaks = [measure_peak(unchunked)[0] for _ in range(3)]
        if any(p is None for p in peaks):
            lines.append(f"| {name} | n/a (peak RSS not measurable here) | | | | | | | | | |")
            continue
        P = int(statistics.median(peaks))  # type: ignore[type-var]
        budget = P // 2

        def budgeted(model: nn.Module = model, X: Tensor = X, output: int = output,
                     budget: int = budget) -> Tensor:  # fmt: skip
            return torchcurv.per_sample_hessian(model, X, output=output, memory_budget=budget)

        try:
            H = budgeted()  # first call: the probe
        except torchcurv.MemoryBudgetError as error:
            lines.append(f"| {name} | {fmt_mib(P)} | {fmt_mib(budget)} | raised "
                         f"MemoryBudgetError: {error} | | | | | | | |")  # fmt: skip
            targets.append(Target("memory budget: peak <= budget + 10%", name, "raised", "",
                                  False))  # fmt: skip
            continue
        diff = float((H - reference).abs().max())
        del H, reference
        got = [measure_peak(budgeted)[0] for _ in range(3)]
        peak = max(p for p in got if p is not None)
        t_un, t_bu = [], []
        timed(unchunked)
        for _ in range(repeats):
            t_un.append(timed(unchunked)[0])
            t_bu.append(timed(budgeted)[0])
        ratio = statistics.median(t_bu) / statistics.median(t_un)
        within = peak <= 1.1 * budget
        lines.append(
            f"| {name} | {fmt_mib(P)} | {fmt_mib(budget)} | {fmt_mib(peak)} "
            f"| {peak / budget:.2f} | {passfail(within)} | {fmt_ms(statistics.median(t_un))} "
            f"| {fmt_ms(statistics.median(t_bu))} | {fmt_ratio(ratio)} | {diff:.1e} "
            f"| {planner_diagnostic(model, X, budget)} |"
        )
        targets.append(Target("memory budget: measured peak <= budget + 10%", name,
                              f"{peak / MiB:.1f} MiB of {budget / MiB:.1f} MiB "
                              f"({peak / budget:.2f}x)", "<= 1.10x", within))  # fmt: skip
        targets.append(Target("memory budget: time / unchunked time", name, fmt_ratio(ratio),
                              "<= 1.5x", ratio <= 1.5))  # fmt: skip
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


def header(s: Settings, peak_note: str, start_load: str) -> list[str]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 0
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "# torchcurv benchmarks", "",
        f"Generated by `python benchmarks/run.py{' --quick' if s.quick else ''}` on {now}.", "",
        "## Machine", "",
        f"- CPU: {cpu_model()}, {cores} cores usable ({os.cpu_count()} online)",
        f"- torch {torch.__version__}, {torch.get_num_threads()} intra-op threads "
        f"(default), {torch.get_num_interop_threads()} inter-op threads; "
        f"torchcurv {torchcurv.__version__}; Python {platform.python_version()}; "
        f"{platform.system()} {platform.release()}",
        f"- load average (1/5/15 min) at start: {start_load}; the machine may be shared, "
        "so absolute times are noisy. Methods are interleaved repeat by repeat, so ratios are "
        "more stable than times.",
        f"- malloc environment: {malloc_env or 'glibc defaults (no MALLOC_* variables)'}",
        "",
        "## Method", "",
        "- **Time**: `time.perf_counter` around one call; median (and min) over repeats "
        f"(at most {s.repeats}, at least {s.min_repeats}; fewer for slow methods) after a "
        "warm-up call, repeats interleaved across methods. Float32, fixed seeds, models in "
        "eval mode; for input Hessians the parameters have `requires_grad=False`, so no "
        "method records a graph towards them.",
        "- **First call**: the first call on this model and shape, before the warm-up. For "
        "torchcurv it includes the memory probe (one HVP under an allocation counter) that "
        "is cached per model and shape. Process-wide one-time costs (torch's lazy "
        "initialisation of forward-mode AD and vmap) were paid by a global warm-up on a tiny "
        "model before the first workload.",
        "- **Slow loops**: the loop methods may be timed on the first `k` samples; their "
        "times are multiplied by `B / k` (linear extrapolation; marked in the table), their "
        "peak RSS is that of the `k`-sample call.",
        f"- **Peak RSS**: additional peak resident memory of one call: `gc.collect()` and "
        "glibc `malloc_trim(0)` (so memory freed earlier but kept by malloc is returned to "
        "the OS and must be faulted in again), then write `5` to `/proc/self/clear_refs` "
        "(resets `VmHWM`), read `VmRSS`, call, read `VmHWM`; peak = `VmHWM - VmRSS`. It "
        "includes the result. Measured once per method after the timed repeats "
        f"(steady state, probes cached). Check on this machine: {peak_note}.",
        "- **Agreement**: each method's result is compared with torchcurv's on the samples "
        "it computed (max abs difference).",
        "",
    ]  # fmt: skip


def targets_table(targets: list[Target]) -> list[str]:
    lines = [
        "## Targets", "",
        "Computed, not asserted (`--strict` makes a failure exit 1). Ratios are of median "
        "times.", "",
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


def global_warmup() -> None:
    """Pay process-wide one-time costs before timing anything."""
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
        description="torchcurv benchmarks: per-sample Hessians vs torch.func / autograd.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats and smaller loop subsets (< 3 min)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        choices=[*WORKLOAD_NAMES, *GROUPS, *SECTIONS],
                        help="run only this workload, group or section (repeatable): "
                        f"{', '.join([*WORKLOAD_NAMES, *GROUPS, *SECTIONS])}")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results.md",
                        help="markdown report (default: benchmarks/results.md)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target fails")
    args = parser.parse_args(argv)  # fmt: skip

    global PEAK_OK
    PEAK_OK, peak_note = peak_rss_supported()
    if not PEAK_OK:
        peak_note = f"NOT supported ({peak_note}); peaks are reported as n/a"
    s = (Settings(repeats=3, min_repeats=3, seconds_per_method=2.0, quick=True) if args.quick
         else Settings(repeats=9, min_repeats=3, seconds_per_method=6.0, quick=False))  # fmt: skip
    start, start_load = time.perf_counter(), load()
    global_warmup()
    body: list[str] = ["## Workloads", ""]
    targets: list[Target] = []
    for name, build in zip(WORKLOAD_NAMES, all_workloads(args.quick), strict=True):
        if not selected(name, args.only):
            continue
        log(f"[{time.perf_counter() - start:6.1f}s] {name} ...")
        try:
            w = build()
            rows, scale = run_workload(w, s)
            body += workload_table(w, rows, scale)
            targets += workload_targets(w, rows, scale)
            del w, rows
        except Exception as error:  # reported, the run goes on
            log(traceback.format_exc())
            body += [f"### {name}", "", f"ERROR: {type(error).__name__}: {error}", ""]
            targets.append(Target("ran without error", name, "error", "", False))
        release_memory()
    for section, fn in (("sweep", chunk_sweep), ("budget", budget_check)):
        if not selected(section, args.only):
            continue
        log(f"[{time.perf_counter() - start:6.1f}s] {section} ...")
        try:
            lines, more = fn(s)
            body += lines
            targets += more
        except Exception as error:  # reported, the run goes on
            log(traceback.format_exc())
            body += [f"### {section}", "", f"ERROR: {type(error).__name__}: {error}", ""]
            targets.append(Target("ran without error", section, "error", "", False))
        release_memory()
    elapsed = time.perf_counter() - start
    footer = [f"Total run time {elapsed:.0f} s; load average at the end: {load()}.", ""]
    text = "\n".join([*header(s, peak_note, start_load), *targets_table(targets), *body,
                      *footer])  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    log(f"wrote {args.out} in {elapsed:.0f} s")
    failed = any(t.ok is False for t in targets)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
