"""Multi-process runs with ``torch.distributed`` (launched by ``torchrun``): one process per GPU.

How a run is split
------------------
``capture`` and ``netdissect.dissect`` look for an initialized process group, or for the
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables that ``torchrun`` sets (then they join the
group themselves: NCCL when the run uses CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU).
Without either, nothing changes: one process, as before.

- **Sharding.** The dataset's rows are cut into contiguous blocks of whole batches
  (:func:`shard_range`): rank ``r`` gets the ``r``-th block, the first ranks one batch more when
  the batches do not divide evenly, so the shards concatenate in dataset order and every batch
  is a batch the single-process run would have used (same inputs per forward pass, hence the
  same numbers on deterministic kernels).
- **Shards and the published store.** Rank ``r`` of ``W`` writes an ordinary, resumable store
  ``<path>.shards/rank{r:05d}-of-{W:05d}.h5`` next to ``<path>`` (the folder name keeps the full
  file name, so ``a.h5`` and ``a.hdf5`` never share one). Once every rank is done, rank 0
  publishes ``<path>`` as an HDF5 *virtual* store (:func:`publish_shards`): every dataset is a
  virtual dataset mapping the shards' rows in order, with the shards named by paths relative to
  ``<path>``'s folder, so the folder can be moved or copied as a whole. Publishing writes only
  metadata (milliseconds whatever the size) and needs no second copy of terabytes of
  activations; :func:`consolidate` makes a standalone single file when one is wanted. A virtual
  dataset whose source file is missing would read as zeros, so
  :class:`~dissect.store.ActivationStore` refuses a published store whose shards are gone.
- **Resume** works per shard: a rerun with the same world size continues each rank's shard
  where it stopped and then publishes; complete shards are not recomputed.
- **Exact merging** (:mod:`dissect.netdissect`): thresholds come from each rank's own exact
  top values merged by counting all-reduces (:func:`dissect.stats.exact_quantiles`), IoU counts
  are int64 tensors summed with ``all_reduce``; every rank returns the single-process result.
- **Failures.** Every synchronization point is a gloo ``monitored_barrier`` (on a gloo group of
  its own when the data backend is NCCL, also right before each NCCL collective) with a timeout
  (default 30 minutes); at the end of a capture the ranks also exchange their outcomes, so an
  error on one rank is raised on every rank, naming it. A rank that died or hangs makes the
  others raise :class:`DistributedError` (at once when its connection closes, at the latest
  after the timeout) instead of waiting forever.

All ranks must see one filesystem at ``<path>`` (one machine, or NFS/Lustre across nodes):
rank 0 reads every shard when it publishes.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
import torch
import torch.distributed as dist

from ._plumbing.device import resolve_device
from .errors import DissectError, StoreError
from .store import ActivationStore, StoreWriter, create_store

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
SHARD_SUFFIX = ".shards"
_SHARD_NAME = re.compile(r"rank(\d{5})-of-(\d{5})\.h5(\.creating)?")
# root attributes a published store takes from the shards unchanged
_PER_SHARD_ATTRS = ("shard",)

T = TypeVar("T")


class DistributedError(DissectError):
    """Joining the process group failed, or another rank failed, died or timed out."""


def _timedelta(timeout: datetime.timedelta | float | None) -> datetime.timedelta:
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, datetime.timedelta):
        value = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        value = datetime.timedelta(seconds=float(timeout))
    else:
        raise DissectError(f"timeout must be a datetime.timedelta or seconds, got {timeout!r}")
    if value.total_seconds() <= 0:
        raise DissectError(f"timeout must be positive, got {value}")
    return value


def shard_range(n: int, world_size: int, rank: int, align: int = 1) -> range:
    """The contiguous rows ``rank`` handles when ``n`` rows are split over ``world_size`` ranks.

    Rows are grouped into blocks of ``align`` (the batch size) and the blocks are dealt out in
    order, the first ``blocks % world_size`` ranks taking one block more, so the ranges of ranks
    ``0 .. world_size - 1`` concatenate to ``range(n)`` and only the last non-empty one can end
    with a short block. Ranks beyond the number of blocks get an empty range.

    Parameters
    ----------
    n
        Number of rows.
    world_size
        Number of ranks.
    rank
        This rank, ``0 <= rank < world_size``.
    align
        Block size: every range but the last non-empty one is a multiple of it.

    Returns
    -------
    range
        ``range(start, stop)`` with step 1.

    Examples
    --------
    >>> [list(shard_range(10, 3, r)) for r in range(3)]
    [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    >>> [shard_range(10, 3, r, align=4) for r in range(3)]
    [range(0, 4), range(4, 8), range(8, 10)]
    """
    if n < 0 or world_size < 1 or not 0 <= rank < world_size or align < 1:
        raise DissectError(
            f"bad sharding: n={n}, world_size={world_size}, rank={rank}, align={align}"
        )
    blocks = -(-n // align)
    base, extra = divmod(blocks, world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return range(min(n, first * align), min(n, last * align))


def shard_dir(path: str | Path) -> Path:
    """The folder holding the shards of the store published at ``path``."""
    path = Path(path)
    return path.with_name(path.name + SHARD_SUFFIX)


def shard_path(path: str | Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its shard of the store at ``path``."""
    return shard_dir(path) / f"rank{rank:05d}-of-{world_size:05d}.h5"


def shard_attr(rank: int, world_size: int, rows: range) -> str:
    """The ``shard`` root attribute of a shard file (JSON: rank, world size, dataset rows)."""
    return json.dumps({"rank": rank, "world_size": world_size, "rows": [rows.start, rows.stop]})


@dataclass
class DistContext:
    """This process's place in a multi-process run, and the collectives the analyses use.

    Make one with :func:`setup` (or :func:`session`) and pass it as ``distributed=`` to
    :func:`~dissect.hooks.capture` and :func:`~dissect.netdissect.dissect`; they make their
    own when given ``None``.

    Attributes
    ----------
    rank, world_size, local_rank
        This process's global rank, the number of processes, its rank on this machine.
    backend
        The process group's backend (``"nccl"``, ``"gloo"``, ...).
    timeout
        How long any rank waits for the others at a synchronization point.
    owns_group
        Whether :func:`setup` initialized the process group (then :meth:`close` destroys it).
    timings
        Seconds spent in collectives and in publishing, by phase (see :meth:`phase`).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    timeout: datetime.timedelta = DEFAULT_TIMEOUT
    owns_group: bool = False
    control: Any = field(default=None, repr=False)  # gloo group for barriers; None: default
    timings: dict[str, float] = field(default_factory=dict, repr=False)
    _phase: str = field(default="other", repr=False)

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that publishes stores and writes result files."""
        return self.rank == 0

    def shard(self, n: int, align: int = 1) -> range:
        """This rank's rows of ``n`` (see :func:`shard_range`)."""
        return shard_range(n, self.world_size, self.rank, align)

    def device(self, device: str | torch.device | None = None) -> torch.device:
        """Resolve a ``device=`` argument for this rank.

        ``None`` or a bare ``"cuda"`` means ``cuda:LOCAL_RANK`` (modulo the visible GPUs) when
        CUDA is available; an explicit ``"cuda:3"`` or ``"cpu"`` is kept.
        """
        if device is None and not torch.cuda.is_available():
            return torch.device("cpu")
        dev = resolve_device("cuda" if device is None else device)
        if dev.type == "cuda":
            if dev.index is None:
                dev = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(dev)
        return dev

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for the data collectives (the GPU with NCCL, else CPU)."""
        if "nccl" in self.backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Book the time of the collectives inside the block under ``timings[name]``."""
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = previous

    def _book(self, start: float) -> None:
        self.timings[self._phase] = self.timings.get(self._phase, 0.0) + time.perf_counter() - start

    def _fail(self, step: str, exc: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: {step}: another rank died, failed or did not "
            f"arrive within the timeout ({self.timeout}); see the other ranks' logs. ({exc})"
        )

    def barrier(self, step: str) -> None:
        """Wait for every rank; raise :class:`DistributedError` naming the late ranks."""
        start = time.perf_counter()
        try:
            dist.monitored_barrier(group=self.control, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as exc:
            raise self._fail(step, exc) from exc
        finally:
            self._book(start)

    def agree(self, step: str, error: BaseException | None = None) -> None:
        """Every rank reports how ``step`` went; if any rank failed, every rank raises.

        Parameters
        ----------
        step
            What was done (for messages).
        error
            This rank's exception, or ``None``. It is re-raised here after the others learned
            of it; the other ranks raise :class:`DistributedError` naming this rank.
        """
        mine = None if error is None else f"{type(error).__name__}: {error}"
        outcomes = self.gather(step, mine)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
        if failed:
            rank, message = failed[0]
            others = f" (and ranks {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
            raise DistributedError(f"{step} failed on rank {rank}{others}: {message}")

    def gather(self, step: str, obj: Any) -> list[Any]:
        """Every rank's (small, picklable) ``obj``, in rank order, on every rank."""
        self.barrier(step)
        out: list[Any] = [None] * self.world_size
        start = time.perf_counter()
        try:
            dist.all_gather_object(out, obj, group=self.control)
        except RuntimeError as exc:
            raise self._fail(step, exc) from exc
        finally:
            self._book(start)
        return out

    def on_main(self, step: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give its (small, picklable) result to every rank.

        An exception on rank 0 is raised there and as :class:`DistributedError` elsewhere.
        """
        result: Any = None
        error: Exception | None = None
        if self.is_main:
            start = time.perf_counter()
            try:
                result = fn()
            except Exception as exc:  # told to the other ranks, then re-raised
                error = exc
            finally:
                self._book(start)
        self.barrier(step)
        payload = [result, None if error is None else f"{type(error).__name__}: {error}"]
        start = time.perf_counter()
        try:
            dist.broadcast_object_list(payload, src=0, group=self.control)
        except RuntimeError as exc:
            raise self._fail(step, exc) from exc
        finally:
            self._book(start)
        if error is not None:
            raise error
        if payload[1] is not None:
            raise DistributedError(f"{step} failed on rank 0: {payload[1]}")
        return payload[0]

    def _data_collective(self, step: str, fn: Callable[[], None]) -> None:
        if "nccl" in self.backend:
            # an NCCL collective with a dead peer hangs until its watchdog kills the process:
            # make sure every rank is alive first, so failures get a readable error
            self.barrier(step)
        start = time.perf_counter()
        try:
            fn()
        except RuntimeError as exc:
            raise self._fail(step, exc) from exc
        finally:
            self._book(start)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all ranks (same dtype, same device).

        Integer tensors sum exactly (int64 counts stay int64 on gloo and NCCL).
        """
        buf = tensor.detach().to(self.comm_device, copy=True).contiguous()
        self._data_collective("all-reduce", lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
        return buf.to(tensor.device)

    def close(self) -> None:
        """Destroy the process group if :func:`setup` created it (idempotent)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def env_ranks() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or ``None`` (one process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2 or "RANK" not in os.environ:
            return None
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise DistributedError(f"bad torchrun variables RANK/WORLD_SIZE/LOCAL_RANK: {exc}") from exc
    return rank, world, local


def _wrap(timeout: datetime.timedelta, owns: bool) -> DistContext:
    backend = str(dist.get_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    if "LOCAL_RANK" in os.environ:
        local = int(os.environ["LOCAL_RANK"])
    else:
        local = rank % max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 0
    control = None
    if backend != "gloo":  # barriers with timeouts and object exchange need gloo
        try:
            control = dist.new_group(backend="gloo", timeout=timeout)
        except RuntimeError as exc:
            raise DistributedError(f"rank {rank}: creating a gloo group failed: {exc}") from exc
    return DistContext(rank, world, local, backend, timeout, owns, control)


def setup(
    timeout: datetime.timedelta | float | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
) -> DistContext | None:
    """Join (or adopt) the process group of a multi-process run; ``None`` in a single process.

    An initialized process group of two or more ranks is adopted as is. Otherwise, when
    ``torchrun``'s ``RANK`` and ``WORLD_SIZE`` (> 1) are set, the group is initialized from
    them (``MASTER_ADDR``/``MASTER_PORT``): NCCL when CUDA is available and ``device`` is not
    the CPU, gloo otherwise.

    Parameters
    ----------
    timeout
        How long a rank waits for the others (``timedelta`` or seconds; default 30 minutes):
        at start-up, at each synchronization point and in each collective.
    device
        The ``device=`` the run will use (chooses the backend).
    backend
        Force a backend (``"gloo"``, ``"nccl"``).

    Returns
    -------
    DistContext or None

    Raises
    ------
    DistributedError
        If the process group cannot be joined (a rank missing at start-up, bad variables).
    """
    timeout = _timedelta(timeout)
    if dist.is_available() and dist.is_initialized():
        return _wrap(timeout, owns=False) if dist.get_world_size() > 1 else None
    ranks = env_ranks()
    if ranks is None:
        return None
    rank, world, local = ranks
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        wants_cuda = torch.cuda.is_available() and (
            device is None or torch.device(device).type == "cuda"
        )
        backend = "nccl" if wants_cuda and dist.is_nccl_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(local % torch.cuda.device_count())
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    log.info("rank %d of %d joining the %s process group at %s", rank, world, backend, where)
    try:
        dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {rank} of {world} could not join the {backend} process group at {where} "
            f"within {timeout}: {exc}. Launch every rank with torchrun (or set MASTER_ADDR, "
            "MASTER_PORT, RANK and WORLD_SIZE consistently)"
        ) from exc
    return _wrap(timeout, owns=True)


def resolve(
    distributed: DistContext | bool | None, device: str | torch.device | None = None
) -> DistContext | None:
    """Turn a ``distributed=`` argument into a context (``None``: a single-process run).

    ``None`` detects a process group or torchrun's variables (:func:`setup`), ``False`` forces a
    single-process run, ``True`` requires a multi-process run, a :class:`DistContext` is used.
    """
    if isinstance(distributed, DistContext):
        return distributed if distributed.world_size > 1 else None
    if distributed is False:
        return None
    if distributed is None or distributed is True:
        ctx = setup(device=device)
        if ctx is None and distributed is True:
            raise DistributedError(
                "distributed=True but there is no process group and no torchrun variables: "
                "launch with torchrun --nproc_per_node=N"
            )
        return ctx
    raise DissectError(f"distributed must be None, a bool or a DistContext, got {distributed!r}")


@contextmanager
def session(
    timeout: datetime.timedelta | float | None = None,
    device: str | torch.device | None = None,
) -> Iterator[DistContext | None]:
    """:func:`setup` as a ``with`` block: the group it created is destroyed at the end.

    Yields ``None`` in a single process, so ``with session() as ctx:`` works everywhere.
    """
    ctx = setup(timeout, device)
    try:
        yield ctx
    finally:
        if ctx is not None:
            ctx.close()


# --------------------------------------------------------------------------- shard stores


def _open_shard(path: Path, expected: str) -> h5py.File:
    if not path.is_file():
        raise StoreError(
            f"shard {path} is missing on rank 0: every rank must write to one filesystem "
            "(a shared NFS/Lustre folder across nodes)"
        )
    f = ActivationStore._open(path)
    if not bool(f.attrs["complete"]) or f.attrs.get("shard") != expected:
        got = f.attrs.get("shard")
        f.close()
        raise StoreError(f"shard {path} is unfinished or of another layout ({got}, not {expected})")
    return f


def publish_shards(path: str | Path, world_size: int, n: int, align: int = 1) -> Path:
    """Publish the shards of ``world_size`` ranks as one virtual store at ``path`` (atomically).

    Every dataset (activations, gradients, maxima, index) of the published file is an HDF5
    virtual dataset whose rows ``shard_range(n, world_size, r, align)`` map shard ``r``'s
    rows, named relative to ``path``'s folder. Root attributes are the shards' (fingerprint,
    model, settings) with ``n_samples = n``, ``complete = True`` and ``shards`` (the JSON list
    of relative shard paths). Shard files of another world size in the shard folder (leftovers
    of an earlier run) are removed.

    Parameters
    ----------
    path
        Where to publish.
    world_size, n, align
        The layout the shards were written with.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    StoreError
        If a shard is missing, unfinished, or disagrees with the others in shape or dtype.
    """
    path = Path(path)
    ranges = [shard_range(n, world_size, r, align) for r in range(world_size)]
    shards = [(shard_path(path, r, world_size), rows) for r, rows in enumerate(ranges) if rows]
    files = []
    try:
        for r, (p, rows) in enumerate(shards):
            files.append(_open_shard(p, shard_attr(r, world_size, rows)))
        first = files[0]
        layers = json.loads(first.attrs["layers"])
        groups = ["activations", "maxima"] + (["gradients"] if "gradients" in first else [])
        names = [f"{g}/{layer}" for g in groups for layer in layers] + ["index"]
        for (p, _), f in zip(shards, files, strict=True):
            for name in names:
                a, b = first[name], f[name] if name in f else None
                if b is None or a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                    got = "missing" if b is None else f"{b.shape[1:]} {b.dtype}"
                    raise StoreError(
                        f"{p}: {name} is {got} but {shards[0][0].name} has "
                        f"{a.shape[1:]} {a.dtype}: inputs must have one size on every rank"
                    )
        rel = [f"{shard_dir(path).name}/{p.name}" for p, _ in shards]
        tmp = path.with_name(path.name + ".creating")
        with h5py.File(tmp, "w") as out:
            attrs = {k: v for k, v in first.attrs.items() if k not in _PER_SHARD_ATTRS}
            out.attrs.update(attrs)
            out.attrs.update({"n_samples": n, "complete": True, "shards": json.dumps(rel)})
            for name in names:
                src = first[name]
                layout = h5py.VirtualLayout(shape=(n, *src.shape[1:]), dtype=src.dtype)
                for (_, rows), relpath in zip(shards, rel, strict=True):
                    shape = (len(rows), *src.shape[1:])
                    layout[rows.start : rows.stop] = h5py.VirtualSource(
                        relpath, name, shape=shape, dtype=src.dtype
                    )
                group, _, leaf = name.rpartition("/")
                parent = out.require_group(group) if group else out
                ds = parent.create_virtual_dataset(leaf, layout)
                ds.attrs.update(dict(src.attrs))
            out.create_dataset("progress", data=np.int64(n))
        os.replace(tmp, path)
    finally:
        for f in files:
            f.close()
    keep = {p.name for p, _ in shards}
    for stale in shard_dir(path).iterdir():
        if _SHARD_NAME.fullmatch(stale.name) and stale.name not in keep:
            log.info("removing %s (a shard of an earlier run with another layout)", stale)
            stale.unlink(missing_ok=True)
    log.info("published %s: %d rows from %d shards", path, n, len(shards))
    return path


def consolidate(
    src: str | Path, dest: str | Path, *, batch_rows: int = 1024, overwrite: bool = False
) -> ActivationStore:
    """Copy a store (for instance a published virtual store) into one standalone HDF5 file.

    Parameters
    ----------
    src
        A complete store.
    dest
        The new file (written atomically: under a temporary name until complete).
    batch_rows
        Rows copied at a time (memory is bounded by them).
    overwrite
        Replace an existing ``dest``.

    Returns
    -------
    ActivationStore
        The copy, open for reading; it reads exactly like ``src``.
    """
    src, dest = Path(src), Path(dest)
    if dest.exists() and not overwrite:
        raise StoreError(f"{dest} exists; pass overwrite=True to replace it")
    if dest.resolve() == src.resolve():
        raise StoreError("consolidate needs a destination other than the source")
    with ActivationStore(src) as store:
        if not store.complete:
            raise StoreError(f"{src} is unfinished: finish the capture before consolidating")
        meta = store.meta
        reserved = {"format", "version", "n_samples", "complete", "layers", "dtype", "pool",
                    "gradients", "shards"}
        grads = bool(meta.get("gradients"))
        n = store.n_samples
        index = store.index
        tmp = dest.with_name(dest.name + ".copying")
        create_store(
            tmp,
            n=n,
            layers={name: tuple(store[name].shape[1:]) for name in store.layers},
            dtype=meta["dtype"],
            pool=meta["pool"],
            attrs={k: v for k, v in meta.items() if k not in reserved},
            gradients=grads,
        )
        with StoreWriter(tmp) as writer:
            for start in range(0, n, batch_rows):
                stop = min(n, start + batch_rows)
                acts = {name: store[name][start:stop] for name in store.layers}
                maxima = {name: store._layer("maxima", name)[start:stop] for name in store.layers}
                gradients = (
                    {name: store.gradients(name)[start:stop] for name in store.layers}
                    if grads else None
                )
                writer.write(start, index[start:stop], acts, maxima, gradients)
            writer.finish()
    os.replace(tmp, dest)
    return ActivationStore(dest)
