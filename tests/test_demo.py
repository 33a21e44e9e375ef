"""`dissect demo --fast` end to end on the real MobileNetV2: every step, the report resolves."""

from __future__ import annotations

import json

import pytest
from test_report import parse

from dissect import ActivationStore
from dissect.cli import main
from dissect.demo import LAYERS
from dissect.similarity import SimilarityResult


@pytest.mark.slow
def test_fast_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "chelsea    -> Egyptian cat (0.72)" in printed  # the real weights, offline
    assert "Linear probes:" in printed and "Linear probes:" not in captured.err  # tables: stdout
    assert "Network Dissection" in printed and f"report: {out.resolve()}" in printed
    with ActivationStore(out / "activations.h5") as store:
        assert store.complete and store.layers == LAYERS
    run = json.loads((out / "run.json").read_text())
    assert set(run["seconds"]) >= {"capture", "network dissection", "activation maximization",
                                   "deconvnet patches", "linear probes", "layer similarity",
                                   "attribution maps"}
    for folder in ("units", "actmax", "deconv"):
        for layer in LAYERS:
            assert list((out / folder / layer).glob("unit_*.png")), (folder, layer)
    assert (out / "probes.json").is_file() and (out / "netdissect.json").is_file()
    similarity = SimilarityResult.from_json(out / "layers" / "similarity.json")
    assert similarity.rows == LAYERS and (out / "layers" / "nearest.json").is_file()
    entries = json.loads((out / "attribution" / "attribution.json").read_text())
    assert entries[0]["label"] == "Egyptian cat"
    assert set(entries[0]["maps"]) == {"integrated gradients", "grad-cam", "occlusion"}
    report = out / "report"
    pages = sorted(p.name for p in report.glob("*.html"))
    assert pages == sorted(["index.html", "attribution.html", "layers.html"]
                           + [f"layer-{layer}.html" for layer in LAYERS])
    for page in report.glob("*.html"):
        for target in parse(page).targets:
            assert (report / target).is_file(), (page.name, target)
    layer_page = (report / "layer-features.17.html").read_text()
    assert "activation maximization" in layer_page and "guided patches" in layer_page
