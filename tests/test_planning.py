"""The memory planner: budgets, plans, refusals, and a measured peak in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchcurv
from torchcurv._planning import WORK_PER_FORWARD, parse_budget, plan_chunks

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        ("2GiB", 2 * 2**30),
        ("500MB", 500 * 10**6),
        ("1.5 KiB", 1536),
        ("64", 64),
        (10**9, 10**9),
        (2.5e6, 2_500_000),
    ],
)
def test_parse_budget(budget: object, expected: int) -> None:
    assert parse_budget("f", budget, CPU) == expected


def test_default_budget_is_half_the_available_memory() -> None:
    from torchcurv._planning import available_memory

    default = parse_budget("f", None, CPU)
    assert 0 < default <= available_memory(CPU)


@pytest.mark.parametrize("budget", ["2 parsecs", "", 0, -5, True, float("inf"), [1]])
def test_bad_budgets_are_refused(budget: object) -> None:
    with pytest.raises(torchcurv.TorchcurvError, match=r"f: memory_budget must be None"):
        parse_budget("f", budget, CPU)


def test_a_call_that_fits_is_not_chunked() -> None:
    plan = plan_chunks("f", batch=10, axes=(1, 8), result_bytes=100, work_bytes=10, budget=10**6)
    assert (plan.batch, plan.axes) == (10, (1, 8))


def test_plans_shrink_the_batch_first_then_the_basis() -> None:
    plan = plan_chunks(
        "f",
        batch=100,
        axes=(2, 50),
        result_bytes=10,
        work_bytes=100,
        budget=100 * 10 + 20 * 100 * 100 + 2 * 20 * 10,
    )
    assert plan.batch == 20
    assert plan.axes == (2, 50)
    assert plan.predicted_peak <= plan.budget
    plan = plan_chunks(
        "f",
        batch=100,
        axes=(2, 50),
        result_bytes=10,
        work_bytes=100,
        budget=100 * 10 + 2 * 10 + 30 * 100,
    )
    assert plan.batch == 1
    assert plan.axes == (1, 30)
    assert plan.predicted_peak <= plan.budget


def test_an_impossible_budget_is_refused_before_work_with_what_would_fit() -> None:
    with pytest.raises(
        torchcurv.MemoryBudgetError,
        match=r"f: memory_budget of 100 B cannot "
        r"be met: the result alone takes 1000 B.*at least",
    ):
        plan_chunks("f", batch=10, axes=(3,), result_bytes=100, work_bytes=10, budget=100)


def test_tiny_budget_is_refused_by_the_public_functions() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    X = torch.randn(32, 8)
    with pytest.raises(
        torchcurv.MemoryBudgetError,
        match=r"per_sample_hessian: memory_budget "
        r"of 1\.0 KiB cannot be met.*Pass memory_budget of at least",
    ):
        torchcurv.per_sample_hessian(model, X, memory_budget="1KiB")
    with pytest.raises(torchcurv.MemoryBudgetError, match=r"per_sample: memory_budget"):
        torchcurv.per_sample(torchcurv.hessian(lambda x: x.prod()), memory_budget=16)(X)


def test_budgeted_results_equal_unchunked_results() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    ).double()
    X = torch.randn(64, 8, dtype=torch.float64)
    whole = torchcurv.per_sample_hessian(model, X, chunk_size=None)
    work = WORK_PER_FORWARD[2]
    for budget in ["300KiB", "100KiB", 60_000]:
        budgeted = torchcurv.per_sample_hessian(model, X, memory_budget=budget)
        torchcurv.testing.assert_trees_close(budgeted, whole)
    assert work >= 1


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="peak RSS is measured through Linux's /proc/self/clear_refs",
)
@pytest.mark.parametrize("mode", ["fwd-over-rev", "auto"])
def test_measured_peak_stays_within_the_budget(mode: str) -> None:
    script = Path(__file__).parent / "scripts" / "measure_peak.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), "256", "256", mode],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["close"], report
    assert report["budgeted_peak"] <= 1.1 * report["budget"], report


@pytest.mark.parametrize(
    ("mode", "axes"),
    [
        ("fwd-over-rev", (1, 8)),
        ("rev-over-rev", (1, 8)),
        ("rev-over-fwd", (8, 8)),
        ("fwd-over-fwd", (8, 8)),
    ],
)
def test_plans_cover_each_stage_basis_so_a_fitting_call_is_not_chunked(
    mode: str, axes: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with caplog.at_level("DEBUG", logger="torchcurv"):
        torchcurv.per_sample_hessian(model, torch.randn(3, 8), output=0, mode=mode)
    assert f"batch chunk 3, basis chunks {axes}" in caplog.text


def test_auto_takes_the_structured_path_only_where_it_applies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 4 * 4, 1),
    )
    with caplog.at_level("DEBUG", logger="torchcurv"):
        H = torchcurv.per_sample_hessian(mlp, torch.randn(128, 8), output=0)
    assert "mode='auto' chose 'structured'" in caplog.text
    caplog.clear()
    with caplog.at_level("DEBUG", logger="torchcurv"):
        torchcurv.per_sample_hessian(cnn, torch.randn(2, 1, 6, 6), output=0)
        torchcurv.per_sample_hessian(mlp, torch.randn(4, 8), wrt="params", output=0)
    assert "chose 'structured'" not in caplog.text
    assert H.shape == (128, 8, 8)
