"""Sphinx extension for the torchcurv docs: executed examples, a Markdown include, API coverage.

``.. runblock::``
    Executes its Python content at build time and renders the code followed by what it
    printed. All blocks of one page share one namespace, run in page order, with
    ``docs/_generated`` as the working directory (so ``fig.savefig("x.png")``, which
    works when the snippet is copied anywhere, lands where ``.. image::
    /_generated/x.png`` finds it). An exception, or a warning the code emits,
    fails the build: the failure is reported with its location and the build exits with
    status 1, with or without ``-W``; the page is executed again by the next build.

    Options: ``:raises: ExcName`` (the block must raise that exception; its last line is
    shown as output), ``:hide-code:``, ``:hide-output:``.

``.. include-markdown:: path``
    Renders a small Markdown file (headings, paragraphs, lists, pipe tables, code fences,
    inline code, emphasis, links) as document nodes. With ``:optional:`` a missing file is
    not an error: the directive's content (reStructuredText) is shown instead.

API coverage
    ``api_coverage = {"module": "docname", ...}`` in ``conf.py``: every name in each
    module's ``__all__`` must be documented (``autofunction``, ``autoclass``,
    ``automodule``...) on that page, or the build warns, which ``-W`` turns into an error.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

# Warnings that are torch's own business, ignored as in the pytest configuration.
_IGNORED_WARNINGS = (r"`torch\.jit\.script` is deprecated",)

# One namespace per page (not stored on the environment: it is pickled).
_NAMESPACES: dict[str, dict[str, Any]] = {}
# Failures of this build: (docname, line, message).
_FAILURES: list[tuple[str, int, str]] = []
_TIMINGS: dict[str, float] = {}


# --------------------------------------------------------------------------------------
# runblock
# --------------------------------------------------------------------------------------


def _reset_namespace(app: Sphinx, docname: str, source: list[str]) -> None:
    _NAMESPACES.pop(docname, None)
    _TIMINGS.pop(docname, None)


def _failed_docs(env: BuildEnvironment) -> set[str]:
    """Pages whose examples failed: read again by the next build, even if unchanged."""
    if not hasattr(env, "runblock_failed"):
        env.runblock_failed = set()  # type: ignore[attr-defined]
    failed: set[str] = env.runblock_failed  # type: ignore[attr-defined]
    return failed


def _outdated(
    app: Sphinx, env: BuildEnvironment, added: set[str], changed: set[str], removed: set[str]
) -> list[str]:
    return sorted(_failed_docs(env) - removed)


def _purge(app: Sphinx, env: BuildEnvironment, docname: str) -> None:
    _failed_docs(env).discard(docname)


class RunBlock(SphinxDirective):
    """Execute Python at build time and show the code and its printed output."""

    has_content = True
    option_spec = {  # noqa: RUF012 - docutils API
        "raises": directives.unchanged_required,
        "hide-code": directives.flag,
        "hide-output": directives.flag,
    }

    def run(self) -> list[nodes.Node]:
        code = "\n".join(self.content)
        docname = self.env.docname
        _, line = self.get_source_info()
        self._note_package_sources()
        namespace = _NAMESPACES.setdefault(docname, {"__name__": f"runblock:{docname}"})
        expected = self.options.get("raises")
        output, problem = self._execute(code, namespace, f"<{docname}.rst:{line}>", expected)
        if problem is not None:
            _FAILURES.append((docname, line, problem))
            _failed_docs(self.env).add(docname)
            logger.warning(
                "runblock failed:\n%s", problem, location=self.get_location(), type="runblock"
            )
        container = nodes.container(classes=["runblock"])
        if "hide-code" not in self.options:
            code_node = nodes.literal_block(
                code, code, language="python", classes=["runblock-code"]
            )
            self.set_source_info(code_node)
            container += code_node
        output = output.rstrip()
        if output and "hide-output" not in self.options:
            out_node = nodes.literal_block(
                output, output, language="none", classes=["runblock-output"]
            )
            self.set_source_info(out_node)
            container += out_node
        return [container]

    def _note_package_sources(self) -> None:
        """Re-run the page when the package changes (incremental builds)."""
        import torchcurv

        for path in sorted(Path(torchcurv.__file__).parent.rglob("*.py")):
            self.env.note_dependency(str(path))

    def _execute(
        self, code: str, namespace: dict[str, Any], filename: str, expected: str | None
    ) -> tuple[str, str | None]:
        """Run `code`; return (printed output, a failure description or None)."""
        stdout = io.StringIO()
        start = time.perf_counter()
        cwd = os.getcwd()
        problem = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for pattern in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", pattern)
            try:
                os.chdir(Path(self.env.srcdir, self.config.runblock_generated_dir))
                with contextlib.redirect_stdout(stdout):
                    exec(compile(code, filename, "exec"), namespace)
            except Exception as error:
                names = {cls.__name__ for cls in type(error).__mro__}
                names |= {f"{cls.__module__}.{cls.__qualname__}" for cls in type(error).__mro__}
                if expected is not None and expected in names:
                    # The last line of the traceback, as a console shows it, and any notes
                    # (hypothesis attaches the falsifying example as one).
                    stdout.write(f"{type(error).__qualname__}: {error}\n")
                    for note in getattr(error, "__notes__", ()):
                        stdout.write(f"{note}\n")
                else:
                    problem = "".join(traceback.format_exception(error))
            else:
                if expected is not None:
                    problem = f"the block was expected to raise {expected}, but did not."
            finally:
                os.chdir(cwd)
        elapsed = time.perf_counter() - start
        _TIMINGS[self.env.docname] = _TIMINGS.get(self.env.docname, 0.0) + elapsed
        logger.verbose("runblock %s: %.2fs", filename, elapsed)
        if problem is None and caught:
            problem = "the block emitted warnings:\n" + "\n".join(
                f"  {w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
            )
        return stdout.getvalue(), problem


# --------------------------------------------------------------------------------------
# include-markdown
# --------------------------------------------------------------------------------------

_INLINE = re.compile(
    r"(?P<code>`+)(?P<code_text>.+?)(?P=code)"
    r"|\*\*(?P<strong>.+?)\*\*"
    r"|(?<![\w*])\*(?P<em>[^*\s](?:[^*]*[^*\s])?)\*(?![\w*])"
    r"|\[(?P<link_text>[^\]]+)\]\((?P<link_url>[^)\s]+)\)"
)
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")


def markdown_inline(text: str) -> list[nodes.Node]:
    """Inline Markdown (code, strong, emphasis, links) as docutils nodes."""
    result: list[nodes.Node] = []
    position = 0
    for match in _INLINE.finditer(text):
        if match.start() > position:
            result.append(nodes.Text(text[position : match.start()]))
        if match.group("code") is not None:
            literal = match.group("code_text").strip()
            result.append(nodes.literal(literal, literal))
        elif match.group("strong") is not None:
            result.append(nodes.strong("", "", *markdown_inline(match.group("strong"))))
        elif match.group("em") is not None:
            result.append(nodes.emphasis("", "", *markdown_inline(match.group("em"))))
        else:
            label = match.group("link_text")
            result.append(nodes.reference(label, label, refuri=match.group("link_url")))
        position = match.end()
    if position < len(text):
        result.append(nodes.Text(text[position:]))
    return result


def _table_cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [cell.strip().replace("\\|", "|") for cell in cells]


def _table(header: list[str], rows: list[list[str]]) -> nodes.table:
    width = len(header)
    table = nodes.table(classes=["markdown-table"])
    group = nodes.tgroup(cols=width)
    table += group
    for column in range(width):
        # Text-based writers lay the table out with these widths (HTML sizes it itself).
        texts = [cells[column] for cells in [header, *rows] if column < len(cells)]
        group += nodes.colspec(colwidth=min(max(3, *(len(text) for text in texts)), 40))

    def make_row(cells: list[str]) -> nodes.row:
        row = nodes.row()
        for cell in (cells + [""] * width)[:width]:
            entry = nodes.entry()
            entry += nodes.paragraph("", "", *markdown_inline(cell))
            row += entry
        return row

    head = nodes.thead()
    head += make_row(header)
    body = nodes.tbody()
    for cells in rows:
        body += make_row(cells)
    group += head
    group += body
    return table


def markdown_to_nodes(text: str) -> list[nodes.Node]:
    """Block-level Markdown (the subset benchmark reports use) as docutils nodes."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    lines = text.splitlines()
    result: list[nodes.Node] = []
    paragraph: list[str] = []
    bullets: nodes.bullet_list | None = None

    def flush() -> None:
        nonlocal bullets
        if paragraph:
            result.append(nodes.paragraph("", "", *markdown_inline(" ".join(paragraph))))
            paragraph.clear()
        bullets = None

    index = 0
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            language = stripped[3:].strip() or "none"
            block = []
            index += 1
            while index < len(lines) and not lines[index].strip().startswith("```"):
                block.append(lines[index])
                index += 1
            body = "\n".join(block)
            result.append(nodes.literal_block(body, body, language=language))
        elif (
            (stripped.startswith("|") or "|" in stripped)
            and index + 1 < len(lines)
            and _TABLE_RULE.match(lines[index + 1])
        ):
            flush()
            header = _table_cells(line)
            rows = []
            index += 2
            while index < len(lines) and lines[index].strip() and "|" in lines[index]:
                rows.append(_table_cells(lines[index]))
                index += 1
            result.append(_table(header, rows))
            continue
        elif match := _HEADING.match(line):
            flush()
            result.append(nodes.rubric("", "", *markdown_inline(match.group(2))))
        elif match := _BULLET.match(line):
            if paragraph:
                flush()
            if bullets is None:
                bullets = nodes.bullet_list(bullet="-")
                result.append(bullets)
            item = nodes.list_item()
            item += nodes.paragraph("", "", *markdown_inline(match.group(1)))
            bullets += item
        elif not stripped:
            flush()
        elif bullets is not None and line.startswith((" ", "\t")):
            last = bullets.children[-1].children[-1]
            last += [nodes.Text(" "), *markdown_inline(stripped)]
        else:
            bullets = None
            paragraph.append(stripped)
        index += 1
    flush()
    return result


