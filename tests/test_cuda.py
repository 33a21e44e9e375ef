"""The GPU tier: every analysis run on ``cuda`` against its CPU result.

Collected everywhere, run only where ``torch.cuda.is_available()``: ``pytest -m cuda`` on a GPU
runner exercises the device paths (placement, pinned memory, the ``"torch"`` counting engine,
device generators) that a CPU-only run never reaches.

Comparisons are chosen so that only float rounding separates the devices:

- cuDNN convolutions and cuBLAS matmuls would use TF32 (a 10-bit mantissa) on Ampere and
  later GPUs; the ``full_float32`` fixture turns that off for every test here;
- gradient methods run in float64, so no ReLU gate or max-pool switch can flip between devices
  (a flipped gate changes a gradient entry by its whole size, not by a rounding error);
- Network Dissection counts are exact integers on every device, so they are compared exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DictImages, Recorder, TinyCNN
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dissect import capture
from dissect.actmax import visualize
from dissect.attribution import grad_cam, integrated_gradients, occlusion, saliency, smoothgrad
from dissect.datasets import Concept, SyntheticConcepts
from dissect.deconvnet import receptive_field, reconstruct, top_patches
from dissect.hooks.source import BatchSource
from dissect.netdissect import IoUTally
from dissect.netdissect import dissect as dissect_units
from dissect.probes import ProbeOptions, probe
from dissect.store import ActivationStore, StoreWriter, create_store

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = "cuda"
SECOND_GPU = "cuda:1"
LAYERS = ["0", "3", "5", "7"]
TARGETS = [0, 1, 2]


@pytest.fixture(autouse=True)
def full_float32():
    """Full float32 precision on the GPU during each test (TF32 off), restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --------------------------------------------------------------------------- helpers


def tiny(dtype: torch.dtype = torch.float32) -> TinyCNN:
    """conftest's TinyCNN with the weights of its ``tiny`` fixture, in ``dtype``, on the CPU."""
    torch.manual_seed(0)
    return TinyCNN().to(dtype).eval()


def images(n: int = 3, dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def close(got, ref, rtol: float = 1e-4) -> None:
    """Equal within ``rtol`` of the reference's scale (GPU kernels sum in another order)."""
    got, ref = torch.as_tensor(got).cpu(), torch.as_tensor(ref).cpu()
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)


def devices(model: nn.Module) -> set[torch.device]:
    return {p.device for p in model.parameters()}


def input_devices(model: nn.Module) -> list[torch.device]:
    """Record the device of every input the model's first module sees from now on."""
    seen: list[torch.device] = []
    first = next(iter(model.children()))
    first.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    return seen


