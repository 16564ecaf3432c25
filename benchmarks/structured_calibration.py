"""Calibrate the structured-Hessian cost model against measured CPU timings.

Times :func:`torchcurv.engines.structured.structured_input_hessian` against
``torch.vmap(torch.func.hessian(f))`` (float32, median of several interleaved runs after
warm-up, default thread count, under ``torch.no_grad()`` with parameters that do not require
grad) on a few tanh MLPs, and prints a markdown table with the time ratios (of medians, and
of minima, which are more robust on a shared machine), the cost model's predicted choice and
whether the prediction picked the faster path (by median time).

``--fit`` additionally times both paths on a grid of shapes and fits the machine constants of
the cost model (``_ELEM_COST``, ``_BMM_COST``, ``_OP_COST_*`` in
``torchcurv/engines/structured.py``) by non-negative least squares on relative errors;
paste the printed values there.

Usage::

    python benchmarks/structured_calibration.py [--repeats 7] [--fit]
"""

from __future__ import annotations

import argparse
import itertools
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

try:
    from torchcurv.engines import structured as st
except ImportError:  # a source checkout without an installed package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    from torchcurv.engines import structured as st

# (label, widths, batch size, selected outputs)
Case = tuple[str, list[int], int, int]
CASES: list[Case] = [
    ("8-64-64-1", [8, 64, 64, 1], 128, 1),
    ("32-128-128-1", [32, 128, 128, 1], 64, 1),
    ("128-256-256-1", [128, 256, 256, 1], 16, 1),
    ("2-512-512-1", [2, 512, 512, 1], 1000, 1),
    ("2-512x6-3 (all 3)", [2, *[512] * 6, 3], 1000, 3),
]

# Extra shapes for fitting the constants: narrow/wide, shallow/deep, small/large n and m.
FIT_CASES: list[Case] = [
    ("4-16-1", [4, 16, 1], 8, 1),
    ("4-16x4-1", [4, 16, 16, 16, 16, 1], 8, 1),
    ("16-32-1", [16, 32, 1], 256, 1),
    ("64-64-64-1", [64, 64, 64, 1], 32, 1),
    ("256-16-16-1", [256, 16, 16, 1], 16, 1),
    ("512-8-1", [512, 8, 1], 8, 1),
    ("256-64-1", [256, 64, 1], 8, 1),
    ("8-256-256-8", [8, 256, 256, 8], 64, 8),
    ("2-1024-1024-1", [2, 1024, 1024, 1], 200, 1),
    ("4-128x4-2", [4, 128, 128, 128, 128, 2], 256, 2),
    ("64-512-1", [64, 512, 1], 64, 1),
    ("16-64-64-16", [16, 64, 64, 16], 32, 16),
    ("256-32-32-1", [256, 32, 32, 1], 32, 1),
    ("784-64-64-10 (all 10)", [784, 64, 64, 10], 4, 10),
]


def mlp(widths: list[int]) -> nn.Sequential:
    """A tanh MLP with the given layer widths (no activation after the last layer)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def time_interleaved(
    fns: list[Callable[[], Tensor]], repeats: int, warmup: int = 2
) -> tuple[list[float], list[float]]:
    """Median and minimum wall time (s) of each function.

    Runs are interleaved so that a disturbance (another process on the CPU) hits all
    functions alike; the minimum is the more robust estimate on a busy machine.
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times], [min(ts) for ts in times]


def run_case(widths: list[int], batch: int, m: int, repeats: int) -> dict[str, float]:
    """Time both paths on one case and evaluate the cost model."""
    torch.manual_seed(0)
    net = mlp(widths)
    x = torch.randn(batch, widths[0])
    out: int | slice = 0 if m == 1 else slice(0, m)

    def f(xi: Tensor) -> Tensor:
        result: Tensor = net(xi)[out]
        return result

    generic = torch.vmap(torch.func.hessian(f))

    def structured() -> Tensor:
        return st.structured_input_hessian(net, x, output=out)

    with torch.no_grad():
        scale = max(1.0, float(generic(x).abs().max()))
        torch.testing.assert_close(structured() / scale, generic(x) / scale, rtol=0, atol=1e-4)
        (t_s, t_g), (min_s, min_g) = time_interleaved([structured, lambda: generic(x)], repeats)
    cost = st.structured_cost(net, tuple(x.shape), n_outputs_selected=m, dtype_bytes=4)
    ops = st._parse(net)
    assert not isinstance(ops, str)
    terms = st._cost_terms(ops, st._shapes(ops, (widths[0],)), float(batch), float(m))
    return {"t_s": t_s, "t_g": t_g, "min_s": min_s, "min_g": min_g, **cost, **terms}


