"""The result of :func:`~dissect.deconvnet.top_patches`: each unit's top patches and projections."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._plumbing.arrays import decode_array, encode_array
from .._plumbing.paths import safe_name
from .._plumbing.result_files import read_json, result_path, write_json
from ..errors import DissectError
from .receptive import ReceptiveField

FORMAT = "torch-dissect-top-patches"
VERSION = 1


@dataclass(frozen=True)
class Patch:
    """One of a unit's top images.

    Attributes
    ----------
    unit, rank
        The unit and the image's rank among its top images (0: the strongest).
    row
        Position of the image in the dataset (``dataset[row]``).
    index
        The item's own ``"index"`` (its dataset index; ``row`` when items have none).
    value
        The unit's maximal activation on the image (the top signal's value).
    position
        ``(i, j)`` of that maximum in the layer's maps (``()`` for a layer without maps).
    box
        The position's receptive field clipped to the image, ``(y0, y1, x0, x1)``.
    window
        The input box shown as the patch: the layer's fixed patch shape, holding ``box``.
    """

    unit: int
    rank: int
    row: int
    index: int
    value: float
    position: tuple[int, ...]
    box: tuple[int, int, int, int]
    window: tuple[int, int, int, int]


class TopPatches:
    """Top-k images of some units of one layer, with projections (:func:`top_patches`).

    Attributes
    ----------
    layer, method, k
        What was computed (``k`` may be smaller than asked when the dataset is small).
    units
        The units, in the order of the first axis of the arrays.
    field
        The layer's :class:`ReceptiveField` for the dataset's input size.
    patches
        ``patches[n]`` lists unit ``units[n]``'s :class:`Patch` es, strongest first.
    images
        ``(U, k, C, h, w)`` the patches of the model inputs (normalized, as the model sees
        them; ``transform.denormalize`` turns them back into pictures).
    projections
        ``(U, k, C, h, w)`` the projections on the same windows (zero outside the field).
    """

    def __init__(self, layer: str, method: str, units: list[int], field: ReceptiveField,
                 patches: list[list[Patch]], images: torch.Tensor,
                 projections: torch.Tensor) -> None:
        self.layer, self.method, self.units, self.field = layer, method, units, field
        self.patches, self.images, self.projections = patches, images, projections
        self.k = images.shape[1]

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, unit: int) -> list[Patch]:
        """The patches of ``unit`` (a unit index of the layer, not a position)."""
        try:
            return self.patches[self.units.index(unit)]
        except ValueError:
            raise DissectError(f"unit {unit} was not computed; units: {self.units}") from None

    def rows(self) -> list[Patch]:
        """Every patch, unit by unit, strongest first."""
        return [p for unit_patches in self.patches for p in unit_patches]

    def summary(self) -> str:
        """A few lines: the layer, its receptive field and each unit's top values."""
        lines = [f"top-{self.k} {self.method} patches of {len(self.units)} units of "
                 f"{self.layer}; receptive field {self.field}"]
        for unit, unit_patches in zip(self.units, self.patches, strict=True):
            values = ", ".join(f"{p.value:.3g}" for p in unit_patches[:5])
            more = ", ..." if len(unit_patches) > 5 else ""
            rows = ", ".join(str(p.row) for p in unit_patches[:5])
            lines.append(f"  unit {unit:4d}: max {values}{more} (images {rows}{more})")
        return "\n".join(lines)

    def to_csv(self, path: str | Path) -> Path:
        """Write one row per patch (unit, rank, row, index, value, position, box, window).

        ``path`` is the file, or an existing folder to write ``<layer>_patches.csv`` in.
        """
        path = result_path(path, f"{safe_name(self.layer)}_patches.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "unit", "rank", "row", "index", "value", "i", "j",
                             "box_y0", "box_y1", "box_x0", "box_x1",
                             "window_y0", "window_y1", "window_x0", "window_x1"])
            for p in self.rows():
                pos = list(p.position) + [""] * (2 - len(p.position))
                writer.writerow([self.layer, p.unit, p.rank, p.row, p.index, repr(p.value),
                                 *pos[:2], *p.box, *p.window])
        return path

    def to_json(self, path: str | Path) -> Path:
        """Everything as one JSON file: the patches' metadata and, exactly, both arrays.

        ``images`` and ``projections`` are stored as base64 of their float32 bytes
        (:mod:`dissect._plumbing.arrays`); :meth:`from_json` gives back equal tensors.
        ``path`` is the file, or an existing folder to write ``<layer>_patches.json`` in.
        """
        doc = {
            "format": FORMAT, "version": VERSION,
            "layer": self.layer, "method": self.method, "k": self.k, "units": self.units,
            "receptive_field": asdict(self.field),
            "patches": [asdict(p) for p in self.rows()],
            "images": encode_array(self.images.float()),
            "projections": encode_array(self.projections.float()),
        }
        return write_json(result_path(path, f"{safe_name(self.layer)}_patches.json"), doc,
                          allow_nan=True)

    @classmethod
    def from_json(cls, path: str | Path) -> TopPatches:
        """Load a result written by :meth:`to_json` (arrays included)."""
        data = read_json(path, FORMAT, VERSION, "top-patches result")
        try:
            f = data["receptive_field"]
            field = ReceptiveField(f["layer"], *(tuple(f[k]) for k in (
                "input_size", "map_size", "size", "stride", "offset")), bool(f["is_global"]))
            units = [int(u) for u in data["units"]]
            by_unit: dict[int, list[Patch]] = {u: [] for u in units}
            for p in data["patches"]:
                patch = Patch(int(p["unit"]), int(p["rank"]), int(p["row"]), int(p["index"]),
                              float(p["value"]), tuple(p["position"]), tuple(p["box"]),
                              tuple(p["window"]))
                by_unit[patch.unit].append(patch)
            images = torch.from_numpy(decode_array(data["images"], "images"))
            projections = torch.from_numpy(decode_array(data["projections"], "projections"))
            return cls(data["layer"], data["method"], units, field,
                       [by_unit[u] for u in units], images, projections)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DissectError(f"{path} is a damaged top-patches result: {exc!r}") from exc

    def __repr__(self) -> str:
        return (f"TopPatches(layer={self.layer!r}, method={self.method!r}, "
                f"units={len(self.units)}, k={self.k}, patch={tuple(self.images.shape[-2:])})")
