"""HART's hybrid tokenizer: `HARTAutoEncoder` (VQ-VAE + hybrid quantizer) and `HARTAutoEncoderWithDisc`.

Weight compatibility: `HARTAutoEncoderWithDisc.state_dict()` has exactly the official keys and shapes
(`vae.encoder.*`, `vae.decoder.*`, `vae.quant_conv.*`, `vae.post_quant_conv.*`, `vae.quantize.*` incl. the
`ema_vocab_hit_SV` buffer, `disc.main.*`; anatomy §3.3), so official weights load with strict=True and ours
load into the official classes. Nothing else (losses, perceptual net, usage trackers) lives in these modules.

`TokenizerConfig` is a plain dataclass (the YAML config embeds it); `tokenizer_config(name)` gives the presets.
Pixels are in [-1, 1]. The image side must be 2**(len(ch_mult)-1) * patch_nums[-1] (16 * 16 = 256 for hart-256).
Non-square images: every `patch_nums` argument below also takes an aspect-ratio bucket's schedule of (h, w)
grids (see quantizer.py); the image is then 16H x 16W px for the last grid (H, W), e.g.
`img_to_idxBl_and_frest(img_B3HW, patch_nums=schedule)`, `idxBl_to_var_input(idx_Bl, schedule)`,
`get_next_autoregressive_input(si, S, f_hat, h, patch_nums=schedule)`. The convolutions take any size.

Shape legend: B batch, C channels (Cvae for latents), H/W image size, h/w latent size, L tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tokenizer.discriminator import NLayerDiscriminator
from tokenizer.quantizer import MultiScaleQuantizer
from tokenizer.vqvae import Decoder, Encoder

PATCH_NUMS_BY_RESOLUTION: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    dropout: float = 0.0
    beta: float = 0.25  # commitment weight
    quant_resi: float = 0.5  # Phi(h) = (1 - r) h + r conv(h)
    share_quant_resi: int = 4  # number of shared Phi convs (0: one per scale, 1: a single one)
    patch_nums: tuple[int, ...] = PATCH_NUMS_BY_RESOLUTION[256]
    quant_conv_ks: int = 3
    using_znorm: bool = False
    # hybrid: probability that the decoder gets the discrete-only f_hat (1.0 = plain VQ-VAE, paper: 0.5)
    skip_continuous_prob: float = 0.5
    disc_ndf: int = 64
    disc_n_layers: int = 3

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.patch_nums = tuple(self.patch_nums)
        positive_ints = {
            "vocab_size": self.vocab_size,
            "z_channels": self.z_channels,
            "ch": self.ch,
            "quant_conv_ks": self.quant_conv_ks,
            "disc_ndf": self.disc_ndf,
            "disc_n_layers": self.disc_n_layers,
        }
        for name, value in positive_ints.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TokenizerConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"TokenizerConfig.vocab_size must be >= 2, got {self.vocab_size}")
        if self.quant_conv_ks % 2 != 1:
            raise ValueError(f"TokenizerConfig.quant_conv_ks must be odd, got {self.quant_conv_ks}")
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise ValueError(f"TokenizerConfig.ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        pn = self.patch_nums
        if not pn or any(not isinstance(p, int) or p < 1 for p in pn) or any(a >= b for a, b in zip(pn, pn[1:])):
            raise ValueError(f"TokenizerConfig.patch_nums must be strictly increasing positive ints, got {pn!r}")
        if len(pn) < 2:
            raise ValueError(f"TokenizerConfig.patch_nums needs at least 2 scales, got {pn!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TokenizerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.beta < 0:
            raise ValueError(f"TokenizerConfig.beta must be >= 0, got {self.beta}")
        if not 0.0 <= self.quant_resi <= 1.0:
            raise ValueError(f"TokenizerConfig.quant_resi must be in [0, 1], got {self.quant_resi}")
        if not isinstance(self.share_quant_resi, int) or self.share_quant_resi < 0:
            raise ValueError(f"TokenizerConfig.share_quant_resi must be an int >= 0, got {self.share_quant_resi!r}")
        if not 0.0 <= self.skip_continuous_prob <= 1.0:
            raise ValueError(f"TokenizerConfig.skip_continuous_prob must be in [0, 1], got {self.skip_continuous_prob}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.downsample * self.patch_nums[-1]


_TINY = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), patch_nums=(1, 2, 4), disc_ndf=8, disc_n_layers=2)
TOKENIZER_PRESETS: dict[str, dict] = {
    "hart-256": dict(patch_nums=PATCH_NUMS_BY_RESOLUTION[256]),
    "hart-512": dict(patch_nums=PATCH_NUMS_BY_RESOLUTION[512]),
    "hart-1024": dict(patch_nums=PATCH_NUMS_BY_RESOLUTION[1024]),
    "tiny": _TINY,  # 16 px images, 4x4 latent, trains in well under a second per step on CPU
}


def tokenizer_config(name: str, **overrides) -> TokenizerConfig:
    if name not in TOKENIZER_PRESETS:
        raise ValueError(f"unknown tokenizer preset {name!r}; choose from {sorted(TOKENIZER_PRESETS)}")
    return TokenizerConfig(**{**TOKENIZER_PRESETS[name], **overrides})


class HARTAutoEncoder(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.Cvae = cfg.z_channels
        self.encoder = Encoder(ch=cfg.ch, ch_mult=cfg.ch_mult, z_channels=cfg.z_channels, dropout=cfg.dropout)
        self.decoder = Decoder(ch=cfg.ch, ch_mult=cfg.ch_mult, z_channels=cfg.z_channels, dropout=cfg.dropout)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, stride=1, padding=ks // 2)
        self.quantize = MultiScaleQuantizer(
            vocab_size=cfg.vocab_size,
            Cvae=cfg.z_channels,
            patch_nums=cfg.patch_nums,
            beta=cfg.beta,
            quant_resi=cfg.quant_resi,
            share_quant_resi=cfg.share_quant_resi,
            using_znorm=cfg.using_znorm,
        )

    # ------------------------------------------------------------------ training forward

    def forward(
        self,
        img_B3HW: torch.Tensor,
        skip_continuous_prob: float | None = None,
        patch_nums=None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """Training forward (AE:131-153). Returns
        rec (B,3,H,W) unclamped, vq_loss (scalar), idx_Bl (per-scale (B, pn*pn)), latent_BChw (the detached
        quant_conv output, e.g. for dead-code restarts), used_continuous (bool).
        skip_continuous_prob defaults to cfg.skip_continuous_prob.
        """
        p = self.cfg.skip_continuous_prob if skip_continuous_prob is None else skip_continuous_prob
        f_BChw = self.img_to_latent(img_B3HW)
        q = self.quantize(f_BChw, patch_nums=patch_nums, skip_continuous_prob=p, generator=generator)
        rec = self.decoder(self.post_quant_conv(q.f_hat.to(self.dtype)))
        return {
            "rec": rec,
            "vq_loss": q.vq_loss,
            "idx_Bl": q.idx_Bl,
            "latent_BChw": f_BChw.detach(),
            "used_continuous": q.used_continuous,
        }

    def freeze_for_hybrid(self) -> None:
        """HART's hybrid stage (AE:113-122): encoder, quant_conv and quantizer (codebook + Phi) frozen."""
        for module in (self.encoder, self.quant_conv, self.quantize):
            module.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the convolutions compute in (their weights'): images and latents are cast to it where
        they enter; the quantizer works in fp32 (`MultiScaleQuantizer.codebook`), decoded images leave in fp32."""
        return self.quant_conv.weight.dtype

    # ------------------------------------------------------------------ encode / decode

    def img_to_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(img_B3HW.to(self.dtype)))

    @torch.no_grad()
    def img_to_idxBl(self, img_B3HW: torch.Tensor, patch_nums=None) -> list[torch.Tensor]:
        return self.quantize.f_to_idxBl(self.img_to_latent(img_B3HW), patch_nums)

    @torch.no_grad()
    def img_to_idxBl_and_frest(self, img_B3HW: torch.Tensor, patch_nums=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Tokens for AR training: ([idx (B, pn*pn) per scale], last-scale residual (B, h*w, Cvae))."""
        return self.quantize.f_to_idxBl_and_frest(self.img_to_latent(img_B3HW), patch_nums)

    def idxBl_to_var_input(self, idx_Bl: list[torch.Tensor], patch_nums=None) -> torch.Tensor:
        return self.quantize.idxBl_to_var_input(idx_Bl, patch_nums)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor, patch_nums=None):
        return self.quantize.get_next_autoregressive_input(si, SN, f_hat, h_BChw, patch_nums)

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat_BChw.to(self.dtype))).clamp(-1, 1).float()

    @torch.no_grad()
    def idxBl_to_img(self, idx_Bl: list[torch.Tensor], patch_nums=None, phi_at_last: bool = True) -> torch.Tensor:
        return self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_Bl, patch_nums, phi_at_last=phi_at_last))

    @torch.no_grad()
    def img_to_reconstructed_img(self, img_B3HW: torch.Tensor, continuous: bool, patch_nums=None) -> torch.Tensor:
        """Reconstruction in [-1, 1]: discrete-only (all S scales, Phi at the last one, as the official
        `img_to_reconstructed_img(last_one=True)`) or continuous (the decoder on the exact latent)."""
        f_BChw = self.img_to_latent(img_B3HW)
        if continuous:
            return self.fhat_to_img(f_BChw)
        return self.fhat_to_img(self.quantize.f_to_idxBl_and_fhat(f_BChw, patch_nums)[1])


