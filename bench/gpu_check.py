"""The GPU check (run it through bench/gpu_check.sh). Prints one JSON object; exit 2 without CUDA.

Sections, in order (each records its own seconds, and an exception becomes that section's "error"):
- `environment`: torch / CUDA versions, the GPUs, whether apex imports, the dense bf16 peak of the device
  (hart_train.memory_plan.GPU_PEAK_TFLOPS).
- `kernels`: every GPU-only path against the torch path: both attention kernels at the official benchmark's
  shape (width 256, 4 heads of 64, the 1024px schedule at the expected kept count) and at the released
  model's (HARTConfig defaults: width 1536, 16 heads of 96), timed, with the one `run.attention: auto` would take; the CUDA bf16
  attention against the CPU fp32 result; apex's RMSNorm and FusedAdam (where apex imports) against torch's.
- `tiny_stages`: the tiny tokenizer-vq and t2i configs in bf16 over NCCL, on 1 rank and on every GPU when
  there are 2+: a t2i run killed (SIGKILL to its process group) after its step-4 checkpoint and relaunched
  must end with the uninterrupted run's losses (reported as the largest difference; bit-exact on CUDA
  needs deterministic kernels, which the run does not force), then `hart-sample` on the GPU. The data are
  generated shapes with captions (`synthetic_dataset`), so the check needs no fonts or downloads.
- `buckets`: the tiny tokenizer and t2i stages in bf16 on a bucketed set of three aspects, with held-out
  evaluation, and `hart-sample --aspect` of each bucket (`buckets_section`); `kernels` also times the
  released model's attention on the largest 1024px bucket, 52x80.
- `fullsize`: the released 0.7B shape at the 1024px schedule (configs/t2i_1024.yaml with a full-size random
  tokenizer and a width-1536 Qwen2, as bench/fullsize_step.py builds them) on every GPU, at the largest
  micro-batch `hart-train plan` says fits this GPU: s/step, samples/s, tokens/s, MFU (model FLOPs of
  hart_train.flops over the table's peak), the planner's per-rank prediction and the measured peak.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
WORK = Path(os.environ.get("HART_GPU_CHECK_WORK", "/tmp/hart-gpu-check"))
# HART_GPU_CHECK_CPU=1 runs the tiny-stage section on CPU ranks (gloo) to check this script without a GPU
DEVICE = "cpu" if os.environ.get("HART_GPU_CHECK_CPU") == "1" else "cuda"


def _env() -> dict:
    e = dict(os.environ)
    e.update(DS_ACCELERATOR=DEVICE, WANDB_MODE="offline", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return e


def synthetic_dataset(resolution: int, count: int, buckets: str | None = None) -> Path:
    """`count` generated image-caption pairs (coloured shapes on a plain ground, named in the caption),
    sharded at `resolution` with `hart-data shard folder:` (no fonts or downloads on the GPU machine).
    `buckets` (hart-data shard --buckets): the images are square, 5:3 and 3:5 in turn, sharded by bucket."""
    from PIL import Image, ImageDraw

    from data_tools.shard import shard_dataset

    tag = f"shapes-{resolution}-{count}" + ("-buckets" if buckets else "")
    out = WORK / tag
    if (out / "manifest.json").exists():
        return out
    src = WORK / f"{tag}-src"
    src.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
    names = list(colours)
    for i in range(count):
        fg, bg = names[i % 4], names[(i // 4 + 1 + i % 4) % 4]
        shape = ("circle", "square")[(i // 16) % 2]
        w, h = ((resolution, resolution), (resolution * 5 // 3, resolution), (resolution, resolution * 5 // 3))[
            i % 3 if buckets else 0]
        img = Image.new("RGB", (w, h), colours[bg])
        d, m = ImageDraw.Draw(img), resolution // 8 + (i * 7) % (resolution // 8)
        box = (m, m, w - m, h - m)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=colours[fg])
        img.save(src / f"{i:05d}.png")
        (src / f"{i:05d}.txt").write_text(f"a {fg} {shape} on {bg}")
    shard_dataset(f"folder:{src}", str(out), resolution=resolution, fmt="png", samples_per_shard=64, workers=1,
                  limit=count, progress=False, buckets=buckets)
    return out


def _train_cmd(config: str, sets: list[str], nproc: int, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "-m", "hart_train.cli", "run", "--config", config]
    for s in sets + [f"run.device={DEVICE}", "run.dtype=bf16"]:
        cmd += ["--set", s]
    return cmd


def _run(cmd: list[str], timeout: float = 600) -> str:
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... exited {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout + p.stderr


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def section(report: dict, name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as e:  # one failing section must not hide the others' evidence
        report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    report[name + "_s"] = round(time.perf_counter() - t0, 1)
    print(f"gpu_check: {name} done in {report[name + '_s']} s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- sections


def environment() -> dict:
    from hart_train.memory_plan import peak_tflops
    from hart_train.models import kernels

    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": names,
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
            "apex": kernels.apex_available(), "peak_bf16_tflops": peak_tflops(names[0])}


def _problem(width: int | None, heads: int | None, batch: int, bucket: str | None = None) -> dict:
    """The 1024px schedule's attention at the expected kept count; width/heads None: the released model's;
    `bucket` (e.g. "52x80"): that aspect-ratio bucket's schedule instead of the square one."""
    from hart_train.flops import expected_kept_last
    from hart_train.models import HARTConfig
    from hart_train.models.buckets import parse_bucket

    cfg = HARTConfig(patch_nums=(1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64), context_token=300)
    width, heads = width or cfg.embed_dim, heads or cfg.num_heads
    grids = parse_bucket(bucket).schedule(cfg.patch_nums) if bucket else tuple((p, p) for p in cfg.patch_nums)
    seg = [300] + [h * w for h, w in grids[1:-1]] + [round(expected_kept_last(cfg, schedule=grids))]
    hd = width // heads
    return {"batch": batch, "heads": heads, "head_dim": hd, "seg_lens": seg, "scale": 0.25 / hd ** 0.5}


