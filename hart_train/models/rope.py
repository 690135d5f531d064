"""HART's rotary position embeddings: 1D for the text prefix, a non-standard 2D for image tokens.

Shape legend: B batch, L tokens, H heads, d head dim, S scales; a schedule's grids are (h, w), its last (H, W).

This reproduces the released code's naive RoPE path exactly (the fused kernels there are unused and have
no backward), because the released weights were trained with it:

- Text tokens: the HF Llama 1D RoPE, ``inv_freq = theta^(-arange(0, d, 2) / d)``, ``emb = cat(f, f)``, at
  positions ``cumsum(mask) - 1`` (so right padding repeats the last valid position).
- Image tokens: the scale with side ``pn`` sits on ``coords = meshgrid(arange(pn), arange(pn), 'ij') / pn *
  pn_max`` (normalised to the largest grid, fractional when pn does not divide pn_max) plus the last
  context position on both axes. With ``inv_freq = theta^(-arange(0, d, 4) / d)`` (d/4 frequencies) the
  cos/sin vector is ``[row*f, row*f, col*f, col*f]``. It is applied with HF ``rotate_half``, which pairs
  dim k with dim k + d/2, so a dim carrying a row angle is rotated against a dim carrying a column angle.
  It is not a textbook 2D RoPE, but it is what the weights expect.
- Aspect-ratio buckets (buckets.py): each axis is normalised to its own extent. The scale with grid
  h x w of a schedule ending in H x W puts token (i, j) (raster order) at (i / h * H, j / w * W) plus
  the same offset, so the last scale sits on the integer H x W grid and every scale spans the same box,
  exactly as the square rule does with H = W = pn_max (the same operations: the square case is bit-
  identical). This is Infinity's per-axis "normalized by hw" 2D RoPE (`rope2d_normalized_by_hw == 2`
  in FoundationVision/Infinity `infinity/models/basic.py`, which rounds to integer indices; HART keeps
  the fractional coordinates, and so do we). A transposed bucket gets transposed positions.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .buckets import as_schedule

ROPE_THETA = 10000.0


def inv_freq_1d(head_dim: int, theta: float = ROPE_THETA, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


def inv_freq_2d(head_dim: int, theta: float = ROPE_THETA, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.int64, device=device).float() / head_dim))


def context_position_ids(context_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) int64 positions ``cumsum(mask) - 1`` as HART's text pipeline builds them."""
    return context_mask.long().cumsum(dim=1) - 1


def scale_coords(schedule: Sequence, scale_indices: Sequence[int], device=None) -> torch.Tensor:
    """(L, 2) float32 (row, col) coordinates of the listed scales, concatenated in raster order, each axis
    on the last scale's extent. `schedule`: square sides (patch_nums) or (h, w) grids."""
    grids = as_schedule(schedule)
    H, W = grids[-1]
    out = []
    for si in scale_indices:
        h, w = grids[si]
        # the order of operations (divide, then multiply) matches the released code bit for bit
        rows = torch.arange(h, device=device) / h * H
        cols = torch.arange(w, device=device) / w * W
        out.append(torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2))
    return torch.cat(out, dim=0)


def rope_1d(position_ids_BL: torch.Tensor, head_dim: int, theta: float = ROPE_THETA):
    """cos, sin of shape (B, L, d), fp32, for integer positions (B, L)."""
    freqs = position_ids_BL.float()[..., None] * inv_freq_1d(head_dim, theta, position_ids_BL.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_2d(pos_BL2: torch.Tensor, head_dim: int, theta: float = ROPE_THETA):
    """cos, sin of shape (B, L, d), fp32, for (row, col) positions (B, L, 2); layout [row, row, col, col]."""
    freqs = pos_BL2.float()[..., None] * inv_freq_2d(head_dim, theta, pos_BL2.device)  # B, L, 2, d/4
    emb = torch.cat((freqs, freqs), dim=-1)  # B, L, 2, d/2
    emb = emb.reshape(*emb.shape[:-2], head_dim)
    return emb.cos(), emb.sin()


def image_positions(
    schedule: Sequence,
    scale_indices: Sequence[int],
    last_context_pos_B: torch.Tensor,
    kept_last_idx_Bk: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L, 2) positions of the listed image scales of `schedule` (square sides or (h, w) grids), offset
    by the last context position of each sample.

    ``kept_last_idx_Bk`` (sorted per row) keeps only those tokens of the last listed scale, as the
    training forward does when it drops last-scale tokens.
    """
    B = last_context_pos_B.shape[0]
    coords = scale_coords(schedule, scale_indices, last_context_pos_B.device).unsqueeze(0).expand(B, -1, -1)
    if kept_last_idx_Bk is not None:
        h, w = as_schedule(schedule)[scale_indices[-1]]
        n_last = h * w
        head, last = coords[:, :-n_last], coords[:, -n_last:]
        last = torch.gather(last, 1, kept_last_idx_Bk[..., None].expand(-1, -1, 2))
        coords = torch.cat((head, last), dim=1)
    return coords + last_context_pos_B[:, None, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q_BHLd: torch.Tensor, k_BHLd: torch.Tensor, cos_BLd: torch.Tensor, sin_BLd: torch.Tensor):
    """HF-style application; cos/sin are cast to q's dtype first as the released code does."""
    cos = cos_BLd.to(q_BHLd.dtype).unsqueeze(1)
    sin = sin_BLd.to(q_BHLd.dtype).unsqueeze(1)
    return q_BHLd * cos + rotate_half(q_BHLd) * sin, k_BHLd * cos + rotate_half(k_BHLd) * sin
