"""Random image transforms applied before every forward pass ("transformation robustness").

Pure torch (no kornia). Each :class:`Transform` draws its random value once per optimization
step from a ``torch.Generator`` (:meth:`Transform.sample`) and applies it to a whole batch
(:meth:`Transform.apply`), so every image of a batch sees the same draw and an image is the same
whether it is optimized alone or with others. Plain callables ``images -> images`` may be mixed
in; they are called as they are.

:func:`standard_transforms` gives Lucid's defaults (Olah et al. 2017): pad 12 px with grey,
jitter 8 px, scale by one of 0.90, 0.92, ..., 1.10, rotate by -10...10 degrees (0 six times as
likely), jitter 4 px; ``standard_transforms(size=S)`` then resizes to ``S x S`` (:class:`Resize`)
for models that take one input size only (Vision Transformers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DissectError

TransformLike = Callable[[torch.Tensor], torch.Tensor]

STANDARD_SCALES = tuple(1 + (i - 5) / 50.0 for i in range(11))
STANDARD_ANGLES = tuple(float(a) for a in [*range(-10, 11), *[0] * 5])


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` images by ``factor`` (bilinear; the output size is rounded).

    Parameters
    ----------
    x
        Images.
    factor
        Scale factor; 1 returns ``x`` itself.

    Returns
    -------
    torch.Tensor
        ``(N, C, round(factor * H), round(factor * W))``.
    """
    if factor <= 0:
        raise DissectError(f"scale factor must be positive, got {factor}")
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    size = (max(1, round(factor * h)), max(1, round(factor * w)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def rotate(x: torch.Tensor, degrees: float, fill: float = 0.0) -> torch.Tensor:
    """Rotate ``(N, C, H, W)`` images counter-clockwise about their centre (bilinear).

    Counter-clockwise as displayed (row 0 at the top), like ``torchvision``'s ``rotate``
    and kornia's; corners that come from outside the image are ``fill``.

    Parameters
    ----------
    x
        Images.
    degrees
        Angle; 0 returns ``x`` itself.
    fill
        Value of pixels rotated in from outside.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.
    """
    if degrees == 0:
        return x
    n, _, h, w = x.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # output -> input sampling map in normalized coordinates, corrected for the aspect ratio
    theta = torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]],
                         dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    if fill == 0:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + fill


