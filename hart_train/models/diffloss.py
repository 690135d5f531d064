"""HART's residual diffusion head: MAR's SimpleMLPAdaLN and the DiffLoss wrapper (DL:14-274).

Shape legend: N tokens, c target channels (Cvae), W width, Z condition width (the transformer's C).

Parameter names match the released `diffloss.net.*` keys. At full size (W 1024, 6 blocks, c 32, Z 1536)
the head has 36,585,536 parameters. The residual target is divided by `vae_scale` (0.6) before diffusion
and samples are multiplied back, so `clip_denoised` bounds a residual to +-0.6 in latent units.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hart_train.zero_utils import modifying

from .blocks import TimestepEmbedder
from .diffusion import GaussianDiffusion


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)); adaLN chunk order shift, scale, gate."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """MLP denoiser: input (N, c) noisy residual, timestep (N,), condition (N, Z) -> (N, 2c) = (eps, v)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """MAR's init: xavier-uniform Linears, N(0, 0.02) time MLP, zeroed adaLN and output layers."""
        for m in self.modules():  # one module at a time (`modifying`): also on a partitioned model
            if isinstance(m, nn.Linear):
                with modifying(m.parameters()):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        for lin in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            with modifying([lin.weight]):
                nn.init.normal_(lin.weight, std=0.02)
        for lin in [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            with modifying(lin.parameters()):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Computes in the weights' dtype; the output is fp32, since the diffusion loss and the sampler's
        schedule arithmetic run in fp32 (the noisy input arrives in fp32 and is cast here)."""
        dtype = self.input_proj.weight.dtype
        x = self.input_proj(x.to(dtype))
        y = self.time_embed(t) + self.cond_embed(c.to(dtype))
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y).float()

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """`c` is [cond; uncond]; both halves denoise the first half of `x`. CFG `(1+s)cond - s uncond`
        acts on the eps channels only; the variance channels pass through per half."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = eps.chunk(2, dim=0)
        half_eps = cond_eps * (1 + cfg_scale) - cfg_scale * uncond_eps
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    def __init__(self, target_channels: int, z_channels: int, width: int, depth: int, num_sampling_steps: str, vae_scale: float = 0.6):
        super().__init__()
        self.in_channels = target_channels
        self.vae_scale = vae_scale
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth)
        self.train_diffusion = GaussianDiffusion(1000, "")
        self.gen_diffusion = GaussianDiffusion(1000, num_sampling_steps)

    def initialize_weights(self):
        self.net.initialize_weights()

    def forward(
        self, target: torch.Tensor, z: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Mean `loss` (= mse + vb), `mse` and `vb` over N tokens; t ~ U{0..999} and the noise are drawn
        from `generator` unless given."""
        N, target = target.shape[0], target.float()
        if t is None:
            t = torch.randint(0, self.train_diffusion.num_timesteps, (N,), generator=generator, device=target.device)
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=target.device, dtype=torch.float32)
        terms = self.train_diffusion.training_losses(self.net, target / self.vae_scale, t, noise, dict(c=z))
        return {k: v.mean() for k, v in terms.items()}

    @torch.no_grad()
    def sample(
        self, z: torch.Tensor, temperature: float = 1.0, cfg: float | None = None, generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None, step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Residuals (N, c) for conditions `z` (N, Z). With `cfg` set, `z` is [cond; uncond], the start noise
        is shared by the halves and the first half of the result is the guided sample (the second half only
        carries the uncond variance channels along, as released).

        The draws come from `generator` unless given: `noise` is the start noise, (N/2, c) with `cfg` (the
        rows shared by the halves) or (N, c) without; `step_noise` (steps, N, c) is the noise of each
        denoising step in the order taken. `draw_sample_noise` returns the ones the generator would give."""
        guided = cfg is not None
        self.check_sample_noise(z.shape[0], guided, noise, step_noise)
        if noise is None:
            rows = z.shape[0] // 2 if guided else z.shape[0]
            noise = torch.randn((rows, self.in_channels), generator=generator, device=z.device)
        else:
            noise = noise.to(device=z.device, dtype=torch.float32)
        if guided:
            noise = torch.cat([noise, noise], dim=0)
            fn, kwargs = self.net.forward_with_cfg, dict(c=z, cfg_scale=cfg)
        else:
            fn, kwargs = self.net.forward, dict(c=z)
        x = self.gen_diffusion.p_sample_loop(fn, noise, kwargs, clip_denoised=True, temperature=temperature,
                                             generator=generator, step_noise=step_noise)
        return x * self.vae_scale

    def draw_sample_noise(
        self, num_rows: int, guided: bool, device=None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, step_noise) for `sample` on `num_rows` conditions: exactly the draws `sample` takes from
        `generator` when they are not given (one randn per step, not one for all: the values differ)."""
        c, steps = self.in_channels, self.gen_diffusion.num_timesteps
        noise = torch.randn((num_rows // 2 if guided else num_rows, c), generator=generator, device=device)
        step = [torch.randn((num_rows, c), generator=generator, device=device) for _ in range(steps)]
        return noise, torch.stack(step)

    def check_sample_noise(self, num_rows: int, guided: bool, noise: torch.Tensor | None, step_noise: torch.Tensor | None):
        """A ValueError naming the tensor unless the given noise has the shapes `sample` draws."""
        c, steps = self.in_channels, self.gen_diffusion.num_timesteps
        want = (num_rows // 2 if guided else num_rows, c)
        if noise is not None and tuple(noise.shape) != want:
            halves = " (cfg: one row per cond/uncond pair)" if guided else ""
            raise ValueError(f"diffusion start noise has shape {tuple(noise.shape)}, expected {want}{halves}")
        if step_noise is not None and tuple(step_noise.shape) != (steps, num_rows, c):
            raise ValueError(f"diffusion step noise has shape {tuple(step_noise.shape)}, expected "
                             f"{(steps, num_rows, c)} (sampling steps, conditions, channels)")
