"""``dissect compare``: the table, --layers, --json, and one-line errors."""

from __future__ import annotations

import json

import pytest

from dissect.cli import main
from tests.test_netdissect_csv import LITE, ours


def lite_file(tmp_path, name="tally_layer4.csv"):
    path = tmp_path / name
    path.write_bytes(LITE.encode())
    return path


def results_folder(tmp_path, layers=("layer4",)):
    folder = tmp_path / "ours"
    folder.mkdir()
    ours(layers).to_json(folder)
    return folder


def test_compare_prints_the_table(tmp_path, capsys):
    out_json = tmp_path / "cmp" / "comparison.json"
    code = main(["compare", str(results_folder(tmp_path)), str(lite_file(tmp_path)),
                 "--json", str(out_json), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[2].split()[:3] == ["layer", "units", "same"]
    assert lines[3].split() == ["layer4", "6", "4", "4", "4", "3", "2", "4", "3", "5", "5"]
    doc = json.loads(out_json.read_text())
    assert doc["rows"][0]["same_top_detectors"] == 2 and doc["b"].endswith("tally_layer4.csv")
    assert f"comparison: {out_json}" in out and err == ""


def test_compare_pairs_layers(tmp_path, capsys):
    lite = lite_file(tmp_path, "tally.csv")  # Lite's own file name: layer "tally"
    code = main(["compare", str(results_folder(tmp_path)), str(lite), "--layers",
                 "layer4=tally"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.splitlines()[3].split()[:5] == ["layer4", "/", "tally", "6", "4"]


def test_compare_errors_are_one_line(tmp_path, capsys):
    folder = results_folder(tmp_path, ("conv5",))
    code = main(["compare", str(folder), str(lite_file(tmp_path))])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith("dissect compare: error: the results share no layer: A has ['conv5'], "
                          "B has ['layer4']") and err.count("\n") == 1
    # an ambiguous numbering names the option that settles it
    mine = tmp_path / "mine.csv"
    mine.write_text("unit,category,label,score,object-label,object-iou\n"
                    "1,object,dog,0.100000,dog,0.100000\n2,object,car,0.200000,car,0.200000\n")
    assert main(["compare", str(mine), str(mine)]) == 1
    assert "--first-unit 0 or 1" in capsys.readouterr().err
    assert main(["compare", str(mine), str(mine), "--first-unit", "1"]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(mine), str(mine), "--layers", "=x"])
    assert exit_.value.code == 2
    assert "A_LAYER=B_LAYER" in capsys.readouterr().err
    assert main(["compare", str(mine), str(tmp_path / "missing.csv"), "--first-unit", "1"]) == 1
    assert "missing.csv does not exist" in capsys.readouterr().err
