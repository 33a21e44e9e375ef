"""The report over a Vision Transformer (#24): token layers render like conv layers (top images
with the active region outlined, drawn from the patch tokens) and say they were read from
tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import hooked, tiny_vit
from test_report import parse

from dissect._plumbing.images import rgb_uint8
from dissect.datasets import SyntheticConcepts
from dissect.errors import DissectError
from dissect.hooks import TokenGrid
from dissect.netdissect import DissectionResult, dissect
from dissect.netdissect.unit_masks import active_mask, raw_images
from dissect.probes import ProbeResult, probe
from dissect.report import outline_strip, render_unit_images, write_report
from dissect.report.unit_images import OUTLINE_RGB

BLOCK = "encoder.layers.encoder_layer_0"
LAYERS = [BLOCK, "conv_proj"]  # a token layer and a convolution of the same model
SIZE = 48


def maps_by_hand(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """BLOCK's (N, 64, 7, 7) maps from a hook of our own: class token dropped, patch (i, j)
    is token 1 + 7 * i + j."""
    tokens = hooked(model, BLOCK, x).numpy()
    out = np.zeros((len(x), tokens.shape[2], 7, 7), dtype=np.float32)
    for i in range(7):
        for j in range(7):
            out[:, :, i, j] = tokens[:, 1 + 7 * i + j]
    return out


@pytest.fixture(scope="module")
def vit_results(tmp_path_factory) -> tuple[Path, SyntheticConcepts, torch.nn.Module]:
    """A ViT dissected on synthetic concepts, its unit images drawn and its layers probed."""
    out = tmp_path_factory.mktemp("vit-results")
    ds = SyntheticConcepts(40, size=112, seed=3)
    vit = tiny_vit()
    res = dissect(vit, ds, layers=LAYERS, quantile=0.2, batch_size=16, progress=False,
                  store_path=out / "activations.h5")
    res.to_json(out / "netdissect.json")
    written = render_unit_images(res, out / "activations.h5", ds, out / "units", units=4, k=3,
                                 size=SIZE, progress=False)
    assert sorted(written) == sorted(LAYERS) and len(written[BLOCK]) == 4
    probe(out / "activations.h5", ds, pool="cls", layers=[BLOCK], reg=1e-2, control=False,
          progress=False).to_json(out / "probes.json")
    (out / "run.json").write_text(json.dumps({"model": "tiny ViT", "layers": LAYERS}))
    return out, ds, vit


def test_token_unit_images_outline_the_active_patches(vit_results):
    out, ds, vit = vit_results
    res = DissectionResult.from_json(out / "netdissect.json")
    unit = max(res.units(BLOCK), key=lambda u: u.iou).unit
    top = [int(i) for i in res.top_images(BLOCK, 3)[unit]]
    with raw_images(ds) as raw:
        pictures = [rgb_uint8(raw[i]["image"]) for i in top]
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    amaps = maps_by_hand(vit, x)[top, unit].astype(np.float16)  # dissect stores float16
    threshold = float(res.thresholds(BLOCK)[unit])
    masks = [active_mask(a.astype(np.float32), threshold, (112, 112)) for a in amaps]
    assert all(m.any() and not m.all() for m in masks)  # an outlined region on each image
    expected = outline_strip(pictures, masks, size=SIZE)
    drawn = cv2.imread(str(out / "units" / BLOCK / f"unit_{unit:04d}.png"))[..., ::-1]
    assert drawn.shape == (SIZE, 3 * SIZE + 2 * 3, 3)
    np.testing.assert_array_equal(drawn, expected)
    assert (drawn == OUTLINE_RGB).all(-1).any()  # the outline is there


def test_report_over_a_vit_dissection(vit_results):
    out, _, _ = vit_results
    index = write_report(out)
    for layer in LAYERS:
        page = index.parent / f"layer-{layer}.html"
        links = parse(page)
        assert links.cards == 4  # the units whose images were drawn
        tops = [t for t in links.targets if t.startswith("img/units/")]
        assert len(tops) == 4
        for target in links.targets:
            assert (page.parent / target).is_file(), f"{page.name}: {target}"
    text = index.read_text()
    # the probe table: the token layer probed by its class token, and says how it was read
    assert re.search(rf"<td>{re.escape(BLOCK)} <span class=\"meta\">\(tokens: 1 prefix \+ "
                     r"7x7\)</span></td>", text)
    assert "class token (pool=&#x27;cls&#x27;)" in text
    assert ProbeResult.from_json(out / "probes.json").settings["tokens"] == {
        BLOCK: {"prefix": 1, "grid": [7, 7], "channels_last": False, "class_token": True}}


def test_token_layouts_a_dissection_records_are_shown(vit_results, tmp_path):
    out, _, _ = vit_results
    res = DissectionResult.from_json(out / "netdissect.json")
    res.meta["tokens"] = {BLOCK: json.loads(TokenGrid(1, (7, 7)).to_json())}
    res.to_json(tmp_path / "netdissect.json")
    index = write_report(tmp_path)
    row = re.search(r"<tr><td><a href=\"layer-encoder[^<]*</a>([^<]*<span[^>]*>[^<]*</span>)",
                    index.read_text())
    assert row and "(tokens: 1 prefix + 7x7)" in row.group(1)
    block = (index.parent / f"layer-{BLOCK}.html").read_text()
    assert "Read from token outputs (tokens: 1 prefix + 7x7)" in block
    assert "token" not in (index.parent / "layer-conv_proj.html").read_text()
    res.meta["tokens"] = {BLOCK: "not a layout"}
    res.to_json(tmp_path / "netdissect.json")
    with pytest.raises(DissectError, match="netdissect.json.*token layout of layer"):
        write_report(tmp_path)
