"""Nothing lost, nothing raw: full disks, damaged stores and bad store paths.

- A full disk (a small tmpfs in a private mount namespace) or a file-size limit
  (``RLIMIT_FSIZE``) during ``capture`` is a ``StoreError`` naming the file and the OS error;
  ``/progress`` never counts a row that did not reach the file; nothing complete-looking is
  left; a rerun after freeing space resumes to data identical to an uninterrupted run.
- Opening a damaged store is a ``StoreError`` saying what is wrong, for every attribute and
  dataset (a seeded fuzz of the layout), never a ``KeyError``, ``JSONDecodeError``, ...
- Store paths that cannot be files are ``StoreError`` s, and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dissect import ActivationStore, DissectError, StoreError, capture
from dissect.store import StoreWriter, create_store

ROOT = Path(__file__).resolve().parents[1]

# The child process: capture a tiny model over 24 random 64-px images into argv[1] (float32:
# layer "0" is 64 KiB a row, 1.5 MiB in all) and print one JSON line describing the outcome.
# argv[2] says what goes wrong: "none"; "limit" (the file-size limit, RLIMIT_FSIZE, is below
# the store's size from the start); "limit-mid" (the limit drops below the file's size after
# 20 images); "fill-mid" (another file fills the disk after 20 images; argv[3] is where).
CHILD = textwrap.dedent("""
    import json, os, resource, signal, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import torch
    from torch.utils.data import Dataset
    from conftest import TinyCNN
    from dissect import capture, StoreError
    path, mode = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit: EFBIG, not a kill
    if mode == "limit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))

    class Images(Dataset):
        def __init__(self):
            self.x = torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(1))
            self.reads = 0
        def __len__(self):
            return 24
        def __getitem__(self, i):
            self.reads += 1
            # after the 5 identity rows and 20 captured ones: batches 0-4 were handed to the
            # writer, whose queue holds at most 2 and writes 1, so rows 0-7 are surely on disk
            # (at 10 rows a slow writer thread could still be on batch 0: a race under load)
            if self.reads == 5 + 20:
                if mode == "limit-mid":
                    size = os.path.getsize(path)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))
                elif mode == "fill-mid":  # unbuffered: every byte that fits is written
                    with open(sys.argv[3], "wb", buffering=0) as f:
                        try:
                            while f.write(bytes(1 << 12)):
                                pass
                        except OSError:
                            pass
            return self.x[i]

    torch.manual_seed(0)
    model = TinyCNN().eval()
    try:
        capture(model, Images(), ["0", "3"], path, batch_size=4, dtype="float32",
                progress=False).close()
        print(json.dumps({{"outcome": "ok"}}))
    except StoreError as exc:
        print(json.dumps({{"outcome": "StoreError", "message": str(exc)}}))
""").format(root=str(ROOT), tests=str(ROOT / "tests"))


def _reference(tmp_path: Path) -> dict[str, np.ndarray]:
    """An uninterrupted capture of the child's job, as arrays."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TinyCNN

    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.randn(24, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with capture(model, x, ["0", "3"], tmp_path / "reference.h5", batch_size=4,
                 dtype="float32", progress=False) as store:
        return {k: np.asarray(store[k][:]) for k in ("0", "3")} | {
            f"max{k}": store.maxima(k) for k in ("0", "3")} | {"index": store.index}


def _run_child(path: Path, mode: str = "none", *extra: str) -> dict:
    script = path.parent / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script), str(path), mode, *extra],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the child crashed ({out.returncode}):\n{out.stderr[-2000:]}"
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_partial(path: Path, reference: dict[str, np.ndarray]) -> int:
    """The interrupted store: not complete, and every counted row equals the reference."""
    with ActivationStore(path) as store:
        assert not store.complete
        done = store.n_written
        assert 0 <= done < 24
        for k in ("0", "3"):
            np.testing.assert_array_equal(store[k][:done], reference[k][:done])
            np.testing.assert_array_equal(store.maxima(k), reference[f"max{k}"][:done])
        np.testing.assert_array_equal(store.index, reference["index"][:done])
    return done


def _check_resumed(path: Path, reference: dict[str, np.ndarray]) -> None:
    with ActivationStore(path) as store:
        assert store.complete and store.n_written == 24
        for k in ("0", "3"):
            np.testing.assert_array_equal(store[k][:], reference[k])
            np.testing.assert_array_equal(store.maxima(k), reference[f"max{k}"])
        np.testing.assert_array_equal(store.index, reference["index"])