class HARTAutoEncoderWithDisc(nn.Module):
    """The checkpointed unit: `vae` (HARTAutoEncoder) + `disc` (PatchGAN), keys `vae.*` / `disc.*`.

    It has no forward of its own: inference uses `vae`; training runs the tokenizer stage's subclass
    (`hart_train.stages.tokenizer_stage.TokenizerTrainModule`), whose forward returns the loss terms of
    `tokenizer.losses.TokenizerCriterion`.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = HARTAutoEncoder(cfg)
        self.disc = NLayerDiscriminator(in_channels=3, ndf=cfg.disc_ndf, n_layers=cfg.disc_n_layers)


_OFFICIAL_CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "z_channels": "z_channels",
    "ch": "ch",
    "ch_mult": "ch_mult",
    "dropout": "dropout",
    "beta": "beta",
    "using_znorm": "using_znorm",
    "quant_conv_ks": "quant_conv_ks",
    "quant_resi": "quant_resi",
    "share_quant_resi": "share_quant_resi",
    "v_patch_nums": "patch_nums",
}


def config_from_official(official: dict, **overrides) -> TokenizerConfig:
    """TokenizerConfig from an official `HARTAutoEncoderConfig` dict (its config.json); other keys are ignored."""
    if official.get("double_decoder"):
        raise ValueError("official config has double_decoder=True, which this implementation does not support")
    fields = {ours: official[theirs] for theirs, ours in _OFFICIAL_CONFIG_KEYS.items() if theirs in official}
    return TokenizerConfig(**{**fields, **overrides})


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors or torch file (torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def vae_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `vae.*` part of a HARTAutoEncoderWithDisc state dict with the prefix removed (unchanged if unprefixed)."""
    if not any(k.startswith("vae.") for k in state_dict):
        return dict(state_dict)
    return {k[len("vae.") :]: v for k, v in state_dict.items() if k.startswith("vae.")}


def config_to_dict(cfg: TokenizerConfig) -> dict:
    """Plain-python dict of the config (tuples as lists), for YAML / checkpoint client state."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
