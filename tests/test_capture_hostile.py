"""Capture refuses what would be stored wrong, and never reuses stale activations.

- Sequence-first outputs (RNN/LSTM/GRU, MultiheadAttention, Transformer layers with
  ``batch_first=False``) are stored transposed, row ``i`` being sample ``i`` (also when the
  sequence length equals the batch size); other outputs whose first dimension is not the batch
  size, scalars, complex values and integers float16 cannot hold are a ``DataError`` naming the
  layer.
- The weights fingerprint is the same in every process, also for ``file.py:factory`` models.
- A store records the data it was captured from; other data is refused with the differences.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from dissect import ActivationStore, DataError, DissectError, StoreError, capture
from dissect.datasets import SyntheticConcepts
from dissect.hooks import fingerprint
from dissect.models import Preprocess


class Sequences(nn.Module):
    """(N, T, F) inputs through one sequence module built sequence-first (batch_first=False)."""

    def __init__(self, kind: str, batch_first: bool = False, features: int = 6) -> None:
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        if kind in ("lstm", "gru", "rnn"):
            cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
            self.seq = cls(features, 5, batch_first=batch_first)
        elif kind == "attention":
            self.seq = nn.MultiheadAttention(features, 2, batch_first=batch_first)
        else:
            self.seq = nn.TransformerEncoderLayer(features, 2, 12, dropout=0.0,
                                                  batch_first=batch_first)
        self.head = nn.Linear(5 if kind in ("lstm", "gru", "rnn") else features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        if self.kind == "attention":
            out = self.seq(h, h, h)[0]
        elif self.kind == "encoder":
            out = self.seq(h)
        else:
            out = self.seq(h)[0]
        out = out if self.batch_first else out.transpose(0, 1)  # (N, T, H)
        return self.head(out.mean(1))


def _hooked(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.seq.register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "attention", "encoder"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_sequence_first_outputs_are_stored_one_sample_per_row(kind, batch_first, tmp_path):
    torch.manual_seed(0)
    model = Sequences(kind, batch_first).eval()
    # T == batch size: the trap where time step 0 of every sample looked like sample 0
    x = torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(1))
    with capture(model, x, ["seq"], tmp_path / "s.h5", batch_size=4, dtype="float32",
                 progress=False, tokens=None) as store:
        stored = torch.from_numpy(store["seq"][:])
    for start in (0, 4):
        raw = _hooked(model, x[start:start + 4])
        rows = raw if batch_first else raw.transpose(0, 1)  # (N, T, H)
        torch.testing.assert_close(stored[start:start + 4], rows, rtol=1e-5, atol=1e-6)
    assert stored.shape[:2] == (8, 4)


def test_sequence_outputs_need_tokens_none_to_be_stored_as_sequences(tmp_path):
    # (N, T, H) and a 1-D convolution's (N, C, L) look alike: "auto" does not guess
    model = Sequences("lstm", True).eval()
    x = torch.randn(8, 4, 6)
    with pytest.raises(DissectError, match="tokens=None keeps the output as it is"):
        capture(model, x, ["seq"], tmp_path / "s.h5", progress=False)
    assert not (tmp_path / "s.h5").exists()


def test_sequence_first_gradients_are_transposed_too(tmp_path):
    torch.manual_seed(0)
    model = Sequences("lstm").eval()
    x = torch.randn(4, 4, 6, generator=torch.Generator().manual_seed(1))
    with capture(model, x, ["seq"], tmp_path / "g.h5", grads_for=1, dtype="float32",
                 progress=False, tokens=None) as store:
        grads = torch.from_numpy(store.gradients("seq")[:])
    seen = {}

    def keep(module, inputs, output):
        output[0].retain_grad()
        seen["out"] = output[0]

    handle = model.seq.register_forward_hook(keep)
    model(x)[:, 1].sum().backward()
    handle.remove()
    torch.testing.assert_close(grads, seen["out"].grad.transpose(0, 1), rtol=1e-5, atol=1e-6)


class Odd(nn.Module):
    """A conv whose named submodule returns something that is not rows of samples."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.what = what
        self.odd = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.what == "flat":
            z = y.reshape(-1)
        elif self.what == "scalar":
            z = y.sum()
        elif self.what == "complex":
            z = torch.fft.fft2(y)
        elif self.what == "ints":
            z = (y * 10_000).round().to(torch.int64)
        else:
            z = y
        self.odd(z)
        return y.mean((2, 3))


