"""Tokenizer training losses: reconstruction, VQ, perceptual (LPIPS-style), PatchGAN hinge, codebook upkeep.

What the released HART code trains with is only MSE + VQ loss (anatomy §3.2); the perceptual and GAN terms
follow VQGAN/taming (VAR's tokenizer recipe), each switchable by config:

- reconstruction: mean L1 or L2 over pixels, weight `recon_weight`.
- perceptual: an LPIPS-style distance over a VGG16-layout conv net built here. Its weights come ONLY from a
  local file (`perceptual_weights_path`, .pt/.pth via torch.load(weights_only=True) or .safetensors), never a
  download; no path = no perceptual term. The file holds `features.{i}.{weight,bias}` (torchvision vgg16's
  `features` indices, so its state dict maps 1:1) and `lins.{k}.weight` (1, C_k, 1, 1) (LPIPS's `lin{k}.model.1.weight`).
  distance = sum_k mean_hw( lins_k( (n(phi_k(x)) - n(phi_k(y)))^2 ) ), n = unit-normalise over channels,
  taps after the last ReLU of each stage, inputs shifted/scaled with LPIPS's constants. Negative lin weights
  are clamped at 0 so the distance is >= 0 (trained LPIPS weights are non-negative already).
- GAN: hinge losses; the generator term is weighted by VQGAN's adaptive weight
  ||grad_last nll|| / (||grad_last g|| + 1e-4), clamped to [0, adaptive_weight_max], times `disc_weight`, and is 0
  before `disc_start_step` (the discriminator loss is multiplied by 0 there too, keeping its graph).
- codebook usage: perplexity and used fraction from indices; `DeadCodeTracker` restarts codes unused for
  `dead_code_steps` consecutive steps (see its docstring for what the trainer must do under data parallel).

Shape legend: B batch, C channels, H/W image size, V vocabulary, N rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.quantizer import MultiScaleQuantizer


@dataclass
class TokenizerLossConfig:
    recon_loss: str = "l2"  # "l1" | "l2"
    recon_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_weights_path: str | None = None  # local file; None turns the perceptual term off
    perceptual_widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # VGG16
    perceptual_convs: tuple[int, ...] = (2, 2, 3, 3, 3)
    disc_weight: float = 0.5
    disc_start_step: int = 0
    adaptive_weight_max: float = 1e4
    dead_code_steps: int = 0  # restart codes unused for this many steps; 0 = off

    def __post_init__(self) -> None:
        self.perceptual_widths = tuple(self.perceptual_widths)
        self.perceptual_convs = tuple(self.perceptual_convs)
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"TokenizerLossConfig.recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        for name in ("recon_weight", "perceptual_weight", "disc_weight", "adaptive_weight_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"TokenizerLossConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("disc_start_step", "dead_code_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TokenizerLossConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if len(self.perceptual_widths) != len(self.perceptual_convs) or not self.perceptual_widths:
            raise ValueError("TokenizerLossConfig.perceptual_widths and perceptual_convs must be non-empty and of equal length")
        if any(w < 1 for w in self.perceptual_widths) or any(c < 1 for c in self.perceptual_convs):
            raise ValueError("TokenizerLossConfig.perceptual_widths / perceptual_convs must be positive")


# --------------------------------------------------------------------------------- simple terms


def reconstruction_loss(rec: torch.Tensor, img: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    if kind == "l1":
        return (rec - img).abs().mean()
    if kind == "l2":
        return F.mse_loss(rec, img)
    raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance: ||d nll / d W_last|| / (||d g / d W_last|| + 1e-4), clamped, detached.

    Returns 0 when no gradient can be taken (no grad mode, or the last layer is frozen).
    """
    if not (torch.is_grad_enabled() and last_layer.requires_grad and g_loss.requires_grad and nll_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------- perceptual


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on a VGG-layout net; frozen, eval mode, weights from a local file only."""

    def __init__(self, weights_path: str | Path, widths=(64, 128, 256, 512, 512), convs=(2, 2, 3, 3, 3)):
        super().__init__()
        layers: list[nn.Module] = []
        self.tap_indices: list[int] = []  # index in `features` of the ReLU closing each stage
        c_in = 3
        for stage, (width, num_convs) in enumerate(zip(widths, convs)):
            if stage > 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            for _ in range(num_convs):
                layers += [nn.Conv2d(c_in, width, kernel_size=3, padding=1), nn.ReLU()]
                c_in = width
            self.tap_indices.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(w, 1, kernel_size=1, bias=False) for w in widths)
        # LPIPS's input scaling constants (inputs in [-1, 1])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self._load(Path(weights_path))
        self.requires_grad_(False)
        self.eval()

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"perceptual weights {path} do not match the configured net: {e}") from e

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # always eval: a fixed metric network

    def _taps(self, x_B3HW: torch.Tensor) -> list[torch.Tensor]:
        h = (x_B3HW - self.shift) / self.scale
        taps = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.tap_indices:
                taps.append(h)
        return taps

    def forward(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        """Per-image distance (B,), inputs in [-1, 1]."""
        dist = x_B3HW.new_zeros(x_B3HW.shape[0])
        for lin, fx, fy in zip(self.lins, self._taps(x_B3HW), self._taps(y_B3HW)):
            nx = fx / (fx.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = F.conv2d((nx - ny).square(), lin.weight.clamp(min=0))
            dist = dist + d.mean(dim=(1, 2, 3))
        return dist


# --------------------------------------------------------------------------------- criterion


class TokenizerCriterion(nn.Module):
    """All tokenizer loss terms; the loss dicts are what the trainer logs and back-propagates.

    Not a part of the checkpointed model: it holds no trainable state (the perceptual net is frozen and
    reloaded from its file).
    """

    def __init__(self, cfg: TokenizerLossConfig):
        super().__init__()
        self.cfg = cfg
        self.perceptual = (
            PerceptualLoss(cfg.perceptual_weights_path, cfg.perceptual_widths, cfg.perceptual_convs)
            if cfg.perceptual_weights_path and cfg.perceptual_weight > 0
            else None
        )

    def gan_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start_step

    def generator_losses(
        self, img: torch.Tensor, rec: torch.Tensor, vq_loss: torch.Tensor, disc: nn.Module, last_layer: torch.Tensor, step: int
    ) -> dict:
        """Keys: loss (total to back-propagate into the VAE), recon, perceptual, vq, gan_g, gan_weight."""
        cfg = self.cfg
        recon = reconstruction_loss(rec, img, cfg.recon_loss)
        zero = rec.new_zeros(())
        perceptual = self.perceptual(rec, img).mean() if self.perceptual is not None else zero
        nll = cfg.recon_weight * recon + cfg.perceptual_weight * perceptual
        if self.gan_active(step):
            gan_g = hinge_g_loss(disc(rec))
            gan_weight = cfg.disc_weight * adaptive_gan_weight(nll, gan_g, last_layer, cfg.adaptive_weight_max)
        else:
            gan_g, gan_weight = zero, zero
        total = nll + gan_weight * gan_g + vq_loss
        return {"loss": total, "recon": recon, "perceptual": perceptual, "vq": vq_loss, "gan_g": gan_g, "gan_weight": gan_weight}

    def discriminator_losses(self, img: torch.Tensor, rec_detached: torch.Tensor, disc: nn.Module, step: int) -> dict:
        """Keys: loss (hinge, times 0 before disc_start_step), logits_real, logits_fake (batch means)."""
        logits_real = disc(img.detach())
        logits_fake = disc(rec_detached.detach())
        factor = 1.0 if self.gan_active(step) else 0.0
        return {
            "loss": factor * hinge_d_loss(logits_real, logits_fake),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }


# --------------------------------------------------------------------------------- codebook usage


def code_hits(idx_Bl: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(V,) float counts of every code over all scales and the batch."""
    flat = torch.cat([idx.flatten() for idx in idx_Bl])
    return flat.bincount(minlength=vocab_size).float()


def codebook_usage(idx_Bl: list[torch.Tensor], vocab_size: int) -> dict:
    """perplexity = exp(entropy of the code histogram); used_fraction = share of codes hit at least once."""
    hits_V = code_hits(idx_Bl, vocab_size)
    probs = hits_V / hits_V.sum()
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"perplexity": float(entropy.exp()), "used_fraction": float((hits_V > 0).float().mean())}