def kernels_section() -> dict:
    from hart_train.models import kernels

    dev = torch.device("cuda")
    out = {}
    for name, problem in {"official_benchmark_w256_h4": _problem(256, 4, 4),
                          "released_model": _problem(None, None, 4),
                          "released_model_bucket_52x80": _problem(None, None, 4, "52x80")}.items():
        measured = kernels.measure_attention(problem, dev, torch.bfloat16)
        passing = {n: m for n, m in measured.items() if m["ok"]}
        out[name] = {"measured": measured, "auto_choice": min(passing, key=lambda n: passing[n]["s"])}
    # the CUDA bf16 kernels against the CPU fp32 path
    p = _problem(256, 4, 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, sum(p["seg_lens"]), 64, generator=g) for _ in range(3))
    ref = kernels.ATTENTION["key_prefix"](q, k, v, p["seg_lens"], p["scale"])
    out["cuda_bf16_vs_cpu_fp32_max_rel_err"] = {
        n: kernels.rel_err(fn(*(t.cuda().bfloat16() for t in (q, k, v)), p["seg_lens"], p["scale"]).float().cpu(), ref)
        for n, fn in kernels.ATTENTION.items()}
    x, w = torch.randn(4096, 1536, device=dev, dtype=torch.bfloat16), torch.rand(1536, device=dev, dtype=torch.bfloat16)
    os.environ["HART_DISABLE_APEX"] = "1"
    torch_norm = kernels.rms_norm(x, w, 1e-6)
    del os.environ["HART_DISABLE_APEX"]
    out["rms_norm"] = {"apex": kernels.apex_available(),
                       "max_rel_err_vs_torch": kernels.rel_err(kernels.rms_norm(x, w, 1e-6), torch_norm)}
    out["adamw"] = {"apex": kernels.apex_available(), "max_rel_err_vs_torch": _adam_diff()}
    return out


def _adam_diff() -> float:
    """Three steps of the run's AdamW (apex FusedAdam where it imports) against torch's on the same grads."""
    from hart_train.models import kernels

    g = torch.Generator().manual_seed(0)
    init = torch.randn(1 << 20, generator=g)
    grads = [torch.randn(1 << 20, generator=g).cuda() for _ in range(3)]
    params = []
    for disable in ("1", ""):
        os.environ["HART_DISABLE_APEX"] = disable
        p = torch.nn.Parameter(init.clone().cuda())
        opt = kernels.adamw([{"params": [p], "weight_decay": 0.05}], 1e-3, (0.9, 0.95), 1e-8, "cuda")
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        params.append(p.detach())
    os.environ.pop("HART_DISABLE_APEX", None)
    return kernels.rel_err(params[1], params[0])


