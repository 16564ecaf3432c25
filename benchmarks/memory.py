"""Check torchcurv's memory promise, and the planner's speed, one fresh process per workload.

The promise: from the first call of a fresh process on (no warm-up of the same call),
the peak resident memory of the call above the resident memory just before it (``VmHWM``
after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS``) is at most
``1.10 x budget + 16 MiB``, or the call raises `torchcurv.MemoryBudgetError` (and then
allocates no more than that either). Each workload's measured call is the first
torchcurv call on it, after `torchcurv.initialize()` (the documented practice), or, for
the ``first-*`` workloads, after only a tiny default call on another model (the call
then pays torch's one-time set-up within its budget, or refuses a budget too small for
it).

Every workload runs in its own child process (``python benchmarks/memory.py --worker
NAME``) with glibc's default allocator (``MALLOC_*`` variables are removed from the
child's environment). A child prints one JSON line; the parent only collects them (it
never imports torch), reports a child that crashes, is killed (exit status -9: the kernel's
OOM killer) or times out as a failure, and writes a markdown report.

Usage::

    python benchmarks/memory.py [--quick] [--only NAME ...] [--out PATH] [--strict]
                                [--threads N] [--timeout SECONDS] [--list]

``--only`` takes a workload, a group (``cnn16``, ``mlp256-fwd``, ``layernorm``) or a
section (``memory``, ``speed``). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import importlib.util
import itertools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
KiB, MiB, GiB = 2**10, 2**20, 2**30

#: The promise: peak <= SLACK * budget + ALLOWANCE.
SLACK = 1.10
ALLOWANCE = 16 * MiB
#: Workload 2 (default budget, B=128, about 8.9 GB of result) is skipped below this.
DEFAULT_BUDGET_MIN_AVAILABLE = 12 * GiB
#: Time targets.
BUDGET_TIME_TARGET = 1.5  # time at half the unchunked peak / unchunked time, at most
CNN_SPEEDUP_TARGET = 2.0  # raw vmap(hessian) time / torchcurv time, at least
PARAMS_OVERHEAD_TARGET = 1.05  # torchcurv time / raw vmap(hessian) time, at most


# ======================================================================================
# the cases (parent side: names and judging only, no torch)
# ======================================================================================


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    section: str  # "memory" or "speed"
    title: str
    refusal_ok: bool = False  # a MemoryBudgetError counts as PASS
    fallback: str | None = None  # worker to run, in a fresh process, when this one errors
    hidden: bool = False  # run only as another case's fallback
    min_available: int | None = None  # skip when MemAvailable is lower
    extra: bool = False  # not one of the workloads of the brief; marked in the report
    prior: str = "initialize"  # before the measured call: "initialize" or "tiny"


CASES = [
    Case("readme-params", "readme-params", "memory",
         "1. README parameter example: MLP 8-64-64-10 (tanh), cross-entropy, "
         "wrt='params', params='2.*' (P=4160), B=32, budget 3GiB"),
    Case("readme-params-default", "readme-params-default", "memory",
         "2. the same, B=128, default budget (must complete or refuse, never be killed)",
         refusal_ok=True, min_available=DEFAULT_BUDGET_MIN_AVAILABLE),
    Case("cnn16-48MiB", "cnn16", "memory",
         "3. CNN on 1x16x16 (Conv-Tanh-Pool-Conv-Tanh-Flatten-Linear(400,10)), output=2, "
         "input Hessian, B=16, budget 48MiB"),
    Case("cnn16-128MiB", "cnn16", "memory", "3. the same CNN, budget 128MiB"),
    Case("mlp256-fwd-B128", "mlp256-fwd", "memory",
         "4. MLP 256-64-1 (tanh), input Hessian, mode='fwd-over-rev', B=128, budget 96MiB"),
    Case("mlp256-fwd-B512", "mlp256-fwd", "memory",
         "4. the same MLP, mode='fwd-over-rev', B=512, budget 256MiB"),
    Case("mlp256-structured", "mlp256-structured", "memory",
         "5. MLP 256-64-1 (tanh), input Hessian, mode='structured', B=128, budget 96MiB"),
    Case("per-sample-fn", "per-sample-fn", "memory",
         "6. per_sample(hessian(f), memory_budget='64MiB'), f a tanh MLP 128-64-1 of one "
         "sample, B=256"),
    Case("transformer", "transformer", "memory",
         "7. TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32), inputs "
         "[B, 6, 16], output=out.sum(), input Hessian, B=16, budget 32MiB, mode='auto'",
         fallback="transformer-rev"),
    Case("transformer-rev", "transformer", "memory",
         "7. the same transformer block, mode='rev-over-rev' (the 'auto' call failed)",
         hidden=True, fallback="transformer-math"),
    Case("transformer-math", "transformer", "memory",
         "7. the same transformer block, mode='auto', inside "
         "torch.nn.attention.sdpa_kernel(SDPBackend.MATH) (extra: both calls above failed)",
         hidden=True, extra=True),
    Case("layernorm-64MiB", "layernorm", "memory",
         "8. Linear(16,32)-LayerNorm(32)-GELU-Linear(32,10), cross-entropy, wrt='params' "
         "(P=938), B=32, budget 64MiB"),
    Case("layernorm-256MiB", "layernorm", "memory",
         "8. the same LayerNorm model, budget 256MiB (extra: the result alone, 107 MiB, "
         "does not fit 64MiB)", extra=True),
    Case("seed-cnn-half", "seed-cnn-half", "memory",
         "9. seed CNN (MNIST-shaped, 1x28x28), output=2, input Hessian, B=8, budget = half "
         "the unchunked peak measured in the same process"),
    Case("first-cnn16-48MiB", "first", "memory",
         "10. as 3 (48MiB), after only a tiny default call on another model: torch's "
         "one-time set-up is not paid, and does not fit: a refusal passes",
         refusal_ok=True, prior="tiny"),
    Case("first-cnn16-128MiB", "first", "memory",
         "10. as 3 (128MiB), after only a tiny default call on another model (below "
         "torch's set-up bound, 144 MiB: a refusal passes)", refusal_ok=True, prior="tiny"),
    Case("first-mlp256-fwd-B128", "first", "memory",
         "10. as 4 (B=128, 96MiB), after only a tiny default call on another model (a "
         "refusal for torch's set-up passes)", refusal_ok=True, prior="tiny"),
    Case("first-mlp256-fwd-B128-160MiB", "first", "memory",
         "10. as 4 (B=128) with 160MiB, after only a tiny default call on another model",
         prior="tiny"),
    Case("first-per-sample-fn", "first", "memory",
         "10. as 6 (64MiB), after only a tiny default call on another model (a refusal "
         "for torch's set-up passes)", refusal_ok=True, prior="tiny"),
    Case("speed-mlp-budget", "speed", "speed",
         "MLP 128-256-256-1 (tanh), input Hessian, output=0, B=16: budget = half the "
         "unchunked peak vs chunk_size=None"),
    Case("speed-cnn-budget", "speed", "speed",
         "seed CNN, output=2, B=8: budget = half the unchunked peak vs chunk_size=None"),
    Case("speed-cnn-raw", "speed", "speed",
         "seed CNN, output=2, B=8: torchcurv default call vs raw "
         "vmap(torch.func.hessian(f))"),
    Case("speed-params-raw", "speed", "speed",
         "MLP 16-32-10 (tanh), cross-entropy, per-sample parameter Hessian (P=874), B=64: "
         "torchcurv vs raw vmap(hessian) over functional_call"),
]  # fmt: skip
CASE_BY_NAME = {case.name: case for case in CASES}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return None


def child_env() -> tuple[dict[str, str], list[str]]:
    """The environment for a child: ours, without malloc tuning (glibc's defaults)."""
    removed = sorted(k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES")
    return {k: v for k, v in os.environ.items() if k not in removed}, removed


def run_worker(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Run `case` in a fresh child process; its JSON line, or why there is none."""
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", case.name]
    if args.quick:
        command.append("--quick")
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env, _ = child_env()
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout
        partial = _last_json(out or "")
        partial.pop("partial", None)
        stage = _stage(partial)
        partial["crash"] = f"timed out after {args.timeout:.0f} s (killed){stage}"
        partial["wall"] = time.perf_counter() - start
        return partial
    wall = time.perf_counter() - start
    result = _last_json(done.stdout)
    if result and not result.get("partial"):
        result.update(returncode=done.returncode, wall=wall)
        return result
    result.pop("partial", None)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
    why = f"exit status {done.returncode}"
    if done.returncode == -9:
        why += " (SIGKILL: killed, most likely by the kernel's OOM killer)"
    elif done.returncode < 0:
        why += f" (signal {-done.returncode})"
    result.update(crash=f"{why}{_stage(result)}: {tail}", returncode=done.returncode, wall=wall)
    return result


def _last_json(stdout: str) -> dict[str, Any]:
    """The last JSON object line of a worker's output (a partial one if it died), or {}."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict):
            return result
    return {}


def _stage(partial: dict[str, Any]) -> str:
    """Where a worker that died had got to, from its partial line."""
    stage = partial.pop("stage", None)
    return f" during {stage}" if stage else ""


def judge_memory(case: Case, r: dict[str, Any]) -> tuple[str, str]:
    """``(status, reason)`` for a memory case."""
    if "skip" in r:
        return "SKIP", r["skip"]
    if "crash" in r:
        return "FAIL", r["crash"]
    outcome, peak, budget = r.get("outcome"), r.get("peak"), r.get("budget")
    if outcome == "error":
        return "FAIL", f"the call raised {r.get('message', '')}"
    if budget is None:
        return "n/a", "no budget known (torchcurv.explain unavailable)"
    if peak is None:
        return "n/a", f"peak not measurable: {r.get('peak_note')}"
    bound = SLACK * budget + ALLOWANCE
    if peak > bound:
        verb = "refused, but its peak" if outcome == "refused" else "peak"
        return "FAIL", f"{verb} {fmt_bytes(peak)} > bound {fmt_bytes(bound)}"
    if outcome == "refused":
        needed = r.get("expected_result_bytes")
        if case.refusal_ok:
            return "PASS", "refused with MemoryBudgetError (allowed for this workload)"
        if needed is not None and needed > budget:
            return "PASS", (
                f"refused with MemoryBudgetError: the result alone "
                f"({fmt_bytes(needed)}) exceeds the budget"
            )
        return "REFUSED", (
            f"MemoryBudgetError although the result ({fmt_bytes(needed)}) fits the budget"
        )
    return "PASS", "within the bound"


def judge_speed(r: dict[str, Any]) -> tuple[str, str]:
    if "skip" in r:
        return "SKIP", r["skip"]
    if "crash" in r:
        return "FAIL", r["crash"]
    if r.get("error"):
        return "FAIL", r["error"]
    ratio, threshold, better = r["ratio"], r["threshold"], r["better"]
    ok = ratio <= threshold if better == "lower" else ratio >= threshold
    return ("PASS" if ok else "FAIL"), ""


def load_note(r: dict[str, Any]) -> str:
    busy = r.get("others_busy")
    if busy is None:
        return ""
    note = f"other processes kept {busy:.2f} of {r.get('cores', '?')} cores busy"
    if busy > 0.25:
        note += " (disturbed: do not trust this time ratio)"
    return note


def git_state() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    state = head.stdout.strip()
    return state + (" with uncommitted changes" if dirty.stdout.strip() else "")


def one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def report(
    cases: list[Case],
    results: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    started: datetime.datetime,
    available: int | None,
) -> tuple[str, int]:
    """The markdown report and the number of failures."""
    any_result = next((r for r in results.values() if "torch" in r), {})
    threads = sorted({r["threads"] for r in results.values() if "threads" in r})
    speed_threads = "torch's default" + (f" ({', '.join(map(str, threads))})" if threads else "")
    if args.threads is not None:
        speed_threads = str(args.threads)
    _, removed = child_env()
    argv = " ".join(sys.argv[1:])
    lines = [
        "# torchcurv memory promise and planner speed",
        "",
        f"Generated by `python benchmarks/memory.py {argv}` on {started:%Y-%m-%d %H:%M} UTC.",
        "",
        "## Machine",
        "",
        f"- {os.cpu_count()} cores online; load average at start "
        f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}; MemAvailable at start "
        f"{fmt_bytes(available)}",
        f"- torch {any_result.get('torch', '?')}, torchcurv {any_result.get('torchcurv', '?')} "
        f"({any_result.get('torchcurv_path', '?')}), git {git_state()}, Python "
        f"{platform.python_version()}, {platform.system()} {platform.release()}",
        "- allocator: glibc defaults in every child"
        + (
            f" (removed from the children's environment: {', '.join(removed)})"
            if removed
            else " (no MALLOC_* variables)"
        ),
        f"- threads: memory workloads {any_result.get('memory_threads', '?')} "
        f"(`--threads`), speed comparisons {speed_threads}",
        "",
    ]
    failures = 0
    counts: dict[str, int] = {}
    memory = [c for c in cases if c.section == "memory" and c.name in results]
    if memory:
        lines += [
            "## Memory promise",
            "",
            "Each row is a fresh process: build the model (float32, fixed seed, eval mode), "
            "`torchcurv.initialize()` (the `first-*` rows: only a tiny default call on "
            "another model instead), then `gc.collect()`, glibc's `malloc_trim(0)`, write "
            "`5` to `/proc/self/clear_refs` (resets `VmHWM`), read `VmRSS`, the measured "
            "call (the first torchcurv call on this workload: no warm-up, the planner's "
            "measurements included), read `VmHWM`; then `torchcurv.explain` for the "
            "decision below. Peak = `VmHWM - VmRSS`; it includes the result. Bound = 1.10 x "
            "budget + 16 MiB. A "
            "`MemoryBudgetError` passes where the workload allows it or where the result "
            "alone exceeds the budget; otherwise it is reported as REFUSED (the promise is "
            "kept, but the planner gave up on a budget the result fits). Time: the "
            "measured call.",
            "",
            "| workload | budget | measured peak | peak / budget | bound | result | "
            "time [s] | outcome |",
            "|---|--:|--:|--:|--:|---|--:|---|",
        ]
        details = []
        for case in memory:
            r = results[case.name]
            status, why = judge_memory(case, r)
            counts[status] = counts.get(status, 0) + 1
            failures += status == "FAIL"
            budget, peak = r.get("budget"), r.get("peak")
            ratio = f"{peak / budget:.2f}" if budget and peak is not None else "n/a"
            bound = fmt_bytes(SLACK * budget + ALLOWANCE) if budget else "n/a"
            outcome = r.get("outcome", "crash" if "crash" in r else "skip")
            name = case.name + (" (extra)" if case.extra else "")
            lines.append(
                f"| {name} | {fmt_bytes(budget)} | {fmt_bytes(peak)} | {ratio} | {bound} | "
                f"**{status}** | {fmt_seconds(r.get('seconds'))} | {outcome} |"
            )
            details += [f"- **{case.name}**: {case.title}."]
            details.append(f"  - result: {status}: {one_line(why)}")
            if r.get("budget_source"):
                details.append(f"  - budget: {r['budget_source']}")
            if r.get("decision"):
                details.append(f"  - decision: `{one_line(r['decision'])}`")
            if r.get("result_summary"):
                details.append(f"  - result tensors: {r['result_summary']}")
            if r.get("message") and outcome != "error":
                details.append(f"  - message: {one_line(r['message'])[:600]}")
            for note in r.get("notes", []):
                details.append(f"  - {one_line(note)}")
            if r.get("prior") is not None:
                details.append(
                    f"  - before the measured call: {r['prior']} "
                    f"({fmt_seconds(r.get('prior_seconds'))} s, "
                    f"{fmt_bytes(r.get('prior_bytes'))} resident added); RSS before the "
                    f"measured call {fmt_bytes(r.get('rss_before'))}; worker wall time "
                    f"{fmt_seconds(r.get('wall'))} s"
                )
        lines += ["", "### Decisions and notes", "", *details, ""]
    speed = [c for c in cases if c.section == "speed" and c.name in results]
    if speed:
        lines += [
            "## Speed",
            "",
            "One process per comparison, torch's default thread count; parameters frozen "
            "for input Hessians. Each method: a warm-up call, then timed repeats "
            "interleaved across methods (the order rotates every round); median (and "
            "minimum) of `time.perf_counter` around one call. Targets are judged on the "
            "ratio of medians.",
            "",
            "| comparison | A | median A [ms] | B | median B [ms] | ratio | of medians | "
            "of minimums | target | result | repeats |",
            "|---|---|--:|---|--:|---|--:|--:|--:|---|--:|",
        ]
        details = []
        for case in speed:
            r = results[case.name]
            status, why = judge_speed(r)
            counts[status] = counts.get(status, 0) + 1
            failures += status == "FAIL"
            if "ratio" in r:
                a, b = r["a"], r["b"]
                op = "<=" if r["better"] == "lower" else ">="
                lines.append(
                    f"| {case.name} | {a['name']} | {a['median'] * 1e3:.1f} | {b['name']} | "
                    f"{b['median'] * 1e3:.1f} | {r['ratio_is']} | {r['ratio']:.2f}x | "
                    f"{r['ratio_min']:.2f}x | "
                    f"{op} {r['threshold']}x | **{status}** | {r['repeats']} |"
                )
            else:
                lines.append(f"| {case.name} | | | | | | | | | **{status}** | |")
            details.append(f"- **{case.name}**: {case.title}.")
            if why:
                details.append(f"  - {one_line(why)}")
            for note in r.get("notes", []):
                details.append(f"  - {one_line(note)}")
            if note := load_note(r):
                details.append(f"  - {note}")
        lines += ["", "### Notes", "", *details, ""]
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines += ["## Summary", "", f"{summary or 'nothing ran'}.", ""]
    return "\n".join(lines), failures


def select(only: list[str] | None) -> list[Case]:
    visible = [c for c in CASES if not c.hidden]
    if not only:
        return visible
    known = {c.name for c in visible} | {c.group for c in visible} | {"memory", "speed"}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise SystemExit(f"unknown --only {unknown}; known: {sorted(known)}")
    return [c for c in visible if {c.name, c.group, c.section} & set(only)]


def parent_main(args: argparse.Namespace) -> int:
    cases = select(args.only)
    started = datetime.datetime.now(datetime.timezone.utc)
    available = mem_available()
    results: dict[str, dict[str, Any]] = {}
    ran: list[Case] = []
    for case in cases:
        print(f"[memory.py] {case.name} ...", file=sys.stderr, flush=True)
        if case.min_available is not None:
            now = mem_available()
            if now is not None and now < case.min_available:
                results[case.name] = {
                    "skip": f"MemAvailable {fmt_bytes(now)} < {fmt_bytes(case.min_available)}"
                    " (other processes on this machine)"
                }
                ran.append(case)
                continue
        result = run_worker(case, args)
        results[case.name] = result
        ran.append(case)
        while case.fallback and ("crash" in result or result.get("outcome") == "error"):
            case = CASE_BY_NAME[case.fallback]
            print(f"[memory.py] {case.name} (fallback) ...", file=sys.stderr, flush=True)
            result = results[case.name] = run_worker(case, args)
            ran.append(case)
    text, failures = report(ran, results, args, started, available)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"[memory.py] report written to {out}", file=sys.stderr)
    return 1 if args.strict and failures else 0


# ======================================================================================
# workers (child side)
# ======================================================================================

_libc_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_libc_name) if _libc_name else None
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * KiB
    raise KeyError(field)


