"""The training loop: model-agnostic, stage-driven, resumable bit for bit.

The loop knows nothing of HART. A stage (see `hart_train.stages`) supplies the module, whose
`forward(inputs)` returns a dict of loss terms with the total under "loss"; turns reader batches into
inputs; and offers evaluation and images. Everything distributed (ZeRO sharding, gradient reduction,
clipping, accumulation, the optimizer and its schedule) is DeepSpeed's, built from the config.

Resume: the same command finds the newest checkpoint with `COMPLETE` under `<run>/ckpt` and continues
from it. On the same world size the continuation is bit-exact in fp32: weights, optimizer, schedule,
EMA, the reader's position and every RNG (torch's and the stage's generator) come back. On another
world size DeepSpeed's universal conversion runs first (automatically, cached beside the
checkpoint); the reader re-plans the rest of the epoch so no sample is lost or repeated; per-rank RNG
is then re-seeded from (seed, step, rank), since the old ranks' streams have no new owner. A stage whose
checkpoints leave its frozen parameters out (`frozen_from_init`: LoRA adapters on a frozen base) loads them
from `run.init_from` at every start, a resume included, before DeepSpeed restores the trainable ones.

Preemption: SIGTERM or SIGUSR1 sets a flag; at the next step boundary all ranks agree (a MAX
all-reduce), save a checkpoint and exit 0.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from hart_train import checkpoint as ckpt
from hart_train import config as C
from hart_train import distributed as D
from hart_train import engine as E
from hart_train import host_memory
from hart_train import zero_utils
from hart_train.ema import EMA
from hart_train.metrics import MetricsLogger, read_jsonl
from hart_train.models import kernels
from hart_train.run_config import RunConfig

SAMPLE_LOG_DIR = "samples"  # run.log_samples' per-rank files


@dataclass
class TrainResult:
    step: int
    run_dir: str
    last_checkpoint: str | None
    preempted: bool


class Preemption:
    """SIGTERM or SIGUSR1 sets `requested`; the loop acts on it at the next step boundary. Installed when
    `train` starts, so a signal during model building, loading or a world-size conversion is honoured
    after the first step rather than killing the rank."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def run_dir_of(cfg: RunConfig) -> str:
    return os.path.join(cfg.run.out_dir, cfg.run.name)


def _rng_state(stage) -> dict:
    """Per-rank RNG streams plus the stage's own state (e.g. the dead-code tracker; tensors only)."""
    return {"torch": torch.get_rng_state(), "stage": stage.generator.get_state(), "stage_state": stage.state_dict()}


def _restore_rng(stage, state: dict | None, cfg: RunConfig, step: int) -> None:
    if state is not None:
        torch.set_rng_state(state["torch"])
        stage.generator.set_state(state["stage"])
    else:  # new world size: a fresh, deterministic stream for this rank
        seed = hash((cfg.run.seed, step, D.rank())) % (2**62)
        torch.manual_seed(seed)
        stage.generator.manual_seed(seed + 1)