def tiny_stages() -> dict:
    from _common import free_port

    data = synthetic_dataset(16, 256)
    out = WORK / "tiny"
    subprocess.run(["rm", "-rf", str(out)])
    common = [f"data.urls=[{data}]", f"run.out_dir={out}", "data.num_workers=1", "run.max_steps=12",
              "run.save_every=4", "run.log_every=1", "run.image_every=0", "run.eval_every=0"]
    counts = sorted({1, torch.cuda.device_count() if DEVICE == "cuda" else 1})
    report: dict = {}
    for n in counts:
        tok_sets = common + [f"run.name=tok{n}"]
        _run(_train_cmd("configs/tokenizer_vq_tiny.yaml", tok_sets, n, free_port()))
        tok = out / f"tok{n}" / "ckpt" / "step_00000012"
        t2i_sets = common + [f"t2i.tokenizer_ckpt={tok}"]
        _run(_train_cmd("configs/t2i_tiny.yaml", t2i_sets + [f"run.name=ref{n}"], n, free_port()))
        # killed after its step-4 checkpoint, relaunched with the same command
        cmd = _train_cmd("configs/t2i_tiny.yaml", t2i_sets + [f"run.name=kill{n}"], n, free_port())
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        marker = out / f"kill{n}" / "ckpt" / "step_00000004" / "COMPLETE"
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        resumed_log = _run(cmd)
        ref, got = _losses(out / f"ref{n}"), _losses(out / f"kill{n}")
        report[f"{n}_rank"] = {
            "tokenizer_final_loss": _losses(out / f"tok{n}")[12], "t2i_losses": ref,
            "killed_at_step_4_resumed": "resumed from" in resumed_log,
            "resumed_max_abs_loss_diff": max(abs(ref[s] - got[s]) for s in ref),
            "kernels": json.loads((out / f"ref{n}" / "kernels.json").read_text()),
            "memory": json.loads((out / f"ref{n}" / "memory.json").read_text()),
        }
    png = out / "sample.png"
    _run([sys.executable, "-m", "hart_train.sample_cli", "--model", str(out / f"ref{counts[-1]}" / "ckpt" / "step_00000012"),
          "--prompt", "red apple", "--prompt", "rocket", "--out", str(png), "--device", DEVICE])
    report["sample_png_bytes"] = png.stat().st_size
    return report


def buckets_section() -> dict:
    """The tiny t2i stage in bf16 on a bucketed set (square, 5:3 and 3:5 images: buckets 4x4, 3x5, 5x3 of
    the tiny schedule), one rank, then `hart-sample --aspect` of each bucket: the non-square schedules on
    the GPU's kernels. Reports the losses, the buckets each step trained and the sampled sizes."""
    from _common import free_port

    data = synthetic_dataset(16, 96, buckets="16:16,20:12,12:20")
    out = WORK / "buckets"
    subprocess.run(["rm", "-rf", str(out)])
    common = [f"data.urls=[{data}]", f"run.out_dir={out}", "data.num_workers=1", "run.max_steps=6", "run.save_every=6",
              "run.log_every=1", "run.image_every=0", "run.eval_every=0", "run.log_samples=true"]
    _run(_train_cmd("configs/tokenizer_vq_tiny.yaml", common + ["run.name=tok"], 1, free_port()))
    t2i = common + ["run.name=t2i", f"t2i.tokenizer_ckpt={out / 'tok' / 'ckpt' / 'step_00000006'}",
                    "t2i.buckets=[4x4,3x5,5x3]", f"t2i.eval_url={data}", "t2i.eval_samples=24"]
    _run(_train_cmd("configs/t2i_tiny.yaml", t2i, 1, free_port()))
    steps = [json.loads(line) for line in (out / "t2i" / "samples" / "rank_0.jsonl").read_text().splitlines()]
    sizes = {}
    for aspect in ("1:1", "16:9", "9:16"):
        png = out / f"sample_{aspect.replace(':', 'x')}.png"
        _run([sys.executable, "-m", "hart_train.sample_cli", "--model", str(out / "t2i" / "ckpt" / "step_00000006"),
              "--prompt", "red circle", "--aspect", aspect, "--out", str(png), "--device", DEVICE])
        from PIL import Image

        sizes[aspect] = Image.open(png).size
    records = [json.loads(line) for line in (out / "t2i" / "metrics.jsonl").read_text().splitlines()]
    return {"t2i_losses": _losses(out / "t2i"), "step_buckets": [s["bucket"] for s in steps],
            "held_out_loss": next((r["eval/loss"] for r in records if "eval/loss" in r), None),
            "sampled_sizes_wh": sizes, "expected_sizes_wh": {"1:1": (16, 16), "16:9": (20, 12), "9:16": (12, 20)}}


