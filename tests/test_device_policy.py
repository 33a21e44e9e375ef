"""The one device policy (prepare_model) and what rests on it: placement, dtype, the cached
fingerprint, mode restoration, the temporary store of dissect(model), pinning, the gloo control
group and actmax's private copy. CPU only: other devices are stood in for by "meta"."""

from __future__ import annotations

import copy
import datetime
import logging
import os
import socket

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dissect._plumbing.device as device_mod
import dissect.actmax.fastcopy as fastcopy
from dissect import DissectError, PreparedModel, capture, prepare_model
from dissect._plumbing.device import as_module, prepared, run_device
from dissect._plumbing.fingerprint import fingerprint
from dissect.actmax import evaluate, invert, visualize
from dissect.attribution import saliency
from dissect.datasets import SyntheticConcepts
from dissect.deconvnet import receptive_field, reconstruct, top_patches
from dissect.hooks.source import BatchSource
from dissect.netdissect import dissect as dissect_units
from dissect.store import ActivationStore

META = torch.device("meta")


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _mixed_modes() -> nn.Sequential:
    """Train mode, except a frozen BatchNorm (eval) in the middle."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
    ).train()
    model[1].eval()
    return model


# --------------------------------------------------------------------------- placement


def test_a_cpu_model_stays_on_the_cpu_and_a_prepared_model_passes_through(tiny):
    run = prepare_model(tiny)
    assert isinstance(run, PreparedModel)
    assert run.module is tiny
    assert run.device == torch.device("cpu")
    assert run.dtype == torch.float32
    assert run.spread is False
    assert {p.device.type for p in tiny.parameters()} == {"cpu"}
    assert prepare_model(run) is run
    assert prepare_model(run, device="cpu") is run
    assert prepare_model(run, device=torch.device("cpu")) is run
    assert as_module(run) is tiny
    assert run_device(tiny) == torch.device("cpu")
    assert run_device(run) == torch.device("cpu")


def test_a_cpu_model_stays_on_the_cpu_when_cuda_is_available(tiny, monkeypatch, caplog):
    """CUDA is faked as available: device=None must neither move the model nor pick CUDA,
    and says how to use the GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caplog.set_level(logging.INFO, logger="dissect")
    run = prepare_model(tiny)
    assert run.device == torch.device("cpu")
    assert {p.device.type for p in tiny.parameters()} == {"cpu"}
    assert run_device(tiny) == torch.device("cpu")
    assert any("device='cuda'" in r.getMessage() for r in caplog.records)
    assert run_device(nn.ReLU()).type == "cuda"  # nothing decides: the default device


def test_cuda_asked_for_without_cuda_is_a_dissect_error(tiny):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = prepare_model(tiny)
    with pytest.raises(DissectError, match="CUDA is not available"):
        prepare_model(run, device="cuda")
    with pytest.raises(DissectError, match="CUDA is not available"):
        prepare_model(tiny, device="cuda:0")
    with pytest.raises(DissectError, match="unknown device"):
        prepare_model(tiny, device="warp-drive")
    assert next(tiny.parameters()).device.type == "cpu"


