"""`torchcurv._memory`: live-byte peaks, the fitted model, the planner and budgets."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacfwd, jacrev

from torchcurv import MemoryBudgetError, TorchcurvError
from torchcurv._memory import (
    DEFAULT_BUDGET_FRACTION,
    DEFAULT_WORKING_SET,
    MemoryModel,
    Plan,
    _dispatch_peak,
    _kineto_peak,
    available_memory,
    fit,
    format_bytes,
    heap_reserve,
    heap_slack,
    measure_peak,
    measure_peak_on,
    parse_budget,
    plan,
)

CPU = torch.device("cpu")
MiB = 2**20


# --------------------------------------------------------------------------------------
# measure_peak
# --------------------------------------------------------------------------------------


def test_the_peak_is_the_largest_live_total_not_the_sum_of_allocations() -> None:
    def f() -> torch.Tensor:
        a = torch.empty(1000)  # 4000 B
        del a
        b = torch.empty(2000)  # 8000 B, while nothing else is live
        c = torch.empty(500)  # 2000 B on top: 10000 B live
        del c
        return b

    peak, result = measure_peak(f)
    assert peak == 10_000
    assert result.shape == (2000,)


def test_the_result_counts_and_memory_live_before_does_not() -> None:
    before = torch.ones(10_000)  # live before the call, freed by nobody during it
    peak, result = measure_peak(torch.add, before, before)
    assert peak == 40_000
    assert torch.equal(result, 2 * before)


def test_memory_freed_inside_is_not_counted_at_the_end() -> None:
    peak, result = measure_peak(lambda: torch.ones(1000).sum())
    assert peak == 4000 + 4  # the ones and their sum were live together
    assert result.item() == 1000


def test_arguments_are_passed_through() -> None:
    peak, result = measure_peak(torch.zeros, 10, 10, dtype=torch.float64)
    assert (peak, result.shape) == (800, (10, 10))
    assert measure_peak_on("cpu", torch.zeros, 5)[0] == 20


def test_under_vmap_allocations_are_counted_at_their_batched_size() -> None:
    X = torch.randn(8, 1000)
    peak, result = measure_peak(torch.vmap(lambda x: (x * 2).sum()), X)
    assert peak == 8 * 1000 * 4 + 8 * 4  # x * 2 for all 8 samples, then the 8 sums
    assert result.shape == (8,)


def _nested_hessian() -> tuple[Callable[..., torch.Tensor], torch.Tensor]:
    h = torch.vmap(jacfwd(jacrev(lambda x: (x**3).sum())))
    return h, torch.randn(4, 50, dtype=torch.float64)


def test_under_nested_transforms_the_peak_is_deterministic_and_holds_the_result() -> None:
    h, X = _nested_hessian()
    first, result = measure_peak(h, X)
    second, _ = measure_peak(h, X)
    assert first == second
    assert first >= result.numel() * result.element_size()
    torch.testing.assert_close(result, torch.diag_embed(6 * X))


def test_the_two_profiler_paths_agree_exactly() -> None:
    h, X = _nested_hessian()
    assert measure_peak(h, X)[0] == _kineto_peak(lambda: h(X))[0]


def test_param_hessians_through_functional_call_are_measured() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    X = torch.randn(6, 4)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x[None],)).squeeze()

    call = torch.vmap(hessian(loss), in_dims=(None, 0))
    peak, H = measure_peak(call, params, X)
    size = sum(h.numel() * h.element_size() for row in H.values() for h in row.values())
    assert size <= peak == measure_peak(call, params, X)[0]


def test_kernel_workspaces_are_counted() -> None:
    # A convolution's im2col columns are allocated inside the kernel: the allocator
    # sees them, a dispatch mode (which sees operator outputs only) does not.
    conv = nn.Conv2d(8, 8, 3).requires_grad_(False)
    X = torch.randn(4, 8, 64, 64)
    measured = measure_peak(conv, X)[0]
    outputs_only = _dispatch_peak(lambda: conv(X))[0]
    assert measured >= outputs_only >= 4 * 8 * 62 * 62 * 4


def test_an_error_inside_propagates_and_leaves_the_profiler_off() -> None:
    def fails() -> None:
        torch.empty(100)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        measure_peak(fails)
    assert not torch._C._autograd._profiler_enabled()
    assert measure_peak(torch.empty, 25)[0] == 100


def test_measurements_nest() -> None:
    def outer() -> tuple[torch.Tensor, torch.Tensor, int]:
        a = torch.empty(1000)  # 4000 B
        inner, b = measure_peak(torch.empty, 2000)  # 8000 B, kept
        return a, b, inner

    peak, (_, _, inner) = measure_peak(outer)
    assert (peak, inner) == (12_000, 8000)


def test_under_a_running_profiler_operator_outputs_are_still_counted() -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        peak, _ = measure_peak(lambda: torch.ones(1000) * 2)
    assert peak == 8000  # ones and the product, live together


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peaks_come_from_the_caching_allocator() -> None:  # pragma: no cover
    device = torch.device("cuda")
    keep = torch.ones(2**20, device=device)

    def f() -> torch.Tensor:
        a = torch.empty(2**20, device=device)
        del a
        return torch.empty(2**19, device=device)

    peak, _ = measure_peak(f, keep)
    assert peak == 4 * 2**20  # the larger block, whatever was live before

    def outer() -> torch.Tensor:
        big = torch.empty(2**21, device=device)
        del big
        return measure_peak_on(device, torch.empty, 16, device=device)[1]

    assert measure_peak_on(device, outer)[0] >= 8 * 2**20  # an inner reset loses nothing


# --------------------------------------------------------------------------------------
# fit: the model
# --------------------------------------------------------------------------------------


def _affine(fixed: int, a0: int, a_outer: int, a_both: int) -> Callable[..., int]:
    """The structure of a nested derivative: F + b * (a0 + a_o c_o + a_io c_o c_i)."""

    def measure(b: int, chunks: tuple[int, ...]) -> int:
        inner, outer = chunks
        return fixed + b * (a0 + a_outer * outer + a_both * inner * outer)

    return measure


def _phases(b: int, chunks: tuple[int, ...], n_outer: int = 300) -> int:
    """The real shape: a result phase (pieces, 1/c overhead) against a work phase."""
    inner, outer = chunks
    pieces = 4000 + 64_000 // outer + (4000 if outer < n_outer else 0)
    work = 500 + 120 * outer + 30 * inner * outer
    return max(300 + b * pieces, 20_000 + b * work)


def _grid(axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    values = [sorted({1, 2, 3, 5, 8, 13, 21, 34, 64, 100, 128, 200, 256, n}) for n in axes]
    grids: list[tuple[int, ...]] = [()]
    for axis, size in zip(values, axes, strict=True):
        grids = [(*g, v) for g in grids for v in axis if v <= size]
    return grids


def test_the_fit_is_exact_at_every_measured_point() -> None:
    measure = _affine(1000, 200, 50, 7)
    model = fit(measure, (3, 300))
    assert model.path[0] == (1, 1)
    assert model.path[-1] == (3, 300)
    for m in model.measurements:
        assert model.unmargined(m.batch, m.chunks) == m.peak
        assert model.predict(m.batch, m.chunks) == math.ceil(round(1.1 * m.peak, 6))
    assert model.stopped == "complete"


def test_the_fit_is_exact_on_the_path_for_one_and_two_samples() -> None:
    measure = _affine(1000, 200, 50, 7)
    model = fit(measure, (3, 300))
    for chunks in model.path:
        for b in (1, 2):
            assert model.unmargined(b, chunks) == measure(b, chunks)


@pytest.mark.parametrize(
    "measure",
    [_affine(1000, 200, 50, 7), _affine(0, 10, 0, 100), _phases],
    ids=["affine", "work-only", "phases"],
)
def test_the_fit_never_predicts_less_than_the_truth_on_the_plans_it_offers(
    measure: Callable[..., int],
) -> None:
    axes = (3, 300)
    model = fit(measure, axes, result_bytes=4000)
    for chunks in model.candidates():
        for b in (1, 2, 3, 7, 64, 1000):
            assert model.unmargined(b, chunks) >= measure(b, chunks) * (1 - 1e-12), (b, chunks)


def test_without_the_result_size_no_plan_just_below_a_whole_axis_is_offered() -> None:
    # Chunking an axis that was measured whole adds a concatenation the whole call
    # does not make; without result_bytes its size is unknown, so those are not offered.
    model = fit(_phases, (3, 300))
    for chunks in model.candidates():
        for b in (1, 2, 9, 300):
            assert model.unmargined(b, chunks) >= _phases(b, chunks) * (1 - 1e-12), (b, chunks)
    assert not [c for c in model.candidates() if 256 < c[1] < 300]  # the last rungs


def test_a_fit_at_small_chunks_only_would_miss_the_work_phase() -> None:
    # Why the ladder climbs: below c = 64 the result phase hides the work phase.
    flat = [_phases(1, (1, c)) for c in (1, 2)]
    assert flat[1] < flat[0]  # the small-chunk slope is negative...
    extrapolated = flat[0] + (flat[1] - flat[0]) * 299
    assert _phases(1, (1, 300)) > extrapolated  # ...while the unchunked peak is not small
    model = fit(_phases, (1, 300))
    assert model.unmargined(1, (1, 300)) == _phases(1, (1, 300))


def test_extrapolating_in_the_batch_is_conservative_when_a_steeper_phase_takes_over() -> None:
    def measure(b: int, chunks: tuple[int, ...]) -> int:  # flat phase first, steep later
        return max(10_000 + b * 1000, b * 4000)

    model = fit(measure, ())
    for b in range(1, 200):
        assert model.unmargined(b, ()) >= measure(b, ())
    assert model.unmargined(1, ()) == 11_000
    assert model.unmargined(2, ()) == 12_000


@pytest.mark.parametrize("seed", range(5))
def test_with_noisy_measurements_the_margined_prediction_stays_above_the_truth(
    seed: int,
) -> None:
    rng = random.Random(seed)

    def noisy(b: int, chunks: tuple[int, ...]) -> int:
        return int(_phases(b, chunks) * (1 + rng.uniform(-0.04, 0.04)))

    model = fit(noisy, (3, 300))
    for chunks in model.candidates():
        for b in (1, 2, 5, 50):
            assert model.predict(b, chunks) >= _phases(b, chunks), (b, chunks)


def test_predictions_off_the_path_are_still_upper_bounds() -> None:
    model = fit(_phases, (3, 300), result_bytes=4000)
    for chunks in _grid((3, 300)):
        for b in (1, 4):
            assert model.unmargined(b, chunks) >= _phases(b, chunks) * (1 - 1e-12), (b, chunks)


def test_the_ladder_climbs_the_inner_axis_first_then_the_outer() -> None:
    model = fit(_affine(0, 1, 1, 1), (5, 70))
    assert model.path == ((1, 1), (4, 1), (5, 1), (5, 4), (5, 16), (5, 64), (5, 70))
    assert {m.batch for m in model.measurements} == {1, 2}
    assert len(model.measurements) == 2 * len(model.path)


def test_the_ladder_stops_after_passing_the_working_set() -> None:
    measure = _affine(0, 0, 1000, 0)  # 1000 bytes per outer basis vector and sample
    model = fit(measure, (1, 10_000), working_set=50_000)
    assert model.stopped == "working set"
    assert model.path[-1] == (1, 64)  # the first rung past 50 kB
    assert model.single[-2] <= 50_000 < model.single[-1]


def test_no_measurement_exceeds_the_limit() -> None:
    measure = _affine(100, 100, 1000, 0)
    model = fit(measure, (1, 10_000), limit=300_000)
    assert model.stopped == "limit"
    assert max(m.peak for m in model.measurements) <= 300_000
    assert not model.covers(10**9)
    assert model.covers(300_000)


def test_a_function_without_basis_axes_takes_two_measurements() -> None:
    model = fit(lambda b, chunks: 64 + 100 * b, ())
    assert [(m.batch, m.chunks) for m in model.measurements] == [(1, ()), (2, ())]
    assert model.unmargined(1, ()) == 164
    assert model.unmargined(2, ()) == 264


def test_with_one_sample_per_measurement_samples_multiply_the_peak() -> None:
    model = fit(lambda b, chunks: 64 + 100 * b, (), max_batch=1)
    assert [m.batch for m in model.measurements] == [1]
    assert model.unmargined(5, ()) == 5 * 164


def test_running_out_of_memory_on_a_later_rung_ends_the_ladder() -> None:
    def measure(b: int, chunks: tuple[int, ...]) -> int:
        if chunks[0] > 16:
            raise torch.OutOfMemoryError("CPU out of memory")
        return 100 * b * chunks[0]

    model = fit(measure, (1000,))
    assert model.stopped == "out of memory"
    assert model.path[-1] == (16,)


def test_bad_axes_are_refused() -> None:
    with pytest.raises(ValueError, match="axes must be positive"):
        fit(lambda b, c: 1, (0, 3))
    model = fit(lambda b, c: 1, (3,))
    with pytest.raises(ValueError, match="expected 1 chunk sizes"):
        model.predict(1, (1, 1))


# --------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------


def _model(axes: tuple[int, ...] = (1, 256), result: int = 1024) -> MemoryModel:
    def measure(b: int, chunks: tuple[int, ...]) -> int:
        inner, outer = chunks
        chunked = outer < axes[1]
        return 2000 + b * ((2 if chunked else 1) * result + 3000 * outer * inner + 500)

    return fit(measure, axes, result_bytes=result)


def test_a_call_that_fits_is_not_chunked() -> None:
    model = _model()
    chosen = plan("f", batch=10, axes=(1, 256), model=model, result_bytes=1024, budget=2**30)
    assert (chosen.batch, chosen.axes, chosen.reason) == (10, (1, 256), "fits whole")
    assert chosen.predicted_peak == model.predict(10, (1, 256)) <= chosen.budget
    assert "batch chunk 10, basis chunks (1, 256)" in chosen.describe()


def test_plans_prefer_fewer_calls() -> None:
    model = _model()
    budget = 4 * MiB
    chosen = plan("f", batch=100, axes=(1, 256), model=model, result_bytes=1024, budget=budget)
    calls = chosen.calls
    for chunks in model.candidates():
        for b in range(1, 101):
            peak = model.predict(b, chunks) + (100 * 1024 if b < 100 else 0)
            if peak <= budget:
                assert math.ceil(100 / b) * math.ceil(256 / chunks[1]) >= calls


def test_the_batch_shrinks_before_the_basis() -> None:
    # Half the batch with the whole basis, or the whole batch with half the basis: the
    # same number of calls; the whole basis needs fewer forward passes.
    model = _model()
    budget = model.predict(50, (1, 256)) + 100 * 1024
    chosen = plan("f", batch=100, axes=(1, 256), model=model, result_bytes=1024, budget=budget)
    assert chosen.axes == (1, 256)
    assert chosen.batch == 50
    assert chosen.reason == "batch chunk limited by the budget"
    budget = model.predict(1, (1, 256)) + 100 * 1024 - 1  # not even one whole sample
    tight = plan("f", batch=100, axes=(1, 256), model=model, result_bytes=1024, budget=budget)
    assert tight.axes[1] < 256
    assert tight.predicted_peak <= budget


def test_the_outer_axis_shrinks_before_the_inner() -> None:
    model = _model(axes=(8, 64), result=8 * 64 * 64 * 4)
    chosen = plan(
        "f", batch=4, axes=(8, 64), model=model, result_bytes=8 * 64 * 64 * 4, budget=MiB
    )
    assert chosen.axes[0] == 8
    assert chosen.axes[1] < 64


def test_the_working_set_caps_fast_plans() -> None:
    model = _model()
    cap = 200_000
    chosen = plan(
        "f",
        batch=100,
        axes=(1, 256),
        model=model,
        result_bytes=1024,
        budget=2**30,
        preferred_working_set=cap,
    )
    assert chosen.working_set <= cap
    assert chosen.reason.startswith("capped at a working set of")
    uncapped = plan("f", batch=100, axes=(1, 256), model=model, result_bytes=1024, budget=2**30)
    assert uncapped.calls < chosen.calls


def test_when_even_one_sample_exceeds_the_cap_the_fastest_plan_within_budget_is_taken() -> None:
    model = _model()
    kwargs = {"batch": 10, "axes": (1, 256), "model": model, "result_bytes": 1024}
    chosen = plan("f", **kwargs, budget=2**30, preferred_working_set=1)  # type: ignore[arg-type]
    assert (chosen.batch, chosen.axes, chosen.reason) == (10, (1, 256), "fits whole")
    budget = model.predict(3, (1, 256)) + 10 * 1024
    chosen = plan("f", **kwargs, budget=budget, preferred_working_set=1)  # type: ignore[arg-type]
    assert (chosen.batch, chosen.axes) == (3, (1, 256))
    assert chosen.reason == "one sample exceeds the 1 B working set; fastest within budget"


def test_the_batch_limit_is_respected() -> None:
    model = _model()
    chosen = plan(
        "f", batch=10, axes=(1, 256), model=model, result_bytes=1024, budget=2**30, batch_limit=1
    )
    assert chosen.batch == 1
    assert chosen.reason == "at most 1 sample per call"


@pytest.mark.parametrize("seed", range(3))
def test_every_plan_fits_its_budget(seed: int) -> None:
    rng = random.Random(seed)
    model = fit(_phases, (3, 300), result_bytes=3 * 300 * 4)
    for _ in range(30):
        budget = int(10 ** rng.uniform(5, 8))
        batch = rng.randint(1, 500)
        try:
            chosen = plan(
                "f", batch=batch, axes=(3, 300), model=model, result_bytes=3600, budget=budget
            )
        except MemoryBudgetError:
            continue
        assert chosen.predicted_peak <= budget
        assert 1 <= chosen.batch <= batch


def test_an_impossible_budget_is_refused_with_a_budget_that_works() -> None:
    model = _model()
    with pytest.raises(MemoryBudgetError) as info:
        plan("per_sample_hessian", batch=10, axes=(1, 256), model=model, result_bytes=1024,
             budget=1000)  # fmt: skip
    message = str(info.value)
    assert message.startswith("per_sample_hessian: memory_budget of 1000 B cannot be met")
    assert "the result of all 10 samples takes 10.0 KiB" in message
    needed = message.split("Pass memory_budget of at least ")[1].split(",")[0]
    number, unit = needed.split()
    enough = math.ceil(float(number) * {"B": 1, "KiB": 2**10, "MiB": 2**20}[unit] * 1.001)
    chosen = plan(
        "per_sample_hessian", batch=10, axes=(1, 256), model=model, result_bytes=1024,
        budget=enough,
    )  # fmt: skip
    assert chosen.batch == 1


def test_an_empty_batch_plans_nothing() -> None:
    chosen = plan("f", batch=0, axes=(1, 256), model=_model(), result_bytes=1024, budget=10)
    assert (chosen.predicted_peak, chosen.reason) == (0, "empty batch")


def test_plans_are_made_for_the_axes_of_their_model() -> None:
    with pytest.raises(ValueError, match="differ from the model"):
        plan("f", batch=1, axes=(1, 8), model=_model(), result_bytes=1, budget=10**9)


def test_describe_reads_as_a_sentence() -> None:
    text = Plan(3, (1, 8), 2048, 2**20, "fits whole").describe()
    assert text == (
        "batch chunk 3, basis chunks (1, 8), predicted peak 2.0 KiB of a 1.0 MiB budget "
        "(fits whole)"
    )


# --------------------------------------------------------------------------------------
# budgets
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("2GiB", 2 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5 KiB", 1536),
        ("64", 64),
        (10**9, 10**9),
        (2.5e6, 2_500_000),
        (np.int64(4096), 4096),
        (np.uint32(7), 7),
        (np.float64(2.5e6), 2_500_000),
        (np.float32(1024.0), 1024),
    ],
    ids=str,
)
def test_budgets_are_parsed(budget: object, expected: int) -> None:
    parsed = parse_budget("f", budget, CPU)
    assert parsed == expected
    assert type(parsed) is int


@pytest.mark.parametrize(
    "budget",
    ["2 parsecs", "", 0, -5, True, np.bool_(True), float("inf"), float("nan"), 0.5, [1]],
    ids=repr,
)
def test_bad_budgets_are_refused(budget: object) -> None:
    with pytest.raises(TorchcurvError, match=r"f: memory_budget must be None"):
        parse_budget("f", budget, CPU)


def test_the_default_budget_is_a_fraction_of_the_available_memory() -> None:
    default = parse_budget("f", None, CPU)
    assert 0 < default <= DEFAULT_BUDGET_FRACTION * available_memory(CPU) * 1.05
    with open("/proc/meminfo") as meminfo:
        free = next(int(line.split()[1]) * 1024 for line in meminfo if "MemAvailable" in line)
    assert available_memory(CPU) <= free * 1.05


def test_bytes_are_formatted() -> None:
    assert [format_bytes(x) for x in (0, 1023, 1024, 1536, 5 * MiB, 3 * 2**30)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]
    assert DEFAULT_WORKING_SET > 0


# --------------------------------------------------------------------------------------
# live peak against the resident memory of a fresh process
# --------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import ctypes, gc, json, sys
    import torch
    from torch import nn
    from torch.func import functional_call, hessian
    from torchcurv._memory import limit_allocator_slack, measure_peak

    if sys.argv[1] == "limited":
        assert limit_allocator_slack()

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    def rss_growth(call):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        before = status("VmRSS")
        result = call()
        return status("VmHWM") - before

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                        nn.Linear(256, 1)).eval().requires_grad_(False)
    X = torch.randn(256, 64)
    small = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))
    params = {k: v.detach() for k, v in small.named_parameters()}
    Y = torch.randn(64, 16)
    loss = lambda p, x: functional_call(small, p, (x[None],)).squeeze()
    calls = {
        "mlp input Hessian": lambda: torch.vmap(hessian(lambda x: mlp(x[None]).squeeze()))(X),
        "param Hessian": lambda: torch.vmap(hessian(loss), in_dims=(None, 0))(params, Y),
    }
    report = {}
    for name, call in calls.items():
        call()  # warm: lazy initialisation happens once per process
        live, _ = measure_peak(call)
        report[name] = {"live": live, "rss": rss_growth(call)}
    print(json.dumps(report))
    """
)


