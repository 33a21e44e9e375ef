"""Shared fixtures: tiny models whose behaviour is known, small deterministic data."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset


def tiny_vit(seed: int = 0, image_size: int = 112) -> nn.Module:
    """A tiny torchvision ViT (eval mode): 1 class token + (image_size / 16)^2 patches of 16 px,
    64 hidden dims, 2 blocks (``encoder.layers.encoder_layer_0``/``_1``), GELU MLPs."""
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
        mlp_dim=128).eval()


def hooked(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s raw first output for ``x`` by a hook of our own, under inference mode as
    capture runs it (for a ViT block: ``(N, 1 + patches, C)`` tokens)."""
    seen = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone()))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    return seen[0]


class TinyCNN(nn.Sequential):
    """conv -> in-place ReLU -> maxpool -> conv -> ReLU -> global pool -> linear (3 classes)."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )


class ReusedReLU(nn.Module):
    """Calls one ReLU module twice in a forward, like torchvision's BasicBlock."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(x))
        return self.relu(self.conv2(y) - 0.5)


class FunctionalNet(nn.Module):
    """Uses F.relu inside forward (no ReLU module)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))


class DictImages(Dataset):
    """Deterministic random images as dict items, with a dataset index offset."""

    def __init__(self, n: int = 10, size: int = 16, seed: int = 0, offset: int = 100) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.offset = offset

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "index": self.offset + i, "pixel_labels": torch.zeros(i + 1)}


@pytest.fixture
def tiny() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))


class Recorder(nn.Module):
    """Wraps a model; records each forward's input rows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.model(x)


@pytest.fixture
def probe_devices(monkeypatch) -> list[tuple[str, torch.device]]:
    """Where each probe fit's features, labels and parameters live: ``(what, device)`` pairs
    recorded by a spy on ``BatchedSoftmax``."""
    import dissect.probes._probe as probe_module

    seen: list[tuple[str, torch.device]] = []

    class Spy(probe_module.BatchedSoftmax):
        def __init__(self, blocks, *args, **kwargs):
            super().__init__(blocks, *args, **kwargs)
            seen.append(("model", self.device))
            seen.extend(("features", b.x.device) for b in blocks if b.x is not None)

        def fit(self, y, *args, **kwargs):
            seen.append(("labels", y.device))
            theta, info = super().fit(y, *args, **kwargs)
            seen.append(("parameters", theta.device))
            return theta, info

    monkeypatch.setattr(probe_module, "BatchedSoftmax", Spy)
    return seen


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny steps (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): on a shared, loaded CPU, waking a second OpenMP
    thread for every tiny op makes them tens of times slower (results are the same). The
    thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(autouse=True, scope="session")
def _annotation_cache_folder(tmp_path_factory):
    """Every test's annotation caches go to one temporary folder, never ~/.cache."""
    folder = tmp_path_factory.mktemp("dissect-cache")
    saved = os.environ.get("DISSECT_CACHE_DIR")
    os.environ["DISSECT_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("DISSECT_CACHE_DIR", None)
    else:
        os.environ["DISSECT_CACHE_DIR"] = saved
