"""Test configuration: hypothesis profiles from torchcurv.testing, and an example count.

``HYPOTHESIS_PROFILE`` picks the profile (``dev`` by default, ``ci`` in CI). Every
hypothesis example run is counted; the total is printed at the end, and when
``TORCHCURV_MIN_EXAMPLES`` is set (CI sets it) a smaller total fails the run.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest
import torch

import torchcurv
from torchcurv.testing import load_profile

PROFILE = load_profile()
# Torch's one-time set-up, paid once here, so that a budgeted call does not pay it
# (and small budgets are not refused for it) depending on which test ran first; the
# fresh-process tests in test_planning.py cover a process that has not paid it.
torchcurv.initialize()
_EXAMPLES = {"run": 0}


def _counting(test: Any) -> Any:
    @functools.wraps(test)
    def counted(*args: Any, **kwargs: Any) -> Any:
        _EXAMPLES["run"] += 1
        return test(*args, **kwargs)

    return counted


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        handle = getattr(getattr(item, "obj", None), "hypothesis", None)
        if handle is not None and not getattr(handle.inner_test, "_torchcurv_counted", False):
            handle.inner_test = _counting(handle.inner_test)
            handle.inner_test._torchcurv_counted = True


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"hypothesis: {_EXAMPLES['run']} examples run (profile {PROFILE!r})"
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    required = int(os.environ.get("TORCHCURV_MIN_EXAMPLES", "0"))
    if required and _EXAMPLES["run"] < required and exitstatus == 0:
        print(
            f"\nFAILED: only {_EXAMPLES['run']} hypothesis examples ran; "
            f"TORCHCURV_MIN_EXAMPLES={required}."
        )
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)
