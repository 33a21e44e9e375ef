"""File names made from layer names: one sanitization, unique for every name.

Layer names are free text (``"features.13"``, ``"encoder.layers.0"``, but also ``"c 1"`` or
``"a/b"`` in hand-made models). :func:`safe_name` keeps a name that is already safe as it is,
and gives every other name its own file name: the unsafe characters become ``_`` and a short
hash of the original name is appended, so ``"c 1"`` and ``"c_1"`` never share a file.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_HASHED = re.compile(r".*-[0-9a-f]{8}")  # what safe_name makes of an unsafe name


def safe_name(name: str) -> str:
    """A file-name-safe, collision-free form of ``name``.

    Parameters
    ----------
    name
        A layer (or other) name.

    Returns
    -------
    str
        ``name`` itself when it holds only letters, digits, ``_``, ``.`` and ``-``, is not
        empty, does not start with ``.`` and does not end like a hashed name (``-`` and 8 hex
        digits); otherwise the sanitized name followed by ``-`` and 8 hex digits of the SHA-1
        of ``name``. Kept names never end like hashed ones, so two names share a file name
        only if their SHA-1 digests share 32 bits.
    """
    clean = _UNSAFE.sub("_", name)
    if clean == name and name and not name.startswith(".") and not _HASHED.fullmatch(name):
        return name
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean.lstrip('.') or '_'}-{digest}"


def unit_image_path(out_dir: str | Path, layer: str, unit: int) -> Path:
    """Where a unit's image of a layer lives: ``out_dir/<safe layer>/unit_<unit:04d>.png``.

    Every writer of per-unit images (Network Dissection's top images, activation maximization,
    deconvnet patches) and the report use this one function.
    """
    return Path(out_dir) / safe_name(layer) / f"unit_{int(unit):04d}.png"
