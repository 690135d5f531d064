"""HART's Llama-style AdaLN transformer pieces.

Shape legend: B batch, L tokens, C width, D condition width (= C), H heads, d head dim, V vocab.

Module and parameter names follow the released `basic_hart.py` so state dicts are interchangeable:
`attn.qkv_proj` (fused, no bias) + `attn.q_bias` / `attn.v_bias` + the `attn.zero_k_bias` buffer,
`attn.proj`, `ffn.{gate,up,down}_proj`, `ln_wo_grad`, `ada_lin.1`, `lvl_embed.mlp.{0,2}`.
Decisions recorded here:
- `ln_wo_grad` has a learnable weight despite its name: the released `LlamaRMSNormFused` ignores
  `elementwise_affine=False`. One norm module is used before both the attention and the FFN.
- The attention scale is 0.25/sqrt(d) without l2-norm (BH:954), 1 with l2-norm and a learned per-head
  multiplier `scale_mul_1H11`, as released.
- Drop path takes its per-sample keep mask from the caller, which draws it from the model's generator, so
  runs are reproducible and activation checkpointing recomputes the same mask.
- The AdaLN condition is pooled once per forward by the model (`context_pooling`), not in every block.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .rope import apply_rope


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, cast back, multiply by the weight (BH:460-475)."""

    def __init__(self, dim: int, eps: float = 1e-6, init_scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) * init_scale)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """Llama MLP `down(silu(gate(x)) * up(x))`, no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """Hidden width of the released llama MLP: 4096 for C=1536, ratio 4."""
    return int(dim * mlp_ratio * 2 / 3 + 255) // 256 * 256


def sinusoidal_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT sinusoid, `cat([cos, sin])`, fp32, (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) -> Linear -> SiLU -> Linear; HART uses it as the scale ("level") embedding."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq_dim = freq_dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def context_pooling(cond_BTD: torch.Tensor, context_mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """AdaLN condition from the text tokens (BH:140-160): masked mean ("avg") or max over all tokens ("max",
    padding included, as released)."""
    if mode == "avg":
        m = context_mask_BT.unsqueeze(-1).to(cond_BTD.dtype)
        return (cond_BTD * m / m.sum(1).clamp(min=1).unsqueeze(1)).sum(1)
    if mode == "max":
        return cond_BTD.max(dim=1).values
    raise ValueError(f"sep_aln_pooling_mode must be 'avg' or 'max', got {mode!r}")


class LayerKV:
    """One block's KV cache (keys after RoPE), grown by concatenation one scale at a time."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class KVCache:
    def __init__(self, depth: int):
        self.layers = [LayerKV() for _ in range(depth)]

    @property
    def length(self) -> int:
        k = self.layers[0].k
        return 0 if k is None else k.shape[2]


class QKVProjection(nn.Linear):
    """The fused q/k/v projection (`attn.qkv_proj`, no bias of its own). Its bias (q_bias, the zero k bias,
    v_bias) is an argument, as the released code builds it per call. A module call rather than `F.linear`
    on `qkv_proj.weight`, so that a wrapper of the layer sees its input: a LoRA adapter (hart_train.lora)
    adds its low-rank term to this output."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)  # released quirk (BH:954), not 1/sqrt(d)
        self.qkv_proj = QKVProjection(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))  # persistent: the released state dict has it
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLC, cos_BLd, sin_BLd, seg_lens=None, cache: LayerKV | None = None):
        """Training: `seg_lens` given, block-causal over the segments. Inference: `cache` given, the new
        tokens attend to everything cached so far plus themselves."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias.to(self.q_bias.dtype), self.v_bias))
        qkv = self.qkv_proj(x_BLC, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B, H, L, d each
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, k, cos_BLd, sin_BLd)
        if cache is not None:
            k, v = cache.extend(k, v)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = kernels.block_causal(q, k, v, seg_lens, self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


def _drop_path(x: torch.Tensor, keep_B: torch.Tensor | None) -> torch.Tensor:
    return x if keep_B is None else x * keep_B.to(x.dtype)[:, None, None]


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block modulated by the pooled text condition; chunk order gamma1, gamma2, scale1, scale2,
    shift1, shift2 (BH:1293-1320)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, attn_l2_norm: bool, drop_path: float):
        super().__init__()
        self.C = dim
        self.drop_path_rate = drop_path
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm)
        self.ffn = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.ln_wo_grad = RMSNorm(dim, eps=norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x_BLC, cond_BD, cos_BLd, sin_BLd, seg_lens=None, cache=None, keep_2B=None):
        """`keep_2B`: drop-path multipliers (0 or 1/keep_prob) for the two branches, or None."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        k1, k2 = (None, None) if keep_2B is None else keep_2B.unbind(0)
        h = self.attn(self.ln_wo_grad(x_BLC).mul(scale1 + 1).add(shift1), cos_BLd, sin_BLd, seg_lens, cache)
        x_BLC = x_BLC + _drop_path(h.mul(gamma1), k1)
        h = self.ffn(self.ln_wo_grad(x_BLC).mul(scale2 + 1).add(shift2))
        return x_BLC + _drop_path(h.mul(gamma2), k2)


class AdaLNBeforeHead(nn.Module):
    """RMSNorm then AdaLN from the max-pooled condition (the head ignores sep_aln_pooling_mode; BH:1380)."""

    def __init__(self, dim: int, norm_eps: float):
        super().__init__()
        self.C = dim
        self.ln_wo_grad = RMSNorm(dim, eps=norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x_BLC: torch.Tensor, cond_BTD: torch.Tensor) -> torch.Tensor:
        cond = cond_BTD.max(dim=1, keepdim=True).values if cond_BTD.dim() == 3 and cond_BTD.shape[1] > 1 else cond_BTD
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale + 1).add(shift)
