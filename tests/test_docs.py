"""The documentation cannot drift: every public name has an API entry.

The Sphinx build makes the same check (``docs/_ext/torchcurv_docs.py``, a warning that
``-W`` turns into an error); this copy runs with the unit tests, without Sphinx. The
extension's own machinery is tested too where Sphinx is installed (the ``docs`` extra).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
API = DOCS / "api.rst"
COVERED = ["torchcurv", "torchcurv.reference", "torchcurv.testing", "torchcurv.testing.strategies"]
HAS_SPHINX = importlib.util.find_spec("sphinx") is not None

_DIRECTIVE = re.compile(r"^\.\. auto(\w+):: (\S+)\s*$((?:\n   .*)*)", re.MULTILINE)


def _documented() -> tuple[set[str], set[str]]:
    """``(objects, modules documented with :members:)`` named in docs/api.rst."""
    objects, with_members = set(), set()
    for kind, name, options in _DIRECTIVE.findall(API.read_text(encoding="utf-8")):
        objects.add(name)
        if kind == "module" and ":members:" in options:
            with_members.add(name)
    return objects, with_members


@pytest.mark.parametrize("module_name", COVERED)
def test_every_public_name_is_in_the_api_reference(module_name: str) -> None:
    objects, with_members = _documented()
    module = importlib.import_module(module_name)
    missing = []
    for name in module.__all__:
        full = f"{module_name}.{name}"
        if isinstance(getattr(module, name), types.ModuleType):
            covered = full in objects
        else:
            covered = full in objects or module_name in with_members
        if not covered:
            missing.append(full)
    assert not missing, f"not documented in {API}: {missing}"


def test_every_tutorial_is_in_the_toctree() -> None:
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    for page in sorted((DOCS / "tutorials").glob("*.rst")):
        assert f"tutorials/{page.stem}" in index, f"{page.name} is not linked from index.rst"


# --------------------------------------------------------------------------------------
# the Sphinx extension (needs the docs extra)
# --------------------------------------------------------------------------------------


def _extension() -> Any:
    with warnings.catch_warnings():  # Sphinx's own deprecations are not ours
        warnings.simplefilter("ignore")
        sys.path.insert(0, str(DOCS / "_ext"))
        try:
            return importlib.import_module("torchcurv_docs")
        finally:
            sys.path.remove(str(DOCS / "_ext"))


@pytest.mark.skipif(not HAS_SPHINX, reason="Sphinx is not installed (docs extra)")
def test_markdown_table_becomes_a_table() -> None:
    from docutils import nodes

    ext = _extension()
    result = ext.markdown_to_nodes(
        "# Results\n\nSome `code` and **bold**.\n\n"
        "| method | time |\n|:--|--:|\n| `torchcurv` | 1.0 ms |\n| loop | 9 ms |\n"
    )
    assert [type(n) for n in result] == [nodes.rubric, nodes.paragraph, nodes.table]
    assert result[0].astext() == "Results"
    assert isinstance(result[1][1], nodes.literal)
    rows = [[entry.astext() for entry in row] for row in result[2].findall(nodes.row)]
    assert rows == [["method", "time"], ["torchcurv", "1.0 ms"], ["loop", "9 ms"]]


def _build(tmp_path: Path, page: str, conf: str = "") -> tuple[int, str, str]:
    """Build a one-page project with the extension; (status, text output, warnings)."""
    import io

    from sphinx.application import Sphinx

    source = tmp_path / "source"
    source.mkdir()
    (source / "conf.py").write_text(
        f"import sys\nsys.path.insert(0, {str(DOCS / '_ext')!r})\n"
        "extensions = ['sphinx.ext.autodoc', 'sphinx.ext.napoleon', 'torchcurv_docs']\n" + conf,
        encoding="utf-8",
    )
    (source / "index.rst").write_text(page, encoding="utf-8")
    status, warning = io.StringIO(), io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = Sphinx(
            str(source),
            str(source),
            str(tmp_path / "out"),
            str(tmp_path / "doctrees"),
            "text",
            status=status,
            warning=warning,
            freshenv=True,
            keep_going=True,
        )
        app.build(force_all=True)
    text = (tmp_path / "out" / "index.txt").read_text(encoding="utf-8")
    return app.statuscode, text, warning.getvalue()


@pytest.mark.skipif(not HAS_SPHINX, reason="Sphinx is not installed (docs extra)")
def test_runblock_shows_code_and_output(tmp_path: Path) -> None:
    status, text, warnings_text = _build(
        tmp_path,
        """\
Page
====

.. runblock::

   x = 6 * 7

.. runblock::

   print("x is", x)

.. runblock::
   :raises: ZeroDivisionError

   1 / 0
""",
    )
    assert status == 0, warnings_text
    assert "x is 42" in text
    assert 'print("x is", x)' in text
    assert "ZeroDivisionError: division by zero" in text


@pytest.mark.skipif(not HAS_SPHINX, reason="Sphinx is not installed (docs extra)")
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("raise ValueError('boom')", "ValueError: boom"),
        ("import warnings\n   warnings.warn('careful')", "UserWarning: careful"),
        ("pass", "expected to raise KeyError"),
    ],
    ids=["exception", "warning", "missing-exception"],
)
def test_runblock_failures_fail_the_build(tmp_path: Path, body: str, message: str) -> None:
    options = "   :raises: KeyError\n" if body == "pass" else ""
    status, _, warnings_text = _build(
        tmp_path, f"Page\n====\n\n.. runblock::\n{options}\n   {body}\n"
    )
    assert status == 1
    assert "runblock failed" in warnings_text
    assert message in warnings_text


@pytest.mark.skipif(not HAS_SPHINX, reason="Sphinx is not installed (docs extra)")
def test_api_coverage_check_names_what_is_missing(tmp_path: Path) -> None:
    _, _, warnings_text = _build(
        tmp_path,
        "API\n===\n\n.. autofunction:: torchcurv.hessian\n",
        conf="api_coverage = {'torchcurv': 'index'}\n",
    )
    assert "torchcurv.hessian is in __all__" not in warnings_text
    assert "torchcurv.jacobian (expected on 'index') is in __all__ but not" in warnings_text
    assert "torchcurv.reference (expected on 'index') is in __all__ but not" in warnings_text


def test_the_readme_snippets_run_in_order() -> None:
    """Every ```python block of the README, run top to bottom in one namespace."""
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) >= 4
    namespace: dict[str, Any] = {}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as error:  # pragma: no cover - the message is the point
            pytest.fail(f"README python block {index + 1} failed: {error!r}\n{block}")
