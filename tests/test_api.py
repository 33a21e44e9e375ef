"""The top-level API: every advertised name is its home module's object, documented; the version
matches the package metadata; importing the package stays light."""

from __future__ import annotations

import configparser
import inspect
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import dissect

# the names dissect/__init__.py imports eagerly, and the module each is imported from
EAGER = {
    "ActivationStore": "dissect.store",
    "DataError": "dissect.errors",
    "DissectError": "dissect.errors",
    "LayerNotFoundError": "dissect.errors",
    "ModelSpecError": "dissect.errors",
    "StoreError": "dissect.errors",
    "PreparedModel": "dissect._plumbing.device",
    "prepare_model": "dissect._plumbing.device",
    "Trace": "dissect.hooks",
    "capture": "dissect.hooks",
    "layer_names": "dissect.hooks",
}


# public names that differ from the name of the object they stand for
ALIASES = {"dissect_units": "dissect"}


def _home(name: str) -> tuple[str, str]:
    """The module a public name comes from and its attribute name there."""
    if name in dissect._LAZY:
        module, attribute = dissect._LAZY[name]
        return f"dissect.{module}", attribute
    return EAGER[name], name


def test_all_lists_exactly_the_eager_and_lazy_names():
    names = [n for n in dissect.__all__ if n != "__version__"]
    assert len(names) == len(set(names)), "a name is listed twice in dissect.__all__"
    assert "__version__" in dissect.__all__
    assert set(names) == set(EAGER) | set(dissect._LAZY)
    assert set(dissect.__all__) <= set(dir(dissect))
    namespace: dict = {}
    exec("from dissect import *", namespace)
    assert set(dissect.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        dissect.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", sorted(set(EAGER) | set(dissect._LAZY)))
def test_public_name_is_the_object_its_home_module_defines(name):
    obj = getattr(dissect, name)
    module, attribute = _home(name)
    assert obj is getattr(import_module(module), attribute), (name, module, attribute)
    assert inspect.isfunction(obj) or inspect.isclass(obj), (name, type(obj))
    assert obj.__name__ == ALIASES.get(name, name), (name, obj.__name__)
    # defined inside that module's package, and the very object its defining module holds
    # (not a copy, a stale re-export or a wrapper the module does not hold)
    assert obj.__module__ == module or obj.__module__.startswith(module + "."), (
        name, obj.__module__, module)
    assert getattr(sys.modules[obj.__module__], obj.__qualname__) is obj
    # documented: its own docstring (a class's is not inherited through __doc__)
    assert obj.__doc__ and obj.__doc__.strip(), f"dissect.{name} has no docstring"


def test_known_aliases():
    assert dissect.dissect_units is dissect.netdissect.dissect
    assert dissect.probe is dissect.probes.probe
    assert dissect.capture is sys.modules["dissect.hooks.capture"].capture


def test_version_matches_setup_cfg():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert isinstance(dissect.__version__, str)
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", dissect.__version__), dissect.__version__
    # one source of the version: setup.cfg reads dissect.__version__
    assert cfg["metadata"]["version"].strip() == "attr: dissect.__version__"
    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    latest = re.search(r"^## (\S+)", changelog, re.MULTILINE)
    assert latest is not None and latest.group(1) == dissect.__version__


@pytest.mark.slow
def test_import_is_light():
    code = ("import sys, dissect; heavy = {'torchvision', 'cv2', 'matplotlib', 'sklearn'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("old, new", [
    ("dissect.active_pixels", "dissect.netdissect.active_pixels"),
    ("dissect.label_runs", "dissect.netdissect.label_runs"),
    ("dissect.fused_tally", "dissect.netdissect.numba_engine"),
])
def test_old_module_paths_still_import_with_a_warning(old, new):
    """The Network Dissection engine modules moved into the package; the old paths are kept
    for one release, warn, and hold the very same objects."""
    import importlib
    import sys
    import warnings

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        shim = importlib.import_module(old)
    home = importlib.import_module(new)
    public = [n for n in vars(home) if not n.startswith("_") and callable(getattr(home, n))]
    assert public
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in public:
            assert getattr(shim, name) is getattr(home, name), name
