"""Convolutional encoder and decoder of the HART / VAR tokenizer (the LDM vq-f16 layout).

Module and parameter names follow VAR's `models/basic_vae.py` (identical to HART's
`hart/modules/networks/basic_vae.py`) so that official weights load strictly:
`conv_in`, `down.{i}.block.{j}`, `down.{i}.attn.{j}`, `down.{i}.downsample.conv`, `mid.{block_1,attn_1,block_2}`,
`norm_out`, `conv_out` (decoder: `up.{i}.block.{j}`, `up.{i}.attn.{j}`, `up.{i}.upsample.conv`).

Design decisions:
- Level i has width `ch * ch_mult[i]`; the encoder has 2 res blocks per level, the decoder 3; self-attention
  only at the lowest resolution (one per res block) plus the mid attention. 2**(len(ch_mult)-1) down-sampling.
- GroupNorm uses 32 groups like the official code whenever the width is a multiple of 32 (always true for
  the official ch=160). For the tiny test widths the rule is `gcd(32, channels)` groups, so a width of 48
  gets 16 groups; the rule never changes the official config.
- Down-sampling pads right/bottom by one and uses a stride-2 3x3 conv with no padding; up-sampling is
  nearest x2 then a 3x3 conv. Both as in the official code, which fixes the numerics.

Shape legend: B batch, C channels, H/W image height/width, h/w latent height/width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_GROUPS = 32


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm(32, eps 1e-6) for official widths; gcd(32, C) groups for tiny widths (see module doc)."""
    return nn.GroupNorm(math.gcd(NUM_GROUPS, num_channels), num_channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        # asymmetric padding (right/bottom only), as LDM/VAR: keeps official weights' numerics
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # a 1x1 projection only where the width changes (key `nin_shortcut`, absent otherwise)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 qkv conv (key `qkv`, shape (3C, C, 1, 1))."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w).unbind(1)
        # (B, hw, C) x (B, C, hw): scores in fp of the input, softmax over keys, scale C**-0.5
        attn_BLL = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C**-0.5, dim=2)
        out_BCL = torch.bmm(v, attn_BLL.transpose(1, 2))
        return x_BChw + self.proj_out(out_BCL.reshape(B, C, h, w))


class _Level(nn.Module):
    """One resolution level; a plain container so the state-dict keys read `block.*`, `attn.*`, `downsample.*`."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BChw)))


class Encoder(nn.Module):
    NUM_RES_BLOCKS = 2

    def __init__(self, ch: int, ch_mult: tuple[int, ...], z_channels: int, dropout: float = 0.0, in_channels: int = 3):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        num_levels = len(ch_mult)
        self.down = nn.ModuleList()
        c_in = ch
        for i_level, mult in enumerate(ch_mult):
            c_out = ch * mult
            lowest = i_level == num_levels - 1
            blocks, attns = [], []
            for _ in range(self.NUM_RES_BLOCKS):
                blocks.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if lowest:
                    attns.append(AttnBlock(c_out))
            level = _Level(blocks, attns)
            if not lowest:
                level.downsample = Downsample2x(c_out)
            self.down.append(level)
        self.mid = _Mid(c_in, dropout)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img_B3HW)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    NUM_RES_BLOCKS = 3

    def __init__(self, ch: int, ch_mult: tuple[int, ...], z_channels: int, dropout: float = 0.0, out_channels: int = 3):
        super().__init__()
        num_levels = len(ch_mult)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(c_in, dropout)
        levels: list[_Level] = []
        # built from the lowest resolution up, stored in increasing-resolution order (`up.0` is full size)
        for i_level in reversed(range(num_levels)):
            c_out = ch * ch_mult[i_level]
            lowest = i_level == num_levels - 1
            blocks, attns = [], []
            for _ in range(self.NUM_RES_BLOCKS):
                blocks.append(ResnetBlock(c_in, c_out, dropout))
                c_in = c_out
                if lowest:
                    attns.append(AttnBlock(c_out))
            level = _Level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample2x(c_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
