"""Gaussian diffusion for HART's residual head (IDDPM as used by MAR and HART), in one configuration.

Shape legend: N tokens, c channels (Cvae).

HART builds exactly one variant (DL:37-42, `create_diffusion`): cosine schedule over 1000 steps, the
network predicts epsilon plus a LEARNED_RANGE variance interpolation, the loss is MSE(eps) + the VLB term
computed on a frozen mean (IDDPM), and sampling runs a respaced chain ("8" steps) with `clip_denoised`.
Only that variant is implemented; there are no flags for the others. The schedule is computed in float64
with numpy, as the reference does, and gathered per timestep as float32.

Every random draw takes a `torch.Generator` (the released sampler uses the global RNG), and the sampler's
step noise can be passed in instead.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

ModelFn = Callable[..., torch.Tensor]


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    )


def space_timesteps(num_steps: int, section_counts: str | Sequence[int]) -> list[int]:
    """The original timesteps kept by respacing ("8" -> 8 evenly strided steps of 1000), sorted."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == want:
                    return list(range(0, num_steps, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_steps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(steps))


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x under a Gaussian discretised to 1/255 bins (the IDDPM decoder term, t == 0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Diffusion over the kept timesteps `use_timesteps` of a `num_steps` cosine schedule.

    With all timesteps kept it is the training process; with a subset it is the respaced sampler, whose
    network still sees the original timestep index (the reference's `_WrappedModel`).
    """

    def __init__(self, num_steps: int = 1000, respacing: str | Sequence[int] = ""):
        base = 1.0 - cosine_betas(num_steps)
        base_cumprod = np.cumprod(base)
        use = list(range(num_steps)) if respacing in ("", None) else space_timesteps(num_steps, respacing)
        self.timestep_map = torch.tensor(use, dtype=torch.long)
        last, betas = 1.0, []
        for i in use:
            betas.append(1 - base_cumprod[i] / last)
            last = base_cumprod[i]
        betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(post_var) > 1 else np.array([])
        tables = dict(
            sqrt_ac=np.sqrt(ac),
            sqrt_1m_ac=np.sqrt(1.0 - ac),
            sqrt_recip_ac=np.sqrt(1.0 / ac),
            sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1),
            post_var=post_var,
            post_logvar=post_logvar,
            post_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            post_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            log_betas=np.log(betas),
        )
        self.betas = betas
        self._t = {k: torch.from_numpy(v) for k, v in tables.items()}

    def _get(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self._t[name].device != t.device:  # move the float64 tables once, not on every call
            self._t[name] = self._t[name].to(t.device)
        v = self._t[name][t].float()
        return v.view(-1, *([1] * (like.dim() - 1))).expand_as(like)

    def _call(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        if self.timestep_map.device != t.device:
            self.timestep_map = self.timestep_map.to(t.device)
        return model(x, self.timestep_map[t], **model_kwargs)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._get("sqrt_ac", t, x0) * x0 + self._get("sqrt_1m_ac", t, x0) * noise

    def q_posterior_mean_logvar(self, x0, xt, t):
        mean = self._get("post_coef1", t, xt) * x0 + self._get("post_coef2", t, xt) * xt
        return mean, self._get("post_logvar", t, xt)

    def p_mean_logvar(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool):
        """Network output (N, 2c) = (eps, v in [-1, 1]) -> mean, log variance and x0 of p(x_{t-1} | x_t)."""
        eps, var_values = out.split(xt.shape[1], dim=1)
        min_log, max_log = self._get("post_logvar", t, xt), self._get("log_betas", t, xt)
        frac = (var_values + 1) / 2
        logvar = frac * max_log + (1 - frac) * min_log
        x0 = self._get("sqrt_recip_ac", t, xt) * xt - self._get("sqrt_recipm1_ac", t, xt) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior_mean_logvar(x0, xt, t)
        return mean, logvar, x0

    def vb_terms_bits(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits: KL(q || p) for t > 0, discretised decoder NLL at t == 0."""
        true_mean, true_logvar = self.q_posterior_mean_logvar(x0, xt, t)
        mean, logvar, _ = self.p_mean_logvar(out, xt, t, clip_denoised=False)
        kl = _normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, model_kwargs: dict
    ) -> dict[str, torch.Tensor]:
        """Per-sample `mse` (of eps), `vb` (the VLB on a frozen mean, so it only trains the variance) and
        `loss` = mse + vb, each of shape (N,)."""
        xt = self.q_sample(x0, t, noise)
        out = self._call(model, xt, t, model_kwargs)
        eps, var_values = out.split(x0.shape[1], dim=1)
        vb = self.vb_terms_bits(torch.cat((eps.detach(), var_values), dim=1), x0, xt, t)
        mse = ((noise - eps) ** 2).mean(dim=1)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        model_kwargs: dict,
        clip_denoised: bool = True,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling from `noise` over all kept timesteps, newest first; the step noise is scaled
        by `temperature` and none is added at the final step. The step noise is drawn from `generator`, one
        `randn` of x's shape per step, unless `step_noise` (num_timesteps, N, c) gives it: row k for the
        k-th step taken (the last row is drawn but unused, as in the reference)."""
        x = noise
        for k, i in enumerate(reversed(range(self.num_timesteps))):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            mean, logvar, _ = self.p_mean_logvar(self._call(model, x, t, model_kwargs), x, t, clip_denoised)
            if step_noise is None:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                z = step_noise[k].to(x)
            x = mean + (float(i != 0) * torch.exp(0.5 * logvar)) * z * temperature
        return x
