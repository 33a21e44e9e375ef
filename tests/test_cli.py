"""The dissect command: layers, capture, demo; errors are one line."""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pytest

from dissect import ActivationStore
from dissect.cli import main


def test_layers_lists_names_and_shapes(capsys):
    assert main(["layers", "torchvision:resnet18", "--input-size", "64", "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out}
    assert rows["layer4"] == ["Sequential", "512x2x2"]
    assert rows["fc"] == ["Linear", "1000"]


def test_capture_from_image_folder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / ("sub" if i % 2 else "") / f"im{i}.png"), img)
    out = tmp_path / "acts.h5"
    code = main(["capture", "torchvision:resnet18", "--data", str(folder), "--layers",
                 "layer1,layer4", "--out", str(out), "--pool", "mean", "--batch-size", "2",
                 "--quiet"])
    assert code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with ActivationStore(out) as store:
        assert store.complete and store["layer4"].shape == (5, 512)
        assert store.meta["dataset"] == str(folder)  # recorded for later analyses


def test_errors_are_one_line(tmp_path, capsys):
    code = main(["capture", "torchvision:resnet18", "--data", "samples", "--layers",
                 "layer9", "--out", str(tmp_path / "x.h5"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "layer9" in err[0] and "Traceback" not in err[0]
    assert main(["layers", "nonsense-model", "--quiet"]) == 1
    with pytest.raises(SystemExit) as info:
        main(["capture", "torchvision:resnet18"])  # missing required options
    assert info.value.code == 2


@pytest.mark.parametrize("argv", [
    [], ["nope"], ["capture"], ["layers", "x", "--input-size", "a"],
    ["layers", "x", "--input-size", "0"], ["layers", "x", "--unknown"],
    ["capture", "x", "--data", "d", "--layers", "l", "--out", "o.h5", "--pool", "0"],
    ["capture", "x", "--data", "d", "--layers", "l", "--out", "o.h5", "--grads-for", "-1"],
    ["netdissect", "x", "--dataset", "d", "--layers", "l", "--out", "o", "--top-k", "-3"],
])
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    from dissect.cli import COMMANDS

    for name in COMMANDS:
        assert f"\n    {name}" in text and f"dissect {name}" in text, name


ALL = {"--device", "--batch-size", "--num-workers"}
COMMON = {  # the common options each subcommand takes: those its run() passes on
    "layers": {"--device"},
    "capture": ALL, "netdissect": ALL, "explain": ALL, "attribute": ALL, "deconv": ALL,
    "demo": ALL,
    "ablate": {"--device", "--batch-size"},
    "probe": {"--device"},
    "similarity": {"--device", "--batch-size"},
    "actmax": {"--device", "--batch-size"},
    "invert": {"--device", "--batch-size"},
    "report": set(),
    "compare": set(),
    "data check": set(), "data broden": set(), "data resize": set(),
}


def test_each_subcommand_has_exactly_the_common_options_it_uses(capsys):
    import importlib
    import inspect

    from dissect.cli import COMMANDS, build_parser
    from dissect.cli.data import ACTIONS

    commands = [c for c in COMMANDS if c != "data"] + [f"data {a}" for a in ACTIONS]
    assert set(COMMON) == set(commands)
    for name in commands:
        parser = build_parser()
        for word in name.split():  # `data check`: the group's parser, then the action's
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[word]
        options = {o for a in parser._actions for o in a.option_strings}
        assert options & ALL == COMMON[name], name
        assert {"--quiet", "--verbose"} <= options, name
        with pytest.raises(SystemExit):
            main([*name.split(), "--help"])
        text = capsys.readouterr().out
        for option in ALL | {"--quiet", "--verbose"}:
            assert (option in text) == (option in COMMON[name] | {"--quiet", "--verbose"}), \
                (name, option)
        module = f"dissect.cli.{name.replace(' ', '.')}"
        source = inspect.getsource(importlib.import_module(module).run)
        for option in COMMON[name]:  # each option listed is passed on by run()
            assert f"args.{option[2:].replace('-', '_')}" in source, (name, option)


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as info:
        main(["layers", "torchvision:resnet18", "--quiet", "--verbose"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_log_lines_are_messages_and_verbose_names_the_logger():
    import logging

    from dissect.cli import configure_logging

    record = logging.LogRecord("dissect.demo", logging.INFO, __file__, 1, "capture ...", None,
                               None)
    warn = logging.LogRecord("dissect.x", logging.WARNING, __file__, 1, "odd %s", ("thing",),
                             None)
    root = logging.getLogger()
    try:
        handler = configure_logging()
        assert handler.format(record) == "capture ..."
        assert handler.format(warn) == "warning: odd thing"
        assert root.level == logging.INFO
        handler = configure_logging(verbose=True)
        assert handler.format(record) == "INFO dissect.demo: capture ..."
        assert logging.getLogger("dissect").getEffectiveLevel() == logging.DEBUG
        configure_logging(quiet=True)
        assert root.level == logging.WARNING
        assert logging.getLogger("dissect").level == logging.NOTSET
        assert sum(type(h).__name__ == "_StderrHandler" for h in root.handlers) == 1
    finally:
        for h in [h for h in root.handlers if type(h).__name__ == "_StderrHandler"]:
            root.removeHandler(h)
        root.setLevel(logging.WARNING)


def test_output_path_errors_are_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv in (["capture", "torchvision:resnet18", "--data", "samples", "--layers", "layer4",
                  "--out", str(afile / "x.h5"), "--quiet"],
                 ["report", str(tmp_path), "--out", str(afile), "--quiet"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(afile) in err and "Traceback" not in err
