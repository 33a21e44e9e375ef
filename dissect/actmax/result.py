"""The result of activation maximization or feature inversion: images and what they reached."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._plumbing.arrays import decode_array, encode_array
from .._plumbing.images import batch_uint8, write_png
from .._plumbing.paths import unit_image_path
from .._plumbing.result_files import read_json, result_path, write_json
from ..errors import DissectError
from .grid import save_grid

FORMAT = "torch-dissect-actmax"
VERSION = 1
KINDS = ("visualize", "invert")


class ActmaxResult:
    """Images optimized by :func:`~dissect.actmax.visualize` or :func:`~dissect.actmax.invert`.

    Made by ``visualize(..., return_result=True)`` (and ``invert``); the report reads it back
    with :meth:`from_json`.

    Attributes
    ----------
    kind
        ``"visualize"`` (activation maximization) or ``"invert"`` (feature inversion).
    images
        ``(N, 3, H, W)`` float32 images in [0, 1], on the CPU.
    objectives
        One description per image (the objective's name, or ``"invert <layer>"``).
    units
        Per image, ``(layer, unit)`` when its objective is one channel of one layer
        (:func:`~dissect.actmax.channel` or a ``("layer", unit)`` tuple), else ``None``.
    values
        ``(N,)`` float64: for ``"visualize"`` the objective each image reaches, evaluated
        once more without the random transforms; for ``"invert"`` the final representation
        distance (lower is better).
    settings
        The call's settings (size, steps, lr, param, seed, device, ...).
    """

    def __init__(self, kind: str, images: torch.Tensor, objectives: Sequence[str],
                 units: Sequence[tuple[str, int] | None], values: np.ndarray | Sequence[float],
                 settings: dict[str, Any] | None = None) -> None:
        if kind not in KINDS:
            raise DissectError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.images = images
        self.objectives = list(objectives)
        self.units = [None if u is None else (str(u[0]), int(u[1])) for u in units]
        self.values = np.asarray(values, dtype=np.float64)
        self.settings = dict(settings or {})
        n = len(images)
        if not (len(self.objectives) == len(self.units) == len(self.values) == n):
            raise DissectError(f"{n} images but {len(self.objectives)} objectives, "
                               f"{len(self.units)} units and {len(self.values)} values")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"ActmaxResult(kind={self.kind!r}, images={tuple(self.images.shape)}, "
                f"objectives={len(self.objectives)})")

    def value(self, layer: str, unit: int) -> float:
        """The value reached by the image of channel ``unit`` of ``layer``."""
        try:
            return float(self.values[self.units.index((layer, int(unit)))])
        except ValueError:
            raise DissectError(f"no image of {layer}:{unit} in this result") from None

    def summary(self) -> str:
        """A few lines: what was optimized and the values reached."""
        what = "objective" if self.kind == "visualize" else "representation distance"
        size = tuple(self.images.shape[-2:])
        lines = [f"{self.kind}: {len(self)} images of {size[0]}x{size[1]} px, "
                 f"{self.settings.get('steps', '?')} steps; {what} reached:"]
        shown = list(zip(self.objectives, self.values, strict=True))
        for name, v in shown[:20]:
            lines.append(f"  {name:<30} {v:.4g}")
        if len(shown) > 20:
            lines.append(f"  ... {len(shown) - 20} more (mean {self.values.mean():.4g})")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files

    def to_csv(self, path: str | Path) -> Path:
        """One row per image: ``index, objective, layer, unit, value``.

        ``path`` is the file, or an existing folder to write ``actmax.csv`` in.
        """
        path = result_path(path, "actmax.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "objective", "layer", "unit", "value"])
            for i, (name, u, v) in enumerate(zip(self.objectives, self.units, self.values,
                                                 strict=True)):
                layer, unit = u if u is not None else ("", "")
                w.writerow([i, name, layer, unit, repr(float(v))])
        return path

    def to_json(self, path: str | Path) -> Path:
        """Everything as one JSON file, the images exactly (base64 of their float32 bytes).

        ``path`` is the file, or an existing folder to write ``actmax.json`` in.
        """
        doc = {
            "format": FORMAT, "version": VERSION, "kind": self.kind,
            "objectives": self.objectives,
            "units": [None if u is None else list(u) for u in self.units],
            "values": [float(v) for v in self.values],
            "settings": self.settings,
            "images": encode_array(self.images.float()),
        }
        return write_json(result_path(path, "actmax.json"), doc, allow_nan=True)

    @classmethod
    def from_json(cls, path: str | Path) -> ActmaxResult:
        """Load a result written by :meth:`to_json`."""
        path = result_path(path, "actmax.json")
        data = read_json(path, FORMAT, VERSION, "activation-maximization result")
        try:
            images = torch.from_numpy(decode_array(data["images"], "images"))
            units = [None if u is None else (u[0], u[1]) for u in data["units"]]
            return cls(data["kind"], images, data["objectives"], units, data["values"],
                       data.get("settings", {}))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DissectError(f"{path} is a damaged activation-maximization result: "
                               f"{exc!r}") from exc

    def save_grid(self, path: str | Path, ncol: int = 8) -> Path:
        """All images as one PNG grid, captioned with their objectives."""
        return save_grid(self.images, path, ncol=ncol, labels=self.objectives)

    def save_unit_images(self, out_dir: str | Path) -> dict[tuple[str, int], Path]:
        """One PNG per single-channel image, ``out_dir/<layer>/unit_<k:04d>.png`` (the
        report's layout); images of other objectives are skipped.

        Returns
        -------
        dict
            ``{(layer, unit): path}``.
        """
        tiles = batch_uint8(self.images)
        return {u: write_png(unit_image_path(out_dir, u[0], u[1]), tile)
                for u, tile in zip(self.units, tiles, strict=True) if u is not None}