class OnDevice(Dataset):
    """Items that already live on a device (as a GPU-side dataset would hand them out)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]




# --------------------------------------------------------------------------- capture


def test_capture_on_cuda_equals_cpu_and_the_model_stays_on_cuda(tmp_path):
    data = DictImages(n=10)
    ref = capture(tiny(), data, LAYERS, tmp_path / "cpu.h5", batch_size=4, dtype="float32",
                  device="cpu", progress=False)
    model = tiny()
    seen = input_devices(model)
    got = capture(model, data, LAYERS, tmp_path / "cuda.h5", batch_size=4, dtype="float32",
                  device=CUDA, progress=False)
    assert {d.type for d in devices(model)} == {"cuda"}  # moved because device= asked
    assert seen and {d.type for d in seen} == {"cuda"}
    assert got.complete and got.layers == LAYERS and len(got) == 10
    for name in LAYERS:
        assert got[name].dtype == np.float32
        close(got[name][:], ref[name][:])
        close(got.maxima(name), ref.maxima(name))
    np.testing.assert_array_equal(got.index, ref.index)
    # a model already on the GPU runs there with device=None, and "cuda" means any CUDA device
    where = devices(model)
    for device in (None, CUDA):
        seen.clear()
        again = capture(model, data, ["3"], tmp_path / f"again-{device}.h5", batch_size=4,
                        dtype="float32", device=device, progress=False)
        assert devices(model) == where
        assert seen and set(seen) == where
        close(again["3"][:], ref["3"][:])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_model_on_the_second_gpu_stays_there(tmp_path):
    data = DictImages(n=6)
    ref = capture(tiny(), data, ["3"], tmp_path / "cpu.h5", batch_size=4, dtype="float32",
                  device="cpu", progress=False)
    model = tiny().to(SECOND_GPU)
    seen = input_devices(model)
    for device in (None, CUDA):
        seen.clear()
        got = capture(model, data, ["3"], tmp_path / f"second-{device}.h5", batch_size=4,
                      dtype="float32", device=device, progress=False)
        assert devices(model) == {torch.device(SECOND_GPU)}
        assert seen and set(seen) == {torch.device(SECOND_GPU)}
        close(got["3"][:], ref["3"][:])


def test_capture_of_items_already_on_cuda(tmp_path):
    x = DictImages(n=9).x
    ref = capture(tiny(), x, LAYERS, tmp_path / "cpu.h5", batch_size=4, dtype="float32",
                  device="cpu", progress=False)
    on_gpu = OnDevice(x.to(CUDA))
    # host memory is pinned for CPU items only: CUDA tensors cannot be pinned
    assert BatchSource(on_gpu, 4, 0, torch.device(CUDA)).pin is False
    assert BatchSource(OnDevice(x), 4, 0, torch.device(CUDA)).pin is True
    model = tiny().to(CUDA)
    got = capture(model, on_gpu, LAYERS, tmp_path / "cuda.h5", batch_size=4, dtype="float32",
                  device=CUDA, progress=False)
    assert got.complete and len(got) == 9
    for name in LAYERS:
        close(got[name][:], ref[name][:])
    np.testing.assert_array_equal(got.index, np.arange(9))


def test_float16_model_on_cuda_captures_float32_gradients(tmp_path):
    data = DictImages(n=6)  # float32 items: the inputs take the model's dtype
    model = tiny().half().to(CUDA)
    got = capture(model, data, ["3"], tmp_path / "half.h5", batch_size=3, dtype="float32",
                  grads_for=0, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {d.type for d in devices(model)} == {"cuda"}
    assert all(p.grad is None for p in model.parameters())
    ref = capture(tiny(), data, ["3"], tmp_path / "ref.h5", batch_size=3, dtype="float32",
                  grads_for=0, device="cpu", progress=False)
    acts, grads = got["3"][:], got.gradients("3")[:]
    ref_acts, ref_grads = ref["3"][:], ref.gradients("3")[:]
    assert acts.dtype == grads.dtype == np.float32
    assert np.isfinite(acts).all() and np.isfinite(grads).all()
    close(acts, ref_acts, rtol=1e-2)  # float16 arithmetic
    # layer "3" feeds a ReLU: compare gradients where its gate is the same on both devices
    gate = np.abs(ref_acts) > 0.05 * np.abs(ref_acts).max()
    assert gate.mean() > 0.5
    close(np.where(gate, grads, 0), np.where(gate, ref_grads, 0), rtol=1e-2)


# --------------------------------------------------------------------------- netdissect


def test_netdissect_on_cuda_equals_the_cpu_exactly(tmp_path):
    ds = SyntheticConcepts(16, size=32, seed=1)  # segmentations 16x16
    store = capture(tiny(), ds, ["0", "3"], tmp_path / "s.h5", batch_size=8, dtype="float32",
                    device="cpu", progress=False)  # maps 32x32 and 16x16
    cpu = dissect_units(store, ds, quantile=0.05, batch_size=5, device="cpu", progress=False)
    gpu = dissect_units(store, ds, quantile=0.05, batch_size=5, device=CUDA, progress=False)
    assert cpu.layers == gpu.layers == ["0", "3"] and cpu.concepts == gpu.concepts
    for name in ("0", "3"):
        # exact order statistics and exact integer counts: equal, not close
        np.testing.assert_array_equal(gpu.thresholds(name), cpu.thresholds(name))
        np.testing.assert_array_equal(gpu.iou(name), cpu.iou(name))
        np.testing.assert_array_equal(gpu.top_images(name), cpu.top_images(name))
        assert (cpu.iou(name) > 0).any()
    assert IoUTally(1, ds.concepts[:1], ds.categories, device=CUDA).engine == "torch"


def _labels(g: torch.Generator, B: int, P: int, sh: int, sw: int, top: int) -> torch.Tensor:
    """Random label planes with runs, repeats across planes, negatives and unknown numbers."""
    coarse = torch.randint(-1, top + 3, (B, P, sh, (sw + 3) // 4), generator=g)
    labels = coarse.repeat_interleave(4, dim=3)[..., :sw].contiguous()
    labels[:, 1:][torch.rand(labels[:, 1:].shape, generator=g) < 0.2] = 2  # repeats of 2
    return labels


def _clear_thresholds(maps: torch.Tensor, size: tuple[int, int], level: float) -> torch.Tensor:
    """Per unit, a threshold near the ``level`` quantile of the upsampled maps, midway in the
    widest gap between neighbouring values there: no pixel lies within rounding of it, so
    which pixels are active cannot depend on the device's float32 arithmetic."""
    up = F.interpolate(maps.double(), size=size, mode="bilinear", align_corners=False)
    values = up.transpose(0, 1).reshape(maps.shape[1], -1).sort(dim=1).values
    start = int(level * values.shape[1])
    window = values[:, start:start + 64]
    gaps = window[:, 1:] - window[:, :-1]
    assert (gaps.amax(1) > 1e-4 * values.abs().amax(1)).all()
    j = gaps.argmax(1)
    rows = torch.arange(len(values))
    return ((window[rows, j] + window[rows, j + 1]) / 2).float()


