"""Multi-scale residual vector quantizer of VAR/HART, with HART's hybrid (continuous) path.

State-dict keys as the official `VectorQuantizer2` / `HARTHybridQuantizer`: `embedding.weight` (V, Cvae),
the Phi convs (`quant_resi.qresi_ls.{k}.*` when partially shared, `quant_resi.qresi.*` when fully shared,
`quant_resi.{k}.*` when not shared) and the diagnostic buffer `ema_vocab_hit_SV` (S, V).

How a latent f (B, Cvae, h, w) with h = w = patch_nums[-1] is quantized, scale by scale (si = 0..S-1):
  rest at pn x pn = area-downsample(f_rest); idx = argmin_v ||rest - e_v||^2 (cosine if using_znorm);
  h_si = Phi_si(bicubic-upsample(e[idx]) to h x w); f_hat += h_si; f_rest -= h_si.
Phi_si(x) = (1 - r) x + r conv3x3(x), r = quant_resi; the S scales share `share_quant_resi` convs, scale si
using the one whose tick (linspace(1/3K, 1-1/3K, K) for K=4, else linspace(1/2K, 1-1/2K, K)) is nearest to
si/(S-1); for S=14, K=4 that is [0,0,0,1,1,1,1,2,2,2,2,3,3,3].

The deliberate asymmetry of the official code, kept as is (anatomy §3.1):
- the training `forward` and the discrete reconstruction apply Phi at the last scale too;
- the token extractor `f_to_idxBl_and_frest` and AR sampling (`get_next_autoregressive_input`) do NOT
  apply Phi at the last scale; there the last scale is where HART's residual diffusion takes over.
Hybrid training forward: after the S discrete scales, with probability 1 - skip_continuous_prob the
remaining residual is added, so the decoder sees the exact continuous latent, else the discrete-only f_hat.
skip_continuous_prob=1 is exactly VAR's discrete VQ-VAE forward.

Every `patch_nums` argument also takes a schedule of (h, w) grids, an aspect-ratio bucket's
(`hart_train.models.buckets.bucket_schedule`): scale si is then h_si x w_si and the latent is the last
grid's H x W, so an image 16H x 16W px. Square sides p mean (p, p); both forms run the same operations,
so the square path is unchanged bit for bit. Indices are flattened in raster (row-major) order.

Shape legend: B batch, C = Cvae latent channels, h/w latent size (a scale's grid where it says so), pn
patch side of a scale, L tokens, N = B*pn*pn (B*h*w) rows, V vocabulary, S number of scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import contextlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Phi(nn.Conv2d):
    """h -> (1 - r) h + r conv3x3(h); a Conv2d subclass so its keys are plain `weight`/`bias`."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        # in the input's dtype (the quantizer's fp32), whatever the weights are stored in
        dt = h_BChw.dtype
        conv = self._conv_forward(h_BChw, self.weight.to(dt), None if self.bias is None else self.bias.to(dt))
        return h_BChw.mul(1 - self.resi_ratio) + conv.mul_(self.resi_ratio)


def scale_grids(patch_nums) -> tuple[tuple[int, int], ...]:
    """(h, w) of every scale from square sides (1, 2, 4) or from grids ((1, 1), (2, 3), (3, 5)). The
    transformer's side validates a bucket's schedule (`hart_train.models.buckets.as_schedule`); the
    tokenizer, a layer below, only reads it."""
    grids = []
    for p in patch_nums:
        h, w = (p, p) if isinstance(p, (int, np.integer)) else p
        if int(h) < 1 or int(w) < 1:
            raise ValueError(f"patch_nums: scale grid {h}x{w} must be positive")
        grids.append((int(h), int(w)))
    return tuple(grids)


