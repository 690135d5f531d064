"""The tokenizer's training losses as the tokenizer stage runs them, on CPU without DeepSpeed.

Hinge losses and the adaptive GAN weight against hand computations; the one-backward GAN of
`TokenizerTrainModule` against a reference built from the definitions (the VAE gets the gradient of
nll + vq + weight * gan_g, the discriminator that of its own hinge loss only); the discriminator start step;
dead-code restarts through the stage's `after_step`; `run.init_from` of a full and of a VAE-only tokenizer.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from hart_train import config as C
from hart_train.run_config import RunConfig, TokenizerStageConfig
from hart_train.stages.tokenizer_stage import TokenizerStage, TokenizerTrainModule
from tokenizer.autoencoder import HARTAutoEncoderWithDisc, tokenizer_config
from tokenizer.losses import (DeadCodeTracker, TokenizerLossConfig, adaptive_gan_weight, code_hits,
                              codebook_usage, generator_gan_term, hinge_d_loss, hinge_g_loss,
                              reconstruction_loss, restart_codes)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tokenizer_vq_tiny.yaml")


def tiny_images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def train_module(seed: int = 0, **loss) -> TokenizerTrainModule:
    torch.manual_seed(seed)
    stage_cfg = TokenizerStageConfig(model=tokenizer_config("tiny"), loss=TokenizerLossConfig(**loss))
    return TokenizerTrainModule(stage_cfg, skip_continuous_prob=0.5)


def tiny_stage(*overrides: str) -> TokenizerStage:
    return TokenizerStage(C.load(RunConfig, TINY_CONFIG, list(overrides)), torch.device("cpu"))


# ----------------------------------------------------------------------------- loss terms by hand


def test_reconstruction_and_hinge_losses_on_known_values():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert reconstruction_loss(a, b, "l1").item() == 0.5 and reconstruction_loss(a, b, "l2").item() == 0.25
    # D: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (mean(0, 0.5) + mean(0, 1)) = 0.375
    assert hinge_d_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])).item() == 0.375
    assert hinge_d_loss(torch.full((2, 1), 2.0), torch.full((2, 1), -2.0)).item() == 0.0  # both beyond the margin
    assert hinge_d_loss(torch.zeros(2, 1), torch.zeros(2, 1)).item() == 1.0
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == -2.0  # G: -mean(D(rec))


def test_adaptive_gan_weight_by_hand():
    grad_nll, grad_g = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])  # norms 5 and 2
    torch.testing.assert_close(adaptive_gan_weight(grad_nll, grad_g, 1e4), torch.tensor(5.0 / 2.0001))
    assert adaptive_gan_weight(grad_nll, grad_g, max_weight=1.5).item() == 1.5  # clamped above
    assert adaptive_gan_weight(torch.zeros(2), grad_g, 1e4).item() == 0.0
    # a vanishing generator gradient: the 1e-4 keeps it finite, the clamp bounds it
    assert adaptive_gan_weight(grad_nll, torch.zeros(2), 1e4).item() == 1e4


def test_generator_gan_term_weight_value_and_gradient_by_hand():
    """nll = mean((rec - t)^2), g = sum(c * rec): d nll/d rec = 2 (rec - t) / N and d g/d rec = c, so
    weight = disc_weight * ||2 (rec - t) / N|| / (||c|| + 1e-4); the term's value is weight * g and its
    gradient with respect to rec is weight * c."""
    gen = torch.Generator().manual_seed(0)
    rec = torch.randn(1, 3, 2, 2, generator=gen, requires_grad=True)
    target, c = torch.randn(1, 3, 2, 2, generator=gen), torch.randn(1, 3, 2, 2, generator=gen)
    nll, gan_g = (rec - target).square().mean(), (c * rec).sum()
    term, weight = generator_gan_term(gan_g, nll, rec, disc_weight=0.5, max_weight=1e4)
    expected = 0.5 * (2 * (rec - target) / rec.numel()).norm() / (c.norm() + 1e-4)
    torch.testing.assert_close(weight, expected.detach())
    torch.testing.assert_close(term, weight * gan_g)
    (grad_rec,) = torch.autograd.grad(term, rec)
    torch.testing.assert_close(grad_rec, weight * c)
    assert not weight.requires_grad

    _, clamped = generator_gan_term(gan_g, nll, rec, disc_weight=0.5, max_weight=1e-3)
    torch.testing.assert_close(clamped, torch.tensor(0.5 * 1e-3))


def test_generator_gan_term_moves_the_generator_only():
    disc = nn.Conv2d(3, 1, 1)
    rec = torch.randn(2, 3, 4, 4, requires_grad=True)
    gan_g = hinge_g_loss(disc(rec))
    term, weight = generator_gan_term(gan_g, rec.square().mean(), rec, disc_weight=1.0, max_weight=1e4)
    (expected,) = torch.autograd.grad(gan_g, rec, retain_graph=True)
    term.backward()
    assert disc.weight.grad is None and disc.bias.grad is None
    torch.testing.assert_close(rec.grad, weight * expected)


# ----------------------------------------------------------------------------- the training module


def test_one_backward_trains_the_vae_on_its_loss_and_the_discriminator_on_its_own():
    """The module's single backward against the definitions, computed on an identical copy: VAE gradients
    of nll + vq + w * gan_g (w a constant), discriminator gradients of the hinge D loss on (img, sg[rec])."""
    model = train_module(disc_weight=0.5)
    ref = copy.deepcopy(model)
    img = tiny_images()
    terms = model(img, step=0, generator=torch.Generator().manual_seed(3))
    terms["loss"].backward()

    out = ref.vae(img, skip_continuous_prob=0.5, generator=torch.Generator().manual_seed(3))
    rec = out["rec"]
    nll = (rec - img).square().mean()
    gan_g = -ref.disc(rec).mean()
    grad_nll, grad_g = (torch.autograd.grad(x, rec, retain_graph=True)[0] for x in (nll, gan_g))
    w = 0.5 * min(grad_nll.norm().item() / (grad_g.norm().item() + 1e-4), 1e4)
    real, fake = ref.disc(torch.cat([img, rec.detach()])).chunk(2)
    gan_d = 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())

    assert w > 0
    for key, value in dict(recon=nll, vq=out["vq_loss"], gan_g=gan_g, gan_weight=w, gan_d=gan_d,
                           logits_real=real.mean(), logits_fake=fake.mean(),
                           loss=nll + out["vq_loss"] + w * gan_g + gan_d).items():
        torch.testing.assert_close(terms[key], torch.as_tensor(value).detach(), rtol=1e-5, atol=1e-6, msg=key)

    vae_params = list(ref.vae.parameters())
    ref_vae = torch.autograd.grad(nll + out["vq_loss"] + w * gan_g, vae_params, retain_graph=True, allow_unused=True)
    ref_disc = torch.autograd.grad(gan_d, list(ref.disc.parameters()))
    for (name, p), g in zip(model.vae.named_parameters(), ref_vae):
        assert (p.grad is None) == (g is None), name
        if g is not None:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    for (name, p), g in zip(model.disc.named_parameters(), ref_disc):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)
    # BatchNorm saw the same two batches in the same order
    for (name, a), b in zip(model.disc.named_buffers(), ref.disc.buffers()):
        assert torch.equal(a, b), name


def test_the_discriminator_starts_at_disc_start_step():
    """Steps are 0-based (the step after `step` completed ones). Before disc_start_step: no GAN term, the
    discriminator not run, no gradient, unchanged by the optimizer (weights and BatchNorm statistics);
    from it on: all GAN terms, the discriminator trained."""
    model = train_module(disc_weight=0.5, disc_start_step=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    initial = {k: v.clone() for k, v in model.disc.state_dict().items()}
    encoder_before = model.vae.encoder.conv_in.weight.detach().clone()
    gan_keys = {"gan_g", "gan_weight", "gan_d", "logits_real", "logits_fake"}
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        terms = model(tiny_images(seed=step), step=step, generator=gen)
        terms["loss"].backward()
        opt.step()
        disc_now = model.disc.state_dict()
        if step < 3:
            assert not gan_keys & set(terms), step
            assert all(p.grad is None for p in model.disc.parameters()), step
            assert all(torch.equal(disc_now[k], v) for k, v in initial.items()), step
        else:
            assert gan_keys <= set(terms) and terms["gan_weight"] > 0, step
            # (the last bias's gradient is 0.5 * (mean(fake > -1) - mean(real < 1)), 0 while all logits are
            # inside the margins: check the weights)
            assert all(p.grad is not None for p in model.disc.parameters()), step
            assert all(p.grad.abs().sum() > 0 for n, p in model.disc.named_parameters() if n.endswith("weight")), step
            assert not torch.equal(disc_now["main.0.weight"], initial["main.0.weight"]), step
    assert not torch.equal(model.vae.encoder.conv_in.weight, encoder_before)  # the VAE trained throughout
    model.eval()  # evaluation never back-propagates: no GAN terms, whatever the step
    assert not gan_keys & set(model(tiny_images(), step=10, generator=gen))


def test_a_hybrid_backward_reaches_exactly_the_decoder_and_the_discriminator():
    model = train_module(disc_weight=0.5)
    model.vae.freeze_for_hybrid()
    terms = model(tiny_images(), step=0, generator=torch.Generator().manual_seed(0))
    terms["loss"].backward()
    trainable = {n for n, _ in model.vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))}
    for n, p in model.vae.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    assert terms["gan_weight"] > 0 and all(p.grad is not None for p in model.disc.parameters())


# ----------------------------------------------------------------------------- codebook upkeep


def test_codebook_usage_statistics():
    idx = [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[0, 1, 2, 3]])]
    hits = code_hits(idx, 8)
    assert hits.tolist() == [2, 2, 2, 2, 0, 0, 0, 0]
    usage = codebook_usage(hits)
    assert usage["used_fraction"] == 0.5 and math.isclose(usage["perplexity"], 4.0, rel_tol=1e-6)
    assert codebook_usage(torch.zeros(8)) == {"perplexity": 1.0, "used_fraction": 0.0}


def test_dead_code_tracker_counts_consecutive_unused_steps():
    tracker = DeadCodeTracker(8, dead_after_steps=3)
    always, once = torch.tensor([1.0] * 4 + [0] * 4), torch.tensor([1.0] * 5 + [0] * 3)  # code 4 hit at step 1 only
    dead = [tracker.update(h).nonzero().flatten().tolist() for h in (once, always, always)]
    assert dead == [[], [], [5, 6, 7]]  # unused for 3 steps; their counters start again
    saved = tracker.state_dict()
    assert tracker.update(always).nonzero().flatten().tolist() == [4]
    assert tracker.steps_since_hit_V.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    resumed = DeadCodeTracker(8, dead_after_steps=99)
    resumed.load_state_dict(saved)
    assert resumed.update(always).nonzero().flatten().tolist() == [4]
    with pytest.raises(ValueError, match="codes"):
        DeadCodeTracker(4, 3).load_state_dict(saved)


def test_restart_codes_draws_dead_codes_from_the_latents():
    codebook = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    latents = torch.randn(10, 4, generator=torch.Generator().manual_seed(1)) + 5.0
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 7, 8, 15]] = True
    restarted = codebook.clone()
    idx = restart_codes(restarted, dead, latents, torch.Generator().manual_seed(42))
    assert idx.tolist() == [2, 7, 8, 15]
    assert torch.equal(restarted[~dead], codebook[~dead])
    rows = torch.randint(10, (4,), generator=torch.Generator().manual_seed(42))  # the documented draw
    assert torch.equal(restarted[dead], latents[rows])
    again = codebook.clone()
    restart_codes(again, dead, latents, torch.Generator().manual_seed(42))
    other = codebook.clone()
    restart_codes(other, dead, latents, torch.Generator().manual_seed(43))
    assert torch.equal(again, restarted) and not torch.equal(other, restarted)
    with pytest.raises(ValueError, match="latents_NC"):
        restart_codes(codebook.clone(), dead, torch.zeros(0, 4), torch.Generator())


def test_the_stage_restarts_codes_unused_for_dead_code_steps():
    """`TokenizerStage.after_step` (one process): after 2 steps without a hit a code takes a row of the
    step's latents drawn by a generator seeded by (run.seed, step); the used codes keep their values; the
    same run again writes the same codebook."""

    def run() -> tuple[torch.Tensor, torch.Tensor, list[dict], dict]:
        stage = tiny_stage("tokenizer.loss.dead_code_steps=2")
        torch.manual_seed(0)
        module = stage.build_model()
        before = module.vae.quantize.embedding.weight.detach().clone()
        out = module(tiny_images(), step=0, generator=torch.Generator().manual_seed(0))
        logs = []
        for step in (1, 2):  # the same batch's codes twice
            stage.after_step(module, out, step)
            logs.append(dict(stage.log_values()))
        return before, module.vae.quantize.embedding.weight.detach().clone(), logs, out

    before, after, logs, out = run()
    unused = code_hits(out["idx_Bl"], 64) == 0
    num_unused = int(unused.sum())
    assert 0 < num_unused < 64
    assert "dead_codes_restarted" not in logs[0] and logs[1]["dead_codes_restarted"] == num_unused
    assert torch.equal(after[~unused], before[~unused])
    latents_NC = out["latent_BChw"].permute(0, 2, 3, 1).reshape(-1, 8)
    rows = torch.randint(latents_NC.shape[0], (num_unused,), generator=torch.Generator().manual_seed(0 * 1_000_003 + 2))
    assert torch.equal(after[unused], latents_NC[rows])
    assert torch.equal(run()[1], after)


# ----------------------------------------------------------------------------- run.init_from


def _write_tokenizer(path: Path, state: dict) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def test_init_from_a_full_tokenizer_loads_vae_and_discriminator(tmp_path, capsys):
    torch.manual_seed(1)
    source = HARTAutoEncoderWithDisc(tokenizer_config("tiny")).state_dict()
    stage = tiny_stage()
    module = stage.build_model()
    stage.load_init(module, str(_write_tokenizer(tmp_path / "full", source)))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in source.items())
    assert "VAE-only" not in capsys.readouterr().out


def test_init_from_a_vae_only_tokenizer_keeps_a_fresh_discriminator(tmp_path, capsys):
    torch.manual_seed(1)
    source = {k: v for k, v in HARTAutoEncoderWithDisc(tokenizer_config("tiny")).state_dict().items() if k.startswith("vae.")}
    stage = tiny_stage()
    torch.manual_seed(0)
    module = stage.build_model()
    fresh_disc = {k: v.clone() for k, v in module.disc.state_dict().items()}
    stage.load_init(module, str(_write_tokenizer(tmp_path / "vae_only", source)))
    state = module.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.items())
    assert all(torch.equal(state[f"disc.{k}"], v) for k, v in fresh_disc.items())
    printed = capsys.readouterr().out
    assert "a VAE-only tokenizer; the VAE is loaded, the discriminator (ndf 8, 2 layers) is freshly initialised" in printed

    other = HARTAutoEncoderWithDisc(tokenizer_config("tiny", vocab_size=32)).state_dict()
    with pytest.raises(ValueError, match="does not match this run's tokenizer.model"):
        stage.load_init(module, str(_write_tokenizer(tmp_path / "other", {k: v for k, v in other.items() if k.startswith("vae.")})))
    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):
        stage.load_init(module, str(_write_tokenizer(tmp_path / "t2i", {"blocks.0.weight": torch.zeros(2)})))
