"""Nox sessions for torchcurv.

Sessions:
    tests      pytest over tests/ and the package doctests (posargs go to pytest)
    tests_torch214
               the same pytest run on torch 2.14.1, the newest release the dependency
               range admits; a CUDA build of ~5.5 GB (it runs on CPU), so it is not a
               default session and CI does not run it: ``nox -s tests_torch214``
    lint       ruff check + ruff format --check
    typecheck  mypy --strict on src/torchcurv (config in pyproject.toml)
    docs       sphinx-build -W --keep-going into docs/_build/html
    demo       python -m torchcurv demo (posargs passed through)
    package    build the wheel and sdist, install the wheel (not editable) with torch
               and the demo extra in a clean environment, and run what a new user
               runs there: the README's first example, the demo, the harness import
    bench      python benchmarks/run.py (posargs passed through)

Every session that needs torch installs the pinned CPU wheel first, so that pip never
resolves ``torch`` to a (multi-GB) CUDA build.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

import nox
import nox.command

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "tests"]

TORCH = "torch==2.13.0"  # CPU wheel on local disk; a looser spec pulls a CUDA build
# The newest torch the dependency range (pyproject.toml) admits; a CUDA build (~5.5 GB).
TORCH_NEWEST = "torch==2.14.1"
RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
LINT_PATHS = ["src", "tests", "benchmarks", "examples", "noxfile.py", "docs"]


def install_project(session: nox.Session, extras: str = "", torch: str = TORCH) -> None:
    """Install ``torch`` (the pinned CPU wheel by default), then the project with ``extras``."""
    # --no-compile: byte-compiling all of torch triples the install time (~60 s vs ~18 s).
    session.install("--no-compile", torch)
    session.install("-e", f".[{extras}]" if extras else ".")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in {"", "0", "false", "no", "off"}


@nox.session
def tests(session: nox.Session) -> None:
    # demo and docs too: their tests (the demo, the docs' API coverage) must run, not skip.
    install_project(session, "test,demo,docs,datasets")
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")
    env = {"HYPOTHESIS_PROFILE": "dev"}
    if _truthy(os.environ.get("CI")):
        # The ci profile, and a floor on the hypothesis examples a full run must execute.
        env = {"HYPOTHESIS_PROFILE": "ci", "TORCHCURV_MIN_EXAMPLES": "10000"}
    session.run("pytest", *session.posargs, env=env)


@nox.session
def tests_torch214(session: nox.Session) -> None:
    # Outside nox.options.sessions and CI: the 2.14.1 wheel is a multi-GB CUDA build.
    install_project(session, "test", torch=TORCH_NEWEST)
    session.run("python", "-c", "import torch; print('torch', torch.__version__)")
    session.run("pytest", *session.posargs, env={"HYPOTHESIS_PROFILE": "dev"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install(RUFF)
    paths = [p for p in LINT_PATHS if os.path.exists(p)]
    failed = []
    for command in (["check"], ["format", "--check", "--output-format", "concise"]):
        try:  # run both, so that one CI log shows every problem
            session.run("ruff", *command, *paths)
        except nox.command.CommandFailed:
            failed.append(f"ruff {command[0]}")
    if failed:
        session.error(f"{' and '.join(failed)} failed")


@nox.session
def typecheck(session: nox.Session) -> None:
    install_project(session, "test,datasets")  # zarr's own types check map_dataset
    session.install(MYPY)
    session.run("mypy", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    if not os.path.exists("docs/conf.py"):
        session.error("docs/conf.py does not exist yet; nothing to build")
    install_project(session, "docs,demo,datasets")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def package(session: nox.Session) -> None:
    tmp = Path(session.create_tmp()).resolve()
    dist = tmp / "dist"
    for old in glob.glob(str(dist / "*")):
        os.remove(old)
    session.install("build")
    session.run("python", "-m", "build", "--outdir", str(dist), ".")
    wheels = glob.glob(str(dist / "*.whl"))
    if len(wheels) != 1 or not glob.glob(str(dist / "*.tar.gz")):
        session.error(f"expected one wheel and one sdist in {dist}, got {os.listdir(dist)}")
    session.install("--no-compile", TORCH)
    session.install(f"{wheels[0]}[demo]")
    readme = Path("README.md").read_text(encoding="utf-8")
    first = re.search(r"```python\n(.*?)```", readme, re.DOTALL)
    if first is None:
        session.error("README.md has no python example")
    example = tmp / "readme_first_example.py"
    example.write_text(first.group(1), encoding="utf-8")
    session.chdir(tmp)  # away from the source tree: the installed package is imported
    session.run("python", "-c", "import torchcurv, sys; print(torchcurv.__file__); "
                "assert 'site-packages' in torchcurv.__file__")  # fmt: skip
    session.run("python", str(example))
    session.run("python", "-c", "import sys, torchcurv.testing; "
                "assert 'hypothesis' not in sys.modules, 'it imported hypothesis'")  # fmt: skip
    session.run("python", "-m", "torchcurv", "demo", "--batch", "16", "--epochs", "2",
                "--no-progress")  # fmt: skip
    if not (tmp / "torchcurv_demo.png").exists():
        session.error("the demo drew no picture")


@nox.session
def demo(session: nox.Session) -> None:
    install_project(session, "demo")
    session.run("python", "-m", "torchcurv", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    install_project(session)
    session.run("python", "benchmarks/run.py", *session.posargs)
