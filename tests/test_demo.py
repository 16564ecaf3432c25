"""The command line: ``python -m torchcurv demo | bench``.

The demo runs in-process with small settings. ``--help`` and one bad argument go through
a real ``python -m torchcurv`` subprocess, as a user would type them; the other argument
errors are checked in-process (each subprocess pays torch's import time).
"""

from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torchcurv.__main__ as cli
from torchcurv import _demo

FAST = ["--batch", "12", "--epochs", "2", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchcurv", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def demo_report() -> str:
    """The report of one small demo run (shared: the run takes a few seconds)."""
    out = io.StringIO()
    _demo.run_demo(_demo.DemoOptions(batch=12, epochs=2, progress=False), out=out)
    return out.getvalue()


def test_demo_report_has_every_section(demo_report: str) -> None:
    for line in [
        "data      scikit-learn's 8x8 digits"
        if importlib.util.find_spec("sklearn")
        else "data      SYNTHETIC digits",
        "model     Linear(64, 32) -> Tanh -> Linear(32, 10): 2410 parameters",
        "training  2 epochs of Adam",
        "1. Input Hessians of the predicted class's logit, per sample",
        "result shape         (12, 64, 64): one 64 x 64 Hessian per image",
        "symmetry             max |H - H^T| = ",
        "vs loop oracle       samples 0, 1 in float64",
        "loop with one autograd.grad per row",
        "2. Per-sample curvature of the loss in the last layer's parameters",
        "as matrices          (5, 330, 330)",
        "batch_hessian of the 5 samples = mean of their Hessians",
        "3. Chunking under a memory budget",
        "refused before allocating anything large",
        "done in ",
    ]:
        assert line in demo_report, f"missing {line!r} in:\n{demo_report}"


def test_demo_numbers_are_right(demo_report: str) -> None:
    """The checks the demo prints are small, not just present."""

    def number(pattern: str) -> float:
        match = re.search(pattern + r"\s*([-+0-9.e]+)", demo_report)
        assert match, f"{pattern!r} not in:\n{demo_report}"
        return float(match.group(1))

    training = re.search(r"epochs of Adam in ([0-9.]+) (ms|s):", demo_report)
    assert training, demo_report
    assert float(training.group(1)) * (1e-3 if training.group(2) == "ms" else 1) < 120
    assert number(r"max \|H - H\^T\| =") < 1e-5
    assert number(r"max \|torchcurv - torchcurv\.reference\| =") < 1e-12
    assert number(r"mean of their Hessians: max \|diff\| =") < 1e-6
    assert demo_report.count("same result (max |diff| = ") == 2
    for value in re.findall(r"same result \(max \|diff\| = ([-+0-9.e]+)\)", demo_report):
        assert float(value) < 1e-5
    # Five rows of the per-sample curvature table, each positive semi-definite.
    rows = re.findall(
        r"^\s+\d+\s+\d+\s+\d+\s+[0-9.]+\s+[0-9.]+\s+(\S+)\s+(\S+)$",
        demo_report,
        flags=re.MULTILINE,
    )
    assert len(rows) == 5
    assert all(float(low) > -1e-5 and float(high) > 0 for low, high in rows)


def test_main_runs_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", *FAST, "--seed", "3", "--no-plot"]) == 0
    captured = capsys.readouterr()
    assert "seed 3" in captured.out
    assert "3. Chunking under a memory budget" in captured.out
    assert captured.err == ""  # no progress bar: not a terminal, and --no-progress


def test_progress_bar_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, pipe = Terminal(), io.StringIO()
    assert list(_demo._Progress(terminal, True).iterate(range(3), "work")) == [0, 1, 2]
    assert list(_demo._Progress(pipe, True).iterate(range(3), "work")) == [0, 1, 2]
    assert list(_demo._Progress(Terminal(), False).iterate(range(3), "work")) == [0, 1, 2]
    assert "work [####################..........] 2/3" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r")  # the bar is erased when done
    assert pipe.getvalue() == ""


def test_demo_restores_torch_threads() -> None:
    import torch

    before = torch.get_num_threads()
    _demo.run_demo(
        _demo.DemoOptions(batch=4, epochs=1, progress=False, threads=1), out=io.StringIO()
    )
    assert torch.get_num_threads() == before


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed"
)
def test_demo_draws_its_picture_by_default_and_points_further(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--batch", "6", "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / cli.DEFAULT_PLOT).stat().st_size > 10_000
    assert f"saved to {cli.DEFAULT_PLOT}" in out
    assert "docs/tutorials/input_hessian.rst, examples/plot_forum_question.py" in out
    for page in ("input_hessian", "parameter_curvature", "memory"):
        assert (Path(__file__).parents[1] / "docs" / "tutorials" / f"{page}.rst").exists()
    for example in ("plot_forum_question", "plot_parameter_spectra", "plot_memory_budget"):
        assert (Path(__file__).parents[1] / "examples" / f"{example}.py").exists()
    assert "_demo.py" in out