def _phi_ticks(num_phi: int) -> np.ndarray:
    if num_phi == 4:
        return np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    return np.linspace(1 / 2 / num_phi, 1 - 1 / 2 / num_phi, num_phi)


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Index of the Phi conv used at scale `si` of `num_scales` when `num_phi` convs are shared."""
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(_phi_ticks(num_phi) - at)))


class PhiPartiallyShared(nn.Module):
    def __init__(self, phis: list[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)

    def get(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(si, num_scales, len(self.qresi_ls))]


class PhiShared(nn.Module):
    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    def get(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi


class PhiNonShared(nn.ModuleList):
    def get(self, si: int, num_scales: int) -> nn.Module:
        return self[phi_index(si, num_scales, len(self))]


@dataclass
class QuantizerOutput:
    f_hat: torch.Tensor  # (B, C, h, w) straight-through: value of the decoder input, gradient of f
    vq_loss: torch.Tensor  # scalar
    idx_Bl: list[torch.Tensor]  # per scale (B, pn*pn), int64
    used_continuous: bool  # True if the continuous residual was added


class MultiScaleQuantizer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        patch_nums: tuple[int, ...],
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        using_znorm: bool = False,
    ):
        super().__init__()
        self.using_znorm = using_znorm
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.patch_nums = tuple(patch_nums)
        self.beta = beta

        def make_phi() -> nn.Module:
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in self.patch_nums])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared([make_phi() for _ in range(share_quant_resi)])

        # per-scale EMA of code hits, diagnostic only (not used by any loss); see _load_from_state_dict
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)
        # taming's VQGAN codebook init (VAR's eini=-1): small uniform, near the origin of the latent space
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)

    # ----------------------------------------------------------------------------------- helpers

    def codebook(self) -> torch.Tensor:
        """The code vectors (V, Cvae) in fp32: the quantizer computes distances, lookups, Phi and its loss in
        fp32 whatever dtype its weights are stored in (bf16 under DeepSpeed's bf16), as VAR and HART run it
        with autocast off. A no-op for fp32 weights."""
        return self.embedding.weight.float()

    def phi(self, si: int, num_scales: int) -> nn.Module:
        return self.quant_resi.get(si, num_scales)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """argmin_v ||z - e_v||^2, computed as |z|^2 + |e|^2 - 2 z.e like the official code.

        With using_znorm the nearest code is by cosine similarity instead (argmax of normalized dot products).
        """
        e_VC = self.codebook().detach()
        if self.using_znorm:
            return (F.normalize(z_NC, dim=-1) @ F.normalize(e_VC.T, dim=0)).argmax(dim=1)
        d_NV = z_NC.square().sum(dim=1, keepdim=True) + e_VC.square().sum(dim=1)
        d_NV.addmm_(z_NC, e_VC.T, alpha=-2, beta=1)
        return d_NV.argmin(dim=1)

    def _grids(self, patch_nums) -> tuple[tuple[int, int], ...]:
        """The call's schedule as (h, w) grids: `patch_nums` (sides or grids), default the config's."""
        return scale_grids(patch_nums or self.patch_nums)

    def _check_latent(self, f_BChw: torch.Tensor, grids: tuple[tuple[int, int], ...]) -> None:
        h, w = f_BChw.shape[-2:]
        H, W = grids[-1]
        if h != H or w != W:
            raise ValueError(f"latent is {h}x{w} but the last scale of patch_nums is {H}x{W}: "
                             f"the image must be 16*{H} x 16*{W} px")

    def _embed_up(self, idx_Bl: torch.Tensor, grid: tuple[int, int], size: tuple[int, int],
                  contiguous: bool = True) -> torch.Tensor:
        """Embed the h x w = `grid` indices ((B, h*w) or flat (B*h*w,)) and bicubic-upsample to `size` (H, W)
        (identity when grid == size).

        The memory layout of the tensors fed to Phi and to the area pooling changes their rounding, so each path
        builds it as the official code does, to match it bit for bit: the training forward and the extractors
        permute (B, pn, pn, C) and make the upsampled map contiguous (contiguous=True); the teacher-forcing
        input and `embed_to_fhat` view (B, L, C) transposed and keep the upsampled layout (contiguous=False).
        """
        h, w = grid
        if contiguous:
            h_BChw = F.embedding(idx_Bl.reshape(-1, h, w), self.codebook()).permute(0, 3, 1, 2)
            return F.interpolate(h_BChw, size=size, mode="bicubic").contiguous()
        B = idx_Bl.numel() // (h * w)
        h_BChw = F.embedding(idx_Bl.reshape(B, h * w), self.codebook()).transpose(1, 2).view(B, self.Cvae, h, w)
        return F.interpolate(h_BChw, size=size, mode="bicubic")

    def scale_contribution(self, idx_Bl: torch.Tensor, si: int, patch_nums=None, apply_phi: bool = True) -> torch.Tensor:
        """What scale si adds to f_hat: Phi_si(bicubic-up(e[idx])), (B, C, h, w)."""
        grids = self._grids(patch_nums)
        h_BChw = self._embed_up(idx_Bl, grids[si], grids[-1])
        return self.phi(si, len(grids))(h_BChw) if apply_phi else h_BChw

    # ----------------------------------------------------------------------- training forward

    def forward(
        self,
        f_BChw: torch.Tensor,
        patch_nums=None,
        skip_continuous_prob: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> QuantizerOutput:
        """Quantize, compute the VQ loss and the straight-through decoder input (HQ:21-117).

        vq_loss = mean over scales of beta*mse(sg[f_hat_si], f) + mse(f_hat_si, sg[f]). The continuous-or-not
        coin is one draw per batch (torch.rand with `generator`, so it is reproducible and can be made
        identical across ranks by seeding the generator identically).
        """
        grids = self._grids(patch_nums)
        self._check_latent(f_BChw, grids)
        kind = f_BChw.device.type
        with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext():
            f_BChw = f_BChw.float()
            B, C, h, w = f_BChw.shape
            f_no_grad = f_BChw.detach()
            f_rest = f_no_grad.clone()
            f_hat = torch.zeros_like(f_rest)
            S = len(grids)
            vq_loss = f_BChw.new_zeros(())
            idx_Bl: list[torch.Tensor] = []
            for si, (ph, pw) in enumerate(grids):
                rest_NC = F.interpolate(f_rest, size=(ph, pw), mode="area").permute(0, 2, 3, 1).reshape(-1, C)
                idx_N = self.nearest_code(rest_NC)
                idx_Bl.append(idx_N.reshape(B, ph * pw))
                h_BChw = self.phi(si, S)(self._embed_up(idx_N, (ph, pw), (h, w)))
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f_BChw).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
            coin = torch.rand((), generator=generator, device=None if generator is None else generator.device)
            used_continuous = bool(coin >= skip_continuous_prob)
            if used_continuous:
                f_hat = f_hat + f_rest
            vq_loss = vq_loss * (1.0 / S)
            # straight-through: the decoder sees f_hat's value, the encoder receives the decoder's gradient
            f_hat = (f_hat.detach() - f_no_grad) + f_BChw
        if self.training and S == self.ema_vocab_hit_SV.shape[0]:
            self._update_ema_hits(idx_Bl)
        return QuantizerOutput(f_hat=f_hat, vq_loss=vq_loss, idx_Bl=idx_Bl, used_continuous=used_continuous)

    @torch.no_grad()
    def _update_ema_hits(self, idx_Bl: list[torch.Tensor]) -> None:
        # local (this rank's) hits; a fresh row is copied, later ones decay with 0.99
        for si, idx in enumerate(idx_Bl):
            hit_V = idx.flatten().bincount(minlength=self.vocab_size).float()
            row = self.ema_vocab_hit_SV[si]
            if row.sum() == 0:
                row.copy_(hit_V)
            else:
                row.mul_(0.99).add_(hit_V, alpha=0.01)

    # ------------------------------------------------------------------------- token extraction

    @torch.no_grad()
    def f_to_idxBl_and_fhat(self, f_BChw: torch.Tensor, patch_nums=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Indices and discrete f_hat as the training forward / official `f_to_idxBl_or_fhat` (Phi at every scale)."""
        grids = self._grids(patch_nums)
        self._check_latent(f_BChw, grids)
        f_rest = f_BChw.detach().float().clone()
        f_hat = torch.zeros_like(f_rest)
        B, C, h, w = f_rest.shape
        idx_Bl = []
        for si, (ph, pw) in enumerate(grids):
            idx_N = self.nearest_code(F.interpolate(f_rest, size=(ph, pw), mode="area").permute(0, 2, 3, 1).reshape(-1, C))
            idx_Bl.append(idx_N.reshape(B, ph * pw))
            h_BChw = self.phi(si, len(grids))(self._embed_up(idx_N, (ph, pw), (h, w)))
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
        return idx_Bl, f_hat

    def f_to_idxBl(self, f_BChw: torch.Tensor, patch_nums=None) -> list[torch.Tensor]:
        return self.f_to_idxBl_and_fhat(f_BChw, patch_nums)[0]

    @torch.no_grad()
    def f_to_idxBl_and_frest(self, f_BChw: torch.Tensor, patch_nums=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """HART's extractor (HQ:119-181): S index maps, and the residual before the last discrete stage.

        Returns ([idx (B, pn*pn) for each scale], f_rest_BLC (B, h*w, C)) where
        f_rest_BLC = f - sum_{si < S-1} Phi_si(up(e[idx_si])), i.e. what the last scale (tokens + diffusion) must
        reconstruct. Phi is not applied at the last scale (HQ:164-166), which does not affect the outputs here.
        """
        grids = self._grids(patch_nums)
        self._check_latent(f_BChw, grids)
        f_rest = f_BChw.detach().float().clone()
        B, C, h, w = f_rest.shape
        S = len(grids)
        idx_Bl = []
        f_rest_before_last = f_rest
        for si, (ph, pw) in enumerate(grids):
            idx_N = self.nearest_code(F.interpolate(f_rest, size=(ph, pw), mode="area").permute(0, 2, 3, 1).reshape(-1, C))
            idx_Bl.append(idx_N.reshape(B, ph * pw))
            if si != S - 1:
                f_rest = f_rest - self.phi(si, S)(self._embed_up(idx_N, (ph, pw), (h, w)))
            else:
                f_rest_before_last = f_rest
        return idx_Bl, f_rest_before_last.permute(0, 2, 3, 1).reshape(B, h * w, C)

    # ------------------------------------------------------------------------- decoding helpers

    @torch.no_grad()
    def idxBl_to_fhat(self, idx_Bl: list[torch.Tensor], patch_nums=None, phi_at_last: bool = True) -> torch.Tensor:
        """f_hat = sum over the given (first len(idx_Bl)) scales of their contributions.

        phi_at_last=True matches the training forward / discrete reconstruction and the official
        `idxBl_to_fhat(same_shape=True, last_one=True)`; False matches HART's AR sampler (no Phi at the last scale).
        """
        grids = self._grids(patch_nums)
        S, size = len(grids), grids[-1]
        f_hat = torch.zeros(idx_Bl[0].shape[0], self.Cvae, *size, device=idx_Bl[0].device, dtype=torch.float32)
        for si, idx in enumerate(idx_Bl):
            # same layout handling as the official embed_to_fhat, so the result matches it bit for bit
            h_BChw = self._embed_up(idx, grids[si], size, contiguous=False)
            f_hat.add_(self.phi(si, S)(h_BChw) if phi_at_last or si != S - 1 else h_BChw)
        return f_hat

    @torch.no_grad()
    def idxBl_to_var_input(self, idx_Bl: list[torch.Tensor], patch_nums=None) -> torch.Tensor:
        """Teacher-forcing input of the transformer (VQ:326-363): (B, sum(h*w) - h_0*w_0, C).

        For si = 0..S-2, f_hat accumulates Phi_si(up(e[idx_si])) and is area-downsampled to scale si+1's grid.
        """
        grids = self._grids(patch_nums)
        S, size = len(grids), grids[-1]
        B = idx_Bl[0].shape[0]
        f_hat = torch.zeros(B, self.Cvae, *size, device=idx_Bl[0].device, dtype=torch.float32)
        next_scales = []
        for si in range(S - 1):
            # in place, so f_hat keeps its contiguous layout (the layout decides the area-pool's rounding)
            f_hat.add_(self.phi(si, S)(self._embed_up(idx_Bl[si], grids[si], size, contiguous=False)))
            next_BCl = F.interpolate(f_hat, size=grids[si + 1], mode="area").reshape(B, self.Cvae, -1)
            next_scales.append(next_BCl.transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    @torch.no_grad()
    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor, patch_nums=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """AR sampling step (HQ:183-207): add scale si's embedded tokens h_BChw (B, C, h, w) to f_hat in place.

        Returns (f_hat, next input): the area-downsampled f_hat for scale si+1's grid, or f_hat itself after
        the last scale, which is added without Phi and without upsampling (h_BChw is already full size
        there). A bucket's sampler passes its schedule as `patch_nums`.
        """
        grids = self._grids(patch_nums)
        if si != SN - 1:
            f_hat.add_(self.phi(si, SN)(F.interpolate(h_BChw, size=grids[-1], mode="bicubic")))
            return f_hat, F.interpolate(f_hat, size=grids[si + 1], mode="area")
        f_hat.add_(h_BChw)
        return f_hat, f_hat

    # ------------------------------------------------------------------------- loading

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # HART's rule (AE:316-323): a checkpoint trained with another number of scales keeps our own buffer
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.ema_vocab_hit_SV.shape:
            state_dict[key] = self.ema_vocab_hit_SV.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
