"""Image parametrizations: the optimized tensor and how it becomes an RGB image in [0, 1].

``"pixel"``
    One free value per pixel and colour channel.
``"fft"``
    The image's 2-D Fourier spectrum (real and imaginary parts), scaled by ``1 / f`` so that
    every frequency band starts with equal energy in the image, as natural images have: the
    gradient no longer favours high-frequency noise (Olah et al., *Feature Visualization*,
    Distill 2017; Lucid's ``fft_image``).

Either way the three channels can be *decorrelated*: the free values live in a colour basis
whose axes are uncorrelated for ImageNet photographs, mapped to RGB by the square root of the
ImageNet colour correlation matrix (Lucid's ``color_correlation_svd_sqrt``), then a sigmoid
maps the result to [0, 1].
"""

from __future__ import annotations

import torch

from ..errors import DissectError

PARAMS = ("fft", "pixel")

COLOR_CORRELATION_SVD_SQRT = (
    (0.26, 0.09, 0.02),
    (0.27, 0.00, -0.05),
    (0.27, -0.09, 0.03),
)
"""Square root of ImageNet's RGB colour correlation (its SVD), as in Lucid."""

FFT_MAGIC = 4.0
"""Lucid's divisor of the inverse FFT (keeps the initial image away from saturation)."""


def color_matrix(device: torch.device | None = None) -> torch.Tensor:
    """The decorrelated-to-RGB colour matrix, scaled so its largest column norm is 1."""
    m = torch.tensor(COLOR_CORRELATION_SVD_SQRT, dtype=torch.float32, device=device)
    return m / m.norm(dim=0).max()


def fft_scale(height: int, width: int, decay_power: float = 1.0,
              device: torch.device | None = None) -> torch.Tensor:
    """``1 / max(f, 1 / max(h, w)) ** decay_power`` for each rFFT bin, shape ``(h, w // 2 + 1)``."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    freqs = (fx * fx + fy * fy).sqrt()
    scale = 1.0 / freqs.clamp_min(1.0 / max(height, width)) ** decay_power
    return scale.to(device=device, dtype=torch.float32)


class ImageParam:
    """A batch of ``n`` images as one leaf tensor to optimize.

    Every image starts from the same noise (drawn from ``generator``), so an image never
    depends on which other images share its batch.

    Parameters
    ----------
    n
        Number of images.
    size
        ``(height, width)`` of each image.
    param
        ``"fft"`` or ``"pixel"`` (see the module docstring).
    decorrelate
        Use the decorrelated colour basis.
    generator
        CPU ``torch.Generator`` for the initial noise (its state advances).
    device
        Where the leaf tensor lives.
    sd
        Standard deviation of the initial noise (Lucid: 0.01).
    """

    def __init__(self, n: int, size: tuple[int, int], *, param: str = "fft",
                 decorrelate: bool = True, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", sd: float = 0.01) -> None:
        if param not in PARAMS:
            raise DissectError(f"unknown parametrization {param!r}: use one of {PARAMS}")
        h, w = size
        if h < 1 or w < 1:
            raise DissectError(f"image size must be positive, got {size}")
        self.param, self.size, self.decorrelate = param, (h, w), decorrelate
        device = torch.device(device)
        shape = (1, 3, h, w // 2 + 1, 2) if param == "fft" else (1, 3, h, w)
        noise = torch.randn(shape, generator=generator) * sd
        self.leaf = noise.expand(n, *shape[1:]).to(device).clone().requires_grad_(True)
        self._scale = fft_scale(h, w, device=device)[None, None] if param == "fft" else None
        self._color = color_matrix(device) if decorrelate else None

    def __call__(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Images ``start:stop`` as an ``(n, 3, h, w)`` tensor in [0, 1] (differentiable)."""
        t = self.leaf[start:stop]
        if self._scale is not None:
            spectrum = torch.view_as_complex(t.contiguous()) * self._scale
            t = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / FFT_MAGIC
        if self._color is not None:
            t = torch.einsum("ij,bjhw->bihw", self._color, t)
        return torch.sigmoid(t)
