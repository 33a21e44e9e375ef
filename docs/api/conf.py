"""Sphinx configuration of the torch-dissect API reference (``make docs``).

Built with ``sphinx-build -W --keep-going -b html docs/api docs/_build/html``: every warning is
an error. The pages are ``index.rst`` (contents), ``guide.md`` (the README), ``architecture.md``
(docs/architecture.md) and one ``api/<package>.rst`` per public package.
"""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

import dissect  # noqa: E402

project = "torch-dissect"
author = "torch-dissect contributors"
copyright = "torch-dissect contributors"  # noqa: A001
release = version = dissect.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = False

# autodoc: a package page documents the names in its ``__all__`` (re-exported ones included).
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_inherit_docstrings = True

# numpydoc renders the sections; its style validation is the linter's job, not the build's.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

# MyST: the README and the architecture page are Markdown.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"torch-dissect {release}"
html_static_path = []
