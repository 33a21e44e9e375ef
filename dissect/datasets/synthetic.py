"""Synthetic concept images whose answers are known: colors, shapes, parts, textures, scenes.

Every image is drawn at segmentation resolution (half the image size, as in Broden) and enlarged
2x by pixel repetition, so each segmentation pixel ``(y, x)`` covers exactly the image block
``[2y:2y+2, 2x:2x+2]``, which has one color of :data:`PALETTE`: the color masks are exact, and a
unit that computes "redness" per pixel can be labelled red with IoU 1.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .concepts import Concept, rgb_to_tensor

#: The named colors (RGB). Shapes use :data:`SHAPE_COLORS`, backgrounds :data:`BACKGROUND_COLORS`.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "orange": (255, 128, 0),
    "purple": (128, 0, 128),
    "pink": (255, 128, 192),
    "brown": (128, 64, 0),
    "gray": (128, 128, 128),
}
SHAPE_COLORS = ("red", "green", "blue", "yellow", "orange", "purple")
WARM_COLORS = ("red", "yellow", "orange")
BACKGROUND_COLORS = ("black", "white", "gray", "brown", "pink")
OBJECTS = ("circle", "square", "triangle", "star", "hexagon", "diamond")
PARTS = ("interior", "border", "corner")
SCENES = ("single-warm", "single-cool", "pair-warm", "pair-cool", "group-warm", "group-cool")
TEXTURES = ("striped", "dotted", "checkered", "zigzagged", "grid")
CATEGORIES = ("color", "object", "part", "scene", "texture")
# the annotation cache's key holds it: bump it whenever a change of the drawing code changes
# any item's labels, so caches made by older code are not read
DRAWING_VERSION = 1

_COLOR_NAMES = tuple(PALETTE)
_RGB = np.array([PALETTE[c] for c in _COLOR_NAMES], dtype=np.uint8)
_COLOR_INDEX = {c: k for k, c in enumerate(_COLOR_NAMES)}
_N_UNIFORMS = 10 + 6 * 4


def _concept_table() -> list[Concept]:
    names = {"color": _COLOR_NAMES, "object": OBJECTS, "part": PARTS, "scene": SCENES,
             "texture": TEXTURES}
    table: list[Concept] = []
    for cat in CATEGORIES:
        for name in names[cat]:
            table.append(Concept(len(table) + 1, name, cat))
    return table


CONCEPTS = _concept_table()
_NUMBER = {(c.category, c.name): c.number for c in CONCEPTS}
_COLOR_NUMBERS = np.array([_NUMBER["color", c] for c in _COLOR_NAMES], dtype=np.int64)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray | None:
    """Vertices of a shape (``None`` for the circle) as an ``(K, 2)`` float array of (x, y)."""
    if kind == "square":
        a = 0.8 * r
        pts = [(-a, -a), (a, -a), (a, a), (-a, a)]
    elif kind == "diamond":
        pts = [(0, -r), (r, 0), (0, r), (-r, 0)]
    elif kind in ("triangle", "hexagon"):
        k, rr = (3, 1.15 * r) if kind == "triangle" else (6, r)
        t = angle + 2 * math.pi * np.arange(k) / k
        pts = list(zip(rr * np.sin(t), -rr * np.cos(t), strict=True))
    elif kind == "star":
        t = angle + math.pi * np.arange(10) / 5
        rr = np.where(np.arange(10) % 2 == 0, 1.15 * r, 0.5 * r)
        pts = list(zip(rr * np.sin(t), -rr * np.cos(t), strict=True))
    else:
        return None
    return np.asarray(pts, dtype=np.float64) + (cx, cy)


class SyntheticConcepts(Dataset):
    """Procedural concept images with pixel-exact answers (a :class:`ConceptDataset`).

    Each image has a two-color textured background and one to four solid-color shapes; the last
    shape drawn (on top of the others) is the main shape, at about twice the others' size.
    Item ``i`` depends only on ``(seed, i)`` (its own ``numpy`` generator), never on the order
    of access; nothing is stored on disk.

    Concepts (31, numbered 1..31 in this order):

    - ``color`` (pixel): black, white, red, green, blue, yellow, orange, purple, pink, brown,
      gray. Every pixel has one. Shapes are red, green, blue, yellow, orange or purple; the
      background uses two of black, white, gray, brown and pink, so shape and background colors
      never mix. RGB values in :data:`PALETTE` (red is (255, 0, 0), green (0, 255, 0), ...).
    - ``object`` (pixel): circle, square, triangle, star, hexagon, diamond, on each visible
      shape pixel (0 on the background).
    - ``part`` (pixel, two planes): plane 1 splits every shape pixel into ``border`` (within
      ``b = max(1, sh // 28)`` segmentation pixels, Chebyshev distance, of any pixel not of the
      same shape, including an occluding shape) and ``interior`` (the rest); plane 2 marks
      ``corner`` on the shape's pixels within ``0.35 r`` of a convex vertex (square, diamond,
      triangle, hexagon, the star's tips; circles have none).
    - ``scene`` (image-level): ``single``/``pair``/``group`` (1, 2, 3-4 shapes) and
      ``warm``/``cool`` (the main shape's color is red, yellow or orange / the others), e.g.
      ``"pair-warm"``.
    - ``texture`` (image-level, the background): ``striped`` (horizontal stripes),
      ``dotted``, ``checkered``, ``zigzagged`` (diagonal zigzag bands), ``grid``.

    Color and object are annotated on every image; part, scene and texture are left unannotated
    (no planes or labels, ``annotated`` False, though still drawn) on a random share
    ``unannotated`` of the images, independently.

    Exactness rule: the picture is drawn at segmentation resolution ``size // 2`` and enlarged 2x
    by repeating pixels, so segmentation pixel ``(y, x)`` is the 2x2 image block
    ``[2y:2y+2, 2x:2x+2]``, of exactly the color its color label names.

    Parameters
    ----------
    n
        Number of images.
    size
        Image side in pixels (even, >= 16); segmentations are ``size // 2``.
    seed
        Seed (a non-negative int); item ``i`` is drawn from ``numpy.random.default_rng([seed,
        i])``.
    unannotated
        Probability that each of part, scene and texture is left unannotated on an image.
    transform
        Applied to each ``(3, size, size)`` float RGB image in [0, 1]; settable later.

    Attributes
    ----------
    categories : list of str
        ``["color", "object", "part", "scene", "texture"]``.
    concepts : list of Concept
        The 31 concepts above.
    targets : torch.Tensor
        int64 ``(n,)``: the main shape's kind, an index into ``target_names`` (a per-image
        class label, e.g. for linear probes).
    target_names : list of str
        The object names.
    """

    def __init__(
        self,
        n: int,
        size: int = 112,
        seed: int = 0,
        unannotated: float = 0.2,
        transform: Callable | None = None,
    ) -> None:
        if not isinstance(n, int | np.integer) or n < 0:
            raise DataError(f"n must be a non-negative int, got {n!r}")
        if not isinstance(size, int | np.integer) or size < 16 or size % 2:
            raise DataError(f"size must be an even int >= 16, got {size!r}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise DataError(f"seed must be a non-negative int, got {seed!r}")
        if not 0.0 <= unannotated < 1.0:
            raise DataError(f"unannotated must be in [0, 1), got {unannotated!r}")
        self.n, self.size, self.seed = int(n), int(size), int(seed)
        self.unannotated = float(unannotated)
        self.transform = transform
        self.categories: list[str] = list(CATEGORIES)
        self.concepts: list[Concept] = list(CONCEPTS)
        self.target_names: list[str] = list(OBJECTS)
        self.palette = dict(PALETTE)
        h = self.size // 2
        self.segmentation_size = (h, h)
        self._border = max(1, h // 28)
        self._yy, self._xx = np.mgrid[0:h, 0:h].astype(np.int32)
        self._targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.n

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i])

    @property
    def targets(self) -> torch.Tensor:
        """int64 ``(n,)``: index into ``target_names`` of each image's main shape."""
        if self._targets is None:
            n_obj = len(OBJECTS)
            self._targets = torch.tensor(
                [int(self._rng(i).integers(n_obj)) for i in range(self.n)], dtype=torch.int64
            )
        return self._targets

    # ------------------------------------------------------------------ composition

    def describe(self, i: int) -> dict[str, Any]:
        """The composition of image ``i``, without drawing it.

        Returns
        -------
        dict
            ``"shapes"``: list of dicts (``kind``, ``color``, ``center`` (x, y) and ``radius``
            in segmentation pixels, ``angle``), the main shape last; ``"texture"``,
            ``"texture_params"`` (pattern period and phases), ``"background"`` (pattern color,
            ground color), ``"scene"``, ``"target"`` (index of the main kind) and
            ``"annotated"`` (dict category -> bool).
        """
        i = self._check_index(i)
        rng = self._rng(i)
        h = self.size // 2
        main_kind = int(rng.integers(len(OBJECTS)))  # first draw: ``targets`` reads only this
        u = rng.random(_N_UNIFORMS)  # everything else, in one call (fast)
        flags = u[0:3] >= self.unannotated  # part, scene, texture
        n_extra = int(u[3] * 4)
        texture = int(u[4] * len(TEXTURES))
        fg = int(u[5] * len(BACKGROUND_COLORS))
        bg = (fg + 1 + int(u[6] * (len(BACKGROUND_COLORS) - 1))) % len(BACKGROUND_COLORS)
        params = tuple(int(v * 65536) for v in u[7:10])
        shapes = []
        for k in range(n_extra + 1):
            main = k == n_extra
            kind, color, size, x, y, angle = u[10 + 6 * k : 16 + 6 * k]
            lo, hi = (0.22, 0.30) if main else (0.08, 0.13)
            radius = max(2.0, h * (lo + (hi - lo) * float(size)))
            margin = 1.2 * radius + 1
            span = h - 1 - 2 * margin
            shapes.append({
                "kind": OBJECTS[main_kind if main else int(kind * len(OBJECTS))],
                "color": SHAPE_COLORS[int(color * len(SHAPE_COLORS))],
                "center": (margin + span * float(x), margin + span * float(y)),
                "radius": radius,
                "angle": 2 * math.pi * float(angle),
            })
        count = ("single", "pair", "group", "group")[n_extra]
        warmth = "warm" if shapes[-1]["color"] in WARM_COLORS else "cool"
        return {
            "shapes": shapes,
            "texture": TEXTURES[texture],
            "texture_params": params,
            "background": (BACKGROUND_COLORS[fg], BACKGROUND_COLORS[bg]),
            "scene": f"{count}-{warmth}",
            "target": main_kind,
            "annotated": {"color": True, "object": True, "part": bool(flags[0]),
                          "scene": bool(flags[1]), "texture": bool(flags[2])},
        }

    def _texture(self, kind: str, params: tuple[int, ...]) -> np.ndarray:
        """Boolean pattern map (True: pattern color) at segmentation resolution."""
        yy, xx = self._yy, self._xx
        scale = self.size / 112
        a, b, c = params

        def pick(options: tuple[int, ...], value: int) -> int:
            return max(2, round(options[value % len(options)] * scale))

        if kind == "striped":
            p = pick((4, 5, 6), a)
            return (yy + b % p) % p < (p + 1) // 2
        if kind == "checkered":
            s = pick((3, 4, 5), a)
            return ((yy + b % s) // s + (xx + c % s) // s) % 2 == 0
        if kind == "dotted":
            s = max(5, pick((6, 7, 8), a))
            dy = (yy + b % s) % s - s // 2
            dx = (xx + c % s) % s - s // 2
            return dy * dy + dx * dx <= 4
        if kind == "zigzagged":
            p = pick((5, 6, 7), a)
            tri = np.abs((xx + c % (2 * p)) % (2 * p) - p)
            return (yy + tri + b % p) % p < (p + 1) // 2
        if kind == "grid":
            s = max(3, pick((5, 6, 7), a))
            return ((yy + b % s) % s == 0) | ((xx + c % s) % s == 0)
        raise AssertionError(kind)

    def _render(self, comp: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draw a composition: color-index map, shape-slot map, part planes (2, h, h)."""
        h = self.size // 2
        fg, bg = (_COLOR_INDEX[c] for c in comp["background"])
        pattern = self._texture(comp["texture"], comp["texture_params"])
        color = np.where(pattern, np.uint8(fg), np.uint8(bg))
        slots = np.zeros((h, h), dtype=np.uint8)
        vertices = []
        for k, shape in enumerate(comp["shapes"], start=1):
            cx, cy = shape["center"]
            pts = _polygon(shape["kind"], cx, cy, shape["radius"], shape["angle"])
            if pts is None:
                cv2.circle(slots, (round(cx), round(cy)), round(shape["radius"]), k, -1,
                           cv2.LINE_8)
            else:
                cv2.fillPoly(slots, [np.round(pts).astype(np.int32)], k, cv2.LINE_8)
                tips = pts[::2] if shape["kind"] == "star" else pts
                vertices.append((k, np.round(tips).astype(int), shape["radius"]))
        slot_color = np.zeros(len(comp["shapes"]) + 1, dtype=np.uint8)
        for k, shape in enumerate(comp["shapes"], start=1):
            slot_color[k] = _COLOR_INDEX[shape["color"]]
        inside = slots > 0
        color = np.where(inside, slot_color[slots], color)
        kernel = np.ones((2 * self._border + 1,) * 2, dtype=np.uint8)
        interior = (cv2.erode(slots, kernel) == cv2.dilate(slots, kernel)) & inside
        parts = np.zeros((2, h, h), dtype=np.int64)
        parts[0] = np.where(interior, _NUMBER["part", "interior"], 0)
        parts[0] += np.where(inside & ~interior, _NUMBER["part", "border"], 0)
        mark = np.zeros((h, h), dtype=np.uint8)
        for k, tips, radius in vertices:
            mark.fill(0)
            rc = max(1, round(0.35 * radius))
            for x, y in tips:
                cv2.circle(mark, (int(x), int(y)), rc, 1, -1, cv2.LINE_8)
            parts[1][(mark > 0) & (slots == k)] = _NUMBER["part", "corner"]
        return color, slots, parts

    def _check_index(self, i: int) -> int:
        i = operator.index(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"item {i} out of range for {self.n} items")
        return i % self.n

    def cache_identity(self) -> dict[str, Any]:
        """What identifies this dataset's annotations for the annotation cache
        (:mod:`dissect.datasets.annotation_cache`): its parameters and
        :data:`DRAWING_VERSION`."""
        return {"dataset": "SyntheticConcepts", "n": self.n, "size": self.size,
                "seed": self.seed, "unannotated": self.unannotated,
                "drawing": DRAWING_VERSION}

    def item_categories(self, i: int) -> tuple[list[str], list[str]]:
        """The category of each pixel-label plane and each image-level label of item ``i``."""
        ann = self.describe(i)["annotated"]
        planes = ["color", "object"] + (["part", "part"] if ann["part"] else [])
        labels = [c for c in ("scene", "texture") if ann[c]]
        return planes, labels

    def _item(self, i: int, image: bool) -> dict[str, Any]:
        i = self._check_index(i)
        comp = self.describe(i)
        color, slots, parts = self._render(comp)
        out: dict[str, Any] = {}
        if image:
            rgb = cv2.resize(_RGB[color], (self.size, self.size),
                             interpolation=cv2.INTER_NEAREST)
            out["image"] = rgb_to_tensor(rgb)
            if self.transform is not None:
                out["image"] = self.transform(out["image"])
        slot_object = np.zeros(len(comp["shapes"]) + 1, dtype=np.int64)
        for k, shape in enumerate(comp["shapes"], start=1):
            slot_object[k] = _NUMBER["object", shape["kind"]]
        ann = comp["annotated"]
        planes = [_COLOR_NUMBERS[color], slot_object[slots]]
        if ann["part"]:
            planes.extend(parts)
        labels = []
        if ann["scene"]:
            labels.append(_NUMBER["scene", comp["scene"]])
        if ann["texture"]:
            labels.append(_NUMBER["texture", comp["texture"]])
        return {
            **out,
            "pixel_labels": torch.from_numpy(np.stack(planes)),
            "image_labels": torch.from_numpy(np.array(labels, dtype=np.int64)),
            "annotated": torch.from_numpy(np.array([ann[c] for c in self.categories])),
            "index": i,
        }

    def annotations(self, i: int) -> dict[str, Any]:
        """Item ``i`` without its image: ``pixel_labels``, ``image_labels``, ``annotated``,
        ``index`` (what scoring needs; skips making the image)."""
        return self._item(i, image=False)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._item(i, image=True)

    def __repr__(self) -> str:
        return f"SyntheticConcepts(n={self.n}, size={self.size}, seed={self.seed})"
