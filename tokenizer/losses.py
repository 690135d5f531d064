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
- GAN: PatchGAN hinge losses, trained in the same backward as the VAE (`TokenizerCriterion.forward`): the
  discriminator's loss sees the reconstruction detached, so it moves only the discriminator; the generator's
  adversarial term enters the VAE at the reconstruction (`generator_gan_term`), so it moves only the VAE.
  Before `disc_start_step` neither term exists and the discriminator is not run. The adversarial term's
  weight is VQGAN's balance taken at the reconstruction instead of at the decoder's last weight
  (`adaptive_gan_weight`, and `generator_gan_term` for why).
- codebook usage: perplexity and used fraction from the code hits; `DeadCodeTracker` finds codes unused for
  `dead_code_steps` consecutive steps and `restart_codes` re-initialises them from encoder latents.

Shape legend: B batch, C channels, H/W image size, V vocabulary, N rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


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


def adaptive_gan_weight(grad_nll: torch.Tensor, grad_g: torch.Tensor, max_weight: float) -> torch.Tensor:
    """||grad_nll|| / (||grad_g|| + 1e-4), clamped to [0, max_weight], detached: the balance of the adversarial
    term against the reconstruction loss, from their gradients with respect to the reconstruction.

    VQGAN's rule is the same ratio of the gradients with respect to the decoder's last weight
    (`decoder.conv_out.weight`), times `disc_weight`; here they are taken one step later, with respect to
    that layer's output `rec`. The two are different numbers: d/dW is d/drec contracted with the last
    layer's input activations, which need not scale both gradients alike. Both weigh how hard the two losses
    pull on the decoder's output, with the same 1e-4, clamp and `disc_weight`. Why at `rec`:
    `generator_gan_term`.
    """
    return (grad_nll.norm() / (grad_g.norm() + 1e-4)).clamp(0, max_weight).detach()


def generator_gan_term(gan_g: torch.Tensor, nll: torch.Tensor, rec: torch.Tensor, disc_weight: float,
                       max_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(term, weight): the generator's adversarial loss for a backward that also trains the discriminator.

    `gan_g` = hinge_g_loss(disc(rec)) and `nll` are functions of `rec`, the decoder's output. The term's value
    is weight * gan_g (what is logged); its gradient is weight * g with g = d gan_g / d rec, and it enters
    the graph at `rec`: g is taken with `torch.autograd.grad` (which fills no `.grad`, so the discriminator
    gets nothing from it and no ZeRO reduction hook fires) and reaches the VAE through the surrogate
    sum(rec * g), whose gradient with respect to rec is exactly g. So one backward trains the VAE on
    nll + weight * gan_g and the discriminator on its own loss only.

    weight = disc_weight * adaptive_gan_weight(d nll / d rec, g, max_weight), on this rank's micro-batch,
    in fp32. Measuring the balance at `rec` rather than at the decoder's last weight reuses g, which the
    surrogate needs anyway, costs one more `autograd.grad` through the loss terms only, and names no
    parameter, so it does not depend on how ZeRO holds or reduces the decoder's weights (under ZeRO-3 the
    last weight is an empty placeholder except while DeepSpeed holds it gathered).
    """
    (grad_g,) = torch.autograd.grad(gan_g, rec, retain_graph=True)
    (grad_nll,) = torch.autograd.grad(nll, rec, retain_graph=True)
    grad_g, grad_nll = grad_g.float(), grad_nll.float()
    weight = disc_weight * adaptive_gan_weight(grad_nll, grad_g, max_weight)
    surrogate = (rec.float() * grad_g).sum()
    return weight * (gan_g.detach() + surrogate - surrogate.detach()), weight


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
    """All tokenizer loss terms of one training step (`forward`).

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
        """Whether the GAN terms are on at `step` (0-based: the step after `step` completed ones)."""
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start_step

    def forward(self, img: torch.Tensor, rec: torch.Tensor, vq_loss: torch.Tensor, disc: nn.Module,
                with_gan: bool) -> dict:
        """`loss` (to back-propagate) and the detached scalars recon, perceptual, vq and, `with_gan`, gan_g,
        gan_weight, gan_d, logits_real, logits_fake (batch means).

        loss = nll + vq_loss [+ generator term + gan_d], nll = recon_weight * recon + perceptual_weight *
        perceptual. Without the GAN the discriminator is not run (it gets no gradient and its BatchNorm
        statistics do not move). `rec` is in the VAE's dtype; every term is computed in fp32.
        """
        cfg = self.cfg
        recon = reconstruction_loss(rec.float(), img, cfg.recon_loss)
        zero = img.new_zeros(())
        perceptual = self.perceptual(rec.float(), img).mean() if self.perceptual is not None else zero
        nll = cfg.recon_weight * recon + cfg.perceptual_weight * perceptual
        loss = nll + vq_loss
        terms = {"recon": recon.detach(), "perceptual": perceptual.detach(), "vq": vq_loss.detach()}
        if with_gan:
            gan_g = hinge_g_loss(disc(rec).float())
            generator_term, weight = generator_gan_term(gan_g, nll, rec, cfg.disc_weight, cfg.adaptive_weight_max)
            # the discriminator sees the reconstruction detached: its loss moves only the discriminator
            logits = disc(torch.cat([img.to(rec.dtype), rec.detach()])).float()
            real, fake = logits.chunk(2)
            gan_d = hinge_d_loss(real, fake)
            terms.update(gan_g=gan_g.detach(), gan_weight=weight, gan_d=gan_d.detach(),
                         logits_real=real.detach().mean(), logits_fake=fake.detach().mean())
            loss = loss + (generator_term + gan_d)
        terms["loss"] = loss
        return terms