@pytest.mark.parametrize("what, message", [
    ("flat", "first dimension is not the batch size"),
    ("scalar", "scalar"),
    ("complex", "complex"),
    ("ints", "float16 holds exactly"),
])
def test_outputs_that_are_not_rows_are_refused_naming_the_layer(what, message, tmp_path):
    model = Odd(what).eval()
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match=message) as info:
        capture(model, x, ["odd"], tmp_path / "o.h5", batch_size=3, progress=False)
    assert "'odd'" in str(info.value)
    assert not (tmp_path / "o.h5").exists()


def test_small_integer_outputs_are_stored_exactly(tmp_path):
    model = Odd("ints").eval()
    with torch.no_grad():
        model.conv.weight.mul_(1e-4)  # |values| * 10000 stay below float16's exact 2048
        model.conv.bias.zero_()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with capture(model, x, ["odd"], tmp_path / "i.h5", progress=False) as store:
        stored = store["odd"][:]
    expected = (model.conv(x) * 10_000).round().detach().numpy()
    np.testing.assert_array_equal(stored.astype(np.float64), expected)


def test_grads_for_out_of_range_is_a_dissect_error(tiny, images, tmp_path):
    for bad in (3, 999, -1):
        with pytest.raises(DissectError, match="grads_for") as info:
            capture(tiny, images, ["3"], tmp_path / f"g{bad}.h5", grads_for=bad,
                    progress=False)
        assert not isinstance(info.value, IndexError)


# --------------------------------------------------------------------------- fingerprint


FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
""")


@pytest.mark.slow
def test_a_file_model_capture_is_reused_by_a_second_process(tmp_path):
    """The module of a path/file.py:factory model gets another name in every process; the
    fingerprint must not depend on it, or a second `dissect capture` could never reuse (or
    resume) the first one's store."""
    fixed = FACTORY.replace("nn.LazyLinear(2)", "nn.Linear(4 * 30 * 30, 2)")
    (tmp_path / "net.py").write_text(fixed)
    images = tmp_path / "images"
    images.mkdir()
    import cv2

    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), np.full((32, 32, 3), 40 * i, np.uint8))
    argv = ["-m", "dissect", "capture", f"{tmp_path / 'net.py'}:make", "--data", str(images),
            "--layers", "0", "--out", str(tmp_path / "a.h5"), "--quiet", "--device", "cpu"]
    for _ in range(2):  # the second run finds the complete store of the first process
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert "other settings" not in out.stderr


def test_a_store_fingerprinted_by_the_previous_release_is_still_recognized(tiny, images,
                                                                            tmp_path, caplog):
    path = tmp_path / "old.h5"
    capture(tiny, images, ["3"], path, progress=False).close()
    with h5py.File(path, "r+") as f:
        f.attrs["fingerprint"] = fingerprint(tiny, legacy=True)
    with caplog.at_level(logging.INFO, logger="dissect"):
        capture(tiny, images, ["3"], path, progress=False).close()
    assert "fingerprinted by torch-dissect 0.1" in caplog.text
    assert fingerprint(tiny) != fingerprint(tiny, legacy=True)


# --------------------------------------------------------------------------- data identity


def test_other_data_of_the_same_size_is_refused(tiny, tmp_path):
    path = tmp_path / "d.h5"
    photos = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    concepts = torch.stack([SyntheticConcepts(12, size=16, seed=0)[i]["image"]
                            for i in range(12)])
    capture(tiny, photos, ["3"], path, progress=False).close()
    with pytest.raises(StoreError, match=r"inputs of rows \[0, 3, 6, 9, 11\] differ"):
        capture(tiny, concepts, ["3"], path, progress=False)
    changed = photos.clone()
    changed[6] += 1  # one of the identifying rows
    with pytest.raises(StoreError, match="differ"):
        capture(tiny, changed, ["3"], path, progress=False)
    with capture(tiny, photos, ["3"], path, progress=False) as again:  # the same data: reused
        assert again.complete


