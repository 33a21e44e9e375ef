"""The files of result objects: one JSON document each, written atomically, read with checks.

Every result object (``DissectionResult``, ``ProbeResult``, ``TopPatches``, ``ActmaxResult``)
has ``to_json(path)`` / ``from_json(path)`` on top of these, so they all name, write and
refuse files the same way: ``path`` is the file, or an existing folder that receives the
result's default file name; the JSON names its ``format`` and ``version``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import DissectError


def result_path(path: str | Path, default_name: str) -> Path:
    """``path`` itself, or ``path / default_name`` when ``path`` is an existing folder."""
    path = Path(path)
    return path / default_name if path.is_dir() else path


def write_json(path: str | Path, doc: dict[str, Any], *, indent: int | None = None,
               allow_nan: bool = False) -> Path:
    """Write ``doc`` as JSON atomically (a temporary file renamed into place).

    Non-finite floats are refused unless ``allow_nan`` (then written as Python's ``json``
    does, ``NaN`` / ``Infinity``, which it reads back).

    Parent folders are created. An interrupted write leaves the previous file (or none),
    never half a document.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(doc, indent=indent, allow_nan=allow_nan)
    except (TypeError, ValueError) as exc:  # NaN or infinity refused, or not JSON at all
        raise DissectError(f"cannot write {path}: {exc}") from exc
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DissectError(f"could not write {path}: {exc}") from exc
    return path


def read_json(path: str | Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """Read a result document, checking its ``format`` and ``version``.

    Parameters
    ----------
    path
        The file.
    fmt, version
        What the document must say it is.
    what
        The result's name for messages (``"dissection result"``).

    Returns
    -------
    dict

    Raises
    ------
    DissectError
        For an unreadable file, invalid JSON, another format or another version.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DissectError(f"cannot read a {what} from {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise DissectError(f"{path} is not a torch-dissect {what}")
    if data.get("version") != version:
        raise DissectError(f"{path} is a {what} of version {data.get('version')!r}; this "
                           f"release reads version {version}")
    return data
