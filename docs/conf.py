"""Sphinx configuration for the torchcurv documentation.

Build with ``nox -s docs`` or ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
Examples on the tutorial pages run at build time (``docs/_ext/torchcurv_docs.py``); the
figures they draw go to ``docs/_generated/``, which is not committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
# A source checkout builds without installing the package first.
sys.path.insert(0, str(DOCS.parent / "src"))

import torch  # noqa: E402

import torchcurv  # noqa: E402

# The examples executed on the tutorial pages are small: one thread runs them as fast as
# several on an idle machine and much faster on a busy one. Timings shown on the pages are
# therefore single-threaded.
torch.set_num_threads(1)

project = "torchcurv"
author = "torchcurv developers"
copyright = "torchcurv developers"
release = torchcurv.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served with the pages, not from a CDN
    "sphinx.ext.viewcode",  # [source] links
    "sphinx_copybutton",
    "sphinx_gallery.gen_gallery",
    "torchcurv_docs",
]
# The copy button leaves out prompts and output: what it copies runs.
copybutton_prompt_text = r">>> |\.\.\. "
copybutton_prompt_is_regexp = True

# The gallery: the scripts in examples/ run at build time (one thread, as above), each
# page with its figures, a thumbnail and the script as .py and .ipynb to download. An
# example that fails fails the build.
sphinx_gallery_conf = {
    "examples_dirs": str(DOCS.parent / "examples"),
    "gallery_dirs": "gallery",
    "filename_pattern": r"plot_",
    "abort_on_example_error": True,
    "write_computation_times": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "within_subsection_order": "FileNameSortKey",
}

exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store", "gallery/*.ipynb"]
templates_path: list[str] = []
default_role = "py:obj"  # `name` in docstrings links to the object where it can
pygments_style = "sphinx"

# autodoc + napoleon: Google-style docstrings, signatures without type annotations (the
# docstrings describe the types; the annotations are long unions).
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Every name in these modules' __all__ must be documented on the given page.
api_coverage = {
    "torchcurv": "api",
    "torchcurv.reference": "api",
    "torchcurv.testing": "api",
    "torchcurv.testing.strategies": "api",
}

try:
    import sphinx_rtd_theme  # noqa: F401

    html_theme = "sphinx_rtd_theme"
except ImportError:  # pragma: no cover - the docs extra installs it
    html_theme = "alabaster"
html_title = f"torchcurv {release}"
html_static_path = ["_static"]
html_css_files = ["torchcurv.css"]