@pytest.mark.slow
def test_a_file_size_limit_below_the_store_is_refused_before_writing(tmp_path):
    path = tmp_path / "limited" / "acts.h5"
    path.parent.mkdir()
    got = _run_child(path, "limit")
    assert got["outcome"] == "StoreError", got
    assert "file-size limit" in got["message"] and str(path) in got["message"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["child.py"]  # nothing left


@pytest.mark.slow
def test_a_write_over_the_file_size_limit_is_a_store_error_and_a_rerun_resumes(tmp_path):
    reference = _reference(tmp_path)
    path = tmp_path / "limited" / "acts.h5"
    path.parent.mkdir()
    got = _run_child(path, "limit-mid")
    assert got["outcome"] == "StoreError", got
    assert str(path) in got["message"] and "File too large" in got["message"]
    assert _check_partial(path, reference) >= 4  # the rows before the failed batch are kept
    assert _run_child(path)["outcome"] == "ok"  # no limit: the rerun resumes
    _check_resumed(path, reference)


def _can_mount_tmpfs() -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def _in_tmpfs(tmp_path: Path, size: str, shell: str) -> None:
    """Run ``shell`` in a private mount namespace with a tmpfs of ``size`` at tmp_path/disk."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "child.py").write_text(CHILD)
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {tmp_path}/disk "
         f"&& {shell}"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr


TMPFS = pytest.mark.skipif(not _can_mount_tmpfs(),
                           reason="needs root and unshare -m (a private tmpfs)")


@TMPFS
@pytest.mark.slow
def test_a_read_only_disk_is_refused_before_writing(tmp_path):
    store = tmp_path / "disk" / "sub" / "acts.h5"
    _in_tmpfs(tmp_path, "4m,ro", f"{sys.executable} {tmp_path}/child.py {store} none "
              f"> {tmp_path}/out.json 2> {tmp_path}/err.txt")
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["outcome"] == "StoreError", got
    assert "not writable" in got["message"] and str(tmp_path / "disk") in got["message"]
    assert "Traceback" not in (tmp_path / "err.txt").read_text()


@TMPFS
@pytest.mark.slow
def test_a_disk_too_small_for_the_store_is_refused_before_writing(tmp_path):
    store = tmp_path / "disk" / "acts.h5"
    _in_tmpfs(tmp_path, "600k", f"{sys.executable} {tmp_path}/child.py {store} none "
              f"> {tmp_path}/out.json 2> {tmp_path}/err.txt; ls -A {tmp_path}/disk "
              f"> {tmp_path}/left.txt")
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["outcome"] == "StoreError", got
    assert "MiB free" in got["message"] and str(store) in got["message"]
    assert "Traceback" not in (tmp_path / "err.txt").read_text()
    assert (tmp_path / "left.txt").read_text().split() == []  # nothing left behind


@TMPFS
@pytest.mark.slow
def test_a_disk_filling_up_is_a_store_error_and_a_rerun_after_freeing_space_resumes(tmp_path):
    reference = _reference(tmp_path)
    store, filler = tmp_path / "disk" / "acts.h5", tmp_path / "disk" / "filler"
    child = f"{sys.executable} {tmp_path}/child.py"
    # in one private mount namespace: a 4 MiB tmpfs (the store needs about 2.6 MiB); another
    # file fills it after 20 images; the state is copied out; the filler is deleted and the
    # same capture runs again
    _in_tmpfs(tmp_path, "4m",
              f"{child} {store} fill-mid {filler} > {tmp_path}/first.json "
              f"2> {tmp_path}/first.err; cp {store} {tmp_path}/after-full.h5; rm {filler}; "
              f"{child} {store} none > {tmp_path}/second.json 2> {tmp_path}/second.err; "
              f"cp {store} {tmp_path}/resumed.h5")
    first = json.loads((tmp_path / "first.json").read_text())
    errors = (tmp_path / "first.err").read_text()
    assert first["outcome"] == "StoreError", first
    assert "disk is full" in first["message"] and str(store) in first["message"]
    assert "Traceback" not in errors and "Exception ignored" not in errors, errors
    assert _check_partial(tmp_path / "after-full.h5", reference) >= 4
    assert json.loads((tmp_path / "second.json").read_text())["outcome"] == "ok"
    _check_resumed(tmp_path / "resumed.h5", reference)


def test_a_failed_write_never_advances_progress(tmp_path, monkeypatch):
    path = tmp_path / "w.h5"
    create_store(path, n=8, layers={"a": (2,)}, dtype="float32", pool=None, attrs={})
    rows = {"a": np.ones((4, 2), np.float32)}
    with StoreWriter(path) as writer:
        writer.write(0, np.arange(4), rows, rows)
        real = h5py.File.flush

        def failing(self):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(h5py.File, "flush", failing)
        with pytest.raises(StoreError, match="disk is full") as info:
            writer.write(4, np.arange(4, 8), rows, rows)
        assert str(path) in str(info.value)
        with pytest.raises(StoreError, match="earlier write failed"):
            writer.write(4, np.arange(4, 8), rows, rows)
        with pytest.raises(StoreError, match="4 of 8"):
            writer.finish()
        monkeypatch.setattr(h5py.File, "flush", real)
    with ActivationStore(path) as store:
        assert store.n_written == 4 and not store.complete


def test_creating_a_store_that_fails_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "c.h5"

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    with pytest.raises(StoreError, match="disk is full"):
        create_store(path, n=4, layers={"a": (2,)}, dtype="float32", pool=None, attrs={})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- store paths


def test_store_paths_that_cannot_be_files(tiny, images, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        capture(tiny, images, ["3"], afile / "x.h5", progress=False)
    folder = tmp_path / "folder"
    folder.mkdir()
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="folder"):
            capture(tiny, images, ["3"], folder, overwrite=overwrite, progress=False)
    assert list(folder.iterdir()) == []  # no .creating left behind
    with pytest.raises(StoreError, match="folder"):
        ActivationStore(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_store_error(tiny, images, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match=str(ro)):
            capture(tiny, images, ["3"], ro / "x.h5", progress=False)
    finally:
        ro.chmod(0o700)


# --------------------------------------------------------------------------- damaged layouts


def _good_store(path: Path, gradients: bool = True) -> Path:
    create_store(path, n=6, layers={"a": (3, 2, 2), "b": (4,)}, dtype="float16", pool=None,
                 attrs={"fingerprint": "f", "model": "m"}, gradients=gradients)
    acts = {"a": np.ones((6, 3, 2, 2), np.float16), "b": np.ones((6, 4), np.float16)}
    maxima = {"a": np.ones((6, 3), np.float32), "b": np.ones((6, 4), np.float32)}
    with StoreWriter(path) as w:
        w.write(0, np.arange(6), acts, maxima, acts if gradients else None)
        w.finish()
    return path


def _attr_edits() -> list[tuple[str, object]]:
    """Root attributes replaced by hostile values (None: deleted)."""
    values = [None, "", "x", "[", "{}", "[]", "null", 1.5, -1, 0, 7, 10 ** 12, True,
              np.array([1, 2]), b"\xff\xfe", "1", "[1, 2]", '["a", "a"]', '["a", 3]', "NaN"]
    keys = ["format", "version", "n_samples", "complete", "layers", "dtype", "pool",
            "gradients", "shards"]
    return [(k, v) for k in keys for v in values]


def _set_attr(path: Path, key: str, value: object) -> None:
    with h5py.File(path, "r+") as f:
        if value is None:
            if key in f.attrs:
                del f.attrs[key]
        else:
            f.attrs[key] = value


def _dataset_edits() -> list[tuple[str, object]]:
    """Datasets deleted, reshaped, retyped or replaced by a group."""
    names = ["activations/a", "activations/b", "maxima/a", "maxima/b", "gradients/a", "index",
             "progress"]
    kinds = ["delete", "group", "shape", "dtype", "scalar"]
    return [(n, k) for n in names for k in kinds] + [
        ("progress", 7), ("progress", -1), ("progress", 2.5), ("progress", 3)]


def _edit_dataset(path: Path, name: str, kind: object) -> None:
    with h5py.File(path, "r+") as f:
        old = f[name]
        shape, dtype = old.shape, old.dtype
        if isinstance(kind, (int, float)):
            del f[name]
            f.create_dataset(name, data=np.asarray(kind))
            return
        del f[name]
        if kind == "group":
            f.create_group(name)
        elif kind == "shape":
            f.create_dataset(name, data=np.zeros((shape[0] + 1,) + shape[1:] if shape else (2,),
                                                 dtype))
        elif kind == "dtype":
            f.create_dataset(name, data=np.zeros(shape, "float64" if dtype.kind != "f"
                                                 else "int32"))
        elif kind == "scalar":
            f.create_dataset(name, data=np.float32(1))


def _data_bytes(path: Path) -> list[tuple[int, int]]:
    """``(offset, size)`` of every block of raw values in the file (chunks, contiguous data)."""
    blocks = []

    def visit(name: str, obj: object) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        if obj.chunks is None:
            blocks.append((obj.id.get_offset(), obj.id.get_storage_size()))
        else:
            for i in range(obj.id.get_num_chunks()):
                info = obj.id.get_chunk_info(i)
                blocks.append((info.byte_offset, info.size))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return [(o, n) for o, n in blocks if o is not None and n]


def test_every_damaged_layout_is_a_store_error(tmp_path):
    """A seeded fuzz over the layout: attributes replaced by hostile values, datasets deleted,
    reshaped, retyped or replaced, and bytes flipped inside the stored values (1,019 cases):
    each store opens and reads, or is a StoreError; never another exception.

    Flips are kept to the blocks of values: HDF5 1.14 itself can loop forever on some flips
    of its own metadata (seen twice in 7,000 random flips anywhere in the file), which no
    Python code can interrupt; the stores' 1.8 file format makes HDF5 refuse most such flips
    by their checksums (``dissect.store.layout.LIBVER``)."""
    good = _good_store(tmp_path / "good.h5")
    outcomes: dict[str, int] = {}
    cases = [("attr", k, v) for k, v in _attr_edits()] + [
        ("dataset", n, k) for n, k in _dataset_edits()]
    blocks = _data_bytes(good)
    rng = np.random.default_rng(0)
    for _ in range(800):
        offset, size = blocks[int(rng.integers(len(blocks)))]
        cases.append(("flip", offset + int(rng.integers(size)), int(rng.integers(1, 256))))
    for i, (kind, a, b) in enumerate(cases):
        path = tmp_path / f"case{i}.h5"
        shutil.copy(good, path)
        if kind == "attr":
            _set_attr(path, a, b)
        elif kind == "dataset":
            _edit_dataset(path, a, b)
        else:
            data = bytearray(path.read_bytes())
            data[a] ^= b
            path.write_bytes(bytes(data))
        try:
            with ActivationStore(path) as store:  # what every analysis reads through
                for layer in store.layers:
                    store.maxima(layer), next(store.iter(layer, 1))
                _ = store.index, store.meta
            outcome = "opened"
        except StoreError:
            outcome = "StoreError"
        except Exception as exc:  # noqa: BLE001 - this is what the test is about
            pytest.fail(f"case {i} ({kind} {a!r} {b!r:.40}) raised {type(exc).__name__}: {exc}")
        finally:
            path.unlink()
        outcomes[f"{kind} {outcome}"] = outcomes.get(f"{kind} {outcome}", 0) + 1
    structured = len(cases) - 800
    assert outcomes["attr StoreError"] + outcomes["dataset StoreError"] > 0.8 * structured, \
        outcomes


def test_specific_damage_messages(tmp_path):
    path = _good_store(tmp_path / "s.h5")
    _set_attr(path, "version", "1")
    with pytest.raises(StoreError, match=r"version '1' \(str\); this release reads version 1"):
        ActivationStore(path)
    path = _good_store(tmp_path / "p.h5")
    _edit_dataset(path, "progress", 7)
    with pytest.raises(StoreError, match="progress says 7 rows of 6"):
        ActivationStore(path)
    path = _good_store(tmp_path / "m.h5")
    _edit_dataset(path, "maxima/a", "shape")
    with pytest.raises(StoreError, match="/maxima/a"):
        ActivationStore(path)
    path = _good_store(tmp_path / "l.h5")
    _set_attr(path, "layers", "[")
    with pytest.raises(StoreError, match="'layers' is not valid JSON"):
        ActivationStore(path)


def test_a_damaged_store_is_refused_by_capture_too(tiny, images, tmp_path):
    path = tmp_path / "d.h5"
    capture(tiny, images, ["3"], path, progress=False).close()
    _edit_dataset(path, "progress", 99)
    with pytest.raises(StoreError, match="overwrite=True"):
        capture(tiny, images, ["3"], path, progress=False)
    store = capture(tiny, images, ["3"], path, overwrite=True, progress=False)
    assert store.complete
    store.close()
    assert issubclass(StoreError, DissectError)
