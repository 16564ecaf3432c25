"""Module-level planning: budgets, refusals, decisions, and a measured peak in a fresh
process. The planner's own pieces (measurement, fit, plan) are tested in test_memory.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchcurv
from torchcurv._runner import TORCH_SETUP_BYTES


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
    for mode in ["structured", "fwd-over-rev"]:
        for budget in ["300KiB", "100KiB", 60_000]:
            budgeted = torchcurv.per_sample_hessian(model, X, memory_budget=budget, mode=mode)
            torchcurv.testing.assert_trees_close(budgeted, whole)
            decision = torchcurv.explain(
                torchcurv.per_sample_hessian, model, X, memory_budget=budget, mode=mode
            )
            assert decision.predicted_peak is not None
            assert decision.predicted_peak <= decision.budget


def _measure_in_a_fresh_process(*args: object) -> dict[str, float]:
    script = Path(__file__).parent / "scripts" / "measure_peak.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


_PROC = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="peak RSS is measured through Linux's /proc/self/clear_refs",
)


@_PROC
@pytest.mark.parametrize("prior", ["initialize", "tiny"])
@pytest.mark.parametrize("mode", ["fwd-over-rev", "structured"])
def test_the_first_budgeted_call_of_a_fresh_process_keeps_the_promise(
    mode: str, prior: str
) -> None:
    # The promise (docs/tutorials/memory.rst), with glibc's default allocator, on the
    # first call of a process (no warm-up of the same call): the resident memory the
    # call adds is at most 1.10 x the budget + 16 MiB, and the live tensor bytes
    # (allocations minus frees, result included) stay within the budget. After
    # torchcurv.initialize() the budget is half the unchunked live peak; after only a
    # tiny call on another model the call pays torch's one-time set-up inside, so the
    # budget adds room for it (TORCH_SETUP_BYTES).
    whole = _measure_in_a_fresh_process(256, 256, mode, "initialize")
    budget = int(whole["live_peak"] // 2)
    if prior == "tiny":
        budget += TORCH_SETUP_BYTES
    budgeted = _measure_in_a_fresh_process(256, 256, mode, prior, budget)
    assert budgeted["peak"] <= 1.10 * budget + 16 * 2**20, (whole, budgeted)
    assert budgeted["live_peak"] <= budget, (whole, budgeted)
    if prior == "initialize":
        assert budgeted["live_peak"] < whole["live_peak"], (whole, budgeted)
    assert abs(budgeted["checksum"] - whole["checksum"]) <= 1e-3 * abs(whole["checksum"]) + 1e-3


@_PROC
def test_a_budget_too_small_for_torchs_set_up_is_refused_before_allocating() -> None:
    script = (
        "import torch, torchcurv\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(),\n"
        "                        torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 1))\n"
        "try:\n"
        "    torchcurv.per_sample_hessian(m, torch.randn(4, 1, 6, 6), memory_budget='48MiB')\n"
        "except torchcurv.MemoryBudgetError as error:\n"
        "    print(error)\n"
        "torchcurv.initialize()\n"
        "H = torchcurv.per_sample_hessian(m, torch.randn(4, 1, 6, 6), memory_budget='48MiB')\n"
        "print(tuple(H.shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600
    )
    message, shape = result.stdout.strip().splitlines()[-2:]
    assert "torch's one-time set-up" in message
    assert "torchcurv.initialize()" in message
    assert shape == "(4, 1, 1, 6, 6, 1, 6, 6)"


@pytest.mark.parametrize(
    ("mode", "axes"),
    [
        ("fwd-over-rev", (1, 8)),
        ("rev-over-rev", (1, 8)),
        ("rev-over-fwd", (8, 8)),
        ("fwd-over-fwd", (8, 8)),
    ],
)
def test_plans_cover_each_stage_basis_so_a_small_call_is_not_chunked(
    mode: str, axes: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    X = torch.randn(3, 8)
    decision = torchcurv.explain(torchcurv.per_sample_hessian, model, X, output=0, mode=mode)
    assert (decision.batch_chunk, decision.basis_chunks, decision.basis_sizes) == (3, axes, axes)
    with caplog.at_level("DEBUG", logger="torchcurv"):
        torchcurv.per_sample_hessian(model, X, output=0, mode=mode)
    assert f"batch chunk 3, basis chunks {axes}" in caplog.text


def test_auto_takes_the_structured_engine_only_where_it_applies() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 4 * 4, 1),
    )
    explain = torchcurv.explain
    assert explain(torchcurv.per_sample_hessian, mlp, torch.randn(128, 8), output=0).engine == (
        "structured"
    )
    decision = explain(torchcurv.per_sample_hessian, cnn, torch.randn(2, 1, 6, 6), output=0)
    assert decision.engine == "fwd-over-rev"
    assert "Conv2d" in decision.why_engine
    decision = explain(torchcurv.per_sample_hessian, mlp, torch.randn(4, 8), wrt="params")
    assert decision.engine == "fwd-over-rev"


def test_a_budget_smaller_than_the_unchunked_peak_chunks_the_basis_of_a_cnn() -> None:
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 14 * 14, 3),
    )
    X = torch.randn(4, 1, 16, 16)
    whole = torchcurv.explain(torchcurv.per_sample_hessian, cnn, X, output=1)
    small = torchcurv.explain(
        torchcurv.per_sample_hessian, cnn, X, output=1, memory_budget=whole.predicted_peak // 3
    )
    assert small.predicted_peak is not None
    assert small.predicted_peak <= small.budget
    assert (small.batch_chunk, small.basis_chunks) != (whole.batch_chunk, whole.basis_chunks)
    H = torchcurv.per_sample_hessian(cnn, X, output=1, memory_budget=small.budget)
    torchcurv.testing.assert_trees_close(H, torchcurv.per_sample_hessian(cnn, X, output=1))