def test_cuda_without_an_index_means_any_cuda_device(monkeypatch):
    """A model prepared on cuda:1 passes through device="cuda" and "cuda:1" (no move). CUDA
    is faked as available; the PreparedModel only claims cuda:1, nothing touches a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = nn.Linear(2, 2)
    run = PreparedModel(model, torch.device("cuda", 1), torch.float32)
    assert prepare_model(run, device="cuda") is run
    assert prepare_model(run, device=torch.device("cuda")) is run
    assert prepare_model(run, device="cuda:1") is run
    assert model.weight.device.type == "cpu"


def test_a_model_without_parameters_runs_on_the_default_device():
    run = prepare_model(nn.ReLU())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert run.device.type == expected
    assert run.dtype is None and run.spread is False
    assert prepare_model(nn.ReLU(), device="cpu").device == torch.device("cpu")


def test_a_single_device_model_is_moved_only_when_asked():
    """The "meta" device stands in for a second device: a model there stays there without
    device=, and a CPU model is moved there (in place) by device="meta"."""
    on_meta = nn.Linear(2, 2).to(META)
    run = prepare_model(on_meta)
    assert run.device == META and on_meta.weight.device == META
    model = nn.Linear(2, 2)
    run = prepare_model(model, device="meta")
    assert run.device == META and run.module is model
    assert model.weight.device == META and model.bias.device == META
    assert run.inputs(torch.ones(3, 2)).device == META


def test_a_model_spread_over_two_devices_is_never_moved():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(META))
    run = prepare_model(model, device="cpu")
    assert run.spread is True
    assert run.module is model
    assert run.device == torch.device("cpu")
    assert model[0].weight.device.type == "cpu"
    assert model[1].weight.device == META and model[1].bias.device == META
    assert run.inputs(torch.ones(3, 2)).device == torch.device("cpu")
    # without device=, inputs go to the device of the first parameter
    run = prepare_model(model)
    assert run.spread is True and run.device == torch.device("cpu")
    assert model[1].weight.device == META
    # the first parameter decides, whichever device that is
    flipped = nn.Sequential(nn.Linear(2, 2).to(META), nn.Linear(2, 2))
    assert prepare_model(flipped).device == META
    assert flipped[1].weight.device.type == "cpu"
    # device= decides where inputs go, even when it is not the first parameter's device
    run = prepare_model(flipped, device="cpu")
    assert run.spread is True and run.device == torch.device("cpu")
    assert flipped[0].weight.device == META and flipped[1].weight.device.type == "cpu"


def test_inputs_take_the_model_floating_dtype():
    model = nn.Linear(2, 2).double()
    run = prepare_model(model)
    assert run.dtype == torch.float64
    x = torch.ones(3, 2, dtype=torch.float32)
    assert run.inputs(x).dtype == torch.float64
    assert run.inputs(torch.ones(3, 2, dtype=torch.long)).dtype == torch.long  # not floating
    half = prepare_model(nn.Linear(2, 2).to(torch.bfloat16))
    assert half.inputs(x).dtype == torch.bfloat16
    # several floating dtypes: no cast
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    assert prepare_model(mixed).dtype is None
    assert prepare_model(mixed).inputs(x).dtype == torch.float32


# --------------------------------------------------------------------------- DataParallel


def test_data_parallel_is_refused_everywhere(tiny, images, tmp_path):
    wrapped = nn.DataParallel(tiny)
    with pytest.raises(DissectError, match=r"model\.module"):
        prepare_model(wrapped)
    with pytest.raises(DissectError, match=r"model\.module"):
        prepare_model(wrapped, device="cpu")
    with pytest.raises(DissectError, match=r"model\.module"):
        run_device(wrapped)
    with pytest.raises(DissectError, match=r"model\.module"):
        capture(wrapped, images, ["3"], tmp_path / "a.h5", progress=False)
    assert not (tmp_path / "a.h5").exists()
    with pytest.raises(DissectError, match=r"model\.module"):
        saliency(wrapped, images[:2], 0)
    with pytest.raises(DissectError, match=r"model\.module"):
        visualize(wrapped, [("3", 0)], size=16, steps=1, transforms=None, progress=False)
    with pytest.raises(DissectError, match=r"model\.module"):
        top_patches(wrapped, images, "3", [0], k=1, progress=False)
    with pytest.raises(DissectError, match=r"model\.module"):
        dissect_units(wrapped, SyntheticConcepts(2, size=32), layers=["3"], progress=False,
                      store_path=tmp_path / "b.h5")
    assert not (tmp_path / "b.h5").exists()
    with pytest.raises(DissectError, match="torch.nn.Module"):
        prepare_model(lambda x: x)


# --------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.bfloat16, 2e-2)])
def test_capture_with_gradients_on_a_low_or_high_precision_model(tiny, images, tmp_path,
                                                                 dtype, tol):
    model = copy.deepcopy(tiny).to(dtype)
    store = capture(model, images, ["4"], tmp_path / "a.h5", grads_for=0, dtype="float32",
                    progress=False)
    seen = {}
    hook = model[4].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    try:
        out = model(images.to(dtype))
    finally:
        hook.remove()
    (grad,) = torch.autograd.grad(out[:, 0].sum(), seen["out"])
    with store:
        acts = torch.from_numpy(store["4"][:])
        grads = torch.from_numpy(store.gradients("4")[:])
    expected = seen["out"].detach().float()
    assert acts.shape == expected.shape == (10, 6, 8, 8)
    scale = float(expected.abs().max())
    torch.testing.assert_close(acts, expected, rtol=tol, atol=tol * scale)
    gscale = float(grad.abs().max())
    assert gscale > 0
    torch.testing.assert_close(grads, grad.float(), rtol=tol, atol=tol * gscale)
    assert all(p.grad is None and p.dtype == dtype for p in model.parameters())


def _same_analysis(name: str, model: nn.Module, images: torch.Tensor):
    """One analysis of another module than capture, with an answer comparable across dtypes."""
    if name == "reconstruct":
        return reconstruct(model, images[:2], "3", [0, 1], progress=False).float()
    if name == "receptive_field":
        return str(receptive_field(model, "3", 16))
    if name == "top_patches":
        top = top_patches(model, images, "3", [0, 1], k=2, progress=False)
        return top.images.float(), top.projections.float()
    if name == "evaluate":
        return evaluate(model, [("3", 0), ("3", 1)], images[:2].clamp(0, 1)).float()
    if name == "visualize":
        return visualize(model, [("3", 0)], size=16, steps=1, transforms=None,
                         progress=False).shape
    if name == "invert":
        return invert(model, images[:2].clamp(0, 1), "3", steps=1, progress=False).shape
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["reconstruct", "receptive_field", "top_patches", "evaluate",
                                  "visualize", "invert"])
def test_other_analyses_cast_inputs_to_the_model_dtype(tiny, images, name):
    expected = _same_analysis(name, tiny, images)
    got = _same_analysis(name, copy.deepcopy(tiny).double(), images)
    if isinstance(expected, str | torch.Size):
        assert got == expected
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- fingerprint


@pytest.fixture
def fingerprint_calls(monkeypatch):
    calls: list[str] = []
    real = device_mod.weights_fingerprint

    def counting(model: nn.Module) -> str:
        calls.append(type(model).__name__)
        return real(model)

    monkeypatch.setattr(device_mod, "weights_fingerprint", counting)
    return calls


def test_dissect_of_a_model_hashes_its_weights_once(tiny, fingerprint_calls, tmp_path,
                                                    monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    ds = SyntheticConcepts(6, size=32, seed=0)
    result = dissect_units(tiny, ds, layers=["3"], quantile=0.2, batch_size=4, progress=False)
    assert result.layers == ["3"]
    assert len(fingerprint_calls) == 1


def test_a_prepared_model_is_hashed_once_for_a_chain_of_calls(tiny, images, tmp_path,
                                                              fingerprint_calls):
    run = prepare_model(tiny)
    store = capture(run, images, ["3"], tmp_path / "a.h5", progress=False)
    assert len(fingerprint_calls) == 1
    with store:
        top = top_patches(run, images, "3", [0, 1], k=2, store=store, progress=False)
    assert top.images.shape[:2] == (2, 2)
    assert len(fingerprint_calls) == 1
    assert prepare_model(run).fingerprint == run.fingerprint
    assert len(fingerprint_calls) == 1
    # the fingerprint is the real one, and the store records it
    assert run.fingerprint == fingerprint(tiny)
    with ActivationStore(tmp_path / "a.h5") as again:
        assert again.meta["fingerprint"] == run.fingerprint


def test_a_bare_module_is_hashed_by_each_call(tiny, images, tmp_path, fingerprint_calls):
    capture(tiny, images, ["3"], tmp_path / "a.h5", progress=False).close()
    capture(tiny, images, ["3"], tmp_path / "b.h5", progress=False).close()
    assert len(fingerprint_calls) == 2


def test_the_fingerprint_survives_a_move_of_a_prepared_model(fingerprint_calls):
    run = prepare_model(nn.Linear(2, 2))
    run._fingerprint = "known"  # as if computed before
    moved = prepare_model(run, device="meta")
    assert moved is not run and moved.device == META and moved.module is run.module
    assert moved.fingerprint == "known"
    assert fingerprint_calls == []


# --------------------------------------------------------------------------- temporary store


class _Watched(SyntheticConcepts):
    """SyntheticConcepts that records the TMPDIR folder's entries when an item is read, and
    fails at item ``fail_at``."""

    def __init__(self, n: int, folder: str, fail_at: int | None = None) -> None:
        super().__init__(n, size=32, seed=0)
        self.folder, self.fail_at = folder, fail_at
        self.seen: list[list[str]] = []

    def __getitem__(self, i: int) -> dict:
        self.seen.append(sorted(os.listdir(self.folder)))
        if self.fail_at is not None and i == self.fail_at:
            raise RuntimeError(f"broken item {i}")
        return super().__getitem__(i)


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def test_the_temporary_store_lives_in_tmpdir_and_is_removed(tiny, tmpdir_env):
    ds = _Watched(6, str(tmpdir_env))
    result = dissect_units(tiny, ds, layers=["3"], quantile=0.2, batch_size=4, progress=False)
    assert result.layers == ["3"]
    assert ds.seen, "capture read no item"
    made = {name for names in ds.seen for name in names}
    assert len(made) == 1 and next(iter(made)).startswith("dissect-")
    assert os.listdir(tmpdir_env) == []


def test_the_temporary_store_is_removed_when_the_call_fails(tiny, tmpdir_env):
    ds = _Watched(8, str(tmpdir_env), fail_at=5)
    with pytest.raises(Exception, match="broken item 5"):
        dissect_units(tiny, ds, layers=["3"], quantile=0.2, batch_size=2, progress=False)
    assert any(names for names in ds.seen), "the temporary folder was never made"
    assert os.listdir(tmpdir_env) == []


def test_a_store_path_is_kept(tiny, tmpdir_env, tmp_path):
    ds = _Watched(6, str(tmpdir_env))
    keep = tmp_path / "keep.h5"
    dissect_units(tiny, ds, layers=["3"], quantile=0.2, batch_size=4, progress=False,
                  store_path=keep)
    assert keep.exists()
    assert all(names == [] for names in ds.seen)  # nothing made in TMPDIR
    with ActivationStore(keep) as store:
        assert store.complete and store.layers == ["3"] and len(store) == 6
    assert os.listdir(tmpdir_env) == []


# --------------------------------------------------------------------------- pinning


def test_host_memory_is_pinned_only_for_cuda_and_cpu_items():
    cpu_items = TensorDataset(torch.zeros(8, 3, 4, 4))
    assert BatchSource(cpu_items, 4, 0, torch.device("cuda")).pin is True
    assert BatchSource(torch.zeros(8, 3, 4, 4), 4, 0, torch.device("cuda:1")).pin is True
    assert BatchSource(cpu_items, 4, 0, torch.device("cpu")).pin is False
    assert BatchSource(cpu_items, 4, 0, META).pin is False
    meta_items = TensorDataset(torch.zeros(8, 3, 4, 4, device=META))
    assert BatchSource(meta_items, 4, 0, torch.device("cuda")).pin is False
    assert BatchSource(torch.zeros(8, 3, 4, 4, device=META), 4, 0,
                       torch.device("cuda")).pin is False
    # a caller's DataLoader keeps its own pin_memory choice
    loader = DataLoader(cpu_items, batch_size=4)
    assert BatchSource(loader, 4, 0, torch.device("cuda")).pin is False


# --------------------------------------------------------------------------- gloo group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_gloo() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))


def test_the_gloo_control_group_is_made_once_per_default_group(monkeypatch):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    from dissect.distributed import context

    made = []
    real_new_group = dist.new_group

    def counting(*args, **kwargs):
        group = real_new_group(*args, **kwargs)
        made.append(group)
        return group

    monkeypatch.setattr(dist, "new_group", counting)
    timeout = datetime.timedelta(seconds=30)
    context._CONTROL.clear()
    try:
        _init_gloo()
        first = context._control_group(timeout)
        assert context._control_group(timeout) is first
        assert made == [first]
        context.DistContext(0, 1, 0, "gloo", timeout, owns_group=True).close()
        assert not dist.is_initialized() and context._CONTROL == {}
        _init_gloo()
        second = context._control_group(timeout)
        assert second is not first
        assert context._control_group(timeout) is second
        assert len(made) == 2
        # destroyed without close(): the cached group belongs to the old default group
        dist.destroy_process_group()
        _init_gloo()
        third = context._control_group(timeout)
        assert third is not second and len(made) == 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        context._CONTROL.clear()


# --------------------------------------------------------------------------- actmax copy

VIS = {"size": 16, "steps": 2, "transforms": None, "progress": False}


def _count_forwards(model: nn.Sequential) -> list[int]:
    """Calls of the model's own first layer (the forward pass may stop before the model's end).

    A deep copy copies the hook too: its calls, on the copy's layer, are not counted."""
    calls: list[int] = []
    first = model[0]
    first.register_forward_hook(lambda m, i, o: calls.append(1) if m is first else None)
    return calls


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: out of memory"),
])
def test_running_out_of_memory_for_the_copy_never_falls_back(tiny, monkeypatch, error):
    def no_room(model, device):
        raise error

    monkeypatch.setattr(fastcopy, "_frozen_copy", no_room)
    tiny.train()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    forwards = _count_forwards(tiny)
    with pytest.raises(DissectError, match="memory") as info:
        visualize(tiny, [("3", 0)], **VIS)
    assert "never used instead" in str(info.value)
    assert info.value.__cause__ is error
    assert forwards == []  # the caller's model never ran
    assert all(m.training for m in tiny.modules())
    assert all(p.requires_grad and p.grad is None for p in tiny.parameters())
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k])


