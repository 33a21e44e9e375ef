"""Penalties on the optimized images: L1, L2, total variation, blur.

A regularizer maps images ``(N, 3, H, W)`` in [0, 1] to one **weighted** penalty per image
``(N,)``; the optimizer minimizes ``-objective + sum(penalties)``. Every penalty is a mean over
pixels, so a weight means the same at every image size. Any callable ``images -> (N,)`` works
as a regularizer too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DissectError

RegularizerLike = Callable[[torch.Tensor], torch.Tensor]


def _per_image(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(1)


@dataclass(frozen=True)
class L1:
    """``weight * mean |x - constant|`` (Lucid's ``L1``; pulls towards flat grey)."""

    weight: float = 1.0
    constant: float = 0.5

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.weight * _per_image((images - self.constant).abs())


@dataclass(frozen=True)
class L2:
    """``weight * mean (x - constant)^2``."""

    weight: float = 1.0
    constant: float = 0.5

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.weight * _per_image((images - self.constant) ** 2)


def total_variation(images: torch.Tensor, beta: float = 2.0, eps: float = 1e-8) -> torch.Tensor:
    """Mean over pixels of ``((x[i, j+1] - x[i, j])^2 + (x[i+1, j] - x[i, j])^2) ** (beta / 2)``.

    Mahendran & Vedaldi's ``TV^beta`` (CVPR 2015), per image; ``beta=2`` (their choice) is
    smooth, ``beta=1`` the classic isotropic total variation (``eps`` keeps it differentiable).

    Parameters
    ----------
    images
        ``(N, C, H, W)``.
    beta
        Exponent (> 0).
    eps
        Added inside the power when ``beta < 2``.

    Returns
    -------
    torch.Tensor
        ``(N,)``.
    """
    dx = images[..., :-1, 1:] - images[..., :-1, :-1]
    dy = images[..., 1:, :-1] - images[..., :-1, :-1]
    sq = dx * dx + dy * dy
    if beta == 2:
        return _per_image(sq)
    return _per_image((sq + eps) ** (beta / 2))


@dataclass(frozen=True)
class TotalVariation:
    """``weight * TV^beta`` (see :func:`total_variation`)."""

    weight: float = 1.0
    beta: float = 2.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise DissectError(f"TV beta must be positive, got {self.beta}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.weight * total_variation(images, self.beta)


@dataclass(frozen=True)
class Blur:
    """``weight * 0.5 * mean (x - blur(x))^2`` with the blurred image held fixed.

    Lucid's ``blur_input_each_step``: each step pulls the image towards its own 3x3 box blur,
    damping high-frequency patterns.
    """

    weight: float = 1.0
    kernel: int = 3

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise DissectError(f"blur kernel must be an odd positive size, got {self.kernel}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        k, c = self.kernel, images.shape[1]
        with torch.no_grad():
            box = torch.full((c, 1, k, k), 1.0 / (k * k), dtype=images.dtype,
                             device=images.device)
            blurred = F.conv2d(F.pad(images, [k // 2] * 4, mode="replicate"), box, groups=c)
        return self.weight * 0.5 * _per_image((images - blurred) ** 2)


def resolve_regularizers(spec: RegularizerLike | Sequence[RegularizerLike] | None
                         ) -> list[RegularizerLike]:
    """``None``, one regularizer or a list of them, checked to be callables."""
    if spec is None:
        return []
    items = [spec] if callable(spec) else list(spec)
    for r in items:
        if not callable(r):
            raise DissectError(
                f"regularizers must be callables images -> (N,) penalties (L1, L2, "
                f"TotalVariation, Blur), got {type(r).__name__}"
            )
    return items
