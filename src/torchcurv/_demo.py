"""The walkthrough behind ``python -m torchcurv demo``.

Trains a small tanh MLP (64 -> 32 -> 10) for a few seconds on scikit-learn's bundled 8x8
digits (or, without scikit-learn, on a clearly labelled synthetic stand-in), then shows
the three things torchcurv is for, each checked as it goes:

1. per-sample input Hessians of the predicted class's logit: shape, symmetry, agreement
   with the loop oracle `torchcurv.reference` in float64, and time against that loop;
2. per-sample curvature of the cross-entropy loss in the last layer's parameters;
3. the same input Hessians computed in chunks under a memory budget.

The report goes to `out` (stdout); a progress bar for the slower steps goes to `err`
(stderr) when it is a terminal.
"""

from __future__ import annotations

import copy
import math
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

import torchcurv

__all__ = ["DemoError", "DemoOptions", "check_plot_path", "run_demo"]

#: How many samples the (slow) loop oracle is timed on; its time is scaled to the batch.
LOOP_SAMPLES = 256
#: Samples compared with the loop oracle in float64.
ORACLE_SAMPLES = 2
#: Samples whose loss curvature is shown.
CURVATURE_SAMPLES = 5


class DemoError(Exception):
    """A demo option that cannot be honoured (the message says why and what to do)."""


@dataclass(frozen=True)
class DemoOptions:
    """Settings of the demo (the command-line options of ``python -m torchcurv demo``).

    Attributes:
        batch: Number of images whose input Hessians are computed.
        seed: Seed of the data split, the initial weights and the training order.
        epochs: Training epochs.
        plot: Where to save a heatmap of one input Hessian (needs matplotlib), or None.
        progress: Whether to draw progress bars on `err` (only when it is a terminal).
        threads: torch's intra-op threads during the demo (restored afterwards). The
            demo's models are tiny: one thread is as fast as several on an idle machine
            and much faster on a busy one.
    """

    batch: int = 256
    seed: int = 0
    epochs: int = 10
    plot: Path | None = None
    progress: bool = True
    threads: int = 1


