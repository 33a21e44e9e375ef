"""The top-level API: every advertised name resolves; importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import dissect


def test_every_public_name_resolves():
    for name in dissect.__all__:
        assert getattr(dissect, name) is not None, name
    assert dissect.dissect_units is dissect.netdissect.dissect
    assert dissect.probe is dissect.probes.probe


def test_import_is_light():
    code = ("import sys, dissect; heavy = {'torchvision', 'cv2', 'matplotlib', 'sklearn'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