def test_another_transform_or_source_is_refused(tiny, tmp_path):
    path = tmp_path / "t.h5"
    plain = Preprocess(resize_size=None, crop_size=None)
    data = SyntheticConcepts(8, size=16, seed=0, transform=plain)
    capture(tiny, data, ["3"], path, progress=False, dataset="synthetic:8").close()
    data.transform = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).without_resize()
    with pytest.raises(StoreError, match="transform: file") as info:
        capture(tiny, data, ["3"], path, progress=False, dataset="synthetic:8")
    assert "mean=(0.5, 0.5, 0.5)" in str(info.value)
    data.transform = plain
    with pytest.raises(StoreError, match="data source: file 'synthetic:8', this call 'samples'"):
        capture(tiny, data, ["3"], path, progress=False, dataset="samples")
    # a call that does not know its source spec is checked on the content only
    capture(tiny, data, ["3"], path, progress=False).close()


def test_lambda_transforms_are_described_without_memory_addresses(tiny, tmp_path):
    data = SyntheticConcepts(6, size=16, seed=0, transform=lambda im: im * 2)
    with capture(tiny, data, ["3"], tmp_path / "l.h5", progress=False) as store:
        text = store.meta["data_transform"]
    assert "0x" not in text and "lambda" in text
    data.transform = lambda im: im * 2  # another function object, same description and data
    capture(tiny, data, ["3"], tmp_path / "l.h5", progress=False).close()


def test_a_resume_checks_the_data_too(tiny, images, tmp_path):
    path = tmp_path / "r.h5"
    capture(tiny, images, ["3"], path, progress=False, dtype="float32").close()
    with h5py.File(path, "r+") as f:  # a capture stopped after 4 rows
        f.attrs["complete"] = False
        f["progress"][()] = 4
    with pytest.raises(StoreError, match="differ"):
        capture(tiny, images.flip(0), ["3"], path, progress=False, dtype="float32")
    with capture(tiny, images, ["3"], path, progress=False, dtype="float32") as store:
        assert store.complete


def test_a_store_without_data_identity_is_used_with_a_warning(tiny, images, tmp_path, caplog):
    path = tmp_path / "o.h5"
    capture(tiny, images, ["3"], path, progress=False).close()
    with h5py.File(path, "r+") as f:  # as torch-dissect 0.1 wrote it
        for key in ("data_source", "data_transform", "data_rows", "data_hash"):
            del f.attrs[key]
    with caplog.at_level(logging.WARNING, logger="dissect"):
        with capture(tiny, images, ["3"], path, progress=False) as store:
            assert isinstance(store, ActivationStore)
    assert "did not record its data" in caplog.text


class Patched(nn.Module):
    """A conv whose output gets a non-finite 2x2 patch on the images whose first pixel is
    above 1 (a model that overflows or divides by zero on some inputs)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        bad = (x[:, 0, 0, 0] > 1)[:, None, None, None]
        patch = torch.zeros_like(y, dtype=torch.bool)
        patch[:, 0, :2, :2] = True
        return torch.where(bad & patch, torch.full_like(y, self.value), y)


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN 8"), (float("inf"), "+inf 8")])
def test_capture_warns_once_per_layer_about_non_finite_values(value, kind, tmp_path, caplog):
    x = torch.zeros(12, 3, 8, 8)
    x[[3, 9], 0, 0, 0] = 2.0  # rows 3 and 9 get the patch: 2 x 4 values

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patched = Patched(value)

        def forward(self, x):
            return self.patched(x)

    model = Wrapped().eval()
    with caplog.at_level(logging.WARNING, logger="dissect"):
        capture(model, x, ["patched.conv", "patched"], tmp_path / "w.h5", batch_size=4,
                dtype="float32", progress=False).close()
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 1, warnings  # the conv itself is finite: nothing said about it
    assert "'patched'" in warnings[0] and "8 non-finite" in warnings[0]
    assert f"({kind})" in warnings[0] and "rows 3, 9" in warnings[0]