# --------------------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar on a terminal; silent elsewhere (pipes, files, tests)."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled and bool(getattr(stream, "isatty", lambda: False)())

    def iterate(self, items: range, label: str) -> Iterator[int]:
        total = len(items)
        for done, item in enumerate(items):
            self._draw(label, done, total)
            yield item
        self._clear()

    def _draw(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * done // max(total, 1)
        self.stream.write(f"\r  {label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        self.stream.flush()

    def _clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 78 + "\r")
            self.stream.flush()


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


def _size(size: int) -> str:
    """A memory budget as torchcurv accepts it: ``"8MiB"``, ``"512KiB"`` or bytes."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _timed(compute: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = compute()
    return result, time.perf_counter() - start


# --------------------------------------------------------------------------------------
# data and model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Data:
    description: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def _load_digits() -> tuple[torch.Tensor, torch.Tensor] | None:
    """scikit-learn's bundled 8x8 digits as ``([1797, 64] in [0, 1], [1797])``, or None."""
    with warnings.catch_warnings():  # third-party import noise is not the demo's business
        warnings.simplefilter("ignore")
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            return None
        digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels


def _synthetic_digits(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in with the digits' shapes: 10 smooth 8x8 prototypes plus noise."""
    prototypes = torch.rand(10, 1, 4, 4, generator=generator)
    prototypes = F.interpolate(prototypes, size=(8, 8), mode="bilinear", align_corners=False)
    labels = torch.arange(1797) % 10
    noise = 0.25 * torch.randn(1797, 64, generator=generator)
    images = (prototypes.reshape(10, 64)[labels] + noise).clamp(0, 1)
    return images, labels


def _data(seed: int) -> _Data:
    generator = torch.Generator().manual_seed(seed)
    loaded = _load_digits()
    if loaded is not None:
        images, labels = loaded
        source = "scikit-learn's 8x8 digits"
    else:
        images, labels = _synthetic_digits(generator)
        source = (
            "SYNTHETIC digits (scikit-learn is not installed; "
            "pip install 'torchcurv[demo]' for the real ones)"
        )
    order = torch.randperm(len(labels), generator=generator)
    split = int(0.8 * len(labels))
    train, test = order[:split], order[split:]
    description = (
        f"{source}: {len(labels)} images of 8x8 pixels, 10 classes; "
        f"{len(train)} train / {len(test)} test"
    )
    return _Data(description, images[train], labels[train], images[test], labels[test])


def _train(data: _Data, options: DemoOptions, progress: _Progress) -> tuple[nn.Module, str]:
    torch.manual_seed(options.seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(options.seed)
    start = time.perf_counter()
    for _ in progress.iterate(range(options.epochs), "training"):
        order = torch.randperm(len(data.y_train), generator=generator)
        for first in range(0, len(order), 64):
            batch = order[first : first + 64]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.X_train[batch]), data.y_train[batch])
            torch.autograd.backward(loss)
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        train_acc = (model(data.X_train).argmax(1) == data.y_train).float().mean().item()
        test_acc = (model(data.X_test).argmax(1) == data.y_test).float().mean().item()
    summary = (
        f"{options.epochs} epochs of Adam in {_ms(seconds)}: train accuracy "
        f"{train_acc:.1%}, test accuracy {test_acc:.1%}"
    )
    return model, summary


def _predicted_logit(out: torch.Tensor) -> torch.Tensor:
    """The largest logit of one sample: the logit of its predicted class."""
    return out.max()


# --------------------------------------------------------------------------------------
# the three sections
# --------------------------------------------------------------------------------------


def _input_hessians(
    model: nn.Module, X: torch.Tensor, source: str, out: TextIO, progress: _Progress
) -> tuple[torch.Tensor, float]:
    batch = len(X)
    print("1. Input Hessians of the predicted class's logit, per sample", file=out)
    print("   torchcurv.per_sample_hessian(model, X, output=lambda out: out.max())", file=out)
    torchcurv.per_sample_hessian(model, X[:2], output=_predicted_logit)  # warm-up
    H, seconds = _timed(lambda: torchcurv.per_sample_hessian(model, X, output=_predicted_logit))
    side = X.shape[1]
    print(f"   batch                {batch} {source} images", file=out)
    print(
        f"   result shape         {tuple(H.shape)}: one {side} x {side} Hessian per image",
        file=out,
    )
    asymmetry = (H - H.transpose(1, 2)).abs().max().item()
    print(f"   symmetry             max |H - H^T| = {asymmetry:.1e}", file=out)

    # The loop oracle in float64, on a couple of samples.
    model64 = copy.deepcopy(model).double()
    X64 = X[:ORACLE_SAMPLES].double()
    H64 = torchcurv.per_sample_hessian(model64, X64, output=_predicted_logit)
    worst = 0.0
    for i in range(len(X64)):
        oracle = torchcurv.reference.hessian(lambda x: model64(x.unsqueeze(0))[0].max())(X64[i])
        worst = max(worst, (H64[i] - oracle).abs().max().item())
    float32_error = (H[:ORACLE_SAMPLES].double() - H64).abs().max().item()
    scale = H64.abs().max().item()
    samples = ", ".join(str(i) for i in range(len(X64)))
    print(
        f"   vs loop oracle       samples {samples} in float64: max |torchcurv - "
        f"torchcurv.reference| = {worst:.1e}",
        file=out,
    )
    print(
        f"                        (the float32 result is within {float32_error:.1e} of it; "
        f"entries reach {scale:.2g})",
        file=out,
    )

    # Time against the loop, one autograd.grad per row (timed on at most LOOP_SAMPLES).
    timed_samples = min(batch, LOOP_SAMPLES)
    start = time.perf_counter()
    for i in progress.iterate(range(timed_samples), "loop oracle"):
        torchcurv.reference.hessian(lambda x: model(x.unsqueeze(0))[0].max())(X[i])
    loop = (time.perf_counter() - start) * batch / timed_samples
    scaled = "" if timed_samples == batch else f" (timed on {timed_samples}, scaled)"
    print(
        f"   time                 torchcurv {_ms(seconds)}; loop with one autograd.grad per "
        f"row {_ms(loop)}{scaled}: {loop / seconds:.0f}x faster",
        file=out,
    )
    return H, seconds


def _parameter_curvature(model: nn.Module, X: torch.Tensor, y: torch.Tensor, out: TextIO) -> None:
    print("2. Per-sample curvature of the loss in the last layer's parameters", file=out)
    print("   torchcurv.per_sample_hessian(model, X, targets=y, loss=F.cross_entropy,", file=out)
    print('                                wrt="params", params="2.*")', file=out)
    X, y = X[:CURVATURE_SAMPLES], y[:CURVATURE_SAMPLES]
    H = torchcurv.per_sample_hessian(
        model, X, targets=y, loss=F.cross_entropy, wrt="params", params="2.*"
    )
    M = torchcurv.to_matrix(H, batch_dims=1)
    blocks = ", ".join(f"{name} {tuple(H[name][name].shape[1:])}" for name in H)
    print(f"   blocks               H[name][name] for {blocks}", file=out)
    print(
        f"   as matrices          {tuple(M.shape)} (torchcurv.to_matrix(H, batch_dims=1))",
        file=out,
    )
    with torch.no_grad():
        logits = model(X)
    losses = F.cross_entropy(logits, y, reduction="none")
    eigenvalues = torch.linalg.eigvalsh(M.double())
    print("   sample  label  predicted    loss    trace  min eigenvalue  max eigenvalue", file=out)
    for i in range(len(X)):
        print(
            f"   {i:6d}  {int(y[i]):5d}  {int(logits[i].argmax()):9d}  {losses[i]:6.3f}  "
            f"{M[i].trace():7.4f}  {eigenvalues[i, 0]:14.1e}  {eigenvalues[i, -1]:14.4f}",
            file=out,
        )
    print(
        "   (positive semi-definite up to rounding: cross-entropy is convex in the logits,",
        file=out,
    )
    print("   and the logits are linear in this layer's parameters)", file=out)
    H_batch = torchcurv.batch_hessian(model, X, y, loss=F.cross_entropy, params="2.*")
    difference = (torchcurv.to_matrix(H_batch) - M.mean(dim=0)).abs().max().item()
    print(
        f"   batch_hessian of the {len(X)} samples = mean of their Hessians: max |diff| = "
        f"{difference:.1e}",
        file=out,
    )


def _memory_budget(
    model: nn.Module, X: torch.Tensor, H: torch.Tensor, seconds: float, out: TextIO
) -> None:
    print("3. Chunking under a memory budget", file=out)
    setup = torchcurv.initialize()  # torch's one-time set-up, before the budgets
    if setup:
        print(f"   torchcurv.initialize(): torch's one-time set-up took {_mib(setup)}", file=out)
    result_bytes = H.numel() * H.element_size()
    budget = _size(2 * result_bytes)
    print(
        f"   the result alone takes {_mib(result_bytes)}; unchunked it took {_ms(seconds)}",
        file=out,
    )
    runs: list[tuple[str, Callable[[], torch.Tensor]]] = [
        (
            f'memory_budget="{budget}"',
            lambda: torchcurv.per_sample_hessian(
                model, X, output=_predicted_logit, memory_budget=budget
            ),
        ),
        (
            "chunk_size=32",
            lambda: torchcurv.per_sample_hessian(model, X, output=_predicted_logit, chunk_size=32),
        ),
    ]
    for label, compute in runs:
        try:
            chunked, chunked_seconds = _timed(compute)
        except torchcurv.MemoryBudgetError as error:
            print(f"   {label:24} refused: {error}", file=out)
            continue
        difference = (chunked - H).abs().max().item()
        print(
            f"   {label:24} same result (max |diff| = {difference:.1e}) in {_ms(chunked_seconds)}",
            file=out,
        )
    tiny = _size(result_bytes // 4)
    try:
        torchcurv.per_sample_hessian(model, X, output=_predicted_logit, memory_budget=tiny)
    except torchcurv.MemoryBudgetError as error:
        label = f'memory_budget="{tiny}"'
        print(f"   {label:24} refused before allocating anything large:", file=out)
        print(
            textwrap.fill(str(error), width=92, initial_indent="     ", subsequent_indent="     "),
            file=out,
        )
    else:  # pragma: no cover - the planner cannot fit a result into a quarter of its size
        print(f'   memory_budget="{tiny}": accepted', file=out)


# --------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------


def check_plot_path(path: Path) -> None:
    """Fail early (before training) if a plot cannot be written to `path`.

    Raises:
        DemoError: If matplotlib is missing, the folder does not exist, or the file type
            is not one matplotlib writes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise DemoError(
                "--plot needs matplotlib, which is not installed: "
                "pip install matplotlib (or pip install 'torchcurv[demo]')."
            ) from None
        formats = Figure().canvas.get_supported_filetypes()
    if not path.parent.is_dir():
        raise DemoError(f"--plot {path}: the folder {path.parent} does not exist.")
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise DemoError(
            f"--plot {path}: cannot write '.{suffix}' files; use one of "
            + ", ".join(f".{s}" for s in sorted(formats))
            + "."
        )


def _plot(path: Path, image: torch.Tensor, hessian: torch.Tensor, title: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from matplotlib.figure import Figure

        side = math.isqrt(image.numel())
        figure = Figure(figsize=(12, 4))
        axes = figure.subplots(1, 3, width_ratios=[1, 1.25, 1.25])
        axes[0].imshow(image.reshape(side, side).numpy(), cmap="gray_r")
        axes[0].set_title("input image")
        limit = hessian.abs().max().item() or 1.0
        shown = axes[1].imshow(hessian.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[1].set_title(f"input Hessian ({hessian.shape[0]} x {hessian.shape[1]})")
        figure.colorbar(shown, ax=axes[1])
        diagonal = hessian.diagonal().reshape(side, side)
        limit = diagonal.abs().max().item() or 1.0
        shown = axes[2].imshow(diagonal.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        axes[2].set_title(f"diagonal as {side} x {side}")
        figure.colorbar(shown, ax=axes[2])
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        figure.suptitle(title)
        figure.tight_layout()
        figure.savefig(path, dpi=100)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def run_demo(options: DemoOptions, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Run the demo and print its report.

    Args:
        options: The settings.
        out: Where the report goes; default stdout.
        err: Where progress bars go (only drawn on a terminal); default stderr.

    Raises:
        DemoError: If an option cannot be honoured (e.g. a batch larger than the data).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if options.plot is not None:
        check_plot_path(options.plot)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        _run(options, out, _Progress(err, options.progress))
    finally:
        torch.set_num_threads(threads)


# Where each section continues: the docs pages (``nox -s docs`` builds them) and the
# gallery's scripts of a source checkout.
_FURTHER = (
    ("1. input Hessians", "docs/tutorials/input_hessian.rst, examples/plot_forum_question.py"),
    ("2. parameter curvature",
     "docs/tutorials/parameter_curvature.rst, examples/plot_parameter_spectra.py"),
    ("3. memory budgets", "docs/tutorials/memory.rst, examples/plot_memory_budget.py"),
)  # fmt: skip


def _run(options: DemoOptions, out: TextIO, progress: _Progress) -> None:
    start = time.perf_counter()
    threads = "1 thread" if options.threads == 1 else f"{options.threads} threads"
    print(
        f"torchcurv {torchcurv.__version__} demo (torch {torch.__version__}, {threads}, "
        f"seed {options.seed})",
        file=out,
    )
    print(file=out)

    data = _data(options.seed)
    print(f"data      {data.description}", file=out)
    available = len(data.y_test) + len(data.y_train)
    if options.batch > available:
        raise DemoError(
            f"--batch {options.batch} is larger than the {available} images "
            f"there are; pass --batch {available} or less."
        )
    # The batch: test images first, then training images if more are asked for.
    X = torch.cat([data.X_test, data.X_train])[: options.batch]
    y = torch.cat([data.y_test, data.y_train])[: options.batch]
    source = "test" if options.batch <= len(data.y_test) else "test and training"
    model, summary = _train(data, options, progress)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"model     Linear(64, 32) -> Tanh -> Linear(32, 10): {parameters} parameters, float32",
        file=out,
    )
    print(f"training  {summary}", file=out)
    print(file=out)

    H, seconds = _input_hessians(model, X, source, out, progress)
    print(file=out)
    _parameter_curvature(model, X, y, out)
    print(file=out)
    _memory_budget(model, X, H, seconds, out)
    print(file=out)

    if options.plot is not None:
        with torch.no_grad():
            predicted = int(model(X[:1]).argmax())
        _plot(
            options.plot,
            X[0],
            H[0],
            f"image 0 (label {int(y[0])}): Hessian of the logit of class {predicted}",
        )
        print(f"plot      heatmap of image 0's input Hessian saved to {options.plot}", file=out)
    else:
        print("plot      none (pass --plot FILE with matplotlib installed)", file=out)
    print(file=out)
    code = Path(__file__).resolve()
    print("more      the code of each section: the functions _input_hessians,", file=out)
    print(f"          _parameter_curvature and _memory_budget in {code}", file=out)
    for section, page in _FURTHER:
        print(f"          {section}: {page}", file=out)
    print(f"done in {_ms(time.perf_counter() - start)}", file=out)