def test_iou_tally_on_cuda_counts_like_the_cpu():
    concepts = [Concept(1, "red", "color"), Concept(3, "edge", "part"), Concept(4, "rim", "part"),
                Concept(6, "beach", "scene"), Concept(8, "sky", "scene")]
    categories = ["color", "part", "scene"]
    gpu = IoUTally(6, concepts, categories, device=CUDA, engine="torch")
    cpu = {e: IoUTally(6, concepts, categories, engine=e) for e in ("auto", "torch")}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        n = 12
        maps = torch.randn(n, 6, 4, 5, generator=g)
        labels = _labels(g, n, 3, 19, 23, 8)
        image_labels = torch.randint(0, 9, (n, 2), generator=g)
        annotated = torch.rand(n, 3, generator=g) < 0.7
        thr = _clear_thresholds(maps, (19, 23), 0.8)
        for tally in cpu.values():
            tally.add(maps, thr, labels, image_labels, annotated)
        # as dissect() calls it: maps and thresholds on the device, annotations from the loader
        gpu.add(maps.to(CUDA), thr.to(CUDA), labels, image_labels, annotated)
    assert gpu.intersection.device.type == "cuda"
    got = gpu.state_dict()
    for tally in cpu.values():
        want = tally.state_dict()
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
        np.testing.assert_array_equal(gpu.result(), tally.result())
    assert int(got["intersection"].sum()) > 0 and int(got["active"].sum()) > 0


# --------------------------------------------------------------------------- deconvnet


@pytest.mark.parametrize("method", ["deconvnet", "guided", "gradient"])
def test_reconstruct_on_cuda_equals_cpu(method):
    x = images(4)
    ref = reconstruct(tiny(torch.float64), x, "3", [0, 2, 5], method=method, device="cpu",
                      progress=False)
    model = tiny(torch.float64)
    got = reconstruct(model, x, "3", [0, 2, 5], method=method, device=CUDA, batch_size=3,
                      progress=False)
    assert {d.type for d in devices(model)} == {"cuda"}  # moved there, and stays
    assert got.device == x.device and got.shape == (4, 3, 3, 16, 16)
    close(got, ref, rtol=1e-6)


def test_top_patches_on_cuda_choose_the_same_rows():
    data = TensorDataset(images(12, seed=3))
    ref = top_patches(tiny(torch.float64), data, "3", [0, 1, 4], k=3, batch_size=5,
                      device="cpu", progress=False)
    got = top_patches(tiny(torch.float64), data, "3", [0, 1, 4], k=3, batch_size=5,
                      device=CUDA, progress=False)
    assert got.field == ref.field and got.units == ref.units and got.k == ref.k == 3
    for a, b in zip(got.rows(), ref.rows(), strict=True):
        assert (a.unit, a.rank, a.row, a.index) == (b.unit, b.rank, b.row, b.index)
        assert (a.position, a.box, a.window) == (b.position, b.box, b.window)
        assert a.value == pytest.approx(b.value, rel=1e-6)
    assert got.images.device.type == got.projections.device.type == "cpu"
    assert torch.equal(got.images, ref.images)  # the same input pixels
    close(got.projections, ref.projections, rtol=1e-6)


