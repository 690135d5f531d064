"""The residual diffusion head: schedule, respacing, the IDDPM loss, CFG and sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hart_train.models.diffloss import DiffLoss
from hart_train.models.diffusion import GaussianDiffusion, cosine_betas, space_timesteps


def test_cosine_schedule_matches_closed_form():
    betas = cosine_betas(1000)
    ac = np.cumprod(1 - betas)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # alpha_bar(t)/alpha_bar(0) wherever the 0.999 cap is not active
    assert np.allclose(ac[:990], [f((i + 1) / 1000) / f(0) for i in range(990)], rtol=1e-9)
    assert betas.max() == pytest.approx(0.999) and betas[-1] == pytest.approx(0.999)


def test_respacing_keeps_the_base_process():
    steps = space_timesteps(1000, "8")
    assert len(steps) == 8 and steps[0] == 0 and steps[-1] == 999
    base, sub = GaussianDiffusion(1000, ""), GaussianDiffusion(1000, "8")
    assert sub.num_timesteps == 8 and sub.timestep_map.tolist() == steps
    base_ac = np.cumprod(1 - base.betas)
    assert np.allclose(np.cumprod(1 - sub.betas), base_ac[steps], rtol=1e-12)
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_vb_term_trains_only_the_variance():
    d = GaussianDiffusion(1000, "")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 4, generator=g).clamp(-1, 1)
    out = torch.randn(64, 8, generator=g, requires_grad=True)
    t = torch.randint(0, 1000, (64,), generator=g)
    t[:4] = 0  # the decoder-NLL branch
    noise = torch.randn(64, 4, generator=g)
    terms = d.training_losses(lambda x, ts, c: out * 1.0, x0, t, noise, dict(c=None))
    terms["vb"].sum().backward()
    assert out.grad[:, :4].abs().max() == 0 and out.grad[:, 4:].abs().max() > 0
    assert torch.allclose(terms["mse"], ((noise - out[:, :4].detach()) ** 2).mean(1))
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"][4:] >= -1e-6).all()  # KL >= 0


def test_diffusion_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    head = DiffLoss(target_channels=8, z_channels=16, width=64, depth=2, num_sampling_steps="8")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 16, generator=g)
    target = 0.5 * torch.tanh(z[:, :8])  # a residual that the condition determines
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    losses = []
    for step in range(50):
        sg = torch.Generator().manual_seed(step % 5)
        loss = head(target, z, generator=sg)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_cfg_acts_on_eps_channels_only():
    torch.manual_seed(0)
    head = DiffLoss(4, 8, 32, 2, "8")
    for p in head.parameters():  # leave MAR's zero init so the output depends on the inputs
        torch.nn.init.normal_(p, std=0.2)
    x, c = torch.randn(6, 4), torch.randn(6, 8)
    t = torch.randint(0, 1000, (6,))
    plain = head.net(torch.cat([x[:3], x[:3]]), t, c)
    for s in (0.0, 2.5):
        out = head.net.forward_with_cfg(x, t, c, s)
        want = (1 + s) * plain[:3, :4] - s * plain[3:, :4]
        assert torch.allclose(out[:3, :4], want, atol=1e-6) and torch.allclose(out[3:, :4], want, atol=1e-6)
        assert torch.equal(out[:, 4:], plain[:, 4:])


def test_sampling_is_seeded_and_clipped():
    torch.manual_seed(0)
    head = DiffLoss(4, 8, 32, 2, "8")
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(10, 8)
    a = head.sample(z, cfg=1.5, generator=torch.Generator().manual_seed(3))
    b = head.sample(z, cfg=1.5, generator=torch.Generator().manual_seed(3))
    c = head.sample(z, cfg=1.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the last step adds no noise and its mean is a convex mix of a clipped x0 and x_1
    assert a.abs().max() <= 0.6 * 1.05
    u = head.sample(z, cfg=None, generator=torch.Generator().manual_seed(3))
    assert u.shape == (10, 4)



@pytest.mark.parametrize("cfg", [1.5, None])
def test_supplied_noise_replaces_the_generator(cfg):
    torch.manual_seed(0)
    head = DiffLoss(4, 8, 32, 2, "8")
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(10, 8)
    default = head.sample(z, 0.8, cfg=cfg, generator=torch.Generator().manual_seed(3))
    noise, steps = head.draw_sample_noise(10, cfg is not None, generator=torch.Generator().manual_seed(3))
    assert tuple(noise.shape) == ((5 if cfg else 10), 4) and tuple(steps.shape) == (8, 10, 4)
    g = torch.Generator().manual_seed(99)
    state = g.get_state()
    assert torch.equal(head.sample(z, 0.8, cfg=cfg, generator=g, noise=noise, step_noise=steps), default)
    assert torch.equal(g.get_state(), state)
    # the start noise alone: the step noise still comes from the generator, after where the start noise was
    g = torch.Generator().manual_seed(3)
    torch.randn(noise.shape, generator=g)
    assert torch.equal(head.sample(z, 0.8, cfg=cfg, generator=g, noise=noise), default)
    # every step's noise counts except the last step's, which is drawn but not added (as in the reference)
    bumped_first, bumped_last = steps.clone(), steps.clone()
    bumped_first[0] += 1
    bumped_last[-1] += 1
    assert not torch.equal(head.sample(z, 0.8, cfg=cfg, noise=noise, step_noise=bumped_first), default)
    assert torch.equal(head.sample(z, 0.8, cfg=cfg, noise=noise, step_noise=bumped_last), default)


def test_misshapen_noise_is_refused():
    head = DiffLoss(4, 8, 32, 2, "8")
    z = torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"start noise has shape \(10, 4\), expected \(5, 4\)"):
        head.sample(z, cfg=1.5, noise=torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"step noise has shape \(7, 10, 4\), expected \(8, 10, 4\)"):
        head.sample(z, cfg=None, step_noise=torch.randn(7, 10, 4))

def test_full_size_head_parameter_count():
    with torch.device("meta"):
        head = DiffLoss(target_channels=32, z_channels=1536, width=1024, depth=6, num_sampling_steps="8")
    assert sum(p.numel() for p in head.parameters()) == 36_585_536
