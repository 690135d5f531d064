"""The released HART shape (depth 16, width 1536, the 37M diffusion head: 732,497,472 parameters) trained
on this machine's CPUs as the full-size recipes run it, measured. Prints one JSON object.

    python bench/fullsize_step.py [--schedules 256,1024] [--steps 3] [--work /tmp/hart-fullsize] [--memory-only]

For each schedule the shipped config (configs/t2i_{256,1024}.yaml: bf16, ZeRO-3, activation
checkpointing, partitioned construction, the released last-scale token dropping) runs through the real
CLI on 2 CPU ranks (`torch.distributed.run`, gloo, one thread each), micro-batch 1, with a full-size
tokenizer (random weights) and a Qwen2 text encoder of Qwen2-VL-1.5B's width (1536; two random layers,
built from a config here, nothing downloaded) with HART's system prompt, on emoji images rendered at the
schedule's resolution. Overridden: paths, device, micro-batch, run length and warm-up, and three settings
that a 2-core, 24 GiB host needs to hold two ranks of the 0.7B model: no EMA (with it, a rank peaked at
12 GiB in its second step and the kernel killed it), and
the reader runs in the rank process (`data.num_workers=0`: a worker forked after the model is built
keeps the parent's pages, and every page the optimizer then writes is copied), and the optimizer is
DeepSpeed's CPU Adam (`zero.offload_optimizer`, which on a CPU rank moves nothing and steps in place,
where torch's AdamW allocates moment-sized temporaries).

Run 1 trains `--steps` steps, saving after steps-1 and steps. Run 2 copies the run without its last
checkpoint and re-runs the same command: it resumes and must reproduce the last step's loss and weights
bit for bit. Then `hart-train export` writes the official layout.

Reported: seconds per step (median of steps 2..), tokens/s (transformer sequence, text + image inputs
after dropping, at the expected kept count), achieved model FLOP/s (`hart_train.flops`, 3x forward) and
hardware FLOP/s (+ the recomputed blocks), and their ratio to this machine's dense bf16 matmul rate
measured in the same run (a 4096^3 matmul in one process per rank, one thread each, as the ranks run):
the CPU's MFU. Per rank: memory by holder after the first step (the trainer's memory.json: parameters,
fp32 masters, Adam moments, gradients, and the first step's peak above them), peak resident memory, and
peak memory while building the model (param_shards.json). Checkpoint bytes and save / load / export
seconds. `kernels`: both attention kernels as `run.attention: auto` timed them at the run's shape, and
the one it took. `memory` puts `hart-train plan`'s per-rank prediction for the same run next to the measured
`peak_total` of memory.json (holders + the second step's peak). If a schedule does not fit in memory, its
entry says how it failed and what ran before.

On the 2-core, 24 GiB development machine (`--memory-only`, two steps then the final save) the 256px
schedule trains: per rank 6.48 GB held (bf16 parameter half 0.73, fp32 masters 1.46, Adam moments 2.93,
gradients 0.73, reduce bucket 0.10, frozen tokenizer and text encoder 0.52) and 1.30-1.68 GB above that
in the second step (it depends on the kept tokens drawn), 7.78-7.93 GB at the peak against the planner's
8.12 GB. The full 3-step run with a mid-run save, resume and export was OOM-killed in its third step or
at the first save. 1024px does not fit: the planner puts a rank at 10.6 GB, and both ranks were killed
in their first step. It needs a host with about 32 GB.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, free_port, rank_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the random-weight Qwen2 builder the tests use


def prepare(work: Path, resolution: int, with_data: bool = True) -> dict:
    """Emoji shards at `resolution` (unless not `with_data`), a full-size random tokenizer checkpoint, a
    width-1536 Qwen2."""
    import yaml
    from safetensors.torch import save_file

    from data_tools.shard import shard_dataset
    from text_models import save_tiny_qwen
    from tokenizer.autoencoder import HARTAutoEncoderWithDisc, TokenizerConfig, config_to_dict

    data = work / f"emoji-{resolution}"
    if with_data and not (data / "manifest.json").exists():
        shard_dataset("emoji", str(data), resolution=resolution, fmt="png", samples_per_shard=16, workers=1,
                      limit=32, progress=False)
    tok = work / "tokenizer" / "step_00000001"
    if not (tok / "model.safetensors").exists():
        tok.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        cfg = TokenizerConfig()
        save_file({k: v.contiguous() for k, v in HARTAutoEncoderWithDisc(cfg).state_dict().items()}, tok / "model.safetensors")
        (tok / "config.yaml").write_text(yaml.safe_dump({"stage": "tokenizer-hybrid", "tokenizer": {"model": config_to_dict(cfg)}}))
    qwen = work / "qwen2-1536"
    if not (qwen / "config.json").exists():
        qwen.mkdir(parents=True, exist_ok=True)
        save_tiny_qwen(qwen, hidden_size=1536)
    return {"data": data, "tok": tok, "qwen": qwen}


def overrides(out: Path, name: str, paths: dict, steps: int, save_every: int | None = None) -> list[str]:
    return [f"data.urls=[{paths['data']}]", f"run.out_dir={out}", f"run.name={name}", "run.device=cpu",
            "run.init_from=null", f"t2i.tokenizer_ckpt={paths['tok']}", f"t2i.text_encoder.path={paths['qwen']}",
            "data.batch_size=1", "data.num_workers=0", "zero.offload_optimizer=true", "ema.enabled=false",
            "data.shuffle_window=16", f"run.max_steps={steps}",
            f"run.save_every={steps - 1 if save_every is None else save_every}", "run.keep_last=2", "run.log_every=1", "run.image_every=0",
            "optim.warmup_steps=1", "t2i.sample_prompts=[]", "run.collective_timeout_s=3600"]


def train_cmd(config: str, out: Path, name: str, paths: dict, steps: int, save_every: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "hart_train.cli", "run", "--config", config]
    for s in overrides(out, name, paths, steps, save_every):
        cmd += ["--set", s]
    return cmd


def run(cmd: list[str], log: Path) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def matmul_rate(n: int = 4096, repeats: int = 5) -> float:
    """Dense bf16 matmul FLOP/s of this process with one thread (what each rank has)."""
    torch.set_num_threads(1)
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "universal" not in f.parts)


def planned_vs_measured(config: str, sets: list[str], run_dir: Path) -> dict:
    """`hart-train plan`'s prediction for the run (micro-batch 1, 2 ranks; on a CPU rank its host and
    device terms are the same memory) next to the trainer's measured memory.json, where there is one."""
    from hart_train import config as C
    from hart_train.memory_plan import Planner
    from hart_train.run_config import RunConfig

    plan = Planner(C.load(RunConfig, str(REPO / config), sets), world_size=2).plan(1)
    predicted = plan.total + sum(plan.host.values())
    out = {"predicted_bytes_per_rank": predicted, "predicted": plan.to_dict()}
    if (run_dir / "memory.json").exists():
        measured = [r["peak_total"] for r in json.loads((run_dir / "memory.json").read_text())["per_rank"]]
        out.update(measured_peak_total_bytes=measured, predicted_over_measured=[predicted / m for m in measured])
    return out