def test_running_out_of_memory_in_deepcopy_itself(tiny, monkeypatch):
    def no_room(obj, memo=None):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fastcopy.copy, "deepcopy", no_room)
    tiny.train()
    forwards = _count_forwards(tiny)
    with pytest.raises(DissectError, match="memory"):
        visualize(tiny, [("3", 0)], **VIS)
    assert forwards == []
    assert all(m.training for m in tiny.modules())


def test_running_out_of_memory_while_folding_never_falls_back(monkeypatch):
    model = _mixed_modes().train()

    def no_room(model, keep=()):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fastcopy, "fold_batchnorm", no_room)
    forwards = _count_forwards(model)
    with pytest.raises(DissectError, match="memory"):
        visualize(model, [("3", 0)], **VIS)
    assert forwards == []
    assert all(m.training for m in model.modules())


def test_a_model_that_cannot_be_copied_is_used_itself_with_a_warning(monkeypatch, caplog):
    def refuse(obj, memo=None):
        raise TypeError("cannot pickle '_thread.lock' object")

    monkeypatch.setattr(fastcopy.copy, "deepcopy", refuse)
    model = _mixed_modes()
    modes = _modes(model)
    forwards = _count_forwards(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    caplog.set_level(logging.DEBUG, logger="dissect")
    images = visualize(model, [("3", 0), ("4", 1)], **VIS)
    assert images.shape == (2, 3, 16, 16)
    assert torch.isfinite(images).all()
    assert forwards, "the fallback did not run the caller's model"
    warnings = [r for r in caplog.records
                if r.name == "dissect.actmax" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "cannot be deep-copied" in message and "cannot pickle" in message
    assert _modes(model) == modes  # every module's own flag, the frozen BatchNorm too
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # eval mode: BatchNorm statistics untouched
        assert torch.equal(v, before[k])


def test_the_copy_leaves_the_caller_model_alone(tiny):
    tiny.train()
    forwards = _count_forwards(tiny)
    images = visualize(tiny, [("3", 0)], **VIS)
    assert images.shape == (1, 3, 16, 16)
    assert forwards == []  # the optimization ran on the private copy
    assert all(m.training for m in tiny.modules())
    assert all(p.requires_grad for p in tiny.parameters())


# --------------------------------------------------------------------------- modes


def test_capture_restores_every_module_mode(images, tmp_path):
    model = _mixed_modes()
    modes = _modes(model)
    assert modes["1"] is False and modes["0"] is True and modes[""] is True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    store = capture(model, images, ["4"], tmp_path / "a.h5", progress=False, grads_for=0,
                    dtype="float32")
    store.close()
    assert _modes(model) == modes
    for k, v in model.state_dict().items():  # it ran in eval mode: statistics untouched
        assert torch.equal(v, before[k])


def test_prepared_restores_every_module_mode_also_on_errors():
    model = _mixed_modes()
    modes = _modes(model)
    with pytest.raises(ValueError, match="boom"):
        with prepared(model, None) as run:
            assert run.module is model
            assert not any(m.training for m in model.modules())
            assert torch.is_grad_enabled()
            raise ValueError("boom")
    assert _modes(model) == modes
    with torch.no_grad(), prepared(model, "cpu"):
        assert torch.is_grad_enabled()
    assert _modes(model) == modes


def test_saliency_restores_every_module_mode(images):
    model = nn.Sequential(_mixed_modes(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    modes = _modes(model)
    grads = saliency(model, images[:2], 0)
    assert grads.shape == (2, 3, 16, 16)
    assert _modes(model) == modes
    assert all(p.grad is None for p in model.parameters())