class IncludeMarkdown(SphinxDirective):
    """Render a Markdown file; with ``:optional:``, the content stands in when it is missing."""

    required_arguments = 1
    has_content = True
    option_spec = {"optional": directives.flag}  # noqa: RUF012 - docutils API

    def run(self) -> list[nodes.Node]:
        relative, absolute = self.env.relfn2path(self.arguments[0])
        path = Path(absolute)
        if path.is_file():
            self.env.note_dependency(relative)
            return markdown_to_nodes(path.read_text(encoding="utf-8"))
        if "optional" not in self.options:
            logger.warning(
                "include-markdown: %s does not exist",
                path,
                location=self.get_location(),
                type="include-markdown",
            )
            return []
        return self.parse_content_to_nodes()


# --------------------------------------------------------------------------------------
# API coverage
# --------------------------------------------------------------------------------------


def undocumented_names(env: BuildEnvironment, coverage: dict[str, str]) -> list[str]:
    """Names in ``module.__all__`` with no autodoc entry on the page assigned to the module."""
    domain: Any = env.get_domain("py")
    missing = []
    for module_name, docname in coverage.items():
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            full = f"{module_name}.{name}"
            if isinstance(getattr(module, name, None), types.ModuleType):
                entry = domain.modules.get(full)
            else:
                entry = domain.objects.get(full)
            if entry is None or entry.docname != docname:
                missing.append(f"{full} (expected on {docname!r})")
    return missing


