"""LoRA against full fine-tuning of the same model on the same batches, measured, and as `hart-train plan`
predicts it for the full-size model. Prints one JSON object.

    python bench/lora_step.py [--steps 8] [--work /tmp/hart-lora-bench] [--rank 16] [--targets attention,mlp]

1. `measured`: the shipped configs/t2i_256.yaml (bf16, ZeRO-3, activation checkpointing, EMA) at a mid size
   (depth 8, width 512, 8 heads, diffusion head 512 x 3: about 43M parameters) on 2 CPU ranks through the
   real CLI (`torch.distributed.run`, gloo, one thread each), on emoji shards at 16px (patch_nums 1,2,4, a
   tiny random tokenizer and Qwen2 text encoder, micro-batch 8). Both runs start from the same
   `run.init_from` (random weights, every layer non-zero) with the same seed, so they read the same batches
   in the same order; they differ only in `t2i.lora` (rank `--rank`, alpha = rank, the `--targets` groups)
   and in the learning rate (1e-4 full, 1e-3 LoRA: what each would use; it does not change the cost).
   Per run: per-rank bytes of the optimizer's fp32 masters and Adam moments and of the gradient partition
   (the trainer's memory.json, counted from the tensors), trainable parameters, the median step time over
   steps 3.. (metrics.jsonl's step_time_s; the first steps build the optimizer state), and the size of the
   final checkpoint directory (DeepSpeed's files, model/ema safetensors, reader and RNG state). The two
   runs are sequential processes on a shared machine: compare step times with the load average in mind.
2. `planned_fullsize`: `hart-train plan` for configs/t2i_1024.yaml (the 0.7B model at 1024px, 8 GPUs, its
   micro-batch), full fine-tuning and with `t2i.lora` (same rank and targets): per-rank bytes by holder.

On the 2-core development machine (rank 16 on attention + mlp, 12 steps; load average ~3): 1.18M trainable
parameters against 46.0M; per rank, optimizer (masters + moments) 7.1 MB against 276 MB and gradients 1.2 MB
against 46 MB (both 2.6%); checkpoint 23.8 MB against 920 MB; step time 1.59 s against 1.82 s median in one
run and 2.25 s against 2.07 s in another: at this size a CPU step is dominated by ZeRO-3's gathers and the
per-module hooks, which the frozen base still needs (and the adapters add modules), so LoRA's saving in the
weight gradients and the optimizer step is within the machine's noise. Planned for the 0.7B model at 1024px
on 8 GPUs: 6.7M trainable parameters; per rank, optimizer 10.0 MB against 1.10 GB, gradients 1.7 MB against
183 MB, total 15.14 GiB against 16.65 GiB at the largest default bucket, 52x80 (14.98 against 16.49 on
the square schedule) (the step's activations and gathered weights, 11.4 GiB, and the
frozen text encoder dominate both).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, free_port, log, rank_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the random tiny tokenizer and Qwen2 builders the tests use

CONFIG = "configs/t2i_256.yaml"
MODEL = ["t2i.model.depth=8", "t2i.model.embed_dim=512", "t2i.model.num_heads=8", "t2i.model.diff_width=512",
         "t2i.model.diff_depth=3"]


def prepare(work: Path) -> dict:
    """Emoji shards at 16px, a tiny random tokenizer, a tiny Qwen2, and the base weights both runs start from."""
    from safetensors.torch import save_file

    from data_tools.shard import shard_dataset
    from hart_train import config as C
    from hart_train.models import HARTForT2I
    from hart_train.run_config import RunConfig
    from runs import fullsize_t2i_overrides, make_tokenizer_ckpt
    from text_models import save_tiny_qwen

    data = work / "emoji-16"
    if not (data / "manifest.json").exists():
        shard_dataset("emoji", str(data), resolution=16, fmt="png", samples_per_shard=64, workers=1, limit=256,
                      progress=False)
    tok = work / "tok_seed0" / "step_00000001"
    if not (tok / "model.safetensors").exists():
        tok = make_tokenizer_ckpt(work, seed=0)
    qwen = work / "qwen2"
    if not (qwen / "config.json").exists():
        qwen.mkdir(parents=True, exist_ok=True)
        save_tiny_qwen(qwen)
    paths = {"data": data, "tok": tok, "qwen": qwen, "base": work / "base"}
    if not (paths["base"] / "model.safetensors").exists():
        cfg = C.load(RunConfig, str(REPO / CONFIG), fullsize_t2i_overrides(data, work, "x", tok, qwen, *MODEL))
        torch.manual_seed(3)
        model = HARTForT2I(cfg.t2i.model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        paths["base"].mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths["base"] / "model.safetensors")
    return paths


def overrides(paths: dict, out: Path, name: str, steps: int, lora: list[str]) -> list[str]:
    from runs import fullsize_t2i_overrides

    return fullsize_t2i_overrides(paths["data"], out, name, paths["tok"], paths["qwen"], *MODEL,
                                  f"run.init_from={paths['base']}", f"run.max_steps={steps}", "run.save_every=0",
                                  "t2i.sample_prompts=[]", "data.shuffle_window=16", *lora)


def train(sets: list[str], log_path: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "hart_train.cli", "run", "--config", CONFIG]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True)
    log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}), see {log_path}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def summarize_run(run: Path, steps: int) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] >= 3]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    memory = json.loads((run / "memory.json").read_text())["per_rank"]
    shards = json.loads((run / "param_shards.json").read_text())
    ckpt = run / "ckpt" / f"step_{steps:08d}"
    with safe_open(str(ckpt / "ema.safetensors"), framework="pt") as f:  # the EMA covers the trainable ones
        trainable = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {
        "parameters": shards["total"], "trainable_parameters": trainable,
        "per_rank_optimizer_bytes": [m["master_weights"] + m["optimizer_state"] for m in memory],
        "per_rank_master_bytes": [m["master_weights"] for m in memory],
        "per_rank_adam_moment_bytes": [m["optimizer_state"] for m in memory],
        "per_rank_gradient_bytes": [m["gradients"] for m in memory],
        "per_rank_ema_bytes": [m["ema"] for m in memory],
        "per_rank_parameter_bytes": [m["parameters"] for m in memory],
        "per_rank_peak_total_bytes": [m["peak_total"] for m in memory],
        "step_time_median_s": round(statistics.median(step_times), 4), "step_time_min_s": round(min(step_times), 4),
        "step_times_s": [round(t, 4) for t in step_times],
        "checkpoint_bytes": _dir_bytes(ckpt),
        "checkpoint_files": {f.name: f.stat().st_size for f in sorted(ckpt.iterdir()) if f.is_file()},
        "loss_first_last": [losses[1], losses[steps]],
    }


def planned(lora: list[str], gpus: int) -> dict:
    from hart_train import config as C
    from hart_train.memory_plan import Planner
    from hart_train.run_config import RunConfig

    cfg = C.load(RunConfig, str(REPO / "configs/t2i_1024.yaml"), lora)
    planner = Planner(cfg, world_size=gpus)
    plan = planner.plan(cfg.data.batch_size)
    return {"trainable_parameters": planner.trainable, "micro_batch": plan.micro_batch,
            "device_bytes": plan.device, "device_total_bytes": plan.total,
            "optimizer_bytes": plan.device["master_weights"] + plan.device["optimizer_state"],
            "gradient_bytes": plan.device["gradients"], "notes": plan.notes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--work", default="/tmp/hart-lora-bench")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="attention,mlp")
    p.add_argument("--gpus", type=int, default=8, help="ranks of the full-size plan")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON alone (DeepSpeed logs to stdout)
        paths = prepare(work)
    lora = [f"t2i.lora.rank={args.rank}", f"t2i.lora.alpha={args.rank}", f"t2i.lora.targets=[{args.targets}]"]
    variants = {"full": ["optim.lr=1e-4"], "lora": [*lora, "optim.lr=1e-3"]}
    out = {"environment": environment(), "config": CONFIG, "model_overrides": MODEL, "steps": args.steps,
           "lora": {"rank": args.rank, "alpha": args.rank, "targets": args.targets.split(",")}, "measured": {}}
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    for name, extra in variants.items():
        log(f"training {name} ...")
        wall = train(overrides(paths, runs, name, args.steps, extra), work / f"{name}.log")
        out["measured"][name] = {"wall_s": round(wall, 1), **summarize_run(runs / name, args.steps)}
    full, ours = out["measured"]["full"], out["measured"]["lora"]
    out["measured"]["lora_over_full"] = {
        "optimizer_bytes": ours["per_rank_optimizer_bytes"][0] / full["per_rank_optimizer_bytes"][0],
        "gradient_bytes": ours["per_rank_gradient_bytes"][0] / full["per_rank_gradient_bytes"][0],
        "step_time": ours["step_time_median_s"] / full["step_time_median_s"],
        "checkpoint_bytes": ours["checkpoint_bytes"] / full["checkpoint_bytes"],
    }
    log("planning the full-size model ...")
    with contextlib.redirect_stdout(sys.stderr):
        plan_full, plan_lora = planned([], args.gpus), planned(lora, args.gpus)
    out["planned_fullsize"] = {"config": "configs/t2i_1024.yaml", "gpus": args.gpus, "full": plan_full, "lora": plan_lora,
                               "lora_over_full": {k: plan_lora[k] / plan_full[k] for k in
                                                  ("optimizer_bytes", "gradient_bytes", "device_total_bytes")}}
    out["load_average_after"] = environment()["load_average_1_5_15"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
