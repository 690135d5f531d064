"""Tokenizer benchmarks on CPU: `tokenizer-vq` training images/s through `hart-train run` (1 process
against 2 ranks) at 64px and 256px, and encode (image -> tokens) images/s. Prints one JSON object.

    python bench/tokenizer_step.py [--steps64 20] [--steps256 15] [--log-every 5] [--batch64 4] [--batch256 1] [--gan]

- model: a small preset with the real structure (`ch_mult` (1,1,2,2,4), so 16x downsampling, 32 latent
  channels, 4096 codes, the multi-scale quantizer on a schedule ending at image_size/16); only the
  width `ch` is reduced. The perceptual (VGG) term is off: it needs a weights file the bench does not have.
- data: Noto emoji rendered and sharded by `data_tools.shard.shard_dataset("emoji", ...)` as PNG, one
  dataset per resolution, read by the real `StreamingReader` (one DataLoader worker per rank).
- `train`: each row is a `python -m hart_train.cli run` subprocess (1 process, 2 torch threads) and a
  `python -m torch.distributed.run --nproc_per_node=2` one (2 gloo ranks, 1 thread each), same batch
  per rank, so 2 ranks process twice the global batch; on 2 cores that is the fair comparison. ZeRO-2,
  EMA on, no checkpoints until the final one (after timing). Images/s and per-step time are the
  medians of the run's metrics.jsonl log windows after the first (which holds start-up and warm-up).
  `scaling_efficiency` = images/s(2 ranks) / (2 x images/s(1 process)); with the cores fixed at 2 its
  ceiling is about 0.5, so `images_per_s_2ranks_over_1proc` (ceiling about 1.0) is reported too.
  `--gan` adds the 64px rows with the discriminator on from step 0 (disc_weight 0.1).
- OpenMP wait policy: every row runs with OMP_WAIT_POLICY=PASSIVE except one diagnostic 64px
  1-process row with libgomp's default ACTIVE (spinning) policy (`--active-steps N`; off by default).
- `startup_and_save_s`: a row's wall time outside its log windows (imports, DeepSpeed start-up, which
  here includes JIT-building its shm comm op, the final checkpoint).
Default run (no --gan, no active row) is about 7 minutes on the shared 2-core machine.
- `bare_step_s`: the same module's forward + backward + AdamW step in this process, no DeepSpeed and no
  reader (2 threads); the trainer's step time minus this is the runtime's overhead (reader, DeepSpeed,
  EMA, the per-step codebook-usage all-reduce).
- `encode`: `HARTAutoEncoder.img_to_idxBl_and_frest` (eval, no_grad) on batches of the dataset's
  images in a tight loop, interleaved rounds, single process, 2 threads.
- `profile`: the top operators (self CPU time) of one bare training step at 64px.
The machine is shared: load averages are recorded before and after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# libgomp's default active wait (threads spin between parallel regions) made 2-thread steps 10-20x
# slower on this shared, oversubscribed machine (measured; see the `omp_wait_policy` rows). It is read
# when torch's OpenMP runtime starts, so it is set before torch is imported; the JSON records it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, free_port, load_average, log, summarize, time_interleaved  # noqa: E402

from data_tools.reader import ReaderConfig, StreamingReader  # noqa: E402
from data_tools.samples import to_unit_range  # noqa: E402
from data_tools.shard import shard_dataset  # noqa: E402
from hart_train.metrics import read_jsonl  # noqa: E402
from hart_train.run_config import TokenizerStageConfig  # noqa: E402
from hart_train.stages.tokenizer_stage import TokenizerTrainModule  # noqa: E402
from tokenizer.autoencoder import HARTAutoEncoder, TokenizerConfig  # noqa: E402
from tokenizer.losses import TokenizerLossConfig  # noqa: E402

PATCH_NUMS = {64: (1, 2, 3, 4), 256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}
MODEL = dict(vocab_size=4096, z_channels=32, ch_mult=[1, 1, 2, 2, 4], disc_ndf=32, disc_n_layers=3)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(resolution: int, ch: int) -> dict:
    return {**MODEL, "ch": ch, "patch_nums": list(PATCH_NUMS[resolution])}


def make_dataset(tmp: str, resolution: int, count: int) -> str:
    out = os.path.join(tmp, f"emoji-{resolution}")
    shard_dataset("emoji", out, resolution=resolution, fmt="png", samples_per_shard=max(1, count // 4),
                  limit=count, progress=False)
    return out


def run_config(data: str, out_dir: str, name: str, resolution: int, args, batch: int, threads: int, gan: bool,
               steps: int, log_every: int) -> dict:
    return {
        "stage": "tokenizer-vq",
        "run": {"name": name, "out_dir": out_dir, "max_steps": steps, "log_every": log_every,
                "save_every": 0, "keep_last": 1, "eval_every": 0, "image_every": 0, "num_threads": threads,
                "collective_timeout_s": 300},
        "data": {"urls": [data], "resolution": resolution, "batch_size": batch, "num_workers": 1,
                 "shuffle_window": 64},
        "optim": {"lr": 1.0e-4, "warmup_steps": 2, "weight_decay": 0.0},
        "zero": {"stage": 2},
        "ema": {"enabled": True, "decay": 0.99},
        "wandb": {"mode": "disabled"},
        "tokenizer": {"model": model_config(resolution, args.ch),
                      "loss": {"recon_loss": "l2", "disc_weight": 0.1 if gan else 0.0, "disc_start_step": 0},
                      "eval_url": None},
    }  # fmt: skip


def train_run(tmp: str, data: str, resolution: int, ranks: int, args, gan: bool, wait_policy: str = "PASSIVE",
              steps: int | None = None, log_every: int | None = None) -> dict:
    """One `hart-train run` subprocess; medians of the log windows after the first."""
    threads = 2 // ranks
    batch = args.batch64 if resolution == 64 else args.batch256
    steps = steps or (args.steps64 if resolution == 64 else args.steps256)
    log_every = log_every or args.log_every
    name = f"r{resolution}-n{ranks}-{'gan' if gan else 'nogan'}-{wait_policy.lower()}"
    cfg_path = os.path.join(tmp, name + ".yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(run_config(data, os.path.join(tmp, "runs"), name, resolution, args, batch, threads, gan, steps,
                                  log_every), f)
    cli = ["-m", "hart_train.cli", "run", "--config", cfg_path]
    if ranks == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
               f"--master_port={free_port()}", *cli]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": wait_policy, "PYTHONPATH": REPO}
    row = {"resolution": resolution, "ranks": ranks, "threads_per_rank": threads, "batch_per_rank": batch,
           "global_batch": batch * ranks, "gan": gan, "omp_wait_policy": wait_policy, "steps": steps,
           "log_every": log_every, "load_average_before": load_average()}
    log(f"train {name}: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.run_timeout}s"}
    row["wall_s"] = round(time.perf_counter() - start, 1)
    metrics = os.path.join(tmp, "runs", name, "metrics.jsonl")
    if proc.returncode != 0 or not os.path.exists(metrics):
        return {**row, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    windows = [r for r in read_jsonl(metrics) if "samples_per_s" in r]
    timed = windows[1:]
    if not timed:
        return {**row, "error": "fewer than 2 log windows"}
    rates, step_times = [r["samples_per_s"] for r in timed], [r["step_time_s"] for r in timed]
    row.update(images_per_s=round(statistics.median(rates), 3), step_time_s=round(statistics.median(step_times), 3),
               windows_images_per_s=[round(x, 3) for x in rates], windows_step_time_s=[round(x, 3) for x in step_times],
               first_window_step_time_s=round(windows[0]["step_time_s"], 3), load_average_after=load_average())
    in_windows = windows[0]["step"] * windows[0]["step_time_s"] + sum(
        (b["step"] - a["step"]) * b["step_time_s"] for a, b in zip(windows, windows[1:]))
    row["startup_and_save_s"] = round(row["wall_s"] - in_windows, 1)
    log(f"  {row['images_per_s']} images/s, {row['step_time_s']} s/step (windows {row['windows_step_time_s']}), "
        f"wall {row['wall_s']}s, load {row['load_average_after']}")
    return row


def first_batch(data: str, resolution: int, batch: int) -> torch.Tensor:
    reader = StreamingReader(ReaderConfig(urls=[data], resolution=resolution, batch_size=batch, num_workers=0,
                                          shuffle_window=1))
    return to_unit_range(next(iter(reader))["image"])


def reader_rate(data: str, resolution: int) -> float:
    """Images/s of one epoch through `StreamingReader` in this process (no workers): PNG decode + batching."""
    reader = StreamingReader(ReaderConfig(urls=[data], resolution=resolution, batch_size=8, num_workers=0))
    start, count = time.perf_counter(), 0
    for batch in reader:
        if batch["epoch"] > 0:
            break
        count += batch["image"].shape[0]
    return round(count / (time.perf_counter() - start), 1)


def bare_module(resolution: int, ch: int) -> TokenizerTrainModule:
    cfg = TokenizerStageConfig(model=TokenizerConfig(**model_config(resolution, ch)),
                               loss=TokenizerLossConfig(recon_loss="l2", disc_weight=0.0))
    torch.manual_seed(0)
    return TokenizerTrainModule(cfg, skip_continuous_prob=1.0)


def bare_step_fn(module: TokenizerTrainModule, img: torch.Tensor):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        module(img, step=0, generator=gen)["loss"].backward()
        opt.step()
    return step


def encode_fn(vae: HARTAutoEncoder, img: torch.Tensor):
    def encode():
        with torch.no_grad():
            vae.img_to_idxBl_and_frest(img)
    return encode


def profile_step(step_fn, top: int = 12) -> list[dict]:
    step_fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step_fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1), "share": round(e.self_cpu_time_total / total, 3),
             "calls": e.count} for e in events[:top]]  # fmt: skip


def in_process(datasets: dict[int, str], args) -> dict:
    """Encode images/s, the bare training step and a profile, all at 2 threads in this process."""
    torch.set_num_threads(2)
    out: dict = {"load_average_before": load_average()}
    batches = {r: first_batch(d, r, args.encode_batch64 if r == 64 else args.encode_batch256) for r, d in datasets.items()}
    out["reader_images_per_s"] = {f"{r}px": reader_rate(d, r) for r, d in datasets.items()}
    vaes = {r: HARTAutoEncoder(TokenizerConfig(**model_config(r, args.ch))).eval() for r in datasets}
    log("encode: interleaved rounds")
    times = time_interleaved({f"{r}px": encode_fn(vaes[r], batches[r]) for r in datasets}, args.repeats, warmup=1)
    out["encode"] = {}
    for r in datasets:
        s = summarize(times[f"{r}px"]["wall"], times[f"{r}px"]["cpu"])
        n = batches[r].shape[0]
        out["encode"][f"{r}px"] = {"batch": n, "images_per_s": round(n / s["median_s"], 2),
                                   "images_per_s_best_round": round(n / s["min_s"], 2), **s}
    log("bare training step (no DeepSpeed, no reader): interleaved rounds")
    steps = {}
    for r, d in datasets.items():
        img = first_batch(d, r, args.batch64 if r == 64 else args.batch256)
        steps[f"{r}px"] = bare_step_fn(bare_module(r, args.ch).train(), img)
    times = time_interleaved(steps, max(2, args.repeats - 2), warmup=1)
    out["bare_step_s"] = {k: summarize(v["wall"], v["cpu"]) for k, v in times.items()}
    log("profile of one bare step at 64px")
    out["profile_64px_top_ops"] = profile_step(steps["64px"])
    out["load_average_after"] = load_average()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ch", type=int, default=32, help="base width of the small preset")
    ap.add_argument("--steps64", type=int, default=20)
    ap.add_argument("--steps256", type=int, default=15)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--active-steps", type=int, default=0,
                    help="steps of the diagnostic 64px 1-process row with OMP_WAIT_POLICY=ACTIVE (0: skip)")
    ap.add_argument("--batch64", type=int, default=4, help="batch per rank at 64px")
    ap.add_argument("--batch256", type=int, default=1, help="batch per rank at 256px")
    ap.add_argument("--encode-batch64", type=int, default=16)
    ap.add_argument("--encode-batch256", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samples", type=int, default=64, help="emoji images per dataset")
    ap.add_argument("--resolutions", default="64,256")
    ap.add_argument("--gan", action="store_true", help="also the GAN-on rows at 64px")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--run-timeout", type=float, default=240)
    args = ap.parse_args(argv)
    result: dict = {"env": {**environment(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}, "args": vars(args),
                    "model": {f"{r}px": {k: v for k, v in model_config(r, args.ch).items()} for r in PATCH_NUMS}}
    start = time.perf_counter()
    resolutions = [int(r) for r in args.resolutions.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {r: make_dataset(tmp, r, args.samples) for r in resolutions}
        vae = HARTAutoEncoder(TokenizerConfig(**model_config(64, args.ch)))
        result["model"]["vae_params"] = sum(p.numel() for p in vae.parameters())
        result["in_process"] = in_process(datasets, args)
        rows = []
        if not args.skip_train:
            for r in resolutions:
                for ranks in (1, 2):
                    rows.append(train_run(tmp, datasets[r], r, ranks, args, gan=False))
            if args.gan and 64 in resolutions:
                for ranks in (1, 2):
                    rows.append(train_run(tmp, datasets[64], 64, ranks, args, gan=True))
            if args.active_steps and 64 in resolutions:
                rows.append(train_run(tmp, datasets[64], 64, 1, args, gan=False, wait_policy="ACTIVE",
                                      steps=args.active_steps, log_every=max(1, args.active_steps // 2)))
        result["train"] = rows
    scaling = {}
    for one in rows:
        # 2 ranks run 1 thread each, where the wait policy has no thread team to act on
        two = next((x for x in rows if x["ranks"] == 2 and x["resolution"] == one["resolution"]
                    and x["gan"] == one["gan"]), None)
        if one["ranks"] == 1 and two and "images_per_s" in one and "images_per_s" in two:
            key = f"{one['resolution']}px" + ("_gan" if one["gan"] else "") + \
                ("_1proc_active_wait" if one["omp_wait_policy"] == "ACTIVE" else "")
            bare = result["in_process"]["bare_step_s"].get(f"{one['resolution']}px", {}).get("median_s")
            scaling[key] = {"images_per_s_1proc": one["images_per_s"], "images_per_s_2ranks": two["images_per_s"],
                            "scaling_efficiency": round(two["images_per_s"] / (2 * one["images_per_s"]), 3),
                            # same 2 cores either way: 1.0 means 2 ranks x 1 thread match 1 process x 2 threads
                            "images_per_s_2ranks_over_1proc": round(two["images_per_s"] / one["images_per_s"], 3),
                            "step_time_s_1proc": one["step_time_s"], "step_time_s_2ranks": two["step_time_s"],
                            "bare_step_s_2threads": bare}
    result["summary"] = {"train": scaling,
                         "encode_images_per_s": {k: v["images_per_s"] for k, v in result["in_process"]["encode"].items()}}
    result["total_wall_s"] = round(time.perf_counter() - start, 1)
    result["load_average_end"] = load_average()
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
