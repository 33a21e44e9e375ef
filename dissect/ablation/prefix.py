"""Run only the part of a network after a layer, for any model: cached prefix outputs.

A model's ``forward`` is arbitrary Python, so in general its graph cannot be cut at a layer.
What is exact for any model that computes the same thing for the same input:

1. **Plan** (:func:`plan_prefix`, once): a forward pass with hooks on every module records
   which module calls ran and how they nest, up to the end of the layer's (first) call. The
   calls that *finished* by then and whose caller was still running (the maximal finished
   calls; the layer's own call is the last of them) are the prefix. A
   :class:`~torch.overrides.TorchFunctionMode` records which tensors the code that still runs
   reads: the code of the layer's ancestors, and everything after the layer. A prefix output
   that it never reads (a ``conv1`` output read only by ``bn1``, which is itself in the
   prefix) need not be reproduced, only its shape.
2. **Prefix pass** (:func:`run_prefix`, once per batch): the forward runs up to the end of
   the layer's call, keeping the outputs of the prefix calls that are read.
3. **Stubbed passes** (:func:`stubbed`, once per chunk of ``k`` copies of the batch): the
   prefix modules' ``forward`` is replaced, for the duration of a ``with`` block (an instance
   attribute, always removed on exit), by a function returning the kept output repeated ``k``
   times (rows ``i * B : (i + 1) * B`` are copy ``i``), or, for an output nothing reads, a
   placeholder of the right shape that costs no memory (a NaN broadcast). Only the ancestors'
   own code and what comes after the layer are computed; a hook at the layer edits copy ``i``.

The caller checks the plan on the first batch (the stubbed, unedited forward must reproduce
the model's output; :func:`~dissect.ablation.ablate` falls back to full forward passes with a
warning otherwise), and every later prefix pass checks that the same calls ran.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import DissectError
from ..hooks.trace import StopForward

__all__ = ["Plan", "plan_prefix", "run_prefix", "stubbed", "repeat_batch"]

log = logging.getLogger(__name__)

# reading these tells the shape, never the values: a placeholder answers them correctly
_META = frozenset({torch.Tensor.shape.__get__, torch.Tensor.ndim.__get__,
                   torch.Tensor.device.__get__, torch.Tensor.dtype.__get__, torch.Tensor.size,
                   torch.Tensor.dim, torch.Tensor.__len__})


def _is_meta(func: Any) -> bool:
    try:
        return func in _META
    except TypeError:  # an unhashable callable
        return False


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors inside ``obj`` (tuples, lists, dicts; a few levels deep)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 6 and isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item, depth + 1)
    elif depth < 6 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item, depth + 1)


def _map(obj: Any, fn: Any, depth: int = 0) -> Any:
    """``obj`` with ``fn`` applied to its tensors and :class:`_Shape` leaves (tuples, named
    tuples, lists and dicts rebuilt; anything else kept)."""
    if isinstance(obj, (torch.Tensor, _Shape)):
        return fn(obj)
    if depth >= 6:
        return obj
    if isinstance(obj, tuple):
        items = [_map(v, fn, depth + 1) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_map(v, fn, depth + 1) for v in obj]
    if isinstance(obj, dict):
        out = obj.copy()
        for key, value in obj.items():
            out[key] = _map(value, fn, depth + 1)
        return out
    return obj


@dataclass(frozen=True)
class _Shape:
    """What a placeholder must look like: an output nothing reads the values of."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _shape_of(t: torch.Tensor) -> _Shape:
    return _Shape(tuple(t.shape), t.dtype, t.device)


@dataclass(frozen=True)
class Plan:
    """The prefix of a forward pass (see the module docstring).

    Attributes
    ----------
    layer
        The layer whose call ends the prefix.
    order
        The module name of each prefix call, in call order; the layer's call is the last.
    read
        Whether the output of each prefix call is read by code that still runs.
    input_read
        Whether the model's input is read by code that still runs.
    """

    layer: str
    order: tuple[str, ...]
    read: tuple[bool, ...]
    input_read: bool