def measure(schedule: int, work: Path, steps: int, peak_flops: float, memory_only: bool = False) -> dict:
    from hart_train import config as C
    from hart_train.flops import sample_flops
    from hart_train.run_config import RunConfig

    config = f"configs/t2i_{schedule}.yaml"
    paths = prepare(work, schedule)
    out = work / f"runs-{schedule}"
    shutil.rmtree(out, ignore_errors=True)
    save_every = 0 if memory_only else None  # memory only: no save before the measured second step
    rc, text, wall = run(train_cmd(config, out, "a", paths, steps, save_every), work / f"run-{schedule}.log")
    result: dict = {"config": config, "returncode": rc, "wall_s": wall}
    run_dir = out / "a"
    result["memory"] = planned_vs_measured(config, overrides(out, "a", paths, steps, save_every), run_dir)
    # both attention kernels timed at this run's shape by `run.attention: auto`, and the one it took
    result["kernels"] = json.loads((run_dir / "kernels.json").read_text()) if (run_dir / "kernels.json").exists() else None
    if memory_only:
        result["memory_json"] = json.loads((run_dir / "memory.json").read_text()) if (run_dir / "memory.json").exists() else None
        result["log_tail"] = text[-1500:]
        shutil.rmtree(out, ignore_errors=True)
        return result
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps_rec = {r["step"]: r for r in records if "loss" in r}
    if rc != 0:  # report what ran before the failure (e.g. the kernel's OOM killer during a save)
        result["failure"] = text[-2000:]
        result["steps_done"] = {s: {"loss": r["loss"], "step_time_s": r["step_time_s"], "memory_mb": r["memory_mb"]}
                                for s, r in steps_rec.items()}
        for name in ("memory.json", "param_shards.json"):
            if (run_dir / name).exists():
                result[name] = json.loads((run_dir / name).read_text())
        shutil.rmtree(out, ignore_errors=True)
        return result
    step_times = [steps_rec[s]["step_time_s"] for s in sorted(steps_rec) if s > 1]
    cfg = C.load(RunConfig, str(REPO / config), [f"t2i.text_encoder.path={paths['qwen']}"])
    fl = sample_flops(cfg.t2i.model)
    world, batch = 2, 1
    s_per_step = statistics.median(step_times)
    model_flops = fl.train_step_flops * world * batch / s_per_step
    hw_flops = fl.hardware_flops(cfg.run.activation_checkpointing) * world * batch / s_per_step
    saves = [float(x) for x in re.findall(r"saved checkpoint .* \(([\d.]+) s,", text)]
    fsyncs = [float(x) for x in re.findall(r"saved checkpoint .* of which fsync ([\d.]+) s\)", text)]
    last = run_dir / "ckpt" / f"step_{steps:08d}"
    result.update(
        s_per_step=s_per_step, step_times_s=step_times, tokens_per_sample=fl.tokens,
        tokens_per_s=fl.tokens * world * batch / s_per_step,
        train_flops_per_sample=fl.train_step_flops, model_flop_per_s=model_flops, hardware_flop_per_s=hw_flops,
        matmul_bf16_flop_per_s=peak_flops, mfu=model_flops / peak_flops, hfu=hw_flops / peak_flops,
        losses={s: steps_rec[s]["loss"] for s in sorted(steps_rec)},
        peak_rss_mb_rank0=steps_rec[max(steps_rec)]["memory_mb"],
        memory_by_holder=json.loads((run_dir / "memory.json").read_text())["per_rank"],
        param_shards=json.loads((run_dir / "param_shards.json").read_text()),
        checkpoint_bytes=_dir_bytes(last), checkpoint_save_s=saves, checkpoint_fsync_s=fsyncs,
    )
    # resume: the same command from the checkpoint before the last must reproduce the last step
    again = out / "b"
    shutil.copytree(run_dir, again, ignore=shutil.ignore_patterns("wandb"))
    shutil.rmtree(again / "ckpt" / f"step_{steps:08d}")
    rc2, text2, _ = run(train_cmd(config, out, "b", paths, steps), work / f"resume-{schedule}.log")
    loads = [float(x) for x in re.findall(r"resumed from .* at step \d+ \(([\d.]+) s\)", text2)]
    result["checkpoint_load_s"] = loads
    if rc2 == 0:
        from safetensors.torch import load_file

        b = {json.loads(l)["step"]: json.loads(l) for l in (again / "metrics.jsonl").read_text().splitlines() if '"loss"' in l}
        wa, wb = (load_file(d / "ckpt" / f"step_{steps:08d}" / "model.safetensors") for d in (run_dir, again))
        result["resume_bit_exact"] = b[steps]["loss"] == steps_rec[steps]["loss"] and all(torch.equal(wa[k], wb[k]) for k in wa)
    else:
        result["resume_failure"] = text2[-3000:]
    shutil.rmtree(again, ignore_errors=True)
    t0 = time.perf_counter()
    exp = subprocess.run([sys.executable, "-m", "hart_train.cli", "export", "--ckpt", str(last), "--out", str(out / "official")],
                         cwd=REPO, env=rank_env(), capture_output=True, text=True)
    result["export_s"] = time.perf_counter() - t0
    result["export_ok"] = exp.returncode == 0 and (out / "official" / "llm" / "ema_model.bin").exists()
    shutil.rmtree(out, ignore_errors=True)  # a checkpoint of the 0.7B model is ~15 GB
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedules", default="256,1024")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", default="/tmp/hart-fullsize")
    p.add_argument("--memory-only", action="store_true",
                   help="two steps, then the planner's prediction next to the measured memory (no resume/export)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    peak = matmul_rate() * 2  # two ranks, one thread each
    report = {"environment": environment(), "matmul_bf16_flop_per_s_2_ranks": peak, "schedules": {}}
    for s in (int(x) for x in args.schedules.split(",")):
        report["schedules"][s] = measure(s, work, 2 if args.memory_only else args.steps, peak, args.memory_only)
        print(json.dumps({s: {k: v for k, v in report["schedules"][s].items() if k not in ("failure",)}}, default=str),
              file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
