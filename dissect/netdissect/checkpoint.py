"""Resumable counting: :func:`dissect`'s tallies saved every few batches, and what identifies
the run they belong to.

A checkpoint file (``torch.save`` of a dict) holds the run's identity (:func:`run_identity`),
the thresholds of every layer and their non-finite counts (so a resumed run skips the
threshold pass), every layer's :meth:`IoUTally.state_dict` and the number of store rows
counted. It is written to a temporary file next to the path, flushed to disk and moved onto
the path with ``os.replace``: a kill at any moment leaves the previous checkpoint or the new
one, never a mixture.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._plumbing.fingerprint import hash_tensor
from ..datasets.concepts import Concept
from ..errors import DissectError
from ..store import ActivationStore

FORMAT = "torch-dissect netdissect checkpoint"
VERSION = 1


def store_content(store: ActivationStore, names: list[str]) -> str:
    """A hash of what the counting depends on in ``store`` besides the activations: the
    captured model's fingerprint, the rows' dataset positions, and each layer's shape, dtype
    and per-row maxima (read in chunks). A recaptured store (other weights, other data,
    another dtype) hashes differently."""
    h = hashlib.sha256()
    h.update(str(store.meta.get("fingerprint")).encode())
    hash_tensor(h, "index", torch.from_numpy(store.index))
    n = len(store)
    for name in names:
        ds = store[name]
        h.update(f"{name}|{ds.shape}|{ds.dtype}".encode())
        step = max(1, (1 << 22) // max(1, ds.shape[1]))
        for start in range(0, n, step):
            hash_tensor(h, name, torch.from_numpy(store.maxima(name, start, start + step)))
    return h.hexdigest()


def run_identity(store: ActivationStore, dataset: Any, names: list[str], quantile: float,
                 concepts: list[Concept], categories: list[str], area: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the store (its path and
    :func:`store_content`), the dataset (its length, and its ``cache_identity()`` when it has
    one), the layers, the quantile, the scored concepts and categories, and the area rule."""
    identify = getattr(dataset, "cache_identity", None)
    data = json.dumps(identify(), sort_keys=True) if callable(identify) else None
    return {
        "store": str(Path(store.path).resolve()),
        "store content": store_content(store, names),
        "dataset items": len(dataset),
        "dataset": hashlib.sha256(data.encode()).hexdigest() if data else type(dataset).__name__,
        "layers": list(names),
        "quantile": float(quantile),
        "categories": list(categories),
        "concepts": hashlib.sha256(json.dumps([list(c) for c in concepts]).encode()).hexdigest(),
        "area": area,
    }


def load_checkpoint(path: Path, identity: dict[str, Any], overwrite: bool
                    ) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and matches ``identity``; ``None`` when there is
    none (or ``overwrite``).

    Raises
    ------
    DissectError
        If the file cannot be read as a checkpoint, or belongs to another run: the message
        lists every difference and how to start over.
    """
    if overwrite or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not a Network Dissection checkpoint")
        if state.get("version") != VERSION:
            raise ValueError(f"version {state.get('version')!r}; this release writes {VERSION}")
        saved = state["identity"]
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise DissectError(f"cannot resume from the checkpoint {path} ({type(exc).__name__}: "
                           f"{exc}): delete it, or pass overwrite=True, to start over") from None
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
             for key, value in identity.items() if saved.get(key) != value]
    if diffs:
        raise DissectError(f"the checkpoint {path} belongs to another run:\n  "
                           + "\n  ".join(diffs)
                           + "\ndelete it, or pass overwrite=True, to start over")
    return state


def save_checkpoint(path: Path, identity: dict[str, Any], position: int,
                    thresholds: dict[str, np.ndarray], nonfinite: dict[str, dict[str, Any]],
                    tallies: dict[str, dict[str, Any]]) -> None:
    """Write the checkpoint atomically (temporary file, fsync, ``os.replace``)."""
    state = {"format": FORMAT, "version": VERSION, "identity": identity,
             "position": int(position), "thresholds": thresholds, "nonfinite": nonfinite,
             "tallies": tallies}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
