"""HART text-to-image transformer (`HARTForT2I`), weight-compatible with mit-han-lab/hart.

Shape legend: B batch, T text tokens (context_token), Dt text width (context_dim), L image tokens over all
scales (sum pn^2, or sum h*w on a bucket's schedule), k last-scale tokens kept, C width, V vocab, Cv latent
channels (Cvae), S scales.

Sequence: [T text tokens] + [scales 1..S-1 teacher-forcing inputs]; the 1x1 scale is predicted from the
last text token, so the logits `[T-1:]` line up with the concatenated ground-truth indices. The text
embedding `context_embed(context_norm(text))` is both the prefix tokens and, pooled, the AdaLN condition.
The training forward follows the released `HARTForT2I.forward` (T2I:564-707): MAR-style dropping of most
last-scale tokens, the text drop for CFG, discrete logits, and the residual-diffusion loss whose target is
relative to the model's *sampled* last-scale token. The released code returns the pieces; the loss
combination (CE + diff_weight * diffusion) is ours (hart#15).

Decisions:
- Every random draw comes from one `torch.Generator` (`draw_training_randomness`), so a run is a pure
  function of its seed; the draws can also be passed in, which is how a parity check feeds recorded ones.
  The sampler does the same (`SampleDraws`, `draw_sampling_randomness`).
- Attention is block-causal per scale without a mask (see attention.py); no `attn_bias_for_masking` or
  `lvl_1L` buffers exist here. `official_layout.load_official_state_dict` drops them, `official_state_dict` regenerates
  them for the released code.
- The tokenizer is not imported: the codebook (V, Cv) and the next-scale input function are arguments.
- Aspect-ratio buckets (buckets.py): the training forward, `forward_logits`, the draws and the sampler
  take `schedule`, the (h, w) token grid of every scale (`Bucket.schedule(patch_nums)`); None is the
  config's square `patch_nums`, computed exactly as before. A schedule changes only lengths and
  positions, never parameters: segment lengths h*w (block-causal attention), the last scale's h*w tokens
  (token dropping, the diffusion head), 2D RoPE per axis (rope.py) and f_hat of H x W. The level
  embedding is per scale index, so a schedule has the config's number of scales and starts at (1, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hart_train.zero_utils import modifying

from .blocks import AdaLNBeforeHead, AdaLNSelfAttn, KVCache, RMSNorm, TimestepEmbedder, context_pooling
from .buckets import Schedule, as_schedule
from .diffloss import DiffLoss
from .diffusion import space_timesteps
from .rope import context_position_ids as positions_from_mask
from .rope import image_positions, rope_1d, rope_2d
from .token_sampling import truncnorm_sample, filter_top_k_top_p, sample_top_k_top_p, sample_filtered, gumbel_softmax

PATCH_NUMS_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


@dataclass
class HARTConfig:
    depth: int = 16
    embed_dim: int = 1536
    # Not readable from weight shapes (unless attn_l2_norm): 16 is the released code default (head dim 96).
    num_heads: int = 16
    mlp_ratio: float = 4.0  # SwiGLU hidden = int(C*ratio*2/3 + 255) // 256 * 256
    norm_eps: float = 1e-6
    # False (released default): attention scale 0.25/sqrt(head_dim), a released quirk the weights depend on.
    # True: q, k l2-normalised with a learned per-head scale (adds blocks.*.attn.scale_mul_1H11).
    attn_l2_norm: bool = False
    sep_aln_pooling_mode: str = "max"  # block AdaLN pooling of text tokens: "max" (all tokens) or "avg" (masked)
    use_context_norm: bool = True  # RMSNorm on the text embeddings (adds context_norm.weight)
    context_norm_scale: float = 1.0  # initial context_norm weight (the released fused norm ignores it: 1.0)
    cond_drop_rate: float = 0.1
    # True (released quirk, T2I:606): drop text where randn(B) < rate, i.e. ~54% of samples at 0.1.
    # False: rand(B) < rate (VAR's intent).
    cond_drop_randn: bool = True
    drop_path_rate: float = 0.0
    patch_nums: tuple[int, ...] = PATCH_NUMS_1024
    context_token: int = 300
    context_dim: int = 1536
    vocab_size: int = 4096
    Cvae: int = 32
    diff_width: int = 1024
    diff_depth: int = 6
    num_sampling_steps: str = "8"
    diffusion_batch_mul: int = 4
    vae_scale: float = 0.6
    diff_weight: float = 1.0  # loss = CE + diff_weight * diffusion loss
    # last-scale token dropping (T2I:544-562): mask rate ~ truncnorm on [mask_ratio_min, 1], loc 1, sd 0.25;
    # num dropped = min(ceil(n*rate), n - last_scale_min_keep) with Python slice semantics for a negative
    # value, exactly as released (so 16 < n < 32 still drops 2n-32 tokens; n <= 16 drops none).
    mask_ratio_min: float = 0.5
    last_scale_min_keep: int = 32
    # training-time sampling of the last-scale token that the diffusion residual is relative to
    train_top_k: int = 600
    train_top_p: float = 0.96
    # True (released quirk, T2I:480/511): the last scale's CFG and the diffusion CFG reuse the ratio of
    # scale S-2, t = cfg*(S-2)/(S-1). False: t = cfg at the last scale.
    cfg_last_reuses_ratio: bool = True

    def __post_init__(self):
        self.patch_nums = tuple(int(p) for p in self.patch_nums)
        positive = ("depth", "embed_dim", "num_heads", "context_token", "context_dim", "vocab_size", "Cvae",
                    "diff_width", "diff_depth", "diffusion_batch_mul", "train_top_k")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"HARTConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("mlp_ratio", "norm_eps", "vae_scale", "context_norm_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HARTConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"HARTConfig.num_heads={self.num_heads}: embed_dim/num_heads must be a multiple of 4 (2D RoPE)")
        if self.sep_aln_pooling_mode not in ("avg", "max"):
            raise ValueError(f"HARTConfig.sep_aln_pooling_mode must be 'avg' or 'max', got {self.sep_aln_pooling_mode!r}")
        pn = self.patch_nums
        if len(pn) < 2 or pn[0] != 1 or any(b <= a for a, b in zip(pn, pn[1:])):
            raise ValueError(f"HARTConfig.patch_nums must start at 1 and strictly increase (>= 2 scales), got {pn}")
        for name in ("cond_drop_rate", "train_top_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"HARTConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"HARTConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0.0 < self.mask_ratio_min <= 1.0:
            raise ValueError(f"HARTConfig.mask_ratio_min must be in (0, 1], got {self.mask_ratio_min}")
        if self.diff_weight < 0 or self.last_scale_min_keep < 0:
            raise ValueError("HARTConfig.diff_weight and HARTConfig.last_scale_min_keep must be >= 0")
        try:
            space_timesteps(1000, str(self.num_sampling_steps))
        except ValueError as e:
            raise ValueError(f"HARTConfig.num_sampling_steps={self.num_sampling_steps!r}: {e}") from None
        self.num_sampling_steps = str(self.num_sampling_steps)


PRESETS: dict[str, dict] = {
    "hart-0.7b": dict(),  # the released hart-0.7b-1024px shapes (732,497,472 params)
    "tiny": dict(depth=2, embed_dim=64, num_heads=4, patch_nums=(1, 2, 4), context_token=8, context_dim=32,
                 vocab_size=64, Cvae=8, diff_width=64, diff_depth=2),
}


def hart_config(name: str, **overrides) -> HARTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown HART preset {name!r}; choose from {sorted(PRESETS)}")
    return HARTConfig(**{**PRESETS[name], **overrides})


@dataclass
class TextCond:
    """The text side of one forward: prefix tokens / AdaLN condition (B, T, C), pooled (B, C), RoPE positions."""

    cond_BTC: torch.Tensor
    pooled_BC: torch.Tensor
    position_ids_BT: torch.Tensor


@dataclass
class TrainDraws:
    """Every random quantity of one training forward. `None` fields are drawn inside the forward."""

    keep_last_idx: torch.Tensor  # (B, k) sorted kept positions of the last scale
    drop_text: torch.Tensor  # (B,) bool
    drop_path_keep: torch.Tensor | None = None  # (depth, 2, B) multipliers, or None
    sampled_idx: torch.Tensor | None = None  # (B, k) last-scale tokens the residual is relative to
    diff_t: torch.Tensor | None = None  # (mul*B*k,)
    diff_noise: torch.Tensor | None = None  # (mul*B*k, Cv)


@dataclass
class SampleDraws:
    """Every random quantity of one `autoregressive_infer_cfg` call, in the form torch itself draws it, so a
    sample drawn by another implementation (the released code) replays here exactly from its recorded
    draws. `None` fields are drawn inside from the generator, in the order the sampler takes them
    (`draw_sampling_randomness`).

    Tokens: `torch.multinomial(probs, 1)` is `argmax(probs / q)` with `q ~ Exp(1)` of the probabilities'
    shape (torch's one-sample algorithm, one kernel for CPU, CUDA and MPS); `token_exp[si]` is that q for
    scale si, over the filtered distribution's B*pn^2 rows.
    `more_smooth`'s gumbel noise is `-log(q)` with `gumbel_exp[si]` as q (VAR's `gumbel_softmax_with_rng`).
    Per-scale tensors are cast to the logits' dtype (fp32). On a bucket's schedule pn^2 reads h*w (the
    scale's tokens, raster order). The diffusion rows are b*n + token (n = pn_last^2),
    the step noise's B*n cond rows first, then the uncond ones (as the released sampler lays them out)."""

    token_exp: Sequence[torch.Tensor] | None = None  # S tensors (B, pn^2, V), Exp(1)
    gumbel_exp: Sequence[torch.Tensor] | None = None  # S tensors (B, pn^2, V), Exp(1); more_smooth only
    diff_noise: torch.Tensor | None = None  # (B*n, Cv) diffusion start noise, shared by the cond and uncond rows
    diff_step_noise: torch.Tensor | None = None  # (steps, 2*B*n, Cv), row k for the k-th denoising step


class HARTForT2I(nn.Module):
    def __init__(self, config: HARTConfig):
        super().__init__()
        self.config = cfg = config
        C = cfg.embed_dim
        self.patch_nums = cfg.patch_nums
        self.grids = as_schedule(cfg.patch_nums)  # the square schedule as (h, w) grids
        self.num_scales = len(cfg.patch_nums)
        self.L = sum(p * p for p in cfg.patch_nums)
        self.grad_checkpointing = False

        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.context_embed = nn.Linear(cfg.context_dim, C)
        if cfg.use_context_norm:
            self.context_norm = RMSNorm(cfg.context_dim, cfg.norm_eps, init_scale=cfg.context_norm_scale)
        else:
            self.context_norm = nn.Identity()
        self.lvl_embed = TimestepEmbedder(C)
        dpr = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu")]
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_l2_norm, dpr[i]) for i in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.decoder_norm = RMSNorm(C, cfg.norm_eps)
        self.diffloss = DiffLoss(cfg.Cvae, C, cfg.diff_width, cfg.diff_depth, cfg.num_sampling_steps, cfg.vae_scale)
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1.0):
        """VAR's init (T2I:709-806): trunc-normal Linears (std sqrt(1/3C) by default), small head, AdaLN
        gammas ~0, proj / sqrt(2 depth) (the llama MLP has no fc2, so down_proj is not rescaled), MAR's
        init for the diffusion head. RMSNorm weights keep their constructor values."""
        C, depth = self.config.embed_dim, self.config.depth
        std = math.sqrt(1 / C / 3) if init_std < 0 else init_std
        # one module at a time (`modifying`), so this also runs on a model built partitioned (ZeRO-3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                with modifying(m.parameters(recurse=False)):
                    if isinstance(m, nn.Linear):
                        nn.init.trunc_normal_(m.weight, std=std)
                    elif m.weight is not None:
                        m.weight.fill_(1.0)
                    if m.bias is not None:
                        m.bias.zero_()
        with modifying(self.head.parameters()):
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
        with modifying(self.head_nm.ada_lin[-1].parameters()):
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            self.head_nm.ada_lin[-1].bias.zero_()
        for b in self.blocks:
            with modifying([b.attn.proj.weight, *b.ada_lin[-1].parameters()]):
                b.attn.proj.weight.div_(math.sqrt(2 * depth))
                b.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                b.ada_lin[-1].weight[: 2 * C].mul_(init_adaln_gamma)
                b.ada_lin[-1].bias.zero_()
        self.diffloss.initialize_weights()

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in: its weights' (bf16 under DeepSpeed's bf16, else fp32).
        Inputs are cast to it where they enter (text, scale inputs, codebook embeddings); the logits, the
        cross-entropy and the diffusion loss leave in fp32 (`get_logits`, `DiffLoss`)."""
        return self.word_embed.weight.dtype

    # ------------------------------------------------------------------ shared pieces
    def scale_grids(self, schedule: Schedule | None = None) -> Schedule:
        """The (h, w) token grid of every scale: the config's square `patch_nums` when `schedule` is None,
        else the schedule (square sides or (h, w) grids, e.g. `Bucket.schedule(patch_nums)`), which must
        have the config's number of scales and start with the one-token (1, 1) scale."""
        if schedule is None:
            return self.grids
        grids = as_schedule(schedule)
        if len(grids) != self.num_scales or grids[0] != (1, 1):
            raise ValueError(f"schedule {grids} must have {self.num_scales} scales (as patch_nums={self.patch_nums}) "
                             "and start with (1, 1)")
        return grids

    def prepare_text(self, context_BTDt, context_mask_BT, context_position_ids_BT=None) -> TextCond:
        cond = self.context_embed(self.context_norm(context_BTDt.to(self.dtype)))
        pos = positions_from_mask(context_mask_BT) if context_position_ids_BT is None else context_position_ids_BT
        return TextCond(cond, context_pooling(cond, context_mask_BT, self.config.sep_aln_pooling_mode), pos)

    def level_embeddings(self) -> torch.Tensor:
        """(S, C): level 0 is the text prefix (and scale 0), level s the inputs of scale s."""
        return self.lvl_embed(torch.arange(self.num_scales, device=self.head.weight.device))

    def get_logits(self, h_BLC: torch.Tensor, cond_BTC: torch.Tensor) -> torch.Tensor:
        # the head runs in the model's dtype; the logits are fp32 for the softmax / cross-entropy
        return self.head(self.head_nm(h_BLC.to(self.dtype), cond_BTC)).float()

    def _run_blocks(self, x, pooled, cos, sin, seg_lens=None, cache=None, drop_path_keep=None):
        for i, b in enumerate(self.blocks):
            keep = None if drop_path_keep is None else drop_path_keep[i]
            layer_cache = None if cache is None else cache.layers[i]
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(b, x, pooled, cos, sin, seg_lens, None, keep, use_reentrant=False)
            else:
                x = b(x, pooled, cos, sin, seg_lens, layer_cache, keep)
        return x

    # ------------------------------------------------------------------ teacher forcing
    def forward_logits(
        self,
        context_BTDt: torch.Tensor,
        context_mask_BT: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        context_position_ids_BT: torch.Tensor | None = None,
        keep_last_idx: torch.Tensor | None = None,
        drop_path_keep: torch.Tensor | None = None,
        schedule: Schedule | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, TextCond]:
        """Deterministic teacher-forcing pass on `schedule` (None: the square `patch_nums`). Returns logits
        (B, L', V) aligned with the ground truth (L' = L, or fewer when `keep_last_idx` keeps k last-scale
        tokens), the final hidden states (B, T + L' - 1, C) and the text condition."""
        cfg, S, T = self.config, self.num_scales, self.config.context_token
        grids = self.scale_grids(schedule)
        n_last, L = grids[-1][0] * grids[-1][1], sum(h * w for h, w in grids)
        if x_BLCv_wo_first_l.shape[1] != L - 1:
            raise ValueError(f"x_BLCv_wo_first_l has {x_BLCv_wo_first_l.shape[1]} tokens; the schedule {grids} "
                             f"needs L - 1 = {L - 1} (the tokenizer's teacher-forcing input on the same schedule)")
        text = self.prepare_text(context_BTDt, context_mask_BT, context_position_ids_BT)
        x_img = x_BLCv_wo_first_l
        k = n_last
        if keep_last_idx is not None:
            k = keep_last_idx.shape[1]
            last = torch.gather(x_img[:, -n_last:], 1, keep_last_idx[..., None].expand(-1, -1, cfg.Cvae))
            x_img = torch.cat((x_img[:, :-n_last], last), dim=1)
        x = torch.cat((text.cond_BTC, self.word_embed(x_img.to(self.dtype))), dim=1)
        seg_lens = [T] + [h * w for h, w in grids[1:-1]] + [k]
        lvl = torch.repeat_interleave(torch.arange(S, device=x.device), torch.tensor(seg_lens, device=x.device),
                                      output_size=x.shape[1])  # a known size: no host sync
        x = x + self.level_embeddings()[lvl]

        cos_t, sin_t = rope_1d(text.position_ids_BT, cfg.embed_dim // cfg.num_heads)
        pos_img = image_positions(grids, range(1, S), text.position_ids_BT[:, -1], keep_last_idx)
        cos_i, sin_i = rope_2d(pos_img, cfg.embed_dim // cfg.num_heads)
        cos, sin = torch.cat((cos_t, cos_i), dim=1), torch.cat((sin_t, sin_i), dim=1)

        h = self._run_blocks(x, text.pooled_BC, cos, sin, seg_lens=seg_lens, drop_path_keep=drop_path_keep)
        # the head only where there is a target (the last text position onward): the head's condition is
        # pooled, so a row's logits do not depend on the others, and no (L, V) gradient is scattered back
        return self.get_logits(h[:, T - 1:], text.cond_BTC), h, text

    def draw_training_randomness(self, B: int, device, generator: torch.Generator | None = None,
                                 schedule: Schedule | None = None) -> TrainDraws:
        """Kept last-scale positions (a random order, a truncnorm mask rate) among the h*w tokens of the
        schedule's last scale, the text drop and drop path."""
        cfg = self.config
        H, W = self.scale_grids(schedule)[-1]
        n = H * W
        orders = torch.rand(B, n, generator=generator, device=device).argsort(dim=1)
        rate = truncnorm_sample(cfg.mask_ratio_min, 1.0, 1.0, 0.25, generator, device)
        num_masked = min(math.ceil(n * rate), n - cfg.last_scale_min_keep)
        num_masked = len(range(n)[:num_masked])  # the released slice `orders[:, :num_masked]`, negatives included
        # the positions not masked, ascending (orders is a permutation; no nonzero(), so no host sync)
        keep_idx = orders[:, num_masked:].sort(dim=1).values
        if cfg.cond_drop_randn:
            drop = torch.randn(B, generator=generator, device=device) < cfg.cond_drop_rate
        else:
            drop = torch.rand(B, generator=generator, device=device) < cfg.cond_drop_rate
        dp = None
        if self.training and cfg.drop_path_rate > 0:
            dp = torch.ones(cfg.depth, 2, B, device=device)
            for i, b in enumerate(self.blocks):
                p = b.drop_path_rate
                if p > 0:
                    dp[i] = torch.rand(2, B, generator=generator, device=device).lt(1 - p).float() / (1 - p)
        return TrainDraws(keep_idx, drop, dp)

    def forward(
        self,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        gt_idx: torch.Tensor | Sequence[torch.Tensor],
        f_rest_last: torch.Tensor,
        codebook: torch.Tensor,
        *,
        context_position_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        draws: TrainDraws | None = None,
        schedule: Schedule | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training forward. `context` (B, T, Dt), `context_mask` (B, T), `x_BLCv_wo_first_l` (B, L-1, Cv),
        `gt_idx` (B, L) or per-scale [(B, pn^2)], `f_rest_last` (B, pn_last^2, Cv) = the residual before the
        last discrete stage, `codebook` (V, Cv); on a bucket's `schedule` pn^2 reads h*w (the tokenizer's
        outputs on the same schedule). Returns `loss` (= ce + diff_weight * diff_loss), `ce` (mean over kept
        tokens), `acc`, `ce_per_scale` / `acc_per_scale` (S,), `diff_loss` (= diff_mse + diff_vb),
        `diff_mse`, `diff_vb` and `num_kept_last`."""
        cfg = self.config
        B, device = context.shape[0], context.device
        grids = self.scale_grids(schedule)
        gt_BL = torch.cat(list(gt_idx), dim=1) if not torch.is_tensor(gt_idx) else gt_idx
        n_last, L = grids[-1][0] * grids[-1][1], sum(ph * pw for ph, pw in grids)
        if gt_BL.shape[1] != L or f_rest_last.shape[1] != n_last:
            raise ValueError(f"gt_idx has {gt_BL.shape[1]} tokens and f_rest_last {f_rest_last.shape[1]}; the schedule "
                             f"{grids} needs {L} and {n_last}")
        if draws is None:
            draws = self.draw_training_randomness(B, device, generator, grids)
        keep_idx = draws.keep_last_idx
        k = keep_idx.shape[1]
        context = context * (~draws.drop_text).to(context.dtype)[:, None, None]

        logits, h, _ = self.forward_logits(context, context_mask, x_BLCv_wo_first_l, context_position_ids, keep_idx,
                                           draws.drop_path_keep, grids)
        gt = torch.cat((gt_BL[:, :-n_last], torch.gather(gt_BL[:, -n_last:], 1, keep_idx)), dim=1)
        ce_tok = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), gt.reshape(-1), reduction="none").view(B, -1)
        correct = (logits.argmax(-1) == gt).float()
        seg = [ph * pw for ph, pw in grids[:-1]] + [k]
        ce_per_scale = torch.stack([c.mean() for c in ce_tok.split(seg, dim=1)])
        acc_per_scale = torch.stack([c.mean() for c in correct.split(seg, dim=1)])

        # residual diffusion on the kept last-scale tokens, relative to the model's own sampled token
        codebook = codebook.detach()
        gt_last = gt[:, -k:]
        idx = draws.sampled_idx
        if idx is None:
            last_logits = logits[:, -k:].detach()
            # a host sync that stays: the draw below syncs anyway (its tie test, multinomial's checks), and the
            # fallback must leave the generator untouched, which a select (torch.where) over both cannot
            if torch.isfinite(last_logits).all():
                idx = sample_top_k_top_p(last_logits, cfg.train_top_k, cfg.train_top_p, generator)
            else:  # the released code falls back to the ground truth when sampling fails
                idx = gt_last
        e = F.embedding(idx, codebook)
        z = self.decoder_norm(h[:, -k:] + self.word_embed(e.to(self.dtype)))
        target = torch.gather(f_rest_last.float(), 1, keep_idx[..., None].expand(-1, -1, cfg.Cvae)) - e.float()
        mul = cfg.diffusion_batch_mul
        diff = self.diffloss(
            target.reshape(B * k, -1).repeat(mul, 1), z.reshape(B * k, -1).repeat(mul, 1),
            t=draws.diff_t, noise=draws.diff_noise, generator=generator,
        )
        ce = ce_tok.mean()
        return {
            "loss": ce + cfg.diff_weight * diff["loss"],
            "ce": ce,
            "acc": correct.mean(),
            "ce_per_scale": ce_per_scale.detach(),
            "acc_per_scale": acc_per_scale.detach(),
            "diff_loss": diff["loss"],
            "diff_mse": diff["mse"].detach(),
            "diff_vb": diff["vb"].detach(),
            "num_kept_last": torch.tensor(k),
        }

    # ------------------------------------------------------------------ inference
    def draw_sampling_randomness(self, B: int, device, generator: torch.Generator | None = None,
                                 more_smooth: bool = False, use_diffusion: bool = True,
                                 schedule: Schedule | None = None) -> SampleDraws:
        """The draws `autoregressive_infer_cfg` takes from `generator` for B images on `schedule`: passing
        them as `draws` gives the same sample as passing the generator."""
        V = self.config.vocab_size
        grids = self.scale_grids(schedule)
        token, gumbel = [], []
        for h, w in grids:  # per scale the token draw, then the gumbel draw
            token.append(torch.empty(B, h * w, V, device=device).exponential_(generator=generator))
            if more_smooth:
                gumbel.append(torch.empty(B, h * w, V, device=device).exponential_(generator=generator))
        draws = SampleDraws(token, gumbel if more_smooth else None)
        if use_diffusion:
            rows = 2 * B * grids[-1][0] * grids[-1][1]
            draws.diff_noise, draws.diff_step_noise = self.diffloss.draw_sample_noise(rows, True, device, generator)
        return draws

    def check_sample_draws(self, draws: SampleDraws, B: int, more_smooth: bool, use_diffusion: bool,
                           schedule: Schedule | None = None) -> None:
        """A ValueError naming the field unless `draws` has the shapes the sampler draws for B images on
        `schedule`."""
        if draws.gumbel_exp is not None and not more_smooth:
            raise ValueError("SampleDraws.gumbel_exp is given but unused: gumbel noise is drawn only with more_smooth=True")
        if not use_diffusion and (draws.diff_noise is not None or draws.diff_step_noise is not None):
            raise ValueError("SampleDraws.diff_noise / diff_step_noise are given but unused: use_diffusion=False")
        V, Cv, S = self.config.vocab_size, self.config.Cvae, self.num_scales
        grids = self.scale_grids(schedule)
        rows, steps = 2 * B * grids[-1][0] * grids[-1][1], self.diffloss.gen_diffusion.num_timesteps
        want = [("diff_noise", draws.diff_noise, (rows // 2, Cv), "(B*pn_last^2, Cv)"),
                ("diff_step_noise", draws.diff_step_noise, (steps, rows, Cv), "(steps, 2*B*pn_last^2, Cv)")]
        for name in ("token_exp", "gumbel_exp"):
            per_scale = getattr(draws, name)
            if per_scale is not None and len(per_scale) != S:
                raise ValueError(f"SampleDraws.{name} holds {len(per_scale)} tensors, expected one per scale ({S})")
            for si, t in enumerate(per_scale or ()):
                want.append((f"{name}[{si}]", t, (B, grids[si][0] * grids[si][1], V), "(B, pn^2, V)"))
        for name, t, shape, legend in want:
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"SampleDraws.{name} has shape {tuple(t.shape)}, expected {legend} = {shape}")

    @torch.no_grad()
    def forward_scale(self, si: int, x_BlC: torch.Tensor, text: TextCond, cache: KVCache,
                      schedule: Schedule | None = None) -> torch.Tensor:
        """One scale with the KV cache: si == 0 feeds the T text tokens, si > 0 the h*w inputs of scale si
        of `schedule` (already embedded, see `embed_scale_input`). Returns the final hidden states (B, l, C)."""
        hd = self.config.embed_dim // self.config.num_heads
        if si == 0:
            cos, sin = rope_1d(text.position_ids_BT, hd)
        else:
            cos, sin = rope_2d(image_positions(self.scale_grids(schedule), [si], text.position_ids_BT[:, -1]), hd)
        return self._run_blocks(x_BlC, text.pooled_BC, cos, sin, cache=cache)

    def embed_scale_input(self, si: int, x_BlCv: torch.Tensor, lvl_SC: torch.Tensor | None = None) -> torch.Tensor:
        lvl_SC = self.level_embeddings() if lvl_SC is None else lvl_SC
        if si == 0:
            return x_BlCv + lvl_SC[0]  # x is the text condition (B, T, C)
        return self.word_embed(x_BlCv.to(self.dtype)) + lvl_SC[si]

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        codebook: torch.Tensor,
        next_input_fn: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        fhat_to_img: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        context_position_ids: torch.Tensor | None = None,
        cfg: float = 4.5,
        top_k: int = 600,
        top_k_late: int = 300,
        top_k_late_from: int = 7,
        top_p: float = 0.0,
        more_smooth: bool = False,
        generator: torch.Generator | None = None,
        diffusion_temperature: float = 1.0,
        use_diffusion: bool = True,
        draws: SampleDraws | None = None,
        schedule: Schedule | None = None,
    ) -> torch.Tensor:
        """HART sampling (T2I:301-532) with CFG ramp t = cfg*si/(S-1) and logits (1+t)cond - t*uncond.

        `next_input_fn(si, f_hat, h_BChw) -> (f_hat, next_x_BChw)` (the tokenizer's bicubic-up, Phi,
        accumulate, area-down) and `fhat_to_img(f_hat) -> image in [-1, 1]` come from the tokenizer. Returns
        the image in [0, 1] if `fhat_to_img` is given, else f_hat (B, Cv, pn_last, pn_last). `schedule`
        (None: the square `patch_nums`) samples a bucket: scale si is h x w (h_BChw has that shape), f_hat
        is (B, Cv, H, W) and the image 16H x 16W; `next_input_fn` must step on the same schedule
        (`tokenizer.get_next_autoregressive_input(si, S, f_hat, h, patch_nums=schedule)`). top-k is
        `top_k` for si < `top_k_late_from` and `top_k_late` after, clamped to V; 0 disables. The random
        draws come from `generator` except those `draws` gives (see `SampleDraws`); with all of them given
        the generator is not touched.

        Differences from the released function, all deliberate: one `generator` drives every draw (the
        released diffusion noise comes from the global RNG); the diffusion always runs guided with scale t
        (released: unguided in the corner case t == 1.0); `top_k` is honoured (released: ignored); the last
        scale is one pass (released `num_maskgit_iters=1`, the only value it uses).
        """
        c, S = self.config, self.num_scales
        B = context.shape[0]
        grids = self.scale_grids(schedule)
        draws = SampleDraws() if draws is None else draws
        self.check_sample_draws(draws, B, more_smooth, use_diffusion, grids)
        pos = positions_from_mask(context_mask) if context_position_ids is None else context_position_ids
        mask_u = torch.zeros_like(context_mask)
        mask_u[:, 0] = 1  # the released uncond branch: zero text, mask [1, 0, ...], positions 0
        text = self.prepare_text(
            torch.cat((context, torch.zeros_like(context))), torch.cat((context_mask, mask_u)), torch.cat((pos, torch.zeros_like(pos)))
        )
        lvl = self.level_embeddings()
        cache = KVCache(c.depth)
        f_hat = context.new_zeros(B, c.Cvae, *grids[-1])
        x = self.embed_scale_input(0, text.cond_BTC, lvl)
        ratio = 0.0
        for si, (ph, pw) in enumerate(grids):
            last = si == S - 1
            if not (last and c.cfg_last_reuses_ratio):
                ratio = si / (S - 1)
            t = cfg * ratio
            h = self.forward_scale(si, x, text, cache, grids)
            if si == 0:
                h = h[:, -1:]
            logits = self.get_logits(h, text.cond_BTC)
            logits = (1 + t) * logits[:B] - t * logits[B:]
            # the released sampler filters the logits in place, so the gumbel smoothing sees the filtered ones
            logits = filter_top_k_top_p(logits, top_k if si < top_k_late_from else top_k_late, top_p)
            idx = sample_filtered(logits, generator, None if draws.token_exp is None else draws.token_exp[si])
            if more_smooth:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                q = None if draws.gumbel_exp is None else draws.gumbel_exp[si]
                emb = gumbel_softmax(logits.mul(1 + ratio), tau, generator, q) @ codebook.unsqueeze(0)
            else:
                emb = F.embedding(idx, codebook)
            if not last:
                f_hat, nxt = next_input_fn(si, f_hat, emb.transpose(1, 2).reshape(B, c.Cvae, ph, pw))
                x = self.embed_scale_input(si + 1, nxt.reshape(B, c.Cvae, -1).transpose(1, 2), lvl).repeat(2, 1, 1)
                continue
            if use_diffusion:  # the residual, relative to the sampled token, no Phi on the last scale
                z = self.decoder_norm(h + self.word_embed(F.embedding(idx, codebook).to(self.dtype)).repeat(2, 1, 1))
                n = z.shape[1]
                res = self.diffloss.sample(z.reshape(2 * B * n, -1), diffusion_temperature, cfg=t, generator=generator,
                                           noise=draws.diff_noise, step_noise=draws.diff_step_noise)
                emb = emb + res[: B * n].view(B, n, c.Cvae).to(emb.dtype)
            f_hat = f_hat + emb.transpose(1, 2).reshape(B, c.Cvae, ph, pw)
        return f_hat if fhat_to_img is None else fhat_to_img(f_hat).add(1).mul(0.5)