def _prepare_run_dir(cfg: RunConfig, run_dir: str, root: str) -> str | None:
    """Rank 0: clean partial checkpoints, save the resolved config. All: agree on the resume point, and
    convert it to a universal checkpoint first where the world size changed."""
    resume, convert = None, False
    if D.is_main():
        os.makedirs(root, exist_ok=True)
        for path in ckpt.remove_partial(root):
            print(f"removed partial checkpoint {path}", flush=True)
        with open(os.path.join(run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(C.dump(cfg))
        resume = ckpt.latest_complete(root)
        if resume is not None:
            meta = ckpt.read_meta(resume)
            convert = meta["world_size"] != D.world_size() and cfg.zero.stage > 0
            if convert:
                print(f"resuming {resume} on {D.world_size()} ranks (saved on {meta['world_size']}): "
                      "converting to a universal checkpoint", flush=True)
                ckpt.clear_conversion_failure(resume)  # before anyone looks for it
        _truncate_metrics(os.path.join(run_dir, "metrics.jsonl"), 0 if resume is None else meta["step"])
        for path in glob.glob(os.path.join(run_dir, SAMPLE_LOG_DIR, "rank_*.jsonl")):  # any earlier world size's
            _truncate_metrics(path, 0 if resume is None else meta["step"])
    resume, convert = D.broadcast_object((resume, convert))
    if convert:
        _convert_to_universal(cfg, resume)
    return resume


def _convert_to_universal(cfg: RunConfig, resume: str) -> None:
    """Rank 0 runs DeepSpeed's conversion; the other ranks wait for its DONE (or failure) marker in the
    checkpoint directory, bounded by `run.universal_timeout_s`, not by a collective: for the 0.7B model
    the conversion can take longer than `run.collective_timeout_s`, which would end the waiting ranks."""
    if D.is_main():
        t0 = time.perf_counter()
        ckpt.ensure_universal(resume)
        print(f"converted {resume} to a universal checkpoint ({time.perf_counter() - t0:.1f} s)", flush=True)
    else:
        ckpt.wait_for_universal(resume, cfg.run.universal_timeout_s)
    D.barrier()


def _truncate_metrics(path: str, step: int) -> None:
    """Drop log lines of steps after the resume point (they are about to be redone; step 0 when an
    earlier attempt died before its first checkpoint)."""
    if os.path.exists(path):
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)


class PreflightError(OSError):
    """The run cannot start: its directory is not writable or its disk too small for a checkpoint."""


def check_writable(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PreflightError(f"the run directory {run_dir} is not writable: {e}") from None


def _check_disk(run_dir: str, model, trainable_only: bool) -> None:
    """One checkpoint holds about 5 fp32 copies of the parameters (weights, EMA, master, 2 Adam moments), of
    the trainable ones alone where the stage saves only those (`frozen_from_init`)."""
    need = 5 * 4 * sum(_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise PreflightError(f"not enough disk for a checkpoint under {run_dir}: {free / 2**20:.1f} MiB free, "
                             f"about {need / 2**20:.1f} MiB needed")


def _load(engine, cfg, resume, reader, ema, stage) -> int:
    meta = ckpt.read_meta(resume)
    same_world = meta["world_size"] == D.world_size() or cfg.zero.stage == 0
    root, name = os.path.split(resume)
    tag = name if same_world else os.path.join(name, "universal")
    # a stage that saves only its trainable parameters left the frozen ones out of DeepSpeed's files too
    # (they came from run.init_from): the module's state there is partial by design
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                          load_module_strict=not stage.frozen_from_init)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {resume}")
    if not same_world and cfg.zero.stage > 0 and not stage.frozen_from_init:
        _load_frozen(engine.module, resume)
    step = int(meta["step"])
    reader_state, rng_state = ckpt.load_rank_files(resume, D.rank())
    rank0_reader, rank0_rng = ckpt.load_rank_files(resume, 0)
    reader.load_state_dict(reader_state or rank0_reader)  # global state: any rank's copy will do
    stage.load_state_dict(rank0_rng.get("stage_state", {}))  # global too; absent in checkpoints without one
    if ema is not None:
        state = ckpt.load_ema(resume)
        if state is None:
            raise RuntimeError(f"{resume} has no ema.safetensors but EMA is enabled")
        ema.load_full_state_dict(state)
    _restore_rng(stage, rng_state if same_world else None, cfg, step)
    return step


def _load_frozen(module, resume: str) -> None:
    """What the optimizer does not hold, the frozen parameters (`t2i.head_only`'s transformer, the
    tokenizer-hybrid stage's encoder and quantizer) and the persistent buffers, from the checkpoint's
    consolidated model.safetensors, after a world-size change: DeepSpeed's universal checkpoint restores only
    the optimizer's parameters, and the others would keep the new run's fresh initialisation."""
    targets = {n: p for n, p in module.named_parameters() if not p.requires_grad}
    targets.update((n, b) for n, b in module.named_buffers() if zero_utils.is_persistent(module, n))
    if not targets:
        return
    from safetensors import safe_open

    file = os.path.join(resume, "model.safetensors")
    with safe_open(file, framework="pt", device="cpu") as f:
        others = tuple(k for k in f.keys() if k not in targets)
    zero_utils.load_safetensors(module, file, skip=others, targets=targets)


def _record_param_shards(module, ema, run_dir: str, construction_bytes: int | None) -> None:
    """Write how many parameter (and EMA) elements each rank holds (ZeRO-3: about 1/N of the model) and
    each rank's peak memory while the model was built and its initial weights loaded."""
    local = sum((p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) for p in module.parameters())
    total = sum(_numel(p) for p in module.parameters())
    per_rank = D.all_gather_object(local)
    ema_per_rank = D.all_gather_object(sum(s.numel() for s in ema.shadow) if ema is not None else 0)
    construction = D.all_gather_object(construction_bytes)
    if D.is_main():
        with open(os.path.join(run_dir, "param_shards.json"), "w") as f:
            json.dump({"total": total, "per_rank": per_rank, "ema_per_rank": ema_per_rank,
                       "construction_peak_bytes": construction}, f)
        print(f"parameters: {total:,} in total; held per rank: {per_rank}; EMA per rank: {ema_per_rank}; "
              f"peak bytes while building: {construction}", flush=True)


def _numel(p) -> int:
    return p.ds_numel if hasattr(p, "ds_numel") else p.numel()


def _memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mean_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    if not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= D.world_size()
    return dict(zip(keys, t.tolist()))


def train(cfg: RunConfig, make_stage) -> TrainResult:
    """Run (or resume) `cfg` with the stage `make_stage(cfg, device)` builds on this rank's device, once
    the process group exists; returns when max_steps is reached or on preemption."""
    preempt = Preemption()
    if cfg.run.num_threads:
        torch.set_num_threads(cfg.run.num_threads)
    keep = cfg.run.keep_freed_host_memory
    if keep if keep is not None else cfg.run.device == "cpu":  # a CPU measure: CUDA memory is the allocator's
        host_memory.keep_freed_memory()
    # tqdm (progress bars of model loading) would start a monitor thread, which only warns about slow
    # bars; the reader forks its workers from this process, and a fork is safest with no stray threads
    tqdm.monitor_interval = 0
    device = D.init(cfg.run.device, cfg.run.collective_timeout_s)
    stage = make_stage(cfg, device)
    run_dir = run_dir_of(cfg)
    root = os.path.join(run_dir, "ckpt")
    check_writable(run_dir)
    resume = _prepare_run_dir(cfg, run_dir, root)
    problem = stage.attention_problem() if hasattr(stage, "attention_problem") else None
    dtype = torch.bfloat16 if cfg.run.dtype == "bf16" else torch.float32
    chosen = kernels.configure(cfg.run.attention, problem, device, dtype, run_dir, D.broadcast_object, D.is_main(),
                               optimizer_offloaded=cfg.zero.offload_optimizer)
    if D.is_main():
        print(f"kernels: attention {chosen['attention']} (run.attention={cfg.run.attention}), RMSNorm "
              f"{chosen['rms_norm']}, optimizer {chosen['optimizer']}", flush=True)

    same_world = resume is None or ckpt.read_meta(resume)["world_size"] == D.world_size()
    ds_config = E.deepspeed_config(cfg, load_universal=not same_world and cfg.zero.stage > 0)
    if D.is_main():
        with open(os.path.join(run_dir, "deepspeed.json"), "w") as f:
            json.dump(ds_config, f, indent=1)
    # on resume the checkpoint brings every weight back, except where the stage keeps its frozen ones out of it
    init_from = cfg.run.init_from if resume is None or stage.frozen_from_init else None
    model, construction_bytes = build_model(cfg, stage, ds_config, device, init_from)
    _check_disk(run_dir, model, trainable_only=stage.frozen_from_init)
    engine = E.build(cfg, model, ds_config)
    ema = EMA(engine.module, cfg.ema.decay, device) if cfg.ema.enabled else None
    _record_param_shards(engine.module, ema, run_dir, construction_bytes)
    reader = stage.make_reader(rank=D.rank(), world_size=D.world_size())
    torch.manual_seed(cfg.run.seed * 1000 + D.rank() + 1)  # per-rank stream (dropout etc.)
    stage.generator.manual_seed(cfg.run.seed * 1000 + D.rank() + 7)
    step = 0
    if resume is not None:
        t_load = time.perf_counter()
        step = _load(engine, cfg, resume, reader, ema, stage)
        if D.is_main():
            print(f"resumed from {resume} at step {step} ({time.perf_counter() - t_load:.1f} s)", flush=True)
    logger = MetricsLogger(run_dir, C.to_dict(cfg), cfg.wandb, enabled=D.is_main(), resumed_at=step if resume else None)
    try:
        return _loop(cfg, stage, engine, ema, reader, logger, device, run_dir, root, step, preempt)
    finally:
        reader.close()
        logger.close()


def build_model(cfg: RunConfig, stage, ds_config: dict, device, init_from: str | None):
    """The stage's module with identical initial weights on every rank, built partitioned under ZeRO-3
    where the stage supports it (no rank holds the whole model), then `init_from` loaded into it one
    tensor at a time. Returns (module, this rank's peak memory in bytes while doing so, or None).

    Built partitioned, the parameters are created in the run's dtype: in fp32 the initial weights are
    bit for bit those of an unpartitioned build, in bf16 they are drawn in bf16 (the same distribution,
    not the same bits as drawing in fp32 and rounding)."""
    torch.manual_seed(cfg.run.seed)
    partitioned = cfg.zero.stage == 3 and stage.partitioned_construction
    with host_memory.PeakMemory(device) as peak:
        with zero_utils.partitioned_construction(ds_config, enabled=partitioned):
            model = stage.build_model()
        if init_from:
            stage.load_init(model, init_from)
    return model, peak.peak_bytes


def _save(cfg, stage, engine, ema, reader, root, step, device) -> str:
    meta = {"stage": cfg.stage, "zero_stage": cfg.zero.stage, "samples": reader.state_dict().get("samples_consumed"),
            **stage.checkpoint_meta()}
    weights = {"model": zero_utils.full_state_dict(engine.module, device, rank=D.rank(),
                                                    trainable_only=stage.frozen_from_init)}
    if ema is not None:
        weights["ema"] = ema.full_state_dict()
    try:
        return ckpt.save(engine, root, step, meta, reader.state_dict(), _rng_state(stage), weights,
                         C.dump(cfg), cfg.run.keep_last, exclude_frozen=stage.frozen_from_init)
    except (OSError, RuntimeError) as e:
        previous = ckpt.latest_complete(root)
        raise RuntimeError(f"saving the checkpoint of step {step} failed ({e}); the newest complete checkpoint "
                           f"{previous} is intact and the partial one is removed at the next start") from e


def _train_step(cfg, stage, engine, batches, step, sample_log=None) -> tuple[dict, dict, int]:
    """One optimizer step over `run.grad_accum` micro-batches: (mean scalar terms, last outputs, samples)."""
    terms, samples = {}, 0
    for _ in range(cfg.run.grad_accum):
        batch = next(batches)
        if sample_log is not None:
            sample_log.write(step + 1, batch)
        inputs = stage.prepare(batch, step)
        out = engine(**inputs)
        engine.backward(out["loss"])
        engine.step()
        samples += stage.batch_size(batch)
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / cfg.run.grad_accum
    return terms, out, samples


def _tensor_bytes(tensors) -> int:
    return zero_utils.storage_bytes(tensors, set())


def _record_memory(engine, ema, stage, peaks: list, run_dir: str) -> None:
    """After the first steps of a run: every rank's bytes by holder (`zero_utils.memory_breakdown`, the
    EMA, the frozen modules of the stage) and each step's peak above what was held before it
    (activations, gathered ZeRO-3 parameters, communication buckets and temporaries), in memory.json.
    `peak_total` = holders + the steady step's peak (the second step: the first also allocates the
    optimizer state), the figure `hart-train plan` predicts."""
    mine = dict(zero_utils.memory_breakdown(engine))
    mine["ema"] = _tensor_bytes(ema.shadow) if ema is not None else 0
    mine["frozen"] = _tensor_bytes(t for m in stage.frozen_modules(engine.module) for t in (*m.parameters(), *m.buffers()))
    mine["first_step_peak_above_static"] = peaks[0]
    mine["step_peak_above_static"] = peaks[-1]
    mine["peak_total"] = None if peaks[-1] is None else sum(
        mine[k] for k in ("parameters", "master_weights", "optimizer_state", "gradients", "buckets", "ema", "frozen")
    ) + peaks[-1]
    per_rank = D.all_gather_object(mine)
    if D.is_main():
        with open(os.path.join(run_dir, "memory.json"), "w") as f:
            json.dump({"per_rank": per_rank}, f, indent=1)


class SampleLog:
    """`run.log_samples`: one line per micro-batch a rank trains, {"step", "epoch", "bucket" ((width, height)
    px, or null for token batches), "keys"}, in <run>/samples/rank_<r>.jsonl, flushed per step; lines of steps
    after the resume point are dropped at start (`_prepare_run_dir`), as metrics.jsonl's are."""

    def __init__(self, run_dir: str, rank: int):
        os.makedirs(os.path.join(run_dir, SAMPLE_LOG_DIR), exist_ok=True)
        self._file = open(os.path.join(run_dir, SAMPLE_LOG_DIR, f"rank_{rank}.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, batch: dict) -> None:
        bucket = batch.get("bucket")
        self._file.write(json.dumps({"step": step, "epoch": int(batch["epoch"]),
                                     "bucket": None if bucket is None else list(bucket),
                                     "keys": [str(k) for k in batch["key"]]}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _loop(cfg, stage, engine, ema, reader, logger, device, run_dir, root, step, preempt) -> TrainResult:
    sample_log = SampleLog(run_dir, D.rank()) if cfg.run.log_samples else None
    try:
        return _steps(cfg, stage, engine, ema, reader, logger, device, run_dir, root, step, preempt, sample_log)
    finally:
        if sample_log is not None:
            sample_log.close()


def _steps(cfg, stage, engine, ema, reader, logger, device, run_dir, root, step, preempt, sample_log) -> TrainResult:
    batches = iter(reader)
    last_ckpt, window, t0 = None, {}, time.perf_counter()
    samples_in_window = 0
    peaks: list = []  # peak memory of the first two steps (memory.json)
    while step < cfg.run.max_steps:
        measure = len(peaks) < 2
        with host_memory.PeakMemory(device) if measure else contextlib.nullcontext() as peak:
            terms, out, samples = _train_step(cfg, stage, engine, batches, step, sample_log)
        samples_in_window += samples
        step += 1
        if measure:
            peaks.append(peak.peak_bytes)
            if len(peaks) == 2 or step == cfg.run.max_steps:
                _record_memory(engine, ema, stage, peaks, run_dir)
        if ema is not None:
            ema.update()
        stage.after_step(engine.module, out, step)
        for k, v in terms.items():
            window[k] = window.get(k, 0.0) + v
        if step % cfg.run.log_every == 0 or step == cfg.run.max_steps:
            n = cfg.run.log_every if step % cfg.run.log_every == 0 else step % cfg.run.log_every
            values = _mean_across_ranks({k: v / n for k, v in window.items()}, device)
            dt = time.perf_counter() - t0
            values.update(lr=engine.get_lr()[0], grad_norm=float(engine.get_global_grad_norm() or 0.0),
                          samples_per_s=samples_in_window * D.world_size() / dt, step_time_s=dt / n,
                          memory_mb=_memory_mb(cfg.run.device))
            values.update(stage.log_values())
            logger.log(step, values)
            window, samples_in_window, t0 = {}, 0, time.perf_counter()
        _periodic(cfg, stage, engine, ema, logger, step)
        stop = D.any_true(preempt.requested, device)
        if stop or step == cfg.run.max_steps or (cfg.run.save_every and step % cfg.run.save_every == 0):
            t_save = time.perf_counter()
            last_ckpt = _save(cfg, stage, engine, ema, reader, root, step, device)
            if D.is_main():
                print(f"saved checkpoint {last_ckpt} ({time.perf_counter() - t_save:.1f} s, of which fsync "
                      f"{ckpt.last_sync_s:.2f} s)", flush=True)
        if stop:
            if D.is_main():
                print(f"preempted: saved at step {step}, exiting", flush=True)
            return TrainResult(step, run_dir, last_ckpt, preempted=True)
    return TrainResult(step, run_dir, last_ckpt, preempted=False)


def _periodic(cfg, stage, engine, ema, logger, step) -> None:
    last = step == cfg.run.max_steps
    if (cfg.run.eval_every and step % cfg.run.eval_every == 0) or last:
        values = stage.evaluate(engine.module, ema, step)
        if values:
            logger.log(step, values)
    if (cfg.run.image_every and step % cfg.run.image_every == 0) or last:
        logger.log_images(step, stage.images(engine.module, ema, step))