def _live_and_rss(mode: str) -> dict[str, dict[str, int]]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    report: dict[str, dict[str, int]] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="peak RSS is measured through Linux's /proc/self/clear_refs",
)
def test_with_limited_allocator_slack_resident_growth_follows_the_live_peak() -> None:
    # The promise: RSS growth <= 1.10 x live peak + 16 MiB. It holds once
    # limit_allocator_slack() fixed glibc's mmap threshold; with glibc's adaptive
    # default the MLP's resident growth was 1.7x its live peak (see the report in
    # benchmarks/memory_model_check.py), so that case is not asserted here.
    for name, row in _live_and_rss("limited").items():
        live, rss = row["live"], row["rss"]
        assert live <= rss + 16 * MiB, (name, row)
        assert rss <= 1.10 * live + 16 * MiB, (name, row)


def test_on_the_cpu_the_plan_reserves_the_working_set_again_for_heap_slack() -> None:
    def measure(b: int, chunks: tuple[int, ...]) -> int:
        return b * (4096 + 1024 * chunks[0])  # a result of 1024 B per sample, no more

    model = fit(measure, (256,), result_bytes=1024)
    budget = 64 * MiB  # the promise allows 0.1 x 64 + 16 MiB above it; half is reserve
    options = dict(batch=400, axes=(256,), model=model, result_bytes=1024, budget=budget)
    live = plan("f", **options, preferred_working_set=2**40)  # type: ignore[arg-type]
    reserved = plan("f", **options, preferred_working_set=2**40, slack=2.0)  # type: ignore[arg-type]
    working = model.working_set_of(reserved.batch, reserved.axes)
    allowed = (int(0.1 * budget) + 16 * MiB) // 2
    assert working > allowed  # the reserve is taken
    assert reserved.predicted_peak == model.predict(reserved.batch, reserved.axes) + (
        working - allowed
    ) + (400 * 1024 if reserved.batch < 400 else 0)
    assert reserved.predicted_peak <= budget
    assert reserved.batch * math.prod(reserved.axes) < live.batch * math.prod(live.axes)
    assert heap_reserve(10 * MiB, budget, 2.0) == 0  # within the allowance: none
    assert heap_slack(CPU) == 2.0
    assert heap_slack(torch.device("cuda", 0)) == 1.0
