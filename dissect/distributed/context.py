"""The process group of a multi-process run and its synchronization points.

:class:`DistContext` wraps it; :func:`setup` joins or adopts it.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .._plumbing.device import resolve_device
from ..errors import DissectError
from .shards import shard_range

log = logging.getLogger("dissect.distributed")

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)

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
            dist.destroy_process_group()  # every group, the cached gloo group too
            _CONTROL.clear()
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
    control = _control_group(timeout) if backend != "gloo" else None
    return DistContext(rank, world, local, backend, timeout, owns, control)


# The gloo group of the current default process group, made once per process. Process groups
# are process-wide by nature (torch.distributed keeps the default one globally); making a new
# gloo group at every call would open new connections each time.
_CONTROL: dict[str, Any] = {}


def _control_group(timeout: datetime.timedelta) -> Any:
    """The gloo group for barriers with timeouts and object exchange next to an NCCL default
    group: created on first use by every rank (``new_group`` is collective), then reused
    until the default group is destroyed and a new one initialized.

    Its collectives keep the timeout of the call that created it; barriers pass their own.
    """
    world = dist.group.WORLD
    if _CONTROL.get("world") is not world:
        rank = dist.get_rank()
        try:
            group = dist.new_group(backend="gloo", timeout=timeout)
        except RuntimeError as exc:
            raise DistributedError(f"rank {rank}: creating a gloo group failed: {exc}") from exc
        _CONTROL.update(world=world, group=group)
    return _CONTROL["group"]


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
