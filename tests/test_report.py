"""The HTML report: unit images with known outlines, links that resolve, escaping, a browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_netdissect import Planted
from torch import nn

from dissect.cli import main
from dissect.datasets import Concept, SyntheticConcepts
from dissect.errors import DissectError
from dissect.netdissect import DissectionResult, dissect
from dissect.report import outline_strip, render_unit_images, write_report
from dissect.report.unit_images import DIM

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


class Links(HTMLParser):
    """Collects every href and src of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.cards = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("href", "src"):
            if attrs.get(key):
                self.targets.append(attrs[key])
        if tag == "article":
            self.cards += 1


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text())
    return links


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A results folder: planted units dissected on synthetic concepts, unit images drawn."""
    out = tmp_path_factory.mktemp("results")
    ds = SyntheticConcepts(60, size=64, seed=3)
    model = nn.Sequential(Planted())
    res = dissect(model, ds, layers=["0"], quantile=0.5, batch_size=32, progress=False,
                  store_path=out / "activations.h5")
    res.to_json(out / "netdissect.json")
    written = render_unit_images(res, out / "activations.h5", ds, out / "units", k=3, size=48,
                                 progress=False)
    assert sorted(written["0"]) == [0, 1, 2, 3, 4]
    extra = out / "actmax" / "0" / "unit_0000.png"  # the report shows other unit images too
    extra.parent.mkdir(parents=True)
    shutil.copy(written["0"][0], extra)
    (out / "run.json").write_text(json.dumps({"model": "planted", "dataset": "synthetic",
                                              "layers": ["0"]}))
    return out


def test_outline_strip_dims_outside_the_active_region():
    image = np.full((8, 8, 3), 200, dtype=np.uint8)
    amap = np.zeros((2, 2), dtype=np.float32)
    amap[0, 0] = 10.0  # bilinear upsampling: only the top-left corner exceeds 5
    strip = outline_strip([image, image], [amap, np.zeros((2, 2), np.float32)], 5.0, size=8,
                          gap=2)
    assert strip.shape == (8, 18, 3)
    assert (strip[:, 8:10] == 255).all()  # the gap
    second = strip[:, 10:]
    assert (second == round(200 * DIM)).all()  # nothing active: all dimmed
    first = strip[:, :8]
    assert first[0, 0].tolist() != [round(200 * DIM)] * 3  # active corner: bright or outlined
    assert (first[6:, 6:] == round(200 * DIM)).all()


def test_unit_images_show_each_units_top_images(results):
    res = DissectionResult.from_json(results / "netdissect.json")
    strip = cv2.imread(str(results / "units" / "0" / "unit_0000.png"))
    assert strip.shape == (48, 3 * 48 + 2 * 3, 3)
    assert res.top_images("0", 3).shape == (5, 3)


def test_report_pages_links_and_images_resolve(results):
    index = write_report(results)
    assert index == results / "report" / "index.html"
    pages = sorted(index.parent.glob("*.html"))
    assert [p.name for p in pages] == ["index.html", "layer-0.html"]
    for page in pages:
        links = parse(page)
        assert links.targets
        for target in links.targets:
            assert not re.match(r"^[a-z]+://", target), f"{page.name} links outside: {target}"
            assert (page.parent / target.split("?")[0]).is_file(), f"{page.name}: {target}"
    layer = (index.parent / "layer-0.html").read_text()
    assert parse(index.parent / "layer-0.html").cards == 5
    for concept in ("red", "green", "blue", "striped", "interior"):
        assert f'data-concept="{concept}"' in layer
    assert "activation maximization" in layer  # the extra unit image is shown
    assert "detectors per category" in index.read_text()
    shutil.rmtree(results / "x", ignore_errors=True)
    shutil.copytree(index.parent, results / "x")  # the site is self-contained: it moves
    for target in parse(results / "x" / "layer-0.html").targets:
        assert (results / "x" / target).is_file()


def test_cli_report_and_errors(results, tmp_path, capsys):
    assert main(["report", str(results), "--out", str(tmp_path / "site"), "--quiet"]) == 0
    assert "site/index.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(DissectError, match="holds no results"):
        write_report(tmp_path / "empty")


def _injected(tmp_path: Path) -> Path:
    evil = "<script>alert(1)</script>"
    res = DissectionResult(
        ["l<b>"], [Concept(1, evil, "color"), Concept(2, "ok", "color")], ["color"],
        {"l<b>": np.array([[0.9, 0.1], [0.0, 0.05]])}, {"l<b>": np.array([1.0, 2.0], "f4")},
        {"l<b>": np.zeros((2, 1), dtype=np.int64)}, quantile=0.005, iou_threshold=0.04)
    out = tmp_path / "evil"
    res.to_json(out / "netdissect.json")
    (out / "run.json").write_text(json.dumps({"model": evil}))
    return write_report(out)


def test_strings_from_data_are_escaped(tmp_path):
    index = _injected(tmp_path)
    for page in index.parent.glob("*.html"):
        text = page.read_text()
        assert "<script>alert" not in text and "<b>" not in text
    layer = next(index.parent.glob("layer-*.html")).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in layer


def _chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (make setup installs it when it can)")
    return subprocess.run([exe, *CHROMIUM_FLAGS, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_report_in_headless_chromium(results, tmp_path):
    index = write_report(results)
    page = index.parent / "layer-0.html"
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1000,900", page.as_uri())
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[:2] == (900, 1000)
    assert image.std() > 20  # cards, charts and pictures, not a blank page

    def order(query: str) -> list[float]:
        dom = _chromium("--dump-dom", page.as_uri() + query).stdout
        assert 'id="gallery"' in dom
        shown = re.findall(r'<article class="card[^"]*"[^>]*data-iou="([0-9.]+)"[^>]*>', dom)
        hidden = re.findall(r"<article[^>]*hidden", dom)
        return [float(v) for v in shown], hidden, dom

    ious, hidden, dom = order("?sort=iou-asc")
    assert len(ious) == 5 and ious == sorted(ious) and not hidden
    assert "5 of 5 units" in dom  # the script ran
    ious, _, _ = order("?sort=iou-desc")
    assert ious == sorted(ious, reverse=True)
    _, hidden, dom = order("?category=color")
    assert len(hidden) == 2 and "3 of 5 units" in dom


def test_injected_script_renders_as_text_in_chromium(tmp_path):
    index = _injected(tmp_path)
    page = next(index.parent.glob("layer-*.html"))
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    assert "<script>alert" not in dom


def test_layers_whose_names_sanitize_alike_get_their_own_pages_and_images(tmp_path):
    """'c 1' and 'c_1' used to share a page and an image folder: one overwrote the other."""
    from dissect._plumbing.images import write_png
    from dissect._plumbing.paths import unit_image_path

    layers = ["c 1", "c_1"]
    res = DissectionResult(
        layers, [Concept(1, "red", "color")], ["color"],
        {name: np.array([[0.5]]) for name in layers},
        {name: np.array([1.0], "f4") for name in layers},
        {name: np.zeros((1, 1), dtype=np.int64) for name in layers}, quantile=0.005,
        iou_threshold=0.04)
    out = tmp_path / "r"
    res.to_json(out / "netdissect.json")
    colors = {"c 1": (255, 0, 0), "c_1": (0, 0, 255)}
    for name in layers:  # a unit image of each layer, each its own colour
        write_png(unit_image_path(out / "units", name, 0), np.full((4, 4, 3), colors[name],
                                                                    np.uint8))
    index = write_report(out)
    pages = sorted(index.parent.glob("layer-*.html"))
    assert len(pages) == 2
    for name in layers:
        page = next(p for p in pages if f"<title>{name}: units</title>" in p.read_text())
        src = re.search(r'<img src="(img/units/[^"]+)"', page.read_text()).group(1)
        shown = cv2.imread(str(index.parent / src))[0, 0][::-1]  # BGR -> RGB
        assert tuple(int(v) for v in shown) == colors[name], name
