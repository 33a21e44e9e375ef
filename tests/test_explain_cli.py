"""``dissect explain`` and the report's formulas on unit cards (#23)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dissect import capture
from dissect.cli import main
from dissect.datasets import open_dataset
from dissect.netdissect import dissect, explain, load_explanations
from dissect.report import write_report


class Colors(nn.Module):
    """Unit k: 1 + (the pixel's red channel is high) for k=0, (its blue is high) for k=1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.0 + torch.stack([(x[:, 0] > 0.6), (x[:, 2] > 0.6)], dim=1).float()


@pytest.fixture()
def results(tmp_path):
    data = open_dataset("synthetic:24")
    model = nn.Sequential(Colors())
    store = capture(model, data, ["0"], tmp_path / "activations.h5", progress=False,
                    dataset="synthetic:24")
    result = dissect(store, data, ["0"], quantile=0.2, progress=False)
    result.to_json(tmp_path / "netdissect.json")
    store.close()
    return tmp_path


def test_cli_explain_writes_what_explain_returns_and_the_report_shows_it(results, capsys):
    assert main(["explain", str(results / "activations.h5"), "--length", "2", "--quantile",
                 "0.2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    saved = load_explanations(results / "explanations" / "0.json")
    with capture(nn.Sequential(Colors()), open_dataset("synthetic:24"), ["0"],
                 results / "activations.h5", progress=False, dataset="synthetic:24") as store:
        direct = explain(store, open_dataset("synthetic:24"), "0", length=2, quantile=0.2,
                         progress=False)
    assert [(e.unit, e.formula, e.iou) for e in saved] == \
        [(e.unit, e.formula, e.iou) for e in direct]
    assert (results / "explanations" / "0.csv").exists()
    assert saved[0].formula in printed
    index = write_report(results)
    page = (index.parent / "layer-0.html").read_text()
    for e in saved:
        assert f"formula <b>{e.formula}</b> IoU {e.iou:.3f}" in page


def test_cli_explain_refuses_data_without_concepts_and_bad_operators(tmp_path, capsys):
    x = torch.rand(4, 3, 16, 16)
    capture(nn.Sequential(nn.Conv2d(3, 2, 1)), x, ["0"], tmp_path / "a.h5",
            progress=False).close()
    assert main(["explain", str(tmp_path / "a.h5"), "--quiet"]) == 1
    assert "does not record its dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["explain", str(tmp_path / "a.h5"), "--operators", "XOR"])
