"""Image-difference figures for FP8 vs 16-bit: SSIM, PSNR and a difference heatmap."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _as_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """(1, C, H, W) float64 tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if array.max() > 1.0:
        array = array / 255.0
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = torch.mean((_as_tensor(a) - _as_tensor(b)) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window), averaged over channels; 1.0 means identical."""
    x, y = _as_tensor(a), _as_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {tuple(x.shape[2:])} vs {tuple(y.shape[2:])}")
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # the five local means in one pass
    channels = stacked.shape[1]
    rows = g.view(1, 1, window, 1).expand(channels, 1, window, 1).contiguous()
    columns = g.view(1, 1, 1, window).expand(channels, 1, 1, window).contiguous()
    # the 2-D Gaussian as two 1-D passes: the same values with 2 x 11 instead of 121 products a pixel
    blurred = F.conv2d(F.conv2d(stacked, rows, groups=channels), columns, groups=channels)
    mu_x, mu_y, xx, yy, xy = blurred.chunk(5, dim=1)

    c1, c2 = 0.01**2, 0.03**2
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def difference_heatmap(a: Image.Image, b: Image.Image) -> Image.Image:
    """Per-pixel absolute difference, amplified and coloured (black = identical, yellow = far apart)."""
    diff = (_as_tensor(a) - _as_tensor(b)).abs().mean(dim=1)[0].numpy()
    scaled = np.clip(diff * 4.0, 0.0, 1.0)
    rgb = np.stack([np.clip(scaled * 2, 0, 1), np.clip(scaled * 2 - 0.5, 0, 1), np.clip(scaled * 4 - 3, 0, 1)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖output − reference‖ / ‖reference‖, computed in float64."""
    reference = reference.double()
    return float((output.double() - reference).norm() / reference.norm().clamp(min=1e-30))