# --------------------------------------------------------------------------------- codebook usage


def code_hits(idx_Bl: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(V,) float counts of every code over all scales and the batch."""
    flat = torch.cat([idx.flatten() for idx in idx_Bl])
    return flat.bincount(minlength=vocab_size).float()


def codebook_usage(hits_V: torch.Tensor) -> dict:
    """perplexity = exp(entropy of the code histogram `hits_V`); used_fraction = share of codes hit at least once."""
    probs = hits_V / hits_V.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"perplexity": float(entropy.exp()), "used_fraction": float((hits_V > 0).float().mean())}


class DeadCodeTracker:
    """Counts, per code, the steps since it was last hit; `update` returns the codes dead for `dead_after_steps`.

    The tokenizer stage calls `update` after each optimizer step with the hits summed over all ranks, so every
    rank sees the same dead codes; it restarts them with `restart_codes` (rank 0's latents, a generator
    seeded by (seed, step)) and checkpoints `state_dict()` with the run (it is not part of the model).
    """

    def __init__(self, vocab_size: int, dead_after_steps: int):
        if dead_after_steps < 1:
            raise ValueError(f"dead_after_steps must be >= 1, got {dead_after_steps}")
        self.vocab_size = vocab_size
        self.dead_after_steps = dead_after_steps
        self.steps_since_hit_V = torch.zeros(vocab_size, dtype=torch.long)

    def update(self, hit_V: torch.Tensor) -> torch.Tensor:
        """Record one step's hits; returns the (V,) bool mask of the codes unused for `dead_after_steps`
        consecutive steps, which are to be restarted now: their counters start again at 0."""
        hit = hit_V.detach().cpu() > 0
        self.steps_since_hit_V = torch.where(hit, torch.zeros_like(self.steps_since_hit_V), self.steps_since_hit_V + 1)
        dead_V = self.steps_since_hit_V >= self.dead_after_steps
        self.steps_since_hit_V[dead_V] = 0
        return dead_V

    def state_dict(self) -> dict:
        return {"steps_since_hit_V": self.steps_since_hit_V.clone(), "dead_after_steps": self.dead_after_steps}

    def load_state_dict(self, state: dict) -> None:
        steps = state["steps_since_hit_V"]
        if steps.shape != (self.vocab_size,):
            raise ValueError(f"DeadCodeTracker state has {tuple(steps.shape)} codes, expected ({self.vocab_size},)")
        self.steps_since_hit_V = steps.clone().long()
        self.dead_after_steps = int(state["dead_after_steps"])


@torch.no_grad()
def restart_codes(codebook_VC: torch.Tensor, dead_V: torch.Tensor, latents_NC: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """In place: every code v with dead_V[v] becomes a row of `latents_NC` (encoder latents, (N, C)), drawn
    uniformly with replacement by torch.randint on `generator` (a CPU generator); other codes are untouched.
    Returns the restarted code indices. The same inputs and generator state give the same codebook, which is
    how every rank writes the same one."""
    if latents_NC.ndim != 2 or latents_NC.shape[1] != codebook_VC.shape[1] or latents_NC.shape[0] == 0:
        raise ValueError(f"latents_NC must be (N>0, {codebook_VC.shape[1]}), got {tuple(latents_NC.shape)}")
    dead_idx = torch.nonzero(dead_V).flatten()
    rows = torch.randint(latents_NC.shape[0], (dead_idx.numel(),), generator=generator)
    codebook_VC[dead_idx] = latents_NC[rows].to(codebook_VC)
    return dead_idx
