"""The tokenizer stages on the DeepSpeed runtime: real ZeRO processes (2 gloo ranks), real emoji data.

One uninterrupted 2-rank run is the reference (module-scoped, reused by the tests below):
* the reconstruction loss falls;
* (a run SIGKILLed mid-way and re-run with the same command continues bit for bit: tests/test_faults.py);
* a 2-rank checkpoint resumes on 1 rank (universal conversion, reader re-planned);
* tokenizer-hybrid starts from it, keeps encoder and codebook frozen, and trains the decoder;
* tokenizer-hybrid starts from a VAE-only tokenizer with a freshly initialised discriminator.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from procs import check, run_train
from runs import TOKENIZER_CONFIG as CONFIG
from runs import losses
from runs import tokenizer_overrides as overrides
from tokenizer.autoencoder import HARTAutoEncoderWithDisc, TokenizerConfig

HYBRID = "configs/tokenizer_hybrid_tiny.yaml"
GAN_KEYS = {"gan_g", "gan_weight", "gan_d", "logits_real", "logits_fake"}


def initial_weights(run_dir) -> dict:
    """The weights a run starts from: its tokenizer.model built right after torch.manual_seed(run.seed),
    as the trainer builds it."""
    run = yaml.safe_load((run_dir / "config.yaml").read_text())
    torch.manual_seed(run["run"]["seed"])
    return HARTAutoEncoderWithDisc(TokenizerConfig(**run["tokenizer"]["model"])).state_dict()


@pytest.fixture
def reference(tokenizer_reference):
    return tokenizer_reference


def test_vq_stage_trains_and_logs(reference):
    steps = losses(reference)
    assert sorted(steps) == list(range(1, 13))
    first = sum(steps[s]["recon"] for s in (1, 2)) / 2
    last = sum(steps[s]["recon"] for s in (11, 12)) / 2
    assert last < 0.8 * first, (first, last)
    # disc_start_step=6 counts completed steps: the GAN is on from the 7th step, the discriminator is not
    # run or changed before it (its weights and BatchNorm statistics at step 4 are the initial ones)
    assert all(not GAN_KEYS & set(steps[s]) for s in range(1, 7))
    assert all(GAN_KEYS <= set(steps[s]) and steps[s]["gan_weight"] > 0 for s in range(7, 13))
    initial = {k: v for k, v in initial_weights(reference).items() if k.startswith("disc.")}
    at_4 = load_file(reference / "ckpt" / "step_00000004" / "model.safetensors")
    at_8 = load_file(reference / "ckpt" / "step_00000008" / "model.safetensors")
    assert all(torch.equal(at_4[k], v) for k, v in initial.items())
    assert not torch.equal(at_8["disc.main.0.weight"], initial["disc.main.0.weight"])
    assert sum(steps[s].get("dead_codes_restarted", 0) for s in steps) > 0  # codes unused for 3 steps restart
    assert steps[12]["codebook/used_fraction"] > 0
    ckpts = sorted(p.name for p in (reference / "ckpt").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000004", "step_00000008", "step_00000012"]
    for c in ckpts:
        assert (reference / "ckpt" / c / "COMPLETE").exists()
    model = load_file(reference / "ckpt" / "step_00000012" / "model.safetensors")
    assert any(k.startswith("vae.encoder.") for k in model) and any(k.startswith("disc.main.") for k in model)
    evals = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines() if "eval/psnr_discrete" in l]
    # step 12 reaches 10.42 dB continuous, 10.39 dB discrete; the initial weights give 7.49 and 7.55 dB on
    # the same images (this run with optim.lr=1e-30 run.max_steps=1)
    assert evals and evals[-1]["eval/psnr_continuous"] > 9.0 and evals[-1]["eval/psnr_discrete"] > 9.0, evals[-1]
    assert list((reference / "images").glob("reconstruction_step*.png"))
    assert (reference / "wandb_id.txt").exists()


def test_two_rank_checkpoint_resumes_on_one_rank(reference, emoji_dataset, tmp_path):
    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    for later in ("step_00000008", "step_00000012"):
        shutil.rmtree(run / "ckpt" / later)
    result = run_train(CONFIG, overrides(emoji_dataset, tmp_path, "ref"), nproc=1)
    check(result)
    assert "converting to a universal checkpoint" in result.stdout
    assert (run / "ckpt" / "step_00000004" / "universal").is_dir()
    steps = losses(run)
    assert sorted(steps) == list(range(1, 13))
    assert all(steps[s]["loss"] == losses(reference)[s]["loss"] for s in range(1, 5))
    state = json.loads((run / "ckpt" / "step_00000012" / "data" / "rank_00000.json").read_text())
    assert [seg["ranks"] for seg in state["segments"]] == [2, 1]  # the epoch was re-planned for 1 rank


def test_a_conversion_slower_than_the_collective_timeout_still_resumes(emoji_dataset, tmp_path, monkeypatch):
    """1 -> 2 ranks with the universal conversion held back 20 s and collectives bounded by 8 s: the
    waiting rank waits on the conversion's marker (run.universal_timeout_s), not in a collective."""
    check(run_train(CONFIG, overrides(emoji_dataset, tmp_path, "grow", "run.max_steps=4"), nproc=1))
    monkeypatch.setenv("HART_FAULT_SLOW_UNIVERSAL", "20")
    result = run_train(CONFIG, overrides(emoji_dataset, tmp_path, "grow", "run.max_steps=6",
                                         "run.collective_timeout_s=8"), nproc=2)
    check(result)
    assert "converted" in result.stdout and (tmp_path / "grow" / "ckpt" / "step_00000004" / "universal" / "DONE").exists()
    assert sorted(losses(tmp_path / "grow")) == list(range(1, 7))