def fullsize() -> dict:
    from fullsize_step import overrides, prepare
    from _common import free_port

    from hart_train import config as C
    from hart_train.flops import sample_flops
    from hart_train.memory_plan import Planner, peak_tflops
    from hart_train.run_config import RunConfig

    n = torch.cuda.device_count()
    config = "configs/t2i_1024.yaml"
    paths = prepare(WORK, 1024, with_data=False)
    out = WORK / "fullsize"
    subprocess.run(["rm", "-rf", str(out)])
    steps = 6
    sets = [s for s in overrides(out, "a", paths, steps, save_every=0)
            if not s.startswith(("data.batch_size", "data.num_workers", "zero.offload_optimizer", "ema.enabled"))]
    planner = Planner(C.load(RunConfig, str(REPO / config), sets + ["run.device=cuda"]), world_size=n)
    gpu_mem = torch.cuda.get_device_properties(0).total_memory
    b, plan = planner.largest_micro_batch(gpu_mem)
    if b == 0:
        return {"error": "the planner says not even micro-batch 1 fits this GPU", "gpu_mem_bytes": gpu_mem}
    data = synthetic_dataset(1024, b * n * (steps + 1))  # every step a fresh batch, within one epoch
    sets = [s for s in sets if not s.startswith("data.urls")] + [f"data.urls=[{data}]"]
    sets += [f"data.batch_size={b}", "data.num_workers=4"]
    _run(_train_cmd(config, sets, n, free_port()), timeout=900)
    run_dir = out / "a"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in records if "loss" in r and r["step"] > 1]
    s_step = statistics.median(times)
    cfg = C.load(RunConfig, str(REPO / config), sets)
    fl = sample_flops(cfg.t2i.model)
    tflops = peak_tflops(torch.cuda.get_device_name(0))
    model_flops = fl.train_step_flops * b * n / s_step
    measured = [r["peak_total"] for r in json.loads((run_dir / "memory.json").read_text())["per_rank"]]
    subprocess.run(["rm", "-rf", str(out)])
    return {"gpus": n, "micro_batch": b, "s_per_step": s_step, "step_times_s": times,
            "samples_per_s": b * n / s_step, "tokens_per_s": fl.tokens * b * n / s_step,
            "model_flop_per_s": model_flops, "mfu": model_flops / (n * tflops * 1e12) if tflops else None,
            "kernels": json.loads((run_dir / "kernels.json").read_text()) if (run_dir / "kernels.json").exists() else None,
            "planned_bytes_per_rank": plan.total, "measured_peak_bytes_per_rank": measured,
            "planned_over_measured": [plan.total / m for m in measured if m]}


def main() -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    if DEVICE == "cpu":  # the script's own check, without a GPU
        section(report, "tiny_stages", tiny_stages)
        section(report, "buckets", buckets_section)
        print(json.dumps(report, indent=1, default=str))
        return 1 if "error" in report["tiny_stages"] or "error" in report["buckets"] else 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; nothing to check on this machine", file=sys.stderr)
        return 2
    section(report, "environment", environment)
    section(report, "kernels", kernels_section)
    section(report, "tiny_stages", tiny_stages)
    section(report, "buckets", buckets_section)
    if "--skip-fullsize" not in sys.argv:
        section(report, "fullsize", fullsize)
    print(json.dumps(report, indent=1, default=str))
    return 1 if any(isinstance(v, dict) and "error" in v for v in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
