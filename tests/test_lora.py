"""LoRA fine-tuning (`t2i.lora`, hart_train.lora) as a user runs it: an official-layout HART checkpoint built
here is imported (`hart-train import`), and configs/t2i_256.yaml at small width (bf16, ZeRO-3, 2 gloo
ranks, the shipped settings) trains rank-4 adapters on every target group on the emoji shards, starting
from it. Checked: the loss falls; only the adapters train and are saved (the model, the EMA, the
optimizer's masters); the base file is untouched; a SIGKILLed run resumes bit for bit and a 2-rank
checkpoint resumes on 1 rank; the merged export loads into the official layout and computes what the
unmerged adapters compute; hart-sample gives the same images merged and unmerged.

Tolerance of merged against unmerged (test_merged_export_equals_the_unmerged_adapters): both run in fp32 on
the CPU from the same fp32 weights (sampling and export load the fp32 masters); merging changes only the
rounding order (W x + s B (A x) against (W + s B A) x), so the logits agree to about an fp32 ulp of their
magnitude (measured: max |diff| 1.8e-7 with the raw adapters, logits up to 0.65); the test allows 1e-5. The
raw adapters move those logits by up to 0.23 from the base, so a layer left out of the merge or merged twice
fails by four orders of magnitude. hart-sample's images, merged and unmerged, differ by at most 1/255 in a
pixel (measured 0 here, 1 in another run: a value at a rounding boundary of the 8-bit conversion); the
rounding is far below what changes a sampled token, which would move whole patches.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from hart_train import config as C
from hart_train import lora
from hart_train.models import HARTForT2I, load_official_state_dict, official_state_dict
from hart_train.official_io import export_checkpoint, import_official, t2i_config_to_official
from hart_train.run_config import RunConfig
from hart_train.stages import make_stage
from procs import check, kill_group, run_train, start_train, wait_for
from runs import losses, same_kernel
from test_official_io import OFFICIAL_TOKENIZER, write_official
from tokenizer.autoencoder import HARTAutoEncoderWithDisc, tokenizer_config

T2I = "configs/t2i_256.yaml"
LORA = ["t2i.lora.rank=4", "t2i.lora.alpha=8", "t2i.lora.targets=[attention,mlp,adaln,diffusion_head]",
        "optim.lr=2e-3"]  # adapters start at B = 0 and want a larger step than full fine-tuning


def _ckpt(run: Path, step: int) -> Path:
    return run / "ckpt" / f"step_{step:08d}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def imported(t2i_args, tmp_path_factory) -> Path:
    """An official HART directory for the small-width t2i_256 model (trained-looking weights: random, with
    the zero-initialised layers filled in), imported with `hart-train import`; returns the import."""
    root = tmp_path_factory.mktemp("lora_base")
    cfg = C.load(RunConfig, T2I, t2i_args(root, "x")).t2i.model
    torch.manual_seed(11)
    model = HARTForT2I(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    raw = official_state_dict(model)
    tok = HARTAutoEncoderWithDisc(tokenizer_config("tiny")).state_dict()
    official = t2i_config_to_official(cfg)
    src = write_official(root / "hart", raw, raw, tok, llm_cfg=official, tok_cfg=OFFICIAL_TOKENIZER)
    return import_official(src, root / "imported")


def _args(t2i_args, imported: Path, out: Path, name: str, *extra: str) -> list[str]:
    return t2i_args(out, name, f"run.init_from={imported / 'llm'}", f"t2i.tokenizer_ckpt={imported / 'tokenizer'}",
                    *LORA, *extra)


@pytest.fixture(scope="module")
def reference(imported, t2i_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_run")
    base_sha = _sha256(imported / "llm" / "model.safetensors")
    check(run_train(T2I, _args(t2i_args, imported, out, "ref")))
    assert _sha256(imported / "llm" / "model.safetensors") == base_sha  # the base file is only read
    return out / "ref"


def _adapter_names(run: Path) -> set[str]:
    cfg = C.build(RunConfig, yaml.safe_load((run / "config.yaml").read_text()))
    model = lora.inject(HARTForT2I(cfg.t2i.model), cfg.t2i.lora)
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_trains_only_the_adapters(reference):
    ds = json.loads((reference / "deepspeed.json").read_text())
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    steps = losses(reference)
    assert sorted(steps) == list(range(1, 13)) and all(np.isfinite(r["loss"]) for r in steps.values())
    # the base is frozen, so what falls is the adapters' doing (the total is dominated by the diffusion
    # loss's draw-to-draw noise at this size; the CE is not)
    first, last = np.mean([steps[s]["ce"] for s in (1, 2)]), np.mean([steps[s]["ce"] for s in (11, 12)])
    assert last < first - 0.04, (first, last)

    # the model as the stage builds it (unpartitioned here): exactly the adapters are trainable
    cfg = C.build(RunConfig, yaml.safe_load((reference / "config.yaml").read_text()))
    built = make_stage(cfg, torch.device("cpu")).build_model()
    names = {n for n, p in built.named_parameters() if p.requires_grad}
    assert names == _adapter_names(reference)
    assert names and all(".lora_A.default." in n or ".lora_B.default." in n for n in names)
    # 4 groups: attention (2 layers per block), mlp (3), adaln (1 per block + the head's), the diffusion head
    assert {n.rsplit(".", 3)[0] for n in names} >= {"blocks.0.attn.qkv_proj", "blocks.1.ffn.down_proj",
                                                    "head_nm.ada_lin.1", "diffloss.net.final_layer.linear"}
    ckpt = _ckpt(reference, 12)
    model, ema = load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")
    assert set(model) == names and set(ema) == names  # adapters only, the fp32 masters
    assert all(v.dtype == torch.float32 for v in model.values())
    assert any(model[n].abs().max() > 0 for n in names if ".lora_B." in n)  # B has left its zero start
    # the optimizer holds the adapters only: each rank's fp32 masters and two Adam moments cover half of them
    adapter_numel = sum(v.numel() for v in model.values())
    for mem in json.loads((reference / "memory.json").read_text())["per_rank"]:
        assert mem["master_weights"] == pytest.approx(4 * adapter_numel / 2, rel=0.05), mem
        assert mem["optimizer_state"] == pytest.approx(2 * 4 * adapter_numel / 2, rel=0.05), mem
    # DeepSpeed's files carry no base weights either: per rank, its half of the masters and moments (12 bytes
    # per element) and the model's buffers, not its bf16 partition of the base
    for rank in (0, 1):
        optim = (ckpt / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").stat().st_size
        assert optim < 12 * adapter_numel / 2 + 100_000, optim
    base_numel = json.loads((reference / "param_shards.json").read_text())["total"] - adapter_numel
    # (with the frozen partitions in them, each rank's model-states file would hold base_numel bytes more)
    assert all(f.stat().st_size < base_numel for f in ckpt.glob("*model_states.pt"))


def test_lora_starts_as_its_base(reference, imported, t2i_args, tmp_path):
    """B starts at zero, so the first step's loss is the base model's: bit for bit that of full fine-tuning
    from the same init_from on the same batch (the base loaded under its `.base_layer` names, partitioned)."""
    check(run_train(T2I, _args(t2i_args, imported, tmp_path, "full", "t2i.lora=null", "run.max_steps=1",
                               "ema.enabled=false", "t2i.sample_prompts=[]", same_kernel(reference))))
    full, ours = losses(tmp_path / "full")[1], losses(reference)[1]
    for key in ("loss", "ce", "diff_loss"):
        assert full[key] == ours[key], (key, full[key], ours[key])


def test_killed_lora_run_resumes_bit_for_bit(reference, imported, t2i_args, tmp_path):
    args = _args(t2i_args, imported, tmp_path, "killed", same_kernel(reference))
    proc = start_train(T2I, args, nproc=2)
    wait_for(_ckpt(tmp_path / "killed", 4) / "COMPLETE", proc)
    kill_group(proc)
    check(run_train(T2I, args))
    got, ref = losses(tmp_path / "killed"), losses(reference)
    assert sorted(got) == sorted(ref)
    for step in ref:
        for key in ("loss", "ce", "diff_loss", "grad_norm"):
            assert got[step][key] == ref[step][key], (step, key)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(_ckpt(tmp_path / "killed", 12) / name), load_file(_ckpt(reference, 12) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_two_rank_lora_checkpoint_resumes_on_one_rank(reference, imported, t2i_args, tmp_path):
    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    for later in (8, 12):
        shutil.rmtree(_ckpt(run, later))
    result = run_train(T2I, _args(t2i_args, imported, tmp_path, "ref"), nproc=1)
    check(result)
    assert "converting to a universal checkpoint" in result.stdout
    steps, ref = losses(run), losses(reference)
    assert sorted(steps) == list(range(1, 13)) and all(np.isfinite(steps[s]["loss"]) for s in steps)
    assert all(steps[s]["loss"] == ref[s]["loss"] for s in range(1, 5))
    # the adapters' EMA came back from the 2-rank files: 4 more steps at decay 0.9999 move it by ~1e-6, where
    # an EMA started afresh from the step-4 adapters would differ from the saved one by their whole 4-step
    # change (B left zero by up to ~1e-2)
    ema4, ema8 = (load_file(_ckpt(run, s) / "ema.safetensors") for s in (4, 8))
    assert set(ema8) == _adapter_names(run)
    assert max((ema8[k] - ema4[k]).abs().max().item() for k in ema4) < 1e-4
    raw4 = load_file(_ckpt(run, 4) / "model.safetensors")
    assert max((raw4[k] - ema4[k]).abs().max().item() for k in ema4) > 1e-3  # (which the check could tell apart)


def _fixed_batch(cfg, B: int = 2):
    g = torch.Generator().manual_seed(5)
    L = sum(p * p for p in cfg.patch_nums)
    return (torch.randn(B, cfg.context_token, cfg.context_dim, generator=g),
            torch.ones(B, cfg.context_token, dtype=torch.long), torch.randn(B, L - 1, cfg.Cvae, generator=g))


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model.eval().forward_logits(*batch)[0]


def test_merged_export_equals_the_unmerged_adapters(reference, imported, tmp_path):
    from hart_train.sampling import load_pipeline

    ckpt = _ckpt(reference, 12)
    exported = export_checkpoint(ckpt, tmp_path / "official")
    # the official layout, as the official loader reads it: every official key (buffers included) strictly,
    # ema_model.bin a plain tensor dict; and it imports back as an ordinary (non-LoRA) checkpoint
    raw = load_file(exported / "llm" / "model.safetensors")
    ema_bin = torch.load(exported / "llm" / "ema_model.bin", weights_only=True)
    cfg = load_pipeline(str(ckpt), text_encoder=False).model.config
    official_keys = sorted(official_state_dict(HARTForT2I(cfg)))
    assert sorted(raw) == official_keys and sorted(ema_bin) == official_keys
    again = import_official(exported, tmp_path / "again")
    assert "lora" not in yaml.safe_load((again / "llm" / "config.yaml").read_text())["t2i"]

    batch = _fixed_batch(cfg)
    base = HARTForT2I(cfg)
    load_official_state_dict(base, load_file(imported / "llm" / "model.safetensors"), strict=True)
    for weights, use_ema in ((raw, False), (ema_bin, True)):  # the raw adapters, and their EMA (barely moved)
        unmerged = load_pipeline(str(ckpt), use_ema=use_ema, text_encoder=False).model
        assert lora.lora_layers(unmerged)  # the adapters are separate layers
        merged = HARTForT2I(cfg)
        load_official_state_dict(merged, weights, strict=True)
        a, b, c = _logits(unmerged, batch), _logits(merged, batch), _logits(base, batch)
        worst, effect = (a - b).abs().max().item(), (a - c).abs().max().item()
        print(f"{'EMA' if use_ema else 'raw'} adapters, merged vs unmerged logits: max |diff| {worst:.3g}; the "
              f"adapters' effect {effect:.3g}; logits up to {a.abs().max().item():.3g}")
        assert worst < 1e-5, worst
        if not use_ema:
            assert effect > 1000 * 1e-5, effect
    # the raw merge is the base plus alpha/rank * B @ A of the raw adapters, layer by layer
    adapters, scale = load_file(ckpt / "model.safetensors"), 8 / 4
    base_sd = load_file(imported / "llm" / "model.safetensors")
    for layer in ("blocks.1.attn.qkv_proj", "diffloss.net.res_blocks.0.mlp.2"):
        A, B = adapters[f"{layer}.lora_A.default.weight"], adapters[f"{layer}.lora_B.default.weight"]
        want = base_sd[f"{layer}.weight"] + scale * B @ A
        assert torch.allclose(raw[f"{layer}.weight"], want, atol=1e-6), layer
    assert torch.equal(raw["word_embed.weight"], base_sd["word_embed.weight"])  # untargeted: the base as it was


def test_hart_sample_gives_the_same_images_merged_and_unmerged(reference, tmp_path):
    from hart_train import sample_cli

    ckpt = str(_ckpt(reference, 12))
    grids = {}
    for name, extra in (("unmerged", ["--raw"]), ("merged", ["--raw", "--merge-lora"])):
        out = tmp_path / f"{name}.png"
        assert sample_cli.main(["--model", ckpt, "--prompt", "red apple", "--prompt", "rocket", "--seed", "3",
                                "--out", str(out), *extra]) == 0
        grids[name] = np.asarray(Image.open(out)).astype(int)
    diff = np.abs(grids["merged"] - grids["unmerged"]).max()
    print("hart-sample merged vs unmerged: max pixel difference", diff)
    assert grids["merged"].shape == (32, 16, 3) and grids["merged"].std() > 0
    assert diff <= 1  # a value at a rounding boundary of the 8-bit conversion; a different token moves far more


def test_a_base_changed_in_place_is_refused(reference, imported, t2i_args, tmp_path, capsys):
    """The adapters fit the base they were trained on: every checkpoint records its sha256, and a resume or
    hart-sample (export loads the same way) on a base changed since is one clear error, not adapters
    silently applied to other weights."""
    from safetensors.torch import save_file

    from hart_train import sample_cli

    ckpt = _ckpt(reference, 12)
    assert json.loads((ckpt / "meta.json").read_text())["lora_base_sha256"] == _sha256(imported / "llm" / "model.safetensors")
    base = tmp_path / "base"
    shutil.copytree(imported / "llm", base)
    state = load_file(base / "model.safetensors")
    state["head.weight"] = state["head.weight"] + 1e-3  # fine-tuned in place, say
    save_file(state, str(base / "model.safetensors"))
    message = "have changed since this LoRA checkpoint was written"
    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    result = run_train(T2I, _args(t2i_args, imported, tmp_path, "ref", f"run.init_from={base}"), nproc=1)
    assert result.returncode == 2 and "hart-train: error: run.init_from: the base weights" in result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr  # checked before anything starts
    moved = tmp_path / "ckpt"
    shutil.copytree(ckpt, moved)
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["run"]["init_from"] = str(base)
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert sample_cli.main(["--model", str(moved), "--prompt", "red apple", "--out", str(tmp_path / "x.png")]) == 2
    assert message in capsys.readouterr().err


def test_planner_counts_the_adapters_as_measured(reference, imported, t2i_args, tmp_path):
    """`hart-train plan` for the LoRA run: masters, moments and EMA are the adapters', as memory.json measured,
    and the frozen base still counts as parameters."""
    from hart_train.memory_plan import Planner

    cfg = C.load(RunConfig, T2I, _args(t2i_args, imported, tmp_path, "plan"))
    planned = Planner(cfg, world_size=2).plan(cfg.data.batch_size).device
    full = Planner(C.load(RunConfig, T2I, _args(t2i_args, imported, tmp_path, "plan", "t2i.lora=null")), 2)
    for rank in json.loads((reference / "memory.json").read_text())["per_rank"]:
        for key in ("parameters", "master_weights", "optimizer_state", "ema"):
            assert rank[key] == pytest.approx(planned[key], rel=0.05), (key, rank[key], planned[key])
    full_states = full.plan(cfg.data.batch_size).device
    assert planned["optimizer_state"] < full_states["optimizer_state"] / 5
    assert planned["parameters"] >= full_states["parameters"]


@pytest.mark.parametrize("overrides, message", [
    (["t2i.lora.rank=0"], "t2i.lora: rank must be >= 1"),
    (["t2i.lora.targets=[attention,qkv]"], r"t2i.lora: targets.*unknown: \['qkv'\]"),
    (["t2i.lora.targets=[]"], "t2i.lora: targets must name"),
    (["t2i.lora.dropout=1.0"], r"t2i.lora: dropout must be in \[0, 1\)"),
    (["t2i.lora.rank=4", "t2i.head_only=true"], "lora and head_only exclude each other"),
])
def test_bad_lora_settings_are_refused(overrides, message, t2i_args, tmp_path):
    with pytest.raises(C.ConfigError, match=message):
        C.load(RunConfig, T2I, t2i_args(tmp_path, "x", *overrides))


def test_lora_needs_a_base_and_is_not_one(reference, imported, t2i_args, tmp_path):
    from hart_train.stages import validate_paths

    with pytest.raises(C.ConfigError, match="run.init_from: t2i.lora trains adapters on frozen base weights"):
        validate_paths(C.load(RunConfig, T2I, t2i_args(tmp_path, "x", *LORA)))
    with pytest.raises(C.ConfigError, match="run.init_from: .* is a LoRA checkpoint"):
        validate_paths(C.load(RunConfig, T2I, t2i_args(tmp_path, "x", f"run.init_from={_ckpt(reference, 12)}")))
    with pytest.raises(C.ConfigError, match="t2i.lora: LoRA adapts the t2i transformer"):
        C.load(RunConfig, "configs/tokenizer_vq.yaml", ["t2i.lora.rank=4"])
