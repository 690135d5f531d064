"""Checkpoints: one directory per step, written by all ranks, valid only once `COMPLETE` exists.

    <run>/ckpt/step_00001000/
        <DeepSpeed files>           engine.save_checkpoint(<run>/ckpt, tag="step_00001000")
        meta.json                   step, samples, world size, ZeRO stage, schema (rank 0)
        model.safetensors           consolidated full weights (rank 0): init_from, export; a LoRA run's
                                    adapters alone (its base is run.init_from's, see hart_train.lora)
        ema.safetensors             full EMA weights of the trainable parameters, gathered (rank 0)
        data/rank_00000.json ...    reader state, per rank
        rng/rank_00000.pt ...       torch RNG state and the stage's generator, per rank
        config.yaml                 the resolved run config
        COMPLETE                    written last, after a barrier: the only proof of a whole checkpoint
        universal/                  created on demand when resuming on a different world size

Resume takes the newest directory with `COMPLETE`. Directories without it are partial (a crash or a
kill during the save) and are deleted at the next start; the previous complete one is untouched,
because every save goes to a new directory and pruning (keep the last K) happens only after
`COMPLETE`. Durable: every rank fsyncs the files and directories of the checkpoint once its own writes
are done, all ranks meet at a barrier, and only then rank 0 writes `COMPLETE` and fsyncs it and the
directory, so after a power loss or a node crash a marker never vouches for data that did not reach the
disk.

Trust: a run directory must be trusted like code. Resuming reads DeepSpeed's own files with DeepSpeed's
`load_checkpoint` (and a world-size change converts them with `ds_to_universal`), both of which unpickle.
What this project reads itself uses safetensors or `torch.load(weights_only=True)`, and everything
foreign (`run.init_from`, `hart-train import`) is read only that way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from hart_train import distributed as D

CKPT_SCHEMA = 1
last_sync_s = 0.0  # this rank's fsync seconds in the last save (the trainer logs it)
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_steps(root: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every step directory under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        if m:
            path = os.path.join(root, name)
            out.append((int(m.group(1)), path, os.path.exists(os.path.join(path, COMPLETE))))
    return sorted(out)


def latest_complete(root: str) -> str | None:
    done = [p for _, p, ok in list_steps(root) if ok]
    return done[-1] if done else None


def remove_partial(root: str) -> list[str]:
    """Delete step directories without COMPLETE (rank 0, at start-up). Returns what was removed."""
    removed = []
    for _, path, ok in list_steps(root):
        if not ok:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prune(root: str, keep_last: int) -> None:
    done = [p for _, p, ok in list_steps(root) if ok]
    for path in done[: max(0, len(done) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def save(engine, root: str, step: int, meta: dict, reader_state: dict, rng_state: dict,
         weights: dict[str, dict[str, torch.Tensor]], config_yaml: str, keep_last: int,
         exclude_frozen: bool = False) -> str:
    """Write the checkpoint for `step` on every rank; returns its directory. Collective. `exclude_frozen`:
    DeepSpeed's files leave out the frozen parameters (they come from run.init_from: LoRA runs)."""
    tag = tag_for(step)
    path = os.path.join(root, tag)
    rank = D.rank()
    engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    _write_json(os.path.join(path, "data", f"rank_{rank:05d}.json"), reader_state)
    os.makedirs(os.path.join(path, "rng"), exist_ok=True)
    torch.save(rng_state, os.path.join(path, "rng", f"rank_{rank:05d}.pt"))
    if D.is_main():
        for name, state in weights.items():  # model.safetensors (consolidated), ema.safetensors
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, os.path.join(path, f"{name}.safetensors"))
        with open(os.path.join(path, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config_yaml)
        _write_json(os.path.join(path, "meta.json"), {**meta, "schema": CKPT_SCHEMA, "step": step,
                                                       "world_size": D.world_size()})
    t_sync = time.perf_counter()
    sync_tree(path)  # every rank, after its own writes: what COMPLETE vouches for is on disk
    global last_sync_s
    last_sync_s = time.perf_counter() - t_sync
    D.barrier()
    _fault_hold(step)
    if D.is_main():
        with open(os.path.join(path, COMPLETE), "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(path)
        prune(root, keep_last)
    D.barrier()
    return path


def _fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # another rank's temporary file, renamed meanwhile (its writer syncs the result)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str) -> None:
    """fsync every file under `path`, then every directory bottom-up, then `path`'s parent (its entry).
    Each rank calls it once its own files are written, so every file is flushed by its writer after the
    last write (a file another rank is still writing is flushed again by that rank); files already on
    disk cost a no-op. Without it, after a power loss or a node crash the page cache could take files
    with it while the COMPLETE marker, written later, survived."""
    for top, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_path(os.path.join(top, name))
        _fsync_path(top)
    _fsync_path(os.path.dirname(os.path.abspath(path)))


def _fault_hold(step: int) -> None:
    """Fault injection for tests: HART_FAULT_HOLD_CHECKPOINT="STEP:SECONDS" keeps the checkpoint of STEP
    written but unmarked for SECONDS, so a test can kill the run inside that window deterministically."""
    spec = os.environ.get("HART_FAULT_HOLD_CHECKPOINT")
    if spec:
        hold_step, seconds = spec.split(":")
        if int(hold_step) == step:
            time.sleep(float(seconds))


def _conversion_failure(path: str) -> str:
    return os.path.join(path, "universal.FAILED")


def clear_conversion_failure(path: str) -> None:
    if os.path.exists(_conversion_failure(path)):
        os.remove(_conversion_failure(path))


def universal_workers() -> int:
    """Worker processes for each phase of DeepSpeed's conversion: one per core, at most 8 (each extract
    worker holds one rank's optimizer file in memory)."""
    return max(1, min(8, os.cpu_count() or 1))


def ensure_universal(path: str) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0; cached in `path/universal`,
    finished when `universal/DONE` exists). A failure is written to `universal.FAILED` for the waiting
    ranks, then raised."""
    out = os.path.join(path, "universal")
    if os.path.exists(os.path.join(out, "DONE")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    _fault_slow_conversion()
    workers = str(universal_workers())
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path,
           "--output_folder", out, "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"universal checkpoint conversion of {path} failed:\n{proc.stderr[-4000:]}"
        with open(_conversion_failure(path), "w") as f:
            f.write(message)
        raise RuntimeError(message)
    sync_tree(out)
    with open(os.path.join(out, "DONE"), "w") as f:
        f.write("ok\n")
    return out


def wait_for_universal(path: str, timeout_s: float, poll_s: float = 0.5) -> str:
    """The other ranks' side of `ensure_universal`: wait for DONE, or fail with rank 0's failure."""
    out = os.path.join(path, "universal")
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(os.path.join(out, "DONE")):
        if os.path.exists(_conversion_failure(path)):
            with open(_conversion_failure(path)) as f:
                raise RuntimeError(f"rank 0 could not convert the checkpoint: {f.read()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the universal conversion of {path} did not finish within "
                               f"run.universal_timeout_s={timeout_s:g} s")
        time.sleep(poll_s)
    return out


def _fault_slow_conversion() -> None:
    """Fault injection for tests: HART_FAULT_SLOW_UNIVERSAL=SECONDS delays the conversion."""
    seconds = os.environ.get("HART_FAULT_SLOW_UNIVERSAL")
    if seconds:
        time.sleep(float(seconds))


def load_rank_files(path: str, rank: int) -> tuple[dict | None, dict | None]:
    """(reader state, rng state) written by `rank`, or None where that rank did not exist."""
    data_file = os.path.join(path, "data", f"rank_{rank:05d}.json")
    rng_file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    reader = None
    if os.path.exists(data_file):
        with open(data_file, encoding="utf-8") as f:
            reader = json.load(f)
    rng = torch.load(rng_file, weights_only=True) if os.path.exists(rng_file) else None
    return reader, rng


def load_ema(path: str) -> dict[str, torch.Tensor] | None:
    f = os.path.join(path, "ema.safetensors")
    return load_file(f) if os.path.exists(f) else None
