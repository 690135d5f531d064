"""bf16 as the full-size recipes run it: the shipped configs at small width (configs/t2i_{256,512,1024}.yaml,
tokenizer_vq.yaml, tokenizer_hybrid.yaml with their own bf16, ZeRO stage and thresholds, activation
checkpointing and EMA; only sizes, run lengths, paths and the device overridden), 2 gloo ranks on this
CPU (which has AMX-BF16), a Qwen2 text encoder with HART's system prompt.

Tolerance of bf16 against fp32 (test_first_step_matches_fp32): bf16 keeps 8 significant bits, so every
matmul input is rounded by up to 2^-9 (0.2%) relative; accumulation, norms, softmax, the cross-entropy and
the diffusion loss are fp32. From the same non-trivial weights and batch, the first step's loss terms
then differ by a few tenths of a percent at most (measured: 0.016% for the CE, 0.023% for the diffusion
loss); the test allows 0.5% (CE, total) and 1% (the diffusion loss, a mean of squares of the small MLP's
eps error). A wrong cast (a term computed on truncated inputs, a dropped fp32 island) moves them by far
more, and an fp32 run mistaken for bf16 by exactly nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hart_train.models import HARTConfig, HARTForT2I
from procs import REPO, check, env, free_port, run_train
from runs import fullsize_t2i_overrides, losses

T2I = "configs/t2i_256.yaml"
T2I_512, T2I_1024 = "configs/t2i_512.yaml", "configs/t2i_1024.yaml"  # the same settings at other resolutions
TOKENIZER_SIZES = ["tokenizer.model.vocab_size=64", "tokenizer.model.z_channels=8", "tokenizer.model.ch=32",
                   "tokenizer.model.ch_mult=[1,2,2]", "tokenizer.model.patch_nums=[1,2,4]",
                   "tokenizer.model.disc_ndf=8", "tokenizer.model.disc_n_layers=2", "data.resolution=16",
                   "data.batch_size=8", "data.num_workers=1", "data.shuffle_window=64", "run.device=cpu",
                   "run.max_steps=12", "run.save_every=4", "run.log_every=1", "run.eval_every=0",
                   "run.image_every=0", "optim.warmup_steps=2", "tokenizer.eval_samples=16"]


@pytest.fixture(scope="module")
def reference(bf16_reference) -> Path:
    return bf16_reference


def _ckpt(run: Path, step: int) -> Path:
    return run / "ckpt" / f"step_{step:08d}"


def test_bf16_trains_with_fp32_masters_and_ema(reference):
    ds = json.loads((reference / "deepspeed.json").read_text())
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    steps = losses(reference)
    assert sorted(steps) == list(range(1, 13))
    assert all(np.isfinite([r["loss"], r["ce"], r["diff_loss"]]).all() for r in steps.values())
    assert steps[12]["ce"] < steps[1]["ce"] - 0.03, (steps[1]["ce"], steps[12]["ce"])
    model = load_file(_ckpt(reference, 12) / "model.safetensors")
    ema = load_file(_ckpt(reference, 12) / "ema.safetensors")
    # the saved weights are the fp32 masters, not bf16 copies: most values are not bf16-representable
    w = model["blocks.0.ffn.up_proj.weight"]
    assert w.dtype == torch.float32 and (w != w.bfloat16().float()).float().mean() > 0.9
    with torch.device("meta"):
        trainable = {n for n, _ in HARTForT2I(_model_config(reference)).named_parameters()}
    assert set(ema) == trainable and all(ema[k].shape == model[k].shape for k in ema)
    assert all(ema[k].dtype == torch.float32 for k in ema)
    # decay 0.9999 over 12 steps: the EMA has barely left the initial weights, the raw weights have moved
    before = load_file(_ckpt(reference, 4) / "ema.safetensors")
    k = "blocks.1.attn.qkv_proj.weight"
    assert 0 < (ema[k] - before[k]).abs().max() < (model[k] - before[k]).abs().max()


def _model_config(run: Path) -> HARTConfig:
    import yaml

    return HARTConfig(**yaml.safe_load((run / "config.yaml").read_text())["t2i"]["model"])


def test_first_step_matches_fp32(reference, t2i_args, tmp_path):
    """configs/t2i_1024.yaml: from the same trained-looking weights (random, with the zero-initialised output layers filled in so
    that every term depends on the precision), one step in bf16 and one in fp32."""
    torch.manual_seed(1)
    model = HARTForT2I(_model_config(reference))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    init = tmp_path / "init"
    init.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, init / "model.safetensors")
    first = {}
    for dtype in ("bf16", "fp32"):
        check(run_train(T2I_1024, t2i_args(tmp_path, dtype, f"run.dtype={dtype}", f"run.init_from={init}",
                                      "run.max_steps=1", "ema.enabled=false")))
        first[dtype] = losses(tmp_path / dtype)[1]
    for key, rel in (("loss", 0.005), ("ce", 0.005), ("diff_loss", 0.01)):
        a, b = first["bf16"][key], first["fp32"][key]
        assert abs(a - b) <= rel * abs(b), (key, a, b)
    assert first["bf16"]["ce"] != first["fp32"]["ce"]  # bf16 really ran
    print("first-step bf16 vs fp32:", {k: (first["bf16"][k], first["fp32"][k]) for k in ("loss", "ce", "diff_loss")})


def test_bf16_two_rank_checkpoint_resumes_on_one_rank(reference, t2i_args, tmp_path):
    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    for later in (8, 12):
        shutil.rmtree(_ckpt(run, later))
    result = run_train(T2I, t2i_args(tmp_path, "ref"), nproc=1)
    check(result)
    assert "converting to a universal checkpoint" in result.stdout
    steps = losses(run)
    assert sorted(steps) == list(range(1, 13)) and all(np.isfinite(steps[s]["loss"]) for s in steps)
    assert all(steps[s]["loss"] == losses(reference)[s]["loss"] for s in range(1, 5))
    # the EMA came back from the 2-rank checkpoint: after 8 more steps at decay 0.9999 it is still within
    # a hair of the one saved at step 4
    ema4, ema12 = (load_file(_ckpt(run, s) / "ema.safetensors") for s in (4, 12))
    k = "blocks.1.attn.qkv_proj.weight"
    assert (ema12[k] - ema4[k]).abs().max() < 1e-3 * ema4[k].abs().max()


def test_sample_and_export_from_a_bf16_checkpoint(reference, tmp_path):
    ckpt = _ckpt(reference, 12)
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "hart_train.sample_cli", "--model", str(ckpt), "--prompt", "red apple",
           "--prompt", "rocket", "--seed", "3", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    grid = np.asarray(Image.open(out))
    assert grid.shape == (32, 16, 3) and grid.std() > 0
    exported = tmp_path / "official"
    result = subprocess.run([sys.executable, "-m", "hart_train.cli", "export", "--ckpt", str(ckpt), "--out", str(exported)],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ema = load_file(ckpt / "ema.safetensors")
    official_ema = torch.load(exported / "llm" / "ema_model.bin", weights_only=True)
    assert all(torch.equal(official_ema[k], ema[k]) for k in ema)
    assert (exported / "tokenizer" / "model.safetensors").exists()


def test_tokenizer_stages_encode_and_t2i_from_tokens_in_bf16(emoji_dataset, qwen, tmp_path):
    """tokenizer-vq (GAN from step 6, dead-code restarts) -> tokenizer-hybrid -> hart-data encode -> t2i
    from the token shards, every training stage in bf16 from its shipped config."""
    common = [f"data.urls=[{emoji_dataset}]", f"run.out_dir={tmp_path}", f"tokenizer.eval_url={emoji_dataset}",
              *TOKENIZER_SIZES]
    check(run_train("configs/tokenizer_vq.yaml", [*common, "run.name=vq", "tokenizer.loss.disc_start_step=6",
                                                  "tokenizer.loss.dead_code_steps=3"]))
    vq = losses(tmp_path / "vq")
    assert json.loads((tmp_path / "vq" / "deepspeed.json").read_text())["bf16"]["enabled"]
    assert vq[12]["recon"] < 0.8 * vq[1]["recon"] and "gan_g" in vq[12] and "gan_g" not in vq[5]
    assert sum(vq[s].get("dead_codes_restarted", 0) for s in vq) > 0
    evals = [json.loads(l) for l in (tmp_path / "vq" / "metrics.jsonl").read_text().splitlines() if "eval/psnr_discrete" in l]
    assert evals and np.isfinite(evals[-1]["eval/psnr_continuous"])

    init = _ckpt(tmp_path / "vq", 12)
    check(run_train("configs/tokenizer_hybrid.yaml", [*common, "run.name=hybrid", f"run.init_from={init}"]))
    hybrid = losses(tmp_path / "hybrid")
    assert all(np.isfinite(r["loss"]) for r in hybrid.values())
    before = load_file(init / "model.safetensors")
    after = load_file(_ckpt(tmp_path / "hybrid", 12) / "model.safetensors")
    # the frozen encoder computed in bf16, and the checkpoint holds exactly the weights it computed with
    k = "vae.encoder.conv_in.weight"
    assert torch.equal(after[k], before[k].bfloat16().float())
    assert not torch.equal(after["vae.decoder.conv_out.weight"], before["vae.decoder.conv_out.weight"])

    tok_ckpt = _ckpt(tmp_path / "hybrid", 12)
    tokens = tmp_path / "tokens"
    result = subprocess.run([sys.executable, "-m", "data_tools.cli", "encode", emoji_dataset, str(tokens),
                             "--tokenizer-ckpt", str(tok_ckpt), "--text-encoder", f"qwen2:{qwen}", "--max-length", "16",
                             "--system-prompt", "--batch-size", "64", "--no-progress"],
                            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    check(run_train(T2I, fullsize_t2i_overrides(str(tokens), tmp_path, "t2i", tok_ckpt, qwen, "data.kind=tokens",
                                                "run.max_steps=4")))
    t2i = losses(tmp_path / "t2i")
    assert sorted(t2i) == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in t2i.values())


def test_partitioned_construction_holds_half_the_model_per_rank(reference, t2i_args, tmp_path):
    """The shipped 512px config (ZeRO-3, bf16) at a mid size (42M parameters, 80 MiB in bf16): each of 2
    ranks peaks at its half of the model plus a constant ~12 MiB (one layer built whole before it is
    split, DeepSpeed's bookkeeping) while building it and loading `run.init_from` into it, measured as
    the kernel's peak resident set (host_memory.PeakMemory): 0.65-0.68 of the model here, 0.59 at depth
    16, about 0.5 at full size. Built unpartitioned (the same config at ZeRO-2), a rank holds all of it,
    in fp32. The gathered weights equal the init file's, rounded to the dtype they were built in."""
    sizes = ["t2i.model.depth=8", "t2i.model.embed_dim=512", "t2i.model.num_heads=8", "t2i.model.diff_width=256"]
    cfg = _model_config(reference)
    for kv in sizes:
        key, value = kv.removeprefix("t2i.model.").split("=")
        setattr(cfg, key, int(value))
    torch.manual_seed(5)
    init = tmp_path / "init"
    init.mkdir()
    save_file({k: v.contiguous() for k, v in HARTForT2I(cfg).state_dict().items()}, init / "model.safetensors")
    reports = {}
    for zero in (3, 2):
        out = tmp_path / f"zero{zero}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "tests/construct_worker.py", T2I_512, str(out),
               *t2i_args(tmp_path, "c", *sizes, f"zero.stage={zero}", f"run.init_from={init}")]
        result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        reports[zero] = [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]
    total = reports[3][0]["total"]
    model_bytes = 2 * total  # bf16
    for r in reports[3]:
        assert r["dtype"] == "torch.bfloat16" and abs(r["held"] - total / 2) < 0.01 * total
        own = 2 * r["held"]
        assert own <= r["peak_bytes"] < own + 0.25 * model_bytes, (r["peak_bytes"], own, model_bytes)
    for r in reports[2]:
        assert r["peak_bytes"] > 0.9 * model_bytes, (r["peak_bytes"], model_bytes)  # the measurement sees it all
    assert reports[3][0]["max_abs_diff"] == 0.0 and reports[2][0]["max_abs_diff"] == 0.0
    print("construction peak MB per rank, ZeRO-3 partitioned:", [r["peak_bytes"] / 2**20 for r in reports[3]],
          "unpartitioned:", [r["peak_bytes"] / 2**20 for r in reports[2]], "model MB (bf16):", model_bytes / 2**20)
