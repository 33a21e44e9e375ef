"""The API reference builds with no warning, and the cheap docstring examples run as doctests.

``make docs`` runs the same ``sphinx-build -W --keep-going`` into ``docs/_build/html``.
"""

from __future__ import annotations

import doctest
import importlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Modules whose ``Examples`` are real doctests (the others need a store, a dataset or a trained
# model and stay ``+SKIP``).
DOCTEST_MODULES = [
    "dissect._plumbing.token_grid",
    "dissect.actmax.objectives",
    "dissect.deconvnet.receptive",
    "dissect.hooks.trace",
    "dissect.similarity.linear_cka",
]


def test_api_reference_builds_without_warnings(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(ROOT / "docs" / "api"), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    pages = {p.stem for p in (out / "api").glob("*.html")}
    assert pages == {"dissect", "hooks", "store", "datasets", "netdissect", "deconvnet",
                     "actmax", "probes", "attribution", "similarity", "geometry", "ablation",
                     "report", "distributed"}
    assert (out / "guide.html").is_file() and (out / "docs" / "architecture.html").is_file()
    hooks = (out / "api" / "hooks.html").read_text()
    assert 'id="dissect.hooks.Trace"' in hooks and 'id="dissect.hooks.capture"' in hooks


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    assert tests, f"{name} has no doctest"
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test, out=report.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, report.getvalue()
    assert result.attempted > 0