def _check_api_coverage(app: Sphinx, env: BuildEnvironment) -> None:
    missing = undocumented_names(env, app.config.api_coverage)
    for name in missing:
        logger.warning(
            "%s is in __all__ but not documented in the API reference", name, type="api-coverage"
        )


# --------------------------------------------------------------------------------------
# set-up and teardown
# --------------------------------------------------------------------------------------


def _prepare(app: Sphinx) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    Path(app.srcdir, app.config.runblock_generated_dir).mkdir(parents=True, exist_ok=True)
    _FAILURES.clear()
    try:  # examples with hypothesis would cache in <cwd>/.hypothesis, i.e. in docs/
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        pass
    else:
        set_hypothesis_home_dir(Path(app.doctreedir) / "hypothesis")


def _finish(app: Sphinx, exception: Exception | None) -> None:
    if _TIMINGS:
        report = ", ".join(f"{doc} {secs:.1f}s" for doc, secs in sorted(_TIMINGS.items()))
        logger.info("runblock: executed examples in %.1fs (%s)", sum(_TIMINGS.values()), report)
    if _FAILURES:
        app.statuscode = 1  # fails the build, with or without -W
        where = ", ".join(f"{doc}.rst:{line}" for doc, line, _ in _FAILURES)
        count = len(_FAILURES)
        _FAILURES.clear()
        logger.error("%d runblock(s) failed: %s", count, where)


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("api_coverage", {}, "env", types=[dict])
    app.add_config_value("runblock_generated_dir", "_generated", "env", types=[str])
    app.add_directive("runblock", RunBlock)
    app.add_directive("include-markdown", IncludeMarkdown)
    app.connect("builder-inited", _prepare)
    app.connect("source-read", _reset_namespace)
    app.connect("env-get-outdated", _outdated)
    app.connect("env-purge-doc", _purge)
    app.connect("env-check-consistency", _check_api_coverage)
    app.connect("build-finished", _finish)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
