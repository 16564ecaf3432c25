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
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
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
    rows = []
    for a in names:
        row = []
        for b in names:
            block = H[a][b]
            lead = block.shape[:batch_dims]
            n_a = math.prod(H[a][a].shape[batch_dims:]) if False else None  # noqa: F841
            row.append(block)
        rows.append(row)
    shapes = {a: H[a][a].shape[batch_dims:] for a in names}
    sizes = {a: math.isqrt(math.prod(s)) for a, s in shapes.items()}
    lead = H[names[0]][names[0]].shape[:batch_dims]
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
