"""Reconstruction metrics in torch: PSNR and SSIM on images in [0, 1] (map [-1, 1] pixels with (x + 1) / 2).

SSIM follows Wang et al. 2004 as in skimage/pytorch-msssim: an 11x11 gaussian window with sigma 1.5 applied per
channel without padding ("valid"), K1 = 0.01, K2 = 0.03, the SSIM map averaged over pixels and channels.
Both return one value per image, shape (B,); the caller averages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x_B3HW: torch.Tensor, y_B3HW: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """10 log10(range^2 / MSE) per image; +inf for identical images."""
    mse_B = (x_B3HW.double() - y_B3HW.double()).square().flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse_B)).to(x_B3HW.dtype)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    x_B3HW: torch.Tensor, y_B3HW: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Mean SSIM per image (B,). Images must be at least win_size pixels on each side."""
    if min(x_B3HW.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs images of at least {win_size}x{win_size}, got {tuple(x_B3HW.shape[-2:])}")
    C = x_B3HW.shape[1]
    x, y = x_B3HW.double(), y_B3HW.double()
    win = _gaussian_window(win_size, sigma, C, x.device, x.dtype)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).to(x_B3HW.dtype)
