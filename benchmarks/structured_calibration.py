"""Calibrate the structured-Hessian cost model against measured CPU timings.

Times :func:`torchcurv._structured.structured_input_hessian` against
``torch.vmap(torch.func.hessian(f))`` (float32, median of several runs after warm-up, default
thread count) on a few tanh MLPs and prints a markdown table with the time ratios, the cost
model's predicted choice and whether the prediction picked the faster path.

Run with ``python benchmarks/structured_calibration.py`` (``--repeats N`` for more runs,
``--micro`` to also print the machine constants that feed ``_ELEM_COST``/``_OP_COST``).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

try:
    from torchcurv._structured import structured_cost, structured_input_hessian
except ImportError:  # running from a source checkout without an installed package
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))
    from torchcurv._structured import structured_cost, structured_input_hessian

# (label, widths, batch size, selected outputs)
CASES: list[tuple[str, list[int], int, int]] = [
    ("8-64-64-1", [8, 64, 64, 1], 128, 1),
    ("32-128-128-1", [32, 128, 128, 1], 64, 1),
    ("128-256-256-1", [128, 256, 256, 1], 16, 1),
    ("2-512-512-1", [2, 512, 512, 1], 1000, 1),
    ("2-512x6-3 (all 3)", [2, 512, 512, 512, 512, 512, 512, 3], 1000, 3),
]


def mlp(widths: list[int]) -> nn.Sequential:
    """A tanh MLP with the given layer widths (no activation after the last layer)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    net = nn.Sequential(*layers)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def median_time(fn: Callable[[], Tensor], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_case(widths: list[int], batch: int, m: int, repeats: int) -> dict[str, float]:
    """Time both paths on one case and evaluate the cost model."""
    torch.manual_seed(0)
    net = mlp(widths)
    x = torch.randn(batch, widths[0])

    def f(xi: Tensor) -> Tensor:
        out = net(xi)
        return out[0] if m == 1 else out[:m]

    generic = torch.vmap(torch.func.hessian(f))
    with torch.no_grad():
        h_s = structured_input_hessian(net, x, output=0 if m == 1 else slice(0, m))
        h_g = generic(x)
        torch.testing.assert_close(h_s, h_g, rtol=1e-3, atol=1e-4)
        t_s = median_time(
            lambda: structured_input_hessian(net, x, output=0 if m == 1 else slice(0, m)),
            repeats,
        )
        t_g = median_time(lambda: generic(x), repeats)
    cost = structured_cost(net, tuple(x.shape), n_outputs_selected=m, dtype_bytes=4)
    return {"t_s": t_s, "t_g": t_g, **cost}


def micro() -> None:
    """Print the machine constants behind the cost model (GEMM rate, elementwise, overhead)."""
    a, b = torch.randn(2000, 512), torch.randn(512, 512)
    t_mm = median_time(lambda: a @ b, 10)
    gemm_rate = 2 * 2000 * 512 * 512 / t_mm
    big = torch.randn(4_000_000)
    t_el = median_time(lambda: big * 1.5, 10)
    elem_rate = big.numel() / t_el
    tiny = torch.randn(4)
    t_op = median_time(lambda: tiny * 1.5, 200)
    print(f"GEMM rate       : {gemm_rate / 1e9:.1f} GFLOP/s")
    print(f"elementwise rate: {elem_rate / 1e9:.2f} Gelem/s -> _ELEM_COST ~ {gemm_rate / elem_rate:.1f}")
    print(f"per-op overhead : {t_op * 1e6:.1f} us -> _OP_COST ~ {t_op * gemm_rate:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--micro", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, float32\n")
    if args.micro:
        micro()
        print()
    print(
        "| case | B | structured (ms) | vmap(hessian) (ms) | ratio | model ratio "
        "| model picks | faster | correct |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for label, widths, batch, m in CASES:
        r = run_case(widths, batch, m, args.repeats)
        pick = "structured" if r["structured_flops"] < r["generic_flops"] else "generic"
        faster = "structured" if r["t_s"] < r["t_g"] else "generic"
        ok = pick == faster
        all_ok &= ok
        print(
            f"| {label} | {batch} | {r['t_s'] * 1e3:.2f} | {r['t_g'] * 1e3:.2f} "
            f"| {r['t_s'] / r['t_g']:.2f}x | {r['structured_flops'] / r['generic_flops']:.2f}x "
            f"| {pick} | {faster} | {'yes' if ok else 'NO'} |"
        )
    print(f"\ncost model picked the faster path on all cases: {all_ok}")


if __name__ == "__main__":
    main()