def _release() -> None:
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _peak_supported() -> tuple[bool, str]:
    """Whether VmHWM can be reset and then follows a fresh 64 MiB allocation."""
    import torch

    try:
        _release()
        _reset_hwm()
        before = _status("VmRSS")
        if _status("VmHWM") > before + MiB:
            return False, "VmHWM was not reset by writing 5 to /proc/self/clear_refs"
        block = torch.ones(64 * MiB // 4)
        grown = _status("VmHWM") - before
        del block
        _release()
        if not 60 * MiB <= grown <= 80 * MiB:
            return False, f"a 64 MiB tensor raised VmHWM by {fmt_bytes(grown)}"
        return True, "ok"
    except (OSError, KeyError, ValueError) as error:
        return False, f"{type(error).__name__}: {error}"


def _budget_bytes(budget: str) -> int:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if budget.endswith(unit):
            return int(float(budget[: -len(unit)]) * size)
    return int(budget)


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 800 else text[:800] + " ..."


def _leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(path, tensor)`` pairs of a result pytree, dict keys sorted."""
    if isinstance(tree, dict):
        return [pair for k in sorted(tree) for pair in _leaves(tree[k], f"{prefix}[{k}]")]
    if isinstance(tree, list | tuple):
        return [pair for i, t in enumerate(tree) for pair in _leaves(t, f"{prefix}[{i}]")]
    return [(prefix, tree)]


def _summary(result: Any) -> tuple[str, int, bool]:
    """A short description of a result, its bytes, and whether it is all finite."""
    import torch

    leaves = [t for _, t in _leaves(result) if isinstance(t, torch.Tensor)]
    nbytes = sum(t.numel() * t.element_size() for t in leaves)
    finite = all(bool(torch.isfinite(t[i]).all()) for t in leaves for i in range(len(t)))
    shapes = ", ".join(str(list(t.shape)) for t in leaves[:3])
    more = f" and {len(leaves) - 3} more" if len(leaves) > 3 else ""
    return f"{len(leaves)} tensor(s) {shapes}{more}, {fmt_bytes(nbytes)}", nbytes, finite


def _max_rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over matching leaves (flattened)."""
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"{len(la)} vs {len(lb)} result tensors")
    diff = scale = 0.0
    for (_, x), (_, y) in zip(la, lb, strict=True):
        diff = max(diff, float((x.reshape(-1) - y.reshape(-1)).abs().max()))
        scale = max(scale, float(y.abs().max()))
    return diff / scale if scale else diff