class _Recorder(TorchFunctionMode):
    """Module calls (start, end, nesting) and the tensors each torch operation reads."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer
        self.names: list[str] = []  # module name of each call, in start order
        self.parent: list[int] = []  # the call that made it (-1: none)
        self.ends: dict[int, int] = {}  # call -> the event count when it returned
        self.outputs: dict[int, set[int]] = {}  # call -> ids of its output tensors
        self.stack: list[int] = []
        self.events = 0
        self.reads: list[tuple[int, int, set[int]]] = []  # (event, innermost call, tensor ids)
        # the outputs of finished calls whose caller still runs, kept alive until the pass
        # ends so that no other tensor takes their ids: the prefix calls' among them
        self.held: dict[int, list[tuple[int, Any]]] = {}
        self.snapshot: list[tuple[int, Any]] = []  # the prefix outputs as the layer returned
        self.layer_call: int | None = None
        self.layer_end = 0
        self.ancestors: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_meta(func):
            ids = {id(t) for t in _tensors((args, kwargs))}
            if ids:
                self.events += 1
                self.reads.append((self.events, self.stack[-1] if self.stack else -1, ids))
        return func(*args, **kwargs)

    def pre(self, name: str, module: nn.Module, args: Any) -> None:
        self.names.append(name)
        self.parent.append(self.stack[-1] if self.stack else -1)
        self.stack.append(len(self.names) - 1)

    def post(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        call = self.stack.pop()
        self.events += 1
        self.ends[call] = self.events
        if self.layer_call is None:
            self.held.pop(call, None)  # its callees are not prefix calls: let them go
            if self.stack:
                self.held.setdefault(self.stack[-1], []).append((call, output))
            self.outputs[call] = {id(t) for t in _tensors(output)}
            if name == self.layer:
                self.layer_call, self.layer_end = call, self.events
                self.ancestors = set(self.stack)
                # copies: the code after the layer may change them in place (an in-place ReLU)
                with torch._C.DisableTorchFunction():
                    self.snapshot = sorted(
                        ((c, _map(out, lambda t: t.clone())) for c, out in
                         (item for a in self.stack for item in self.held.get(a, []))),
                        key=lambda item: item[0])


def plan_prefix(model: nn.Module, layer: str, x: torch.Tensor
                ) -> tuple[Plan | str, list[Any] | None, Any]:
    """Run ``model(x)`` once, recording the prefix of ``layer`` (module docstring, step 1).

    Parameters
    ----------
    model
        The model (in eval mode, under ``torch.inference_mode`` or ``no_grad``).
    layer
        A layer name of ``model``.
    x
        One batch of inputs.

    Returns
    -------
    (Plan or str, list or None, object)
        The plan, or why the forward cannot be cut at ``layer`` (a sentence); the batch's
        prefix as :func:`run_prefix` returns it (``None`` without a plan); the model's
        output.

    Raises
    ------
    DissectError
        When ``layer`` does not run in the forward pass.
    """
    rec = _Recorder(layer)
    handles = []
    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(partial(rec.pre, name)))
            handles.append(module.register_forward_hook(partial(rec.post, name)))
        with rec:
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    calls = rec.names.count(layer)
    if rec.layer_call is None:
        raise DissectError(f"layer {layer!r} did not run in the forward pass: choose a layer "
                           "the model's forward calls (see dissect.hooks.layer_names)")
    if calls > 1:
        return f"layer {layer!r} runs {calls} times in one forward pass", None, out
    prefix = [c for c in sorted(rec.ends) if rec.ends[c] <= rec.layer_end
              and rec.parent[c] in rec.ancestors]
    order = tuple(rec.names[c] for c in prefix)
    both = set(order) & {rec.names[a] for a in rec.ancestors}
    if both:
        return (f"module {sorted(both)[0]!r} runs both around and before layer {layer!r}",
                None, out)
    # what the code that still runs reads: the ancestors' own code, and all after the layer
    last_read: dict[int, int] = {}  # tensor id -> the last event that read it
    for event, inner, ids in rec.reads:
        if event > rec.layer_end or inner in rec.ancestors or inner == -1:
            for i in ids:
                last_read[i] = event
    returned = {id(t) for t in _tensors(out)}

    def is_read(call: int) -> bool:
        # a read before the call returned was of another tensor that had the same id (the
        # prefix outputs are held until the pass ends, so later reads are theirs)
        ids = rec.outputs.get(call, set())
        return bool(ids & returned) or any(last_read.get(i, 0) > rec.ends[call] for i in ids)

    flags = tuple(c == rec.layer_call or is_read(c) for c in prefix)
    input_ids = {id(t) for t in _tensors(x)}
    plan = Plan(layer, order, flags, bool(input_ids & (set(last_read) | returned)))
    log.debug("prefix of %r: %d calls, %d read: %s", layer, len(order), sum(flags),
              [n for n, f in zip(order, flags, strict=True) if f])
    snapshot = dict(rec.snapshot)
    kept = [snapshot[c] if read else _map(snapshot[c], _shape_of)
            for c, read in zip(prefix, flags, strict=True)]
    return plan, kept, out


class _Mismatch(Exception):
    """The calls of a prefix pass differ from the plan's."""