def test_receptive_field_on_cuda_equals_cpu():
    for layer in ("0", "3", "5", "7"):
        ref = receptive_field(tiny(), layer, 16, device="cpu")
        assert receptive_field(tiny(), layer, 16, device=CUDA) == ref
    assert not receptive_field(tiny(), "3", 16, device=CUDA).is_global
    assert receptive_field(tiny(), "5", 16, device=CUDA).is_global


# --------------------------------------------------------------------------- actmax


def test_visualize_on_cuda_is_close_to_cpu_and_leaves_the_model_alone():
    objectives = [("3", 0), ("3", 4), ("0", 1)]
    options = {"size": 32, "steps": 5, "transforms": None, "seed": 0, "progress": False}
    model = tiny()
    ref = visualize(model, objectives, device="cpu", **options)
    start = visualize(model, objectives, device="cpu", **{**options, "steps": 0})
    assert (ref - start).abs().max() > 1e-2  # the steps moved the images
    got = visualize(model, objectives, device=CUDA, **options)
    assert devices(model) == {torch.device("cpu")}  # the caller's model is left where it was
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert got.shape == (3, 3, 32, 32)
    # the same initial noise (drawn on the CPU) and no random transforms: only rounding
    # differs, amplified a little by Adam's normalized steps
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=0)
    # a model on the GPU: device=None runs there, and the model stays there
    gpu_model = tiny().to(CUDA)
    again = visualize(gpu_model, objectives, return_result=True, **options)
    assert {d.type for d in devices(gpu_model)} == {"cuda"}
    assert again.settings["device"].startswith("cuda")
    assert again.images.device.type == "cpu"
    torch.testing.assert_close(again.images, got, atol=5e-3, rtol=0)


# --------------------------------------------------------------------------- probes