def fit(rows: list[dict[str, float]]) -> None:
    """Fit the cost-model constants (in GEMM-flop units) and print them."""
    # unknowns: [sec/gemm-flop, bmm factor*, elem*, op_s*, op_g*] (all times sec/gemm-flop)
    a: list[list[float]] = []
    b: list[float] = []
    for r in rows:
        a.append([r["s_gemm"], r["s_bmm"], r["s_elem"], r["s_ops"], 0.0])
        b.append(r["min_s"])
        a.append([r["g_gemm"], 0.0, r["g_elem"], 0.0, r["g_ops"]])
        b.append(r["min_g"])
    aw = torch.tensor(
        [[v / t for v in row] for row, t in zip(a, b, strict=True)], dtype=torch.float64
    )
    bw = torch.ones(len(b), dtype=torch.float64)
    try:
        from scipy.optimize import nnls

        coef = torch.tensor(nnls(aw.numpy(), bw.numpy())[0])
    except ImportError:
        coef = torch.linalg.lstsq(aw, bw).solution.clamp_min(0)
    sec_per_flop = float(coef[0]) or 1e-11
    print(f"fitted GEMM rate   : {1 / sec_per_flop / 1e9:.1f} GFLOP/s")
    print(f"_BMM_COST          = {coef[1] / sec_per_flop:.3g}")
    print(f"_ELEM_COST         = {coef[2] / sec_per_flop:.3g}")
    print(f"_OP_COST_STRUCTURED = {coef[3] / sec_per_flop:.3g}")
    print(f"_OP_COST_GENERIC    = {coef[4] / sec_per_flop:.3g}")
    pred = aw @ coef
    err = (pred - 1).abs()
    print(f"relative error of the fitted model: median {err.median():.2f}, max {err.max():.2f}")


def table(cases: list[Case], repeats: int) -> tuple[list[dict[str, float]], bool]:
    """Print the comparison table for ``cases``; return the rows and whether all picks held."""
    print(
        "| case | B | structured (ms) | vmap(hessian) (ms) | ratio | ratio of minima "
        "| model ratio | model picks | faster | correct |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    all_ok = True
    for label, widths, batch, m in cases:
        r = run_case(widths, batch, m, repeats)
        rows.append(r)
        pick = "structured" if r["structured_flops"] < r["generic_flops"] else "generic"
        faster = "structured" if r["t_s"] < r["t_g"] else "generic"
        # a near-tie (within 10%) counts as correct either way
        ok = pick == faster or math.isclose(r["t_s"], r["t_g"], rel_tol=0.1)
        all_ok &= ok
        print(
            f"| {label} | {batch} | {r['t_s'] * 1e3:.2f} | {r['t_g'] * 1e3:.2f} "
            f"| {r['t_s'] / r['t_g']:.2f}x | {r['min_s'] / r['min_g']:.2f}x "
            f"| {r['structured_flops'] / r['generic_flops']:.2f}x "
            f"| {pick} | {faster} | {'yes' if ok else 'NO'} |",
            flush=True,
        )
    return rows, all_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--fit", action="store_true", help="also fit the model constants")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32\n")
    rows, all_ok = table(CASES, args.repeats)
    print(f"\ncost model picked the faster path on all cases: {all_ok}\n")
    if args.fit:
        fit_rows, _ = table(FIT_CASES, args.repeats)
        print()
        fit(rows + fit_rows)


if __name__ == "__main__":
    main()
