"""FLOPs of one HART training sample, as a function of the config: the one count every report uses.

What is counted: the trained model's forward (the transformer over text + image inputs, its head, and
the diffusion head on the kept last-scale tokens, `diffusion_batch_mul` copies of each). A multiply-add is
2 FLOPs; only matrix products are counted (norms, activations, RoPE and the loss are O(N C), under 1%).
Attention counts the (query, key) pairs each query really attends to: the block-causal layout lets a
query of scale s see the text and scales 0..s, so a segment of n queries ending at key e costs
4 * n * e * C (QK^T and AV). The last scale counts the tokens kept after HART's token dropping at its
*expected* kept count (the mask rate is drawn per step; `expected_kept_last` integrates the draw).

`train_step_flops` is the model FLOPs of a step, forward + backward = 3x the forward, the convention of
MFU figures (PaLM, Megatron); activation checkpointing recomputes the forward once more (4x) on the
hardware, reported separately as `hardware_flops`. The frozen tokenizer and text encoder are not
counted (they are not the model being trained; with token shards they do not run at all).

An aspect-ratio bucket changes only lengths: `schedule` (the (h, w) grid of every scale, see
models/buckets.py; None is the config's square `patch_nums`) sets the segments h*w and the last scale's
h*w tokens that the dropping keeps a share of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hart_train.models.blocks import swiglu_hidden
from hart_train.models.buckets import Schedule, as_schedule
from hart_train.models.hart_t2i import HARTConfig


def _grids(cfg: HARTConfig, schedule: Schedule | None) -> Schedule:
    return as_schedule(cfg.patch_nums if schedule is None else schedule)


def expected_kept_last(cfg: HARTConfig, samples: int = 20001, schedule: Schedule | None = None) -> float:
    """Expected number of last-scale tokens kept by HART's dropping (hart_t2i.draw_training_randomness):
    the masked count is min(ceil(n * rate), n - last_scale_min_keep) with Python slice semantics, rate
    ~ N(1, 0.25) truncated to [mask_ratio_min, 1]; the expectation is taken over evenly spaced quantiles.
    n is the last scale's h*w on `schedule` (None: the square patch_nums[-1]^2)."""
    H, W = _grids(cfg, schedule)[-1]
    n = H * W
    lo, hi, loc, scale = cfg.mask_ratio_min, 1.0, 1.0, 0.25
    a, b = torch.tensor((lo - loc) / scale, dtype=torch.float64), torch.tensor((hi - loc) / scale, dtype=torch.float64)
    ca, cb = torch.special.ndtr(a), torch.special.ndtr(b)
    u = (torch.arange(samples, dtype=torch.float64) + 0.5) / samples
    rates = loc + scale * torch.special.ndtri(ca + u * (cb - ca)).clamp(a, b)
    kept = [n - len(range(n)[: min(math.ceil(n * float(r)), n - cfg.last_scale_min_keep)]) for r in rates]
    return sum(kept) / len(kept)


@dataclass
class SampleFlops:
    """Forward FLOPs of one training sample, by part."""

    tokens: float        # transformer sequence length (text + image inputs after dropping)
    linear: float        # block projections, MLPs and AdaLN
    attention: float     # QK^T and AV over the attended pairs
    head: float          # the V-way classifier and its AdaLN
    embed: float         # text and scale-input embeddings
    diffusion: float     # the residual MLP head on the kept last-scale tokens

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.head + self.embed + self.diffusion

    @property
    def train_step_flops(self) -> float:
        return 3 * self.forward

    def hardware_flops(self, activation_checkpointing: bool) -> float:
        """FLOPs the device executes: checkpointed blocks run their forward twice."""
        blocks = self.linear + self.attention
        return self.train_step_flops + (blocks if activation_checkpointing else 0.0)


def sample_flops(cfg: HARTConfig, kept_last: float | None = None, schedule: Schedule | None = None) -> SampleFlops:
    """Forward FLOPs of one training sample of `cfg` on `schedule` (None: square; see the module docstring)."""
    C, T, V, Cv = cfg.embed_dim, cfg.context_token, cfg.vocab_size, cfg.Cvae
    grids = _grids(cfg, schedule)
    k = expected_kept_last(cfg, schedule=grids) if kept_last is None else kept_last
    segments = [T] + [h * w for h, w in grids[1:-1]] + [k]
    N = sum(segments)
    H = swiglu_hidden(C, cfg.mlp_ratio)
    per_token = 2 * (3 * C * C + C * C + 3 * C * H)     # qkv, proj, gate/up/down
    adaln = 2 * C * 6 * C                                 # once per sample per block (pooled condition)
    linear = cfg.depth * (N * per_token + adaln)
    ends, attended = 0.0, 0.0
    for n in segments:
        ends += n
        attended += n * ends
    attention = cfg.depth * 4 * C * attended
    head = (N - T + 1) * 2 * C * V + 2 * C * 2 * C
    embed = 2 * T * cfg.context_dim * C + 2 * (N - T) * Cv * C + 2 * k * Cv * C  # + the sampled token's embedding
    W = cfg.diff_width
    diff_token = 2 * (Cv * W + C * W + 256 * W + W * W + cfg.diff_depth * 5 * W * W + 2 * W * W + 2 * W * Cv)
    diffusion = cfg.diffusion_batch_mul * k * diff_token
    return SampleFlops(N, linear, attention, head, embed, diffusion)