def _probe_store(path, n: int = 240, d: int = 10, classes: int = 3) -> tuple[ActivationStore,
                                                                          np.ndarray]:
    """Two layers whose features carry the label weakly and strongly."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n)
    acts = {}
    for i, s in enumerate((0.8, 3.0)):
        x = rng.normal(size=(n, d))
        x[:, :classes] += s * np.eye(classes)[y]
        acts[f"block{i}"] = x.astype(np.float32)
    create_store(path, n=n, layers={k: v.shape[1:] for k, v in acts.items()}, dtype="float32",
                 pool=None, attrs={})
    with StoreWriter(path) as w:
        w.write(0, np.arange(n), acts, acts)
        w.finish()
    return ActivationStore(path), y


def test_probe_on_cuda_equals_cpu_and_fits_there(tmp_path, probe_devices):
    store, y = _probe_store(tmp_path / "p.h5")
    # float64 and a tight tolerance: both devices reach the same optimum to ~1e-8, far closer
    # than any test row is to a decision boundary
    options = ProbeOptions(dtype="float64", tol=1e-8)
    ref = probe(store, y, device="cpu", reg=1e-2, options=options, progress=False)
    probe_devices.clear()  # only the cuda run below counts
    got = probe(store, y, device=CUDA, reg=1e-2, options=options, progress=False)
    assert {what for what, _ in probe_devices} == {"model", "features", "labels", "parameters"}
    assert {d.type for _, d in probe_devices} == {"cuda"}
    assert got.settings["device"].startswith("cuda")
    assert got.layers == ref.layers == ["block0", "block1"]
    for layer in ref.layers:
        a, b = got[layer], ref[layer]
        assert a.converged and b.converged
        assert a.test_accuracy == pytest.approx(b.test_accuracy, abs=1e-6)
        assert a.train_accuracy == pytest.approx(b.train_accuracy, abs=1e-6)
        assert a.control_test_accuracy == pytest.approx(b.control_test_accuracy, abs=1e-6)
        assert a.test_loss == pytest.approx(b.test_loss, rel=1e-5)
    assert ref["block1"].test_accuracy > 0.9


# --------------------------------------------------------------------------- attribution

METHODS = {
    "saliency": lambda m, x, d: saliency(m, x, TARGETS, device=d),
    "integrated_gradients": lambda m, x, d: integrated_gradients(
        m, x, TARGETS, steps=8, batch_size=10, device=d, progress=False),
    "smoothgrad_sigma0": lambda m, x, d: smoothgrad(
        m, x, TARGETS, n=3, sigma=0.0, device=d, progress=False),
    "occlusion": lambda m, x, d: occlusion(
        m, x, TARGETS, window=4, stride=2, batch_size=16, device=d, progress=False),
    "grad_cam": lambda m, x, d: grad_cam(m, x, TARGETS, "3", device=d),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_attribution_on_cuda_equals_cpu(method):
    x = images(3)
    ref = METHODS[method](tiny(torch.float64), x, "cpu")
    model = tiny(torch.float64)
    got = METHODS[method](model, x, CUDA)
    assert {d.type for d in devices(model)} == {"cuda"}  # moved there, and stays
    assert got.device == x.device
    assert got.shape == (x.shape if method != "grad_cam" else (3, 16, 16))
    close(got, ref, rtol=1e-6)


def test_smoothgrad_on_cuda_is_the_mean_saliency_of_its_noisy_inputs():
    # the noise comes from a generator on the device, so the GPU draws other noise than the
    # CPU for the same seed (documented): compare with the CPU saliency of the GPU's draws
    x = images(3)
    runs = []
    for _ in range(2):
        rec = Recorder(tiny(torch.float64))
        got = smoothgrad(rec, x, TARGETS, n=4, sigma=0.2, seed=5, batch_size=5, device=CUDA,
                         progress=False)
        noisy = torch.cat(rec.inputs)  # step-major: draw i of input b is row i * B + b
        assert noisy.device.type == "cuda" and noisy.shape == (12, 3, 16, 16)
        runs.append((got, noisy.cpu()))
    (got, noisy), (again, noisy_again) = runs
    assert torch.equal(noisy, noisy_again)  # a seed gives the same noise on the same device
    close(again, got, rtol=1e-9)
    assert got.device == x.device
    ref = saliency(tiny(torch.float64), noisy, TARGETS * 4, device="cpu")
    close(got, ref.view(4, 3, 3, 16, 16).mean(0), rtol=1e-6)
    eps = (noisy.view(4, 3, 3, 16, 16) - x) / (0.2 * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
                                                ).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(eps[:, 0], eps[:, 2])  # one standard normal draw per step


def test_attribution_of_a_model_on_cuda_stays_there_with_device_none():
    x = images(2)
    model = tiny(torch.float64).to(CUDA)
    seen = input_devices(model)
    got = saliency(model, x, [0, 1])
    assert seen and {d.type for d in seen} == {"cuda"}
    assert {d.type for d in devices(model)} == {"cuda"} and got.device == x.device
    close(got, saliency(tiny(torch.float64), x, [0, 1], device="cpu"), rtol=1e-6)
    before = copy.deepcopy(model.state_dict())
    grad_cam(model, x, [0, 1], "3")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_vit_token_maps_on_cuda_equal_cpu(tmp_path):
    """A ViT block captured on cuda is stored as the same (C, h, w) maps and class tokens as
    on the CPU, and Grad-CAM over an inner block agrees (#24)."""
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=112, patch_size=16, num_layers=2,
                                               num_heads=2, hidden_dim=64,
                                               mlp_dim=128).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero: a blank Grad-CAM
    x = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    block = "encoder.layers.encoder_layer_0"
    stores = {}
    for dev in ("cpu", CUDA):
        model = copy.deepcopy(vit).to(dev)
        stores[dev] = capture(model, x, [block], tmp_path / f"{dev}.h5", dtype="float32",
                              progress=False)
    with stores["cpu"] as cpu, stores[CUDA] as gpu:
        assert gpu[block].shape == (4, 64, 7, 7) and gpu.layout(block) == cpu.layout(block)
        np.testing.assert_allclose(gpu[block][:], cpu[block][:], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gpu.prefix(block)[:], cpu.prefix(block)[:], rtol=1e-4,
                                   atol=1e-5)
    double = copy.deepcopy(vit).double()
    maps = {dev: grad_cam(copy.deepcopy(double).to(dev), x.double(), 3, block,
                          interpolation=None).cpu() for dev in ("cpu", CUDA)}
    assert maps["cpu"].abs().amax() > 0
    torch.testing.assert_close(maps[CUDA], maps["cpu"], rtol=1e-9, atol=1e-12)