class Transform:
    """A random transform: :meth:`sample` a value, then :meth:`apply` it to a batch."""

    def sample(self, generator: torch.Generator | None = None) -> Any:
        """Draw this step's random value (``None`` for a deterministic transform)."""
        return None

    def apply(self, x: torch.Tensor, value: Any) -> torch.Tensor:  # pragma: no cover
        """Apply the transform with a drawn value to ``(N, C, H, W)`` images."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(x, self.sample(generator))


def _choice(n: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(n, (1,), generator=generator))


@dataclass(frozen=True)
class Pad(Transform):
    """Pad every side by ``width`` pixels (``mode``: constant, reflect or replicate)."""

    width: int
    mode: str = "constant"
    value: float = 0.5

    def __post_init__(self) -> None:
        if self.width < 0:
            raise DissectError(f"pad width must be >= 0, got {self.width}")
        if self.mode not in ("constant", "reflect", "replicate"):
            raise DissectError(f"pad mode must be constant, reflect or replicate: {self.mode!r}")

    def apply(self, x: torch.Tensor, value: Any = None) -> torch.Tensor:
        if self.width == 0:
            return x
        if self.mode == "constant":
            return F.pad(x, [self.width] * 4, mode="constant", value=self.value)
        return F.pad(x, [self.width] * 4, mode=self.mode)


@dataclass(frozen=True)
class Jitter(Transform):
    """Crop ``d`` pixels off each dimension at a random offset ``0..d`` (Lucid's jitter)."""

    d: int

    def __post_init__(self) -> None:
        if self.d < 0:
            raise DissectError(f"jitter must be >= 0 pixels, got {self.d}")

    def sample(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        return _choice(self.d + 1, generator), _choice(self.d + 1, generator)

    def apply(self, x: torch.Tensor, value: tuple[int, int]) -> torch.Tensor:
        dy, dx = value
        h, w = x.shape[-2:]
        if h <= self.d or w <= self.d:
            raise DissectError(f"cannot jitter {self.d} px on a {h}x{w} image: use larger images")
        return x[..., dy:dy + h - self.d, dx:dx + w - self.d]


@dataclass(frozen=True)
class RandomScale(Transform):
    """Resize by a factor drawn uniformly from ``scales`` (see :func:`scale`)."""

    scales: Sequence[float] = STANDARD_SCALES

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise DissectError(f"scales must be positive numbers, got {self.scales!r}")

    def sample(self, generator: torch.Generator | None = None) -> float:
        return float(self.scales[_choice(len(self.scales), generator)])

    def apply(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return scale(x, value)


@dataclass(frozen=True)
class RandomRotate(Transform):
    """Rotate by an angle in degrees drawn uniformly from ``angles`` (see :func:`rotate`)."""

    angles: Sequence[float] = STANDARD_ANGLES
    fill: float = 0.0

    def __post_init__(self) -> None:
        if not self.angles:
            raise DissectError("angles must not be empty")

    def sample(self, generator: torch.Generator | None = None) -> float:
        return float(self.angles[_choice(len(self.angles), generator)])

    def apply(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return rotate(x, value, self.fill)


@dataclass(frozen=True)
class Resize(Transform):
    """Resize to ``size`` (bilinear): a model that takes one input size gets it after the
    size-changing transforms (a Vision Transformer's position embeddings fix its grid)."""

    size: int | tuple[int, int]

    def __post_init__(self) -> None:
        dims = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        if len(dims) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                                     for d in dims):
            raise DissectError(f"Resize size must be a positive int or (H, W), got {self.size!r}")
        object.__setattr__(self, "size", (int(dims[0]), int(dims[1])))

    def apply(self, x: torch.Tensor, value: Any = None) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def pad(width: int, mode: str = "constant", value: float = 0.5) -> Pad:
    """Lucid's name for :class:`Pad`."""
    return Pad(width, mode, value)


def jitter(d: int) -> Jitter:
    """Lucid's name for :class:`Jitter`."""
    return Jitter(d)


def random_scale(scales: Sequence[float]) -> RandomScale:
    """Lucid's name for :class:`RandomScale`."""
    return RandomScale(tuple(scales))


def random_rotate(angles: Sequence[float], fill: float = 0.0) -> RandomRotate:
    """Lucid's name for :class:`RandomRotate` (angles in degrees)."""
    return RandomRotate(tuple(angles), fill)


def standard_transforms(size: int | tuple[int, int] | None = None) -> list[Transform]:
    """Lucid's default transforms: pad 12 (grey), jitter 8, scale 0.9-1.1, rotate +-10, jitter 4.

    Parameters
    ----------
    size
        ``None``: as Lucid (the images' size changes from step to step). ``S`` or ``(H, W)``:
        then :class:`Resize` to it, for models that take one input size (Vision
        Transformers).

    Returns
    -------
    list of Transform
    """
    tfs: list[Transform] = [Pad(12, "constant", 0.5), Jitter(8), RandomScale(STANDARD_SCALES),
                            RandomRotate(STANDARD_ANGLES), Jitter(4)]
    return tfs if size is None else [*tfs, Resize(size)]


def resolve_transforms(spec: str | Sequence[TransformLike] | None) -> list[TransformLike]:
    """``"standard"``, ``None`` (no transforms) or a list of transforms / callables."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec == "standard":
            return standard_transforms()
        if spec == "none":
            return []
        raise DissectError(f"unknown transforms {spec!r}: use 'standard', None or a list")
    if callable(spec):
        return [spec]
    items = list(spec)
    for t in items:
        if not callable(t):
            raise DissectError(
                f"transforms must be callables on (N, 3, H, W) images, got {type(t).__name__}"
            )
    return items


def draw(transforms: Sequence[TransformLike], generator: torch.Generator | None) -> list[Any]:
    """One step's random values, one per transform (``None`` for plain callables)."""
    return [t.sample(generator) if isinstance(t, Transform) else None for t in transforms]


def apply_all(transforms: Sequence[TransformLike], values: Sequence[Any],
              x: torch.Tensor) -> torch.Tensor:
    """Apply ``transforms`` with the drawn ``values`` (see :func:`draw`) in order."""
    for t, v in zip(transforms, values, strict=True):
        x = t.apply(x, v) if isinstance(t, Transform) else t(x)
    return x