def test_hybrid_stage_freezes_encoder_and_trains_decoder(reference, emoji_dataset, tmp_path):
    init = reference / "ckpt" / "step_00000012"
    args = overrides(emoji_dataset, tmp_path, "hybrid", f"run.init_from={init}", "tokenizer.loss.disc_start_step=100")
    check(run_train(HYBRID, args, nproc=2))
    before = load_file(init / "model.safetensors")
    after = load_file(tmp_path / "hybrid" / "ckpt" / "step_00000012" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("vae.encoder.", "vae.quant_conv.", "vae.quantize.embedding",
                                                 "vae.quantize.quant_resi"))]
    assert frozen and all((before[k] == after[k]).all() for k in frozen)
    assert not (before["vae.decoder.conv_out.weight"] == after["vae.decoder.conv_out.weight"]).all()
    steps = losses(tmp_path / "hybrid")
    assert sum(steps[s]["recon"] for s in (11, 12)) < sum(steps[s]["recon"] for s in (1, 2))
    # the 2-rank checkpoint of step 8 resumed on 1 rank keeps them too: DeepSpeed's universal checkpoint
    # restores only what the optimizer holds, the trainer the rest (trainer._load_frozen)
    shutil.rmtree(tmp_path / "hybrid" / "ckpt" / "step_00000012")
    result = run_train(HYBRID, args, nproc=1)
    check(result)
    assert "converting to a universal checkpoint" in result.stdout
    again = load_file(tmp_path / "hybrid" / "ckpt" / "step_00000012" / "model.safetensors")
    assert all((before[k] == again[k]).all() for k in frozen)


def test_hybrid_stage_starts_from_a_vae_only_tokenizer(reference, emoji_dataset, tmp_path):
    """A tokenizer without `disc.*` (as `hart-train import` writes one from an official export that left a
    non-released discriminator out): the VAE is loaded, the discriminator keeps its fresh initialisation."""
    init = tmp_path / "vae_only"
    init.mkdir()
    trained = load_file(reference / "ckpt" / "step_00000012" / "model.safetensors")
    save_file({k: v for k, v in trained.items() if k.startswith("vae.")}, str(init / "model.safetensors"))
    shutil.copy(reference / "ckpt" / "step_00000012" / "config.yaml", init / "config.yaml")
    result = run_train(HYBRID, overrides(emoji_dataset, tmp_path, "from_vae", f"run.init_from={init}",
                                         "run.max_steps=2", "run.save_every=2"), nproc=1)
    check(result)
    assert "a VAE-only tokenizer; the VAE is loaded, the discriminator (ndf 8, 2 layers) is freshly initialised" in result.stdout
    after = load_file(tmp_path / "from_vae" / "ckpt" / "step_00000002" / "model.safetensors")
    assert torch.equal(after["vae.encoder.conv_in.weight"], trained["vae.encoder.conv_in.weight"])  # loaded, frozen
    fresh = initial_weights(tmp_path / "from_vae")
    disc = [k for k in fresh if k.startswith("disc.")]
    assert disc and all(torch.equal(after[k], fresh[k]) for k in disc)  # the GAN starts at step 10
    assert not torch.equal(after["disc.main.0.weight"], trained["disc.main.0.weight"])


def test_bad_config_fails_before_anything_runs(emoji_dataset, tmp_path):
    bad_key = run_train(CONFIG, overrides(emoji_dataset, tmp_path, "bad", "optim.lrr=1"), nproc=1)
    assert bad_key.returncode == 2 and "optim.lrr" in bad_key.stderr
    bad_value = run_train(CONFIG, overrides(emoji_dataset, tmp_path, "bad", "zero.stage=5"), nproc=1)
    assert bad_value.returncode == 2 and "stage" in bad_value.stderr
    missing = run_train(CONFIG, overrides(str(tmp_path / "nope"), tmp_path, "bad"), nproc=1)
    assert missing.returncode == 2 and "data.urls[0]" in missing.stderr
    missing_init = run_train(HYBRID, overrides(emoji_dataset, tmp_path, "bad", f"run.init_from={tmp_path}/x"), nproc=1)
    assert missing_init.returncode == 2 and "run.init_from" in missing_init.stderr
    assert not (tmp_path / "bad").exists()