def run_prefix(model: nn.Module, plan: Plan, x: torch.Tensor) -> list[Any] | None:
    """One prefix pass (module docstring, step 2): per prefix call, its output when it is read,
    else its shape; ``None`` when the calls differ from the plan's (a data-dependent forward).
    """
    modules = dict(model.named_modules())
    kept: list[Any] = []
    depth = 0

    def pre(name: str, module: nn.Module, args: Any) -> None:
        nonlocal depth
        depth += 1

    def post(name: str, module: nn.Module, args: Any, output: Any) -> None:
        nonlocal depth
        depth -= 1
        if depth:
            return  # a call inside another prefix call
        i = len(kept)
        if i >= len(plan.order) or plan.order[i] != name:
            raise _Mismatch()
        kept.append(output if plan.read[i] else _map(output, _shape_of))
        if i == len(plan.order) - 1:
            raise StopForward()

    handles = []
    try:
        for name in dict.fromkeys(plan.order):
            handles.append(modules[name].register_forward_pre_hook(partial(pre, name)))
            handles.append(modules[name].register_forward_hook(partial(post, name)))
        model(x)
    except StopForward:
        return kept
    except _Mismatch:
        return None
    finally:
        for handle in handles:
            handle.remove()
    return None  # the layer did not run


def _batch_dim(shape: tuple[int, ...], batch: int) -> int | None:
    if len(shape) >= 1 and shape[0] == batch:
        return 0
    if len(shape) >= 2 and shape[1] == batch:
        return 1  # sequence-first
    return None


def repeat_batch(value: Any, k: int, batch: int) -> Any:
    """``value`` (an output kept by :func:`run_prefix`, or a tensor) for ``k`` copies of the
    batch: tensors repeated along their batch axis (copy ``i`` in rows ``i * batch :
    (i + 1) * batch``), shapes as placeholders; tensors without a batch axis copied."""

    def one(t: torch.Tensor | _Shape) -> torch.Tensor:
        dim = _batch_dim(tuple(t.shape), batch)
        if isinstance(t, _Shape):
            shape = list(t.shape)
            if dim is not None:
                shape[dim] *= k
            fill = float("nan") if t.dtype.is_floating_point or t.dtype.is_complex else 0
            return torch.full((), fill, dtype=t.dtype, device=t.device).expand(shape)
        if dim is None:
            return t.clone()
        reps = [1] * t.ndim
        reps[dim] = k
        return t.repeat(reps)

    return _map(value, one)


def _stub(queue: deque, original: Any, k: int, batch: int, *args: Any, **kwargs: Any) -> Any:
    if queue:
        return repeat_batch(queue.popleft(), k, batch)
    return original(*args, **kwargs)  # a call after the prefix: computed


@contextlib.contextmanager
def stubbed(model: nn.Module, plan: Plan, kept: list[Any], k: int, batch: int
            ) -> Iterator[None]:
    """Inside the block, the prefix calls of ``model`` return ``kept`` for ``k`` copies of the
    batch instead of computing (module docstring, step 3); every ``forward`` is restored on
    exit, also on errors."""
    modules = dict(model.named_modules())
    queues: dict[str, deque] = {}
    for name, value in zip(plan.order, kept, strict=True):
        queues.setdefault(name, deque()).append(value)
    missing = object()
    saved: dict[str, Any] = {}
    try:
        for name, queue in queues.items():
            module = modules[name]
            saved[name] = module.__dict__.get("forward", missing)
            try:
                module.forward = partial(_stub, queue, module.forward, k, batch)
            except (AttributeError, TypeError, RuntimeError) as exc:  # a scripted module
                raise DissectError(f"cannot stand in for module {name!r}: {exc}") from exc
        yield
    finally:
        for name, previous in saved.items():
            module = modules[name]
            if previous is missing:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
