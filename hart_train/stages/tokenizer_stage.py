"""The tokenizer stages (`tokenizer-vq`, `tokenizer-hybrid`) on the shared runtime.

One DeepSpeed engine trains one module holding `vae` and `disc` (exactly the official
`HARTAutoEncoderWithDisc` keys), so ZeRO sharding, checkpointing and resume are the runtime's, not a
second trainer's. GAN training in a single backward needs two things kept apart:

* the discriminator's hinge loss sees the reconstruction detached, so it only moves `disc`;
* the generator's adversarial term must move the VAE but not `disc`. Its gradient with respect to the
  reconstruction, g = d(-D(rec))/d(rec), is taken with `torch.autograd.grad` (which fills no `.grad`
  and fires no ZeRO reduction hook), and the VAE receives it through the surrogate `sum(rec * g)`,
  whose gradient is exactly g.

VQGAN's adaptive weight ||grad nll|| / ||grad g|| is measured with respect to the reconstruction (the
decoder's output) instead of the decoder's last weight: under ZeRO-3 that weight is a partitioned
placeholder outside the forward. Both are the same ratio up to the last layer's Jacobian.

Dead-code restarts (optional) run after the optimizer step on every rank with all-reduced hits and rank
0's latents, so all ranks write the same codebook (see `tokenizer.losses.DeadCodeTracker`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from data_tools.reader import ReaderConfig, StreamingReader
from data_tools.samples import to_unit_range
from hart_train import distributed as D
from hart_train import zero_utils
from tokenizer.autoencoder import HARTAutoEncoder
from tokenizer.discriminator import NLayerDiscriminator
from tokenizer.losses import (DeadCodeTracker, TokenizerCriterion, code_hits, hinge_d_loss, hinge_g_loss,
                              reconstruction_loss)
from tokenizer.metrics import psnr, ssim


class TokenizerTrainModule(nn.Module):
    """`vae` + `disc` with the official key names; forward returns the loss terms of one step."""

    def __init__(self, stage_cfg, skip_continuous_prob: float):
        super().__init__()
        self.vae = HARTAutoEncoder(stage_cfg.model)
        self.disc = NLayerDiscriminator(in_channels=3, ndf=stage_cfg.model.disc_ndf,
                                        n_layers=stage_cfg.model.disc_n_layers)
        self.loss_cfg = stage_cfg.loss
        self.skip_continuous_prob = skip_continuous_prob
        # the perceptual net is frozen and reloaded from its file: keep it out of the state dict
        self._criterion = (TokenizerCriterion(stage_cfg.loss),)

    def forward(self, image: torch.Tensor, step: int, generator: torch.Generator) -> dict:
        img = image
        cfg, criterion = self.loss_cfg, self._criterion[0]
        out = self.vae(img, skip_continuous_prob=self.skip_continuous_prob, generator=generator)
        rec = out["rec"]  # in the VAE's dtype; every loss term is computed in fp32
        recon = reconstruction_loss(rec.float(), img, cfg.recon_loss)
        zero = img.new_zeros(())
        perceptual = criterion.perceptual(rec.float(), img).mean() if criterion.perceptual is not None else zero
        nll = cfg.recon_weight * recon + cfg.perceptual_weight * perceptual
        loss = nll + out["vq_loss"]
        terms = {"recon": recon.detach(), "perceptual": perceptual.detach(), "vq": out["vq_loss"].detach()}
        if criterion.gan_active(step) and self.training:
            loss = loss + self._gan_terms(img, rec, nll, terms)
        terms["loss"] = loss
        terms["idx_Bl"] = out["idx_Bl"]
        terms["latent_BChw"] = out["latent_BChw"]
        return terms

    def _gan_terms(self, img, rec, nll, terms: dict) -> torch.Tensor:
        cfg = self.loss_cfg
        gan_g = hinge_g_loss(self.disc(rec).float())
        (grad_g,) = torch.autograd.grad(gan_g, rec, retain_graph=True)
        (grad_nll,) = torch.autograd.grad(nll, rec, retain_graph=True)
        grad_g, grad_nll = grad_g.float(), grad_nll.float()
        weight = (grad_nll.norm() / (grad_g.norm() + 1e-4)).clamp(0, cfg.adaptive_weight_max).detach()
        weight = cfg.disc_weight * weight
        # value: weight * gan_g (what is logged); gradient: weight * grad_g into the VAE only
        surrogate = (rec.float() * grad_g).sum()
        generator_term = weight * (gan_g.detach() + surrogate - surrogate.detach())
        logits = self.disc(torch.cat([img.to(rec.dtype), rec.detach()])).float()
        real, fake = logits.chunk(2)
        gan_d = hinge_d_loss(real, fake)
        terms.update(gan_g=gan_g.detach(), gan_weight=weight, gan_d=gan_d.detach(),
                     logits_real=real.detach().mean(), logits_fake=fake.detach().mean())
        return generator_term + gan_d


class TokenizerStage:
    # the tokenizer (109M parameters at full size, ZeRO-2 in its recipes) is built whole on every rank;
    # its initialisers are not written for partitioned construction
    partitioned_construction = False

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.stage_cfg = cfg.tokenizer
        self.device = device
        self.hybrid = cfg.stage == "tokenizer-hybrid"
        self.generator = D.generator(device)
        loss_cfg = self.stage_cfg.loss
        self.dead_codes = (DeadCodeTracker(self.stage_cfg.model.vocab_size, loss_cfg.dead_code_steps)
                           if loss_cfg.dead_code_steps > 0 else None)
        self._last_outputs: dict = {}
        self._log: dict = {}
        self._eval_batches: list | None = None

    # -------------------------------------------------------------- model
    def build_model(self) -> nn.Module:
        p = self.stage_cfg.model.skip_continuous_prob if self.hybrid else 1.0
        module = TokenizerTrainModule(self.stage_cfg, skip_continuous_prob=p)
        if self.hybrid:
            module.vae.freeze_for_hybrid()
        return module

    def load_init(self, module: nn.Module, path: str) -> None:
        """Start from a previous stage's checkpoint (its consolidated `model.safetensors`)."""
        state = load_file(f"{path.rstrip('/')}/model.safetensors")
        missing, unexpected = module.load_state_dict(state, strict=False)
        wanted = [k for k in missing if k.startswith(("vae.", "disc."))]
        if wanted or unexpected:
            raise ValueError(f"{path}: not a tokenizer checkpoint (missing {wanted[:3]}, unexpected {unexpected[:3]})")

    # -------------------------------------------------------------- data
    def make_reader(self, rank: int, world_size: int) -> StreamingReader:
        return StreamingReader(self.cfg.data, rank=rank, world_size=world_size)

    def prepare(self, batch: dict, step: int) -> dict:
        return {"image": to_unit_range(batch["image"].to(self.device)), "step": step, "generator": self.generator}

    @staticmethod
    def frozen_modules(module: nn.Module) -> list[nn.Module]:
        """What this rank holds besides the trained model: the perceptual loss's frozen network."""
        perceptual = module._criterion[0].perceptual
        return [perceptual] if perceptual is not None else []

    @staticmethod
    def batch_size(batch: dict) -> int:
        return int(batch["image"].shape[0])

    # -------------------------------------------------------------- hooks
    def after_step(self, module: nn.Module, outputs: dict, step: int) -> None:
        V = self.stage_cfg.model.vocab_size
        hits = code_hits(outputs["idx_Bl"], V)
        if dist.is_initialized():
            dist.all_reduce(hits)
        self._log = _usage_from_hits(hits)
        if self.dead_codes is None or self.hybrid:
            return
        dead = self.dead_codes.update(hits.cpu())
        if not bool(dead.any()):
            return
        latents = outputs["latent_BChw"].permute(0, 2, 3, 1).reshape(-1, outputs["latent_BChw"].shape[1]).float()
        latents = D.broadcast_object(latents.cpu())
        codebook = module.vae.quantize.embedding.weight
        full = zero_utils.full_param(codebook)
        dead_idx = torch.nonzero(dead).flatten()
        # identical on every rank (rank 0's latents, a generator seeded by (seed, step)): one codebook
        same_everywhere = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step)
        rows = torch.randint(latents.shape[0], (dead_idx.numel(),), generator=same_everywhere)
        full[dead_idx] = latents[rows]
        zero_utils.set_full_param(codebook, full, reset_rows=dead_idx)
        self.dead_codes.steps_since_hit_V[dead] = 0
        self._log["dead_codes_restarted"] = float(dead_idx.numel())

    def log_values(self) -> dict:
        return self._log

    def state_dict(self) -> dict:
        return self.dead_codes.state_dict() if self.dead_codes is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.dead_codes is not None and state:
            self.dead_codes.load_state_dict(state)

    # -------------------------------------------------------------- evaluation and images
    def _eval_data(self) -> list:
        if self._eval_batches is None:
            url = self.stage_cfg.eval_url
            self._eval_batches = []
            if url:
                rc = ReaderConfig(urls=[url], resolution=self.cfg.data.resolution, batch_size=self.cfg.data.batch_size,
                                  num_workers=0, seed=0, shuffle_window=1)
                reader = StreamingReader(rc, rank=D.rank(), world_size=D.world_size())
                per_rank = -(-min(self.stage_cfg.eval_samples, reader.num_samples) // D.world_size())
                taken = 0
                for batch in reader:
                    if taken >= per_rank or batch["epoch"] > 0:
                        break
                    self._eval_batches.append(batch["image"])
                    taken += batch["image"].shape[0]
        return self._eval_batches

    @torch.no_grad()
    def evaluate(self, module: nn.Module, ema, step: int) -> dict:
        """Held-out PSNR / SSIM, discrete-only and continuous (collective: all ranks run it)."""
        batches = self._eval_data()
        if not batches:
            return {}
        was_training = module.training
        module.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # summed on the device, synced once
        for img_u8 in batches:
            img = to_unit_range(img_u8.to(self.device))
            ref = (img + 1) / 2
            for j, continuous in enumerate((False, True)):
                rec = (module.vae.img_to_reconstructed_img(img, continuous=continuous) + 1) / 2
                sums[2 * j] += psnr(rec, ref).clamp(max=100).sum()
                if min(ref.shape[-2:]) >= 11:
                    sums[2 * j + 1] += ssim(rec, ref).sum()
            sums[4] += img.shape[0]
        module.train(was_training)
        if dist.is_initialized():
            dist.all_reduce(sums)
        psnr_d, ssim_d, psnr_c, ssim_c, n = sums.cpu().tolist()
        n = max(1.0, n)
        return {"eval/psnr_discrete": psnr_d / n, "eval/ssim_discrete": ssim_d / n,
                "eval/psnr_continuous": psnr_c / n, "eval/ssim_continuous": ssim_c / n}

    @torch.no_grad()
    def images(self, module: nn.Module, ema, step: int) -> dict[str, np.ndarray]:
        """A grid of rows [input | discrete-only | continuous] (collective; rank 0 gets the picture)."""
        batches = self._eval_data()
        if not batches:
            return {}
        img = to_unit_range(batches[0][: self.stage_cfg.num_image_samples].to(self.device))
        was_training = module.training
        module.eval()
        disc = module.vae.img_to_reconstructed_img(img, continuous=False)
        cont = module.vae.img_to_reconstructed_img(img, continuous=True)
        module.train(was_training)
        rows = torch.cat([img, disc, cont], dim=3)  # B, 3, H, 3W
        grid = torch.cat(list(rows), dim=1)          # 3, B*H, 3W
        arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return {"reconstruction": arr}


def _usage_from_hits(hits_V: torch.Tensor) -> dict:
    probs = hits_V / hits_V.sum().clamp_min(1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return {"codebook/perplexity": float(entropy.exp()), "codebook/used_fraction": float((hits_V > 0).float().mean())}
