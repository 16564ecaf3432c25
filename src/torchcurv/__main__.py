"""Command line: ``python -m torchcurv demo | bench``.

``demo`` trains a small network on 8x8 digits and shows per-sample curvature (see
`torchcurv._demo`); ``bench`` runs the benchmark suite of a source checkout
(``benchmarks/run.py``), passing other arguments through.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torchcurv

__all__ = ["DEFAULT_PLOT", "main"]

#: The demo's picture when no --plot is given (in the working directory).
DEFAULT_PLOT = "torchcurv_demo.png"

_DESCRIPTION = "torchcurv: per-sample Jacobians and Hessians for PyTorch, built on torch.func."

_EPILOG = "Run 'python -m torchcurv <command> --help' for a command's options."

_DEMO_DESCRIPTION = """\
Train a 64-32-10 tanh MLP on scikit-learn's 8x8 digits for a few seconds, then show
per-sample input Hessians (checked against the loop oracle in float64 and timed
against it), per-sample curvature of the loss in the last layer's parameters, and
the same input Hessians computed in chunks under a memory budget.
"""

_DEMO_EPILOG = """\
examples:
  python -m torchcurv demo
  python -m torchcurv demo --batch 64 --seed 1
  python -m torchcurv demo --plot hessian.png   (the picture's file; default
                                                torchcurv_demo.png, needs matplotlib)
  python -m torchcurv demo --no-plot
"""

_BENCH_EPILOG = """\
Arguments after 'bench' go to benchmarks/run.py, e.g.
  python -m torchcurv bench --quick
  python -m torchcurv bench -- --help     (the benchmark suite's own options)
The suite lives in the source checkout, not in the installed package.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        message = f"expected a non-negative integer, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _program_name() -> str:
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m torchcurv" if script in ("__main__.py", "-m", "-c", "") else script


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m torchcurv``."""
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    parser.add_argument(
        "--version", action="version", version=f"torchcurv {torchcurv.__version__}"
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="{demo,bench}")

    demo = commands.add_parser(
        "demo",
        help="train a small network on 8x8 digits (seconds), then compute its per-sample "
        "curvature, checked against the loop oracle",
        description=_DEMO_DESCRIPTION,
        epilog=_DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--batch",
        type=_positive_int,
        default=256,
        metavar="N",
        help="images whose input Hessians are computed (default: 256)",
    )
    demo.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="S",
        help="seed of the data split, weights and training (default: 0)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=10,
        metavar="E",
        help="training epochs (default: 10)",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="T",
        help="torch threads (default: 1; the demo's models are too small to gain from more)",
    )
    picture = demo.add_mutually_exclusive_group()
    picture.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"where to save the heatmap of one input Hessian (default: {DEFAULT_PLOT} "
        "in the working directory, when matplotlib is installed)",
    )
    picture.add_argument(
        "--no-plot",
        dest="no_plot",
        action="store_true",
        help="do not draw the heatmap",
    )
    demo.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="do not draw progress bars on stderr",
    )

    commands.add_parser(
        "bench",
        help="run the benchmark suite (benchmarks/run.py of a source checkout)",
        description="Run benchmarks/run.py: torchcurv against vmap(hessian),\n"
        "autograd.functional and the loop; writes benchmarks/results.md.",
        epilog=_BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _benchmark_script() -> Path | None:
    """``benchmarks/run.py`` of the source checkout this package runs from, if any."""
    root = Path(__file__).resolve().parents[2]
    script = root / "benchmarks" / "run.py"
    return script if script.is_file() and (root / "pyproject.toml").is_file() else None


def _bench(arguments: list[str]) -> int:
    script = _benchmark_script()
    if script is None:
        print(
            "torchcurv bench: the benchmark suite (benchmarks/run.py) is part of the source "
            "checkout, not of the installed package. Run it from a clone of the repository: "
            "'nox -s bench' or 'python -m torchcurv bench'.",
            file=sys.stderr,
        )
        return 2
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    return subprocess.call([sys.executable, str(script), *arguments], cwd=script.parents[1])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print(f"\n{parser.prog}: error: choose a command: demo or bench", file=sys.stderr)
        return 2
    if args.command == "bench":
        return _bench(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    from ._demo import DemoError, DemoOptions, run_demo

    plot = args.plot
    if args.no_plot:
        plot = None
    elif plot is None and importlib.util.find_spec("matplotlib") is not None:
        plot = Path(DEFAULT_PLOT)  # a picture by default, where matplotlib can draw it
    options = DemoOptions(
        batch=args.batch,
        seed=args.seed,
        epochs=args.epochs,
        plot=plot,
        progress=args.progress,
        threads=args.threads,
    )
    try:
        run_demo(options)
    except DemoError as error:
        print(f"{parser.prog} demo: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{parser.prog} demo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
