"""Held-out evaluation of the t2i stage (`t2i.eval_url`, `T2IStage.evaluate`) on the shipped full-size config
(configs/t2i_256.yaml at small width: bf16, ZeRO-3 with persistent small parameters, EMA decay 0.9999), 2
gloo ranks: a run with evaluation trains bit for bit as the same run without (the session's bf16
reference); the numbers of one checkpoint are the same at every evaluation, in the run and in a fresh
process, and on 1 rank as on 2; raw and EMA weights give different numbers; token shards serve as the
held-out set of a token run; a missing held-out set, or one of the wrong kind or encoding, is refused
before the model is built.

Tolerance across rank counts: none. Each held-out micro-batch is computed by one rank whatever the rank
count, and the per-batch sums are added in batch order after the all-reduce, so 1 and 2 ranks give the
same bits wherever one micro-batch's forward does (here: CPU, one thread per rank, as procs.env runs every
rank). Kernels whose rounding depends on the thread count or on scheduling (multi-threaded CPU BLAS, some
GPU kernels) would add float rounding to that (relative ~1e-6 in fp32 sums).

Run as a script (under torchrun), this file is the worker that evaluates a checkpoint of a run:
    tests/test_t2i_eval.py RUN_DIR STEP OUT_JSON
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from procs import REPO, check, env, free_port, run_train
from runs import same_kernel

CONFIG = "configs/t2i_256.yaml"
# 20 samples in micro-batches of 8: batches 0 and 2 (4 samples) on rank 0, batch 1 and a spare on rank 1
HELD_OUT = ["t2i.eval_samples=20", "run.eval_every=4"]
TRAIN_KEYS = ("loss", "ce", "acc", "diff_loss", "grad_norm")


def eval_keys(prefix: str, num_scales: int = 3) -> set[str]:
    return ({f"{prefix}/{k}" for k in ("loss", "ce", "acc", "diff_loss", "diff_mse", "diff_vb")}
            | {f"{prefix}/{m}/scale_{i:02d}" for m in ("ce", "acc") for i in range(num_scales)})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evals(run_dir: Path) -> dict[int, dict]:
    """step -> the held-out log line of that step (without its step and time)."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval")} for r in records(run_dir) if "eval/loss" in r}


def train_lines(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "loss" in r}


def evaluate_checkpoint(run_dir: Path, step: int, nproc: int, out: Path) -> dict:
    """This file as a worker on `nproc` ranks: evaluates the run's checkpoint of `step` twice."""
    args = [str(Path(__file__)), str(run_dir), str(step), str(out)]
    cmd = ([sys.executable, *args] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", *args])
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def evaluated(t2i_args, emoji_dataset, bf16_reference, tmp_path_factory) -> Path:
    """The bf16 reference run (conftest.bf16_reference) with a held-out evaluation every 4 steps."""
    out = tmp_path_factory.mktemp("t2i_eval")
    check(run_train(CONFIG, t2i_args(out, "eval", f"t2i.eval_url={emoji_dataset}", same_kernel(bf16_reference),
                                     *HELD_OUT)))
    return out / "eval"


def test_evaluation_is_logged_and_leaves_training_untouched(evaluated, bf16_reference):
    got, ref = train_lines(evaluated), train_lines(bf16_reference)
    assert sorted(got) == sorted(ref) == list(range(1, 13))
    for step in ref:
        for key in TRAIN_KEYS:
            assert got[step][key] == ref[step][key], (step, key)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(run / "ckpt" / "step_00000012" / name) for run in (evaluated, bf16_reference))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not evals(bf16_reference)

    held = evals(evaluated)
    assert sorted(held) == [4, 8, 12]
    for values in held.values():
        assert set(values) == eval_keys("eval") | eval_keys("eval_ema")
        assert all(math.isfinite(v) for v in values.values())
        for prefix in ("eval", "eval_ema"):
            assert values[f"{prefix}/loss"] == pytest.approx(values[f"{prefix}/ce"] + values[f"{prefix}/diff_loss"])
            assert 0 <= values[f"{prefix}/acc"] <= 1
    # the raw weights train; the EMA (decay 0.9999) has barely left the initial weights
    assert held[12]["eval/ce"] < held[4]["eval/ce"]
    for key in ("ce", "diff_loss", "ce/scale_02"):
        assert held[12][f"eval/{key}"] != held[12][f"eval_ema/{key}"], key
    # stdout carries them as the training metrics (MetricsLogger); wandb gets the same dict


