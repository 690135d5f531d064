"""The tokenizer stages (`tokenizer-vq`, `tokenizer-hybrid`) on the shared runtime.

One DeepSpeed engine trains one module, `TokenizerTrainModule`: the official `HARTAutoEncoderWithDisc`
(`vae` + `disc`, its keys) whose forward returns the loss terms of `tokenizer.losses.TokenizerCriterion`,
so ZeRO sharding, checkpointing and resume are the runtime's, not a second trainer's. The VAE and the
discriminator train in that single backward: the discriminator's hinge loss sees the reconstruction
detached, and the generator's adversarial term enters the VAE at the reconstruction through an autograd
surrogate, so neither reaches the other's weights (`tokenizer.losses.generator_gan_term`). Its adaptive
weight is VQGAN's balance measured at the reconstruction, not at the decoder's last weight (the rule, and
why, in `tokenizer.losses.generator_gan_term`).

A bucketed image dataset (`hart-data shard --buckets`) trains and evaluates each micro-batch on its
aspect-ratio bucket's scale schedule (`schedule_of`); the convolutions take any size, the quantizer the
schedule. Square batches run the square schedule exactly as before.

Dead-code restarts (optional) run after the optimizer step on every rank with all-reduced hits, rank 0's
latents and a generator seeded by (seed, step), so all ranks write the same codebook
(`tokenizer.losses.DeadCodeTracker`, `restart_codes`).
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
from hart_train.models.buckets import image_schedule
from tokenizer.autoencoder import HARTAutoEncoderWithDisc
from tokenizer.losses import DeadCodeTracker, TokenizerCriterion, code_hits, codebook_usage, restart_codes
from tokenizer.metrics import psnr, ssim


class TokenizerTrainModule(HARTAutoEncoderWithDisc):
    """`vae` + `disc` with the official key names; forward returns the loss terms of one step."""

    def __init__(self, stage_cfg, skip_continuous_prob: float):
        super().__init__(stage_cfg.model)
        self.skip_continuous_prob = skip_continuous_prob
        # the perceptual net is frozen and reloaded from its file: keep it out of the state dict
        self._criterion = (TokenizerCriterion(stage_cfg.loss),)

    def forward(self, image: torch.Tensor, step: int, generator: torch.Generator, schedule=None) -> dict:
        """`schedule`: the quantizer's scales for a non-square batch (its aspect-ratio bucket's), None: square."""
        criterion = self._criterion[0]
        out = self.vae(image, skip_continuous_prob=self.skip_continuous_prob, patch_nums=schedule, generator=generator)
        # the GAN terms take gradients inside the forward: only in training, where a backward follows
        with_gan = criterion.gan_active(step) and self.training
        terms = criterion(image, out["rec"], out["vq_loss"], self.disc, with_gan)
        terms["idx_Bl"] = out["idx_Bl"]
        terms["latent_BChw"] = out["latent_BChw"]
        return terms


class TokenizerStage:
    # the tokenizer (109M parameters at full size, ZeRO-2 in its recipes) is built whole on every rank;
    # its initialisers are not written for partitioned construction
    partitioned_construction = False
    frozen_from_init = False  # its checkpoints hold every weight (frozen ones too)

    def __init__(self, cfg, device: torch.device):
        self.cfg = cfg
        self.stage_cfg = cfg.tokenizer
        self.device = device
        self.hybrid = cfg.stage == "tokenizer-hybrid"
        self.generator = D.generator(device)
        loss_cfg = self.stage_cfg.loss
        self.dead_codes = (DeadCodeTracker(self.stage_cfg.model.vocab_size, loss_cfg.dead_code_steps)
                           if loss_cfg.dead_code_steps > 0 else None)
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
        """Start from a tokenizer checkpoint's consolidated `model.safetensors`, strictly: `vae.*` and `disc.*`
        (a previous stage's), or `vae.*` alone (a VAE-only tokenizer, e.g. imported from an official export
        that left a non-released discriminator out), whose discriminator then keeps its fresh
        initialisation (said on stdout)."""
        file = f"{path.rstrip('/')}/model.safetensors"
        state = load_file(file)
        if not any(k.startswith("vae.") for k in state):
            raise ValueError(f"{file}: no `vae.*` weights, not a tokenizer checkpoint")
        vae_only = not any(k.startswith("disc.") for k in state)
        target = module.vae if vae_only else module
        if vae_only:
            state = {k[len("vae."):] if k.startswith("vae.") else k: v for k, v in state.items()}
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{file} does not match this run's tokenizer.model: {e}") from None
        if vae_only and D.is_main():
            cfg = self.stage_cfg.model
            print(f"run.init_from {path}: a VAE-only tokenizer; the VAE is loaded, the discriminator (ndf "
                  f"{cfg.disc_ndf}, {cfg.disc_n_layers} layers) is freshly initialised", flush=True)

    # -------------------------------------------------------------- data
    def make_reader(self, rank: int, world_size: int) -> StreamingReader:
        return StreamingReader(self.cfg.data, rank=rank, world_size=world_size)

    def prepare(self, batch: dict, step: int) -> dict:
        return {"image": to_unit_range(batch["image"].to(self.device)), "step": step, "generator": self.generator,
                "schedule": self.schedule_of(batch)}

    def schedule_of(self, batch: dict):
        """The quantizer's schedule for a batch of the reader's aspect-ratio bucket `batch["bucket"]` ((width,
        height) px; `validate_paths` has checked the dataset's buckets): None for the square one."""
        m = self.stage_cfg.model
        return image_schedule(batch.get("bucket"), m.patch_nums, m.downsample)[1]

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
        self._log = {f"codebook/{k}": v for k, v in codebook_usage(hits).items()}
        if self.dead_codes is None or self.hybrid:
            return
        dead = self.dead_codes.update(hits.cpu())
        if not bool(dead.any()):
            return
        latents = outputs["latent_BChw"].permute(0, 2, 3, 1).reshape(-1, outputs["latent_BChw"].shape[1]).float()
        latents = D.broadcast_object(latents.cpu())
        codebook = module.vae.quantize.embedding.weight
        full = zero_utils.full_param(codebook)
        # identical on every rank (rank 0's latents, a generator seeded by (seed, step)): one codebook
        same_everywhere = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + step)
        dead_idx = restart_codes(full, dead, latents, same_everywhere)
        zero_utils.set_full_param(codebook, full, reset_rows=dead_idx)
        self._log["dead_codes_restarted"] = float(dead_idx.numel())

    def log_values(self) -> dict:
        return self._log

    @staticmethod
    def checkpoint_meta() -> dict:
        return {}

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
                    self._eval_batches.append((batch["image"], self.schedule_of(batch)))
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
        for img_u8, schedule in batches:
            img = to_unit_range(img_u8.to(self.device))
            ref = (img + 1) / 2
            for j, continuous in enumerate((False, True)):
                rec = (module.vae.img_to_reconstructed_img(img, continuous=continuous, patch_nums=schedule) + 1) / 2
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
        img_u8, schedule = batches[0]
        img = to_unit_range(img_u8[: self.stage_cfg.num_image_samples].to(self.device))
        was_training = module.training
        module.eval()
        disc = module.vae.img_to_reconstructed_img(img, continuous=False, patch_nums=schedule)
        cont = module.vae.img_to_reconstructed_img(img, continuous=True)
        module.train(was_training)
        rows = torch.cat([img, disc, cont], dim=3)  # B, 3, H, 3W
        grid = torch.cat(list(rows), dim=1)          # 3, B*H, 3W
        arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return {"reconstruction": arr}
