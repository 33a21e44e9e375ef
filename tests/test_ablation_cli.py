"""``dissect ablate`` and the report's ablation section (#23)."""

from __future__ import annotations

import numpy as np
import pytest

from dissect.ablation import AblationResult
from dissect.cli import main

FACTORY = '''
import torch
from torch import nn


class Colors(nn.Module):
    def forward(self, x):
        return 1.0 + torch.stack([(x[:, 0] > 0.5), (x[:, 2] > 0.5)], dim=1).float()


def make():
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    return nn.Sequential(Colors(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
'''


@pytest.fixture()
def spec(tmp_path):
    (tmp_path / "wired.py").write_text(FACTORY)
    return f"{tmp_path / 'wired.py'}:make"


def test_cli_ablate_writes_a_result_and_the_report_shows_it(spec, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["netdissect", spec, "--dataset", "synthetic:24", "--layers", "0", "--out",
                 str(out), "--quantile", "0.2", "--unit-images", "0", "--quiet"]) == 0
    assert main(["ablate", spec, "--data", "synthetic:24", "--layer", "0", "--metric",
                 "logit", "--out", str(out), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    res = AblationResult.from_json(out / "ablation" / "0.json")
    assert res.units == [0, 1] and res.metric == "logit"
    # class k's logit is the mean of unit k (identity head): removing unit k (set to 0)
    # lowers class k's logit by that mean, at least 1 (the unit is 1 + an indicator)
    drop = res.drop
    assert np.all(drop[0, res.classes == 0] >= 1) and np.all(drop[1, res.classes == 1] >= 1)
    assert np.all(drop[0, res.classes == 1] == 0) and np.all(drop[1, res.classes == 0] == 0)
    assert main(["ablate", spec, "--data", "synthetic:24", "--layer", "0", "--units", "0",
                 "--keep", "--out", str(out), "--quiet"]) == 0
    assert AblationResult.from_json(out / "ablation" / "0-keep.json").units == [0]
    assert main(["report", str(out), "--quiet"]) == 0
    page = (out / "report" / "layer-0.html").read_text()
    assert "<h2>Ablation</h2>" in page and "all but 1 units" in page


def test_cli_ablate_refuses_keep_without_units_and_a_missing_dissection(spec, tmp_path,
                                                                        capsys):
    base = ["ablate", spec, "--data", "synthetic:8", "--layer", "0", "--out",
            str(tmp_path / "r"), "--quiet"]
    assert main([*base, "--keep"]) == 1
    assert "--keep needs --units" in capsys.readouterr().err
    assert main([*base, "--concept", "red"]) == 1
    assert "netdissect.json" in capsys.readouterr().err