def _attempt(call: Callable[[], Any], measure: bool) -> dict[str, Any]:
    """One call: outcome, seconds, peak (if measured), message; the result under "value"."""
    import torchcurv

    _release()
    before = None
    if measure:
        _reset_hwm()
        before = _status("VmRSS")
    out: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        out["value"] = call()
        out["outcome"] = "ok"
    except torchcurv.MemoryBudgetError as error:
        out["outcome"], out["message"] = "refused", _error_text(error)
    except Exception as error:
        out["outcome"], out["message"] = "error", _error_text(error)
    out["seconds"] = time.perf_counter() - start
    if measure:
        out["peak"] = _status("VmHWM") - before  # type: ignore[operator]
        out["rss_before"] = before
    return out


def _explain(**options: Any) -> Callable[[Any, Any], Any] | None:
    import torchcurv

    if not hasattr(torchcurv, "explain"):
        return None
    return lambda model, X: torchcurv.explain(torchcurv.per_sample_hessian, model, X, **options)


def _progress(fields: dict[str, Any], stage: str) -> None:
    """A partial JSON line, so that the parent can say where a killed worker had got to."""
    print(json.dumps({**fields, "partial": True, "stage": stage}), flush=True)


def memory_case(
    call: Callable[[], Any],
    *,
    budget: int | None,
    explain: Callable[[], Any] | None,
    expected_result_bytes: int,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The prior step, the measured (first) call, then explain; the JSON fields of a
    memory workload."""
    supported, peak_note = _peak_supported()
    out: dict[str, Any] = {
        "budget": budget,
        "expected_result_bytes": expected_result_bytes,
        "notes": list(notes or []),
    }
    if not supported:
        out["peak_note"] = peak_note
    _progress(out, f"the prior step ({PRIOR['name']})")
    out["prior"] = PRIOR["name"]
    out["prior_seconds"], out["prior_bytes"] = _prior(PRIOR["name"])
    _progress(out, "the measured call")
    measured = _attempt(call, measure=True)
    out["outcome"], out["seconds"] = measured["outcome"], measured["seconds"]
    out["peak"] = measured["peak"] if supported else None
    out["rss_before"] = measured["rss_before"]
    if "message" in measured:
        out["message"] = measured["message"]
    if measured["outcome"] == "ok":
        summary, nbytes, finite = _summary(measured.pop("value"))
        out["result_summary"] = summary + ("" if finite else "; NOT all finite")
        out["result_bytes"] = nbytes
    del measured
    if explain is None:
        out["decision"] = "n/a (torchcurv.explain is not available for this call)"
    else:  # after the measured call: what it decided (cached), and the default budget
        try:
            decision = explain()
            out["decision"] = str(decision)
            if budget is None and getattr(decision, "budget", None) is not None:
                out["budget"] = int(decision.budget)
                out["budget_source"] = "the default, as torchcurv.explain reports it after"
        except Exception as error:
            out["decision"] = f"explain raised {_error_text(error)}"
    if out["budget"] is None:
        out["budget_source"] = "the default (unknown: explain gave none)"
    return out


#: The prior step of this worker's memory workload (set by `worker_main`).
PRIOR = {"name": "initialize"}


def _prior(name: str) -> tuple[float, int | None]:
    """Run the step before the measured call; its seconds and resident bytes added."""
    import torch

    import torchcurv

    start, before = time.perf_counter(), _status("VmRSS")
    if name == "initialize" and hasattr(torchcurv, "initialize"):
        torchcurv.initialize()
    elif name == "tiny":
        state = torch.random.get_rng_state()
        tiny = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        torchcurv.per_sample_hessian(tiny, torch.randn(3, 4))
        torch.random.set_rng_state(state)
    return time.perf_counter() - start, _status("VmRSS") - before


def _mlp(*sizes: int, act: Any = None) -> Any:
    from torch import nn

    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(act() if act is not None else nn.Tanh())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers).eval()


def _seed_cnn(side: int = 28, second_pool: bool = True) -> Any:
    from torch import nn

    after = ((side - 2) // 2 - 2) // (2 if second_pool else 1)
    layers: list[nn.Module] = [
        nn.Conv2d(1, 8, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.Tanh(),
        *([nn.MaxPool2d(2)] if second_pool else []), nn.Flatten(), nn.Linear(16 * after**2, 10),
    ]  # fmt: skip
    return nn.Sequential(*layers).eval()


def _freeze(model: Any) -> Any:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _hbytes(batch: int, n: int, itemsize: int = 4) -> int:
    return batch * n * n * itemsize


def w_readme_params(batch: int, budget: str | None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import torchcurv

    torch.manual_seed(0)
    model = _mlp(8, 64, 64, 10)
    X, y = torch.randn(batch, 8), torch.randint(0, 10, (batch,))
    opts = dict(wrt="params", params="2.*", loss=F.cross_entropy, targets=y, memory_budget=budget)
    explain = _explain(**opts)
    return memory_case(
        lambda: torchcurv.per_sample_hessian(model, X, **opts),
        budget=_budget_bytes(budget) if budget else None,
        explain=explain and (lambda: explain(model, X)),
        expected_result_bytes=_hbytes(batch, 64 * 64 + 64),
        notes=[
            "the README's one-output MLP has an all-zero cross-entropy Hessian; this "
            "one has 10 outputs"
        ],
    )


def w_cnn16(budget: str) -> dict[str, Any]:
    import torch

    import torchcurv

    torch.manual_seed(0)
    model = _seed_cnn(16, second_pool=False)
    X = torch.randn(16, 1, 16, 16)
    opts = dict(output=2, memory_budget=budget)
    explain = _explain(**opts)
    return memory_case(
        lambda: torchcurv.per_sample_hessian(model, X, **opts),
        budget=_budget_bytes(budget),
        explain=explain and (lambda: explain(model, X)),
        expected_result_bytes=_hbytes(16, 256),
    )


def w_mlp256(batch: int, budget: str, mode: str) -> dict[str, Any]:
    import torch

    import torchcurv

    torch.manual_seed(0)
    model = _mlp(256, 64, 1)
    X = torch.randn(batch, 256)
    opts = dict(output=0, mode=mode, memory_budget=budget)
    explain = _explain(**opts)
    return memory_case(
        lambda: torchcurv.per_sample_hessian(model, X, **opts),
        budget=_budget_bytes(budget),
        explain=explain and (lambda: explain(model, X)),
        expected_result_bytes=_hbytes(batch, 256),
    )


def w_per_sample_fn() -> dict[str, Any]:
    import torch

    import torchcurv

    torch.manual_seed(0)
    W1, b1 = torch.randn(64, 128) / 128**0.5, torch.randn(64) * 0.1
    w2, b2 = torch.randn(64) / 8, torch.randn(()) * 0.1

    def f(x: torch.Tensor) -> torch.Tensor:  # one sample, x: [128]
        return torch.tanh(W1 @ x + b1) @ w2 + b2

    X = torch.randn(256, 128)
    batched = torchcurv.per_sample(torchcurv.hessian(f), memory_budget="64MiB")
    return memory_case(
        lambda: batched(X),
        budget=_budget_bytes("64MiB"),
        explain=None,
        expected_result_bytes=_hbytes(256, 128),
        notes=["torchcurv.explain covers module-level calls only"],
    )


def w_transformer(mode: str, math_attention: bool = False) -> dict[str, Any]:
    import contextlib

    import torch
    from torch import nn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import torchcurv

    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(
        d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True
    ).eval()
    X = torch.randn(16, 6, 16)
    opts = dict(output=lambda out: out.sum(), mode=mode, memory_budget="32MiB")
    explain = _explain(**opts)
    notes = [] if mode == "auto" else [f"mode={mode!r}: the mode='auto' call failed"]
    if math_attention:
        notes.append("attention forced to the math kernel (differentiable to any order)")

    def kernel() -> Any:
        return sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()

    def call() -> Any:
        with kernel():
            return torchcurv.per_sample_hessian(model, X, **opts)

    def explained() -> Any:
        with kernel():
            return explain(model, X)  # type: ignore[misc]

    return memory_case(
        call,
        budget=_budget_bytes("32MiB"),
        explain=explain and explained,
        expected_result_bytes=_hbytes(16, 6 * 16),
        notes=notes,
    )


def w_layernorm(budget: str) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import torchcurv

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 10)).eval()
    X, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    opts = dict(wrt="params", loss=F.cross_entropy, targets=y, memory_budget=budget)
    explain = _explain(**opts)
    n = sum(p.numel() for p in model.parameters())
    return memory_case(
        lambda: torchcurv.per_sample_hessian(model, X, **opts),
        budget=_budget_bytes(budget),
        explain=explain and (lambda: explain(model, X)),
        expected_result_bytes=_hbytes(32, n),
    )


def w_seed_cnn_half() -> dict[str, Any]:
    import torch

    import torchcurv

    torch.manual_seed(0)
    model = _seed_cnn()
    X = torch.randn(8, 1, 28, 28)
    supported, note = _peak_supported()
    if not supported:
        return {"outcome": "error", "message": f"peak not measurable: {note}"}
    whole = _attempt(
        lambda: torchcurv.per_sample_hessian(model, X, output=2, chunk_size=None), measure=False
    )
    if whole["outcome"] != "ok":
        return {"outcome": "error", "message": f"unchunked call: {whole.get('message')}"}
    del whole
    whole = _attempt(
        lambda: torchcurv.per_sample_hessian(model, X, output=2, chunk_size=None), measure=True
    )
    unchunked_peak, unchunked_seconds = whole["peak"], whole["seconds"]
    del whole
    budget = unchunked_peak // 2
    opts = dict(output=2, memory_budget=budget)
    explain = _explain(**opts)
    out = memory_case(
        lambda: torchcurv.per_sample_hessian(model, X, **opts),
        budget=budget,
        explain=explain and (lambda: explain(model, X)),
        expected_result_bytes=_hbytes(8, 784),
    )
    out["notes"].append(
        f"unchunked call (chunk_size=None): peak {fmt_bytes(unchunked_peak)}, "
        f"{fmt_seconds(unchunked_seconds)} s; budget = half of it"
    )
    if out.get("outcome") == "ok":
        out["notes"].append(
            f"time with the budget / unchunked time: {out['seconds'] / unchunked_seconds:.2f}x "
            "(single measurements, memory-workload threads)"
        )
    return out


# -------------------------------------------------------------------------------------
# speed workers
# -------------------------------------------------------------------------------------


def _cpu_busy_seconds() -> float | None:
    """Busy CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def interleaved(methods: dict[str, Callable[[], Any]], quick: bool) -> dict[str, Any]:
    """Median and minimum seconds per method: warm-up, then repeats in rotating order."""
    names = list(methods)
    for name in names:  # warm-up
        methods[name]()
    _release()
    busy0, own0, wall0 = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    times: dict[str, list[float]] = {name: [] for name in names}

    def one(name: str) -> None:
        gc.collect()
        start = time.perf_counter()
        methods[name]()
        times[name].append(time.perf_counter() - start)

    for name in names:
        one(name)
    per_round = sum(t[0] for t in times.values())
    budget_s, least, most = (6.0, 3, 11) if quick else (20.0, 5, 31)
    rounds = max(least, min(most, int(budget_s / max(per_round, 1e-6))))
    for i in range(1, rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            one(name)
    busy1, own1, wall1 = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    return {
        "stats": {n: (statistics.median(t), min(t)) for n, t in times.items()},
        "repeats": rounds,
        "others_busy": others,
    }


def _speed_result(
    timing: dict[str, Any],
    a: str,
    b: str,
    *,
    ratio_of: str,
    threshold: float,
    better: str,
    notes: list[str],
) -> dict[str, Any]:
    import torch

    (ma, na), (mb, nb) = timing["stats"][a], timing["stats"][b]
    if ratio_of == "a/b":
        ratio, ratio_min, ratio_is = ma / mb, na / nb, "A / B"
    else:
        ratio, ratio_min, ratio_is = mb / ma, nb / na, "B / A"
    return {
        "a": {"name": a, "median": ma, "min": na},
        "b": {"name": b, "median": mb, "min": nb},
        "ratio": ratio,
        "ratio_min": ratio_min,
        "ratio_is": ratio_is,
        "threshold": threshold,
        "better": better,
        "repeats": timing["repeats"],
        "others_busy": timing["others_busy"],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "notes": notes,
    }


def w_speed_budget(kind: str, quick: bool) -> dict[str, Any]:
    import torch

    import torchcurv

    torch.manual_seed(0)
    if kind == "mlp":
        model, X, output = _freeze(_mlp(128, 256, 256, 1)), torch.randn(16, 128), 0
    else:
        model, X, output = _freeze(_seed_cnn()), torch.randn(8, 1, 28, 28), 2
    supported, note = _peak_supported()
    if not supported:
        return {"error": f"peak not measurable: {note}"}

    def whole() -> Any:
        return torchcurv.per_sample_hessian(model, X, output=output, chunk_size=None)

    whole()
    measured = _attempt(whole, measure=True)
    if measured["outcome"] != "ok":
        return {"error": f"unchunked call: {measured.get('message')}"}
    unchunked_peak, expected = measured["peak"], measured.pop("value")
    budget = unchunked_peak // 2

    def budgeted() -> Any:
        return torchcurv.per_sample_hessian(model, X, output=output, memory_budget=budget)

    notes = [
        f"unchunked peak {fmt_bytes(unchunked_peak)} (this process, after a warm-up); "
        f"budget {fmt_bytes(budget)}"
    ]
    try:
        if hasattr(torchcurv, "explain"):
            decision = torchcurv.explain(
                torchcurv.per_sample_hessian, model, X, output=output, memory_budget=budget
            )
            notes.append(f"decision with the budget: `{decision}`")
        got = budgeted()
    except Exception as error:
        return {"error": f"call with the budget: {_error_text(error)}", "notes": notes}
    notes.append(f"max abs diff / max abs H vs unchunked: {_max_rel_diff(got, expected):.1e}")
    del got, expected
    measured = _attempt(budgeted, measure=True)
    bound = SLACK * budget + ALLOWANCE
    notes.append(
        f"peak with the budget {fmt_bytes(measured.get('peak'))} (bound "
        f"{fmt_bytes(bound)}, after the first call)"
    )
    del measured
    timing = interleaved({"budget P/2": budgeted, "chunk_size=None": whole}, quick)
    return _speed_result(
        timing,
        "budget P/2",
        "chunk_size=None",
        ratio_of="a/b",
        threshold=BUDGET_TIME_TARGET,
        better="lower",
        notes=notes,
    )


def w_speed_cnn_raw(quick: bool) -> dict[str, Any]:
    import torch

    import torchcurv

    torch.manual_seed(0)
    model = _freeze(_seed_cnn())
    X = torch.randn(8, 1, 28, 28)

    def f(x: torch.Tensor) -> torch.Tensor:
        return model(x.unsqueeze(0))[0, 2]

    raw = torch.vmap(torch.func.hessian(f))

    def ours() -> Any:
        return torchcurv.per_sample_hessian(model, X, output=2)

    notes = []
    if hasattr(torchcurv, "explain"):
        notes.append(
            f"decision: `{torchcurv.explain(torchcurv.per_sample_hessian, model, X, output=2)}`"
        )
    notes.append(f"max abs diff / max abs H: {_max_rel_diff(ours(), raw(X)):.1e}")
    timing = interleaved({"torchcurv": ours, "vmap(hessian)": lambda: raw(X)}, quick)
    return _speed_result(
        timing,
        "torchcurv",
        "vmap(hessian)",
        ratio_of="b/a",
        threshold=CNN_SPEEDUP_TARGET,
        better="higher",
        notes=notes,
    )


def w_speed_params_raw(quick: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    import torchcurv

    torch.manual_seed(0)
    model = _mlp(16, 32, 10)
    X, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (x.unsqueeze(0),)), t.unsqueeze(0))

    raw = torch.vmap(torch.func.hessian(loss), in_dims=(None, 0, 0))

    def ours() -> Any:
        return torchcurv.per_sample_hessian(
            model, X, wrt="params", loss=F.cross_entropy, targets=y
        )

    notes = []
    if hasattr(torchcurv, "explain"):
        decision = torchcurv.explain(
            torchcurv.per_sample_hessian, model, X, wrt="params", loss=F.cross_entropy, targets=y
        )
        notes.append(f"decision: `{decision}`")
    notes.append(f"max abs diff / max abs H: {_max_rel_diff(ours(), raw(params, X, y)):.1e}")
    timing = interleaved({"torchcurv": ours, "vmap(hessian)": lambda: raw(params, X, y)}, quick)
    return _speed_result(
        timing,
        "torchcurv",
        "vmap(hessian)",
        ratio_of="a/b",
        threshold=PARAMS_OVERHEAD_TARGET,
        better="lower",
        notes=notes,
    )


def worker_main(name: str, args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torchcurv") is None:  # a source checkout, not installed
        sys.path.insert(0, str(HERE.parent / "src"))
    import torch

    import torchcurv

    case = CASE_BY_NAME[name]
    PRIOR["name"] = case.prior
    if case.section == "speed" and hasattr(torchcurv, "initialize"):
        torchcurv.initialize()  # torch's one-time set-up, before budgets and timing
    if case.section == "memory":
        torch.set_num_threads(args.threads if args.threads is not None else 1)
    elif args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    workers: dict[str, Callable[[], dict[str, Any]]] = {
        "readme-params": lambda: w_readme_params(32, "3GiB"),
        "readme-params-default": lambda: w_readme_params(128, None),
        "cnn16-48MiB": lambda: w_cnn16("48MiB"),
        "cnn16-128MiB": lambda: w_cnn16("128MiB"),
        "mlp256-fwd-B128": lambda: w_mlp256(128, "96MiB", "fwd-over-rev"),
        "mlp256-fwd-B512": lambda: w_mlp256(512, "256MiB", "fwd-over-rev"),
        "mlp256-structured": lambda: w_mlp256(128, "96MiB", "structured"),
        "per-sample-fn": w_per_sample_fn,
        "transformer": lambda: w_transformer("auto"),
        "transformer-rev": lambda: w_transformer("rev-over-rev"),
        "transformer-math": lambda: w_transformer("auto", math_attention=True),
        "layernorm-64MiB": lambda: w_layernorm("64MiB"),
        "layernorm-256MiB": lambda: w_layernorm("256MiB"),
        "seed-cnn-half": w_seed_cnn_half,
        "first-cnn16-48MiB": lambda: w_cnn16("48MiB"),
        "first-cnn16-128MiB": lambda: w_cnn16("128MiB"),
        "first-mlp256-fwd-B128": lambda: w_mlp256(128, "96MiB", "fwd-over-rev"),
        "first-mlp256-fwd-B128-160MiB": lambda: w_mlp256(128, "160MiB", "fwd-over-rev"),
        "first-per-sample-fn": w_per_sample_fn,
        "speed-mlp-budget": lambda: w_speed_budget("mlp", quick),
        "speed-cnn-budget": lambda: w_speed_budget("cnn", quick),
        "speed-cnn-raw": lambda: w_speed_cnn_raw(quick),
        "speed-params-raw": lambda: w_speed_params_raw(quick),
    }
    try:
        result = workers[name]()
    except Exception as error:  # report, do not crash: the parent wants a line
        key = "message" if case.section == "memory" else "error"
        result = {key: f"worker raised {_error_text(error)}"}
        if case.section == "memory":
            result["outcome"] = "error"
    result.update(
        torch=torch.__version__,
        torchcurv=getattr(torchcurv, "__version__", "?"),
        torchcurv_path=str(pathlib.Path(torchcurv.__file__).parent),
        memory_threads=args.threads if args.threads is not None else 1,
    )
    print(json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="a workload, group or section (memory, speed); repeatable",
    )
    parser.add_argument("--out", default=str(HERE / "memory_results.md"), help="report path")
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats")
    parser.add_argument("--strict", action="store_true", help="exit 1 if anything fails")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 for memory workloads, torch's "
        "default for speed comparisons)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args)
    if args.list:
        for case in CASES:
            if not case.hidden:
                print(f"{case.name:24} [{case.group}, {case.section}] {case.title}")
        return 0
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