class DeadCodeTracker:
    """Counts, per code, the steps since it was last hit, and restarts codes dead for `dead_after_steps`.

    Rule: after each training step, `step(hit_V, quantizer, latents_NC, generator)`; every code with
    `dead_after_steps` or more consecutive steps without a hit is set to a random row of `latents_NC` (encoder
    latents of the current batch, (N, Cvae), e.g. `out["latent_BChw"].permute(0, 2, 3, 1).reshape(-1, C)`),
    and its counter restarts at 0. The trainer must, under data parallel:
      1. all-reduce (sum) `hit_V = code_hits(idx_Bl, V)` so every rank sees the same hits;
      2. pass the same `latents_NC` on every rank (all-gather them, or use rank 0's and broadcast);
      3. use a CPU torch.Generator seeded identically on every rank (and checkpoint its state);
      4. save/restore `state_dict()` with the run (it is not part of the model's state dict);
      5. reset the optimizer state (Adam moments) of the restarted rows if it wants a clean restart.
    Then every rank writes the same codebook and no extra synchronisation is needed.
    """

    def __init__(self, vocab_size: int, dead_after_steps: int):
        if dead_after_steps < 1:
            raise ValueError(f"dead_after_steps must be >= 1, got {dead_after_steps}")
        self.vocab_size = vocab_size
        self.dead_after_steps = dead_after_steps
        self.steps_since_hit_V = torch.zeros(vocab_size, dtype=torch.long)

    def update(self, hit_V: torch.Tensor) -> torch.Tensor:
        """Record one step's hits; returns the (V,) bool mask of dead codes."""
        hit = hit_V.detach().cpu() > 0
        self.steps_since_hit_V = torch.where(hit, torch.zeros_like(self.steps_since_hit_V), self.steps_since_hit_V + 1)
        return self.steps_since_hit_V >= self.dead_after_steps

    def step(self, hit_V: torch.Tensor, quantizer: MultiScaleQuantizer, latents_NC: torch.Tensor, generator: torch.Generator) -> int:
        dead_V = self.update(hit_V)
        num_restarted = quantizer.restart_codes(dead_V, latents_NC, generator)
        self.steps_since_hit_V[dead_V] = 0
        return num_restarted

    def state_dict(self) -> dict:
        return {"steps_since_hit_V": self.steps_since_hit_V.clone(), "dead_after_steps": self.dead_after_steps}

    def load_state_dict(self, state: dict) -> None:
        steps = state["steps_since_hit_V"]
        if steps.shape != (self.vocab_size,):
            raise ValueError(f"DeadCodeTracker state has {tuple(steps.shape)} codes, expected ({self.vocab_size},)")
        self.steps_since_hit_V = steps.clone().long()
        self.dead_after_steps = int(state["dead_after_steps"])