def test_demo_without_matplotlib_skips_the_default_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    assert cli.main(["demo", "--batch", "6", "--epochs", "1", "--no-progress"]) == 0
    assert "plot      none (pass --plot FILE" in capsys.readouterr().out
    assert not (tmp_path / cli.DEFAULT_PLOT).exists()


def test_demo_without_scikit_learn_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_demo, "_load_digits", lambda: None)
    assert cli.main(["demo", "--batch", "6", "--epochs", "1", "--no-progress", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC digits (scikit-learn is not installed" in out
    assert "result shape         (6, 64, 64)" in out


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed"
)
def test_demo_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hessian.png"
    assert cli.main(["demo", *FAST, "--plot", str(path)]) == 0
    assert path.read_bytes().startswith(b"\x89PNG")
    assert f"saved to {path}" in capsys.readouterr().out


def test_demo_plot_without_matplotlib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert cli.main(["demo", *FAST, "--plot", str(tmp_path / "h.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err
    assert "pip install" in err


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed"
)
@pytest.mark.parametrize(
    ("name", "message"),
    [("missing-folder/h.png", "does not exist"), ("h.unknown", "cannot write '.unknown' files")],
)
def test_demo_plot_bad_path_fails_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    assert cli.main(["demo", *FAST, "--plot", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "training" not in captured.out


def test_demo_batch_larger_than_the_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--batch", "5000", "--no-progress", "--no-plot"]) == 2
    assert "--batch 5000 is larger than the 1797 images" in capsys.readouterr().err


def test_bench_without_a_source_checkout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "_benchmark_script", lambda: None)
    assert cli.main(["bench"]) == 2
    assert "part of the source checkout" in capsys.readouterr().err


def test_bench_passes_arguments_through(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    script = tmp_path / "benchmarks" / "run.py"
    calls: list[tuple[list[str], Path]] = []

    def call(command: list[str], cwd: Path) -> int:
        calls.append((command, cwd))
        return 7

    monkeypatch.setattr(cli, "_benchmark_script", lambda: script)
    monkeypatch.setattr(subprocess, "call", call)
    assert cli.main(["bench", "--quick", "--only", "mlp"]) == 7
    assert cli.main(["bench", "--", "--help"]) == 7
    assert calls == [
        ([sys.executable, str(script), "--quick", "--only", "mlp"], tmp_path),
        ([sys.executable, str(script), "--help"], tmp_path),
    ]


def test_no_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "choose a command: demo or bench" in capsys.readouterr().err


def test_help_and_a_bad_argument_from_the_shell() -> None:
    """What a user types (two subprocesses only: each one imports torch)."""
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: python -m torchcurv" in result.stdout
    assert "demo" in result.stdout
    assert "bench" in result.stdout

    result = run_cli("demo", "--batch", "0")
    assert result.returncode == 2
    assert "argument --batch: expected a positive integer, got 0" in result.stderr
    assert "usage: python -m torchcurv demo" in result.stderr


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in [
        "--batch N",
        "--seed S",
        "--epochs E",
        "--threads T",
        "--plot FILE",
        "--no-progress",
    ]:
        assert option in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--batch", "many"], "argument --batch: expected a positive integer, got 'many'"),
        (["demo", "--seed", "-1"], "argument --seed: expected a non-negative integer, got -1"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
    ids=["batch-not-a-number", "negative-seed", "unknown-option", "unknown-command"],
)
def test_bad_arguments(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage:" in err