def test_same_numbers_at_every_evaluation_on_any_number_of_ranks(evaluated, tmp_path):
    logged = evals(evaluated)[12]
    two = evaluate_checkpoint(evaluated, 12, 2, tmp_path / "two.json")
    assert two["first"] == two["second"] == logged  # the run's own evaluation, and twice in a fresh process
    one = evaluate_checkpoint(evaluated, 12, 1, tmp_path / "one.json")
    assert one["first"] == one["second"] == two["first"]  # bit for bit (see the module docstring)


def test_token_shards_as_held_out_set(t2i_args, emoji_dataset, tokenizer_ckpt, qwen, tmp_path):
    """With data.kind: tokens the held-out set is token shards too (`hart-data encode`, as the training set)."""
    tokens = tmp_path / "tokens"
    result = subprocess.run([sys.executable, "-m", "data_tools.cli", "encode", emoji_dataset, str(tokens),
                             "--tokenizer-ckpt", str(tokenizer_ckpt), "--text-encoder", f"qwen2:{qwen}",
                             "--max-length", "16", "--system-prompt", "--batch-size", "64",
                             "--no-progress"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    check(run_train(CONFIG, t2i_args(tmp_path, "tok", f"data.urls=[{tokens}]", "data.kind=tokens",
                                     f"t2i.eval_url={tokens}", "t2i.eval_samples=12", "run.max_steps=2")))
    held = evals(tmp_path / "tok")
    assert sorted(held) == [2] and set(held[2]) == eval_keys("eval") | eval_keys("eval_ema")
    assert all(math.isfinite(v) for v in held[2].values())

    # token shards encoded otherwise than the training set's are refused before anything is built
    from hart_train import config as C
    from hart_train.run_config import RunConfig
    from hart_train.stages import make_stage

    other = tmp_path / "other-tokens"
    other.mkdir()
    manifest = json.loads((tokens / "manifest.json").read_text())
    manifest["options"]["tokenizer_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = C.load(RunConfig, str(REPO / CONFIG), t2i_args(tmp_path, "x", f"data.urls=[{tokens}]", "data.kind=tokens",
                                                         f"t2i.eval_url={other}"))
    with pytest.raises(ValueError, match="t2i.eval_url: its token shards were encoded with tokenizer weights sha256"):
        make_stage(cfg, torch.device("cpu"))


def test_held_out_settings_are_checked_before_the_model_is_built(t2i_args, emoji_dataset, tmp_path):
    from hart_train import config as C
    from hart_train.config import ConfigError
    from hart_train.run_config import RunConfig
    from hart_train.stages import make_stage

    def stage(*extra):
        return make_stage(C.load(RunConfig, str(REPO / CONFIG), t2i_args(tmp_path, "x", *extra)), torch.device("cpu"))

    with pytest.raises(ConfigError, match="eval_samples must be >= 1"):
        stage("t2i.eval_samples=0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="t2i.eval_url: .*manifest.json"):
        stage(f"t2i.eval_url={tmp_path / 'empty'}")
    tokens = tmp_path / "tokens"  # an image dataset's manifest claiming to hold tokens
    tokens.mkdir()
    manifest = json.loads((Path(emoji_dataset) / "manifest.json").read_text())
    (tokens / "manifest.json").write_text(json.dumps({**manifest, "options": {"format": "hart-tokens"}}))
    with pytest.raises(ValueError, match="t2i.eval_url: .* holds tokens"):
        stage(f"t2i.eval_url={tokens}")


def _worker(run_dir: str, step: int, out: str) -> None:
    """Rebuild the run's engine on this launch's ranks as `trainer.train` does, with the weights and the
    EMA of its checkpoint of `step`, and evaluate twice."""
    from hart_train import config as C
    from hart_train import distributed as D
    from hart_train import engine as E
    from hart_train.ema import EMA
    from hart_train.models import kernels
    from hart_train.run_config import RunConfig
    from hart_train.stages import make_stage
    from hart_train.trainer import build_model

    cfg = C.load(RunConfig, str(Path(run_dir) / "config.yaml"))
    device = D.init(cfg.run.device, cfg.run.collective_timeout_s)
    kernels.set_attention(json.loads((Path(run_dir) / "kernels.json").read_text())["attention"])
    ckpt = Path(run_dir) / "ckpt" / f"step_{step:08d}"
    stage = make_stage(cfg, device)
    ds_config = E.deepspeed_config(cfg)
    model, _ = build_model(cfg, stage, ds_config, device, str(ckpt))
    engine = E.build(cfg, model, ds_config)
    ema = EMA(engine.module, cfg.ema.decay, device)
    ema.load_full_state_dict(load_file(ckpt / "ema.safetensors"))
    first = stage.evaluate(engine.module, ema, step)
    second = stage.evaluate(engine.module, ema, step)
    if D.is_main():
        Path(out).write_text(json.dumps({"first": first, "second": second}))
    D.destroy()


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
