"""Checkpoints: one directory per step, written by all ranks, valid only once `COMPLETE` exists.

    <run>/ckpt/step_00001000/
        <DeepSpeed files>           engine.save_checkpoint(<run>/ckpt, tag="step_00001000")
        meta.json                   step, samples, world size, ZeRO stage, schema (rank 0)
        model.safetensors           consolidated full weights (rank 0): init_from, export
        ema.safetensors             full EMA weights of the trainable parameters, gathered (rank 0)
        data/rank_00000.json ...    reader state, per rank
        rng/rank_00000.pt ...       torch RNG state and the stage's generator, per rank
        config.yaml                 the resolved run config
        COMPLETE                    written last, after a barrier: the only proof of a whole checkpoint
        universal/                  created on demand when resuming on a different world size

Resume takes the newest directory with `COMPLETE`. Directories without it are partial (a crash or a
kill during the save) and are deleted at the next start; the previous complete one is untouched,
because every save goes to a new directory and pruning (keep the last K) happens only after
`COMPLETE`. Everything is read back with `weights_only=True` or safetensors: no arbitrary unpickling.
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
         weights: dict[str, dict[str, torch.Tensor]], config_yaml: str, keep_last: int) -> str:
    """Write the checkpoint for `step` on every rank; returns its directory. Collective."""
    tag = tag_for(step)
    path = os.path.join(root, tag)
    rank = D.rank()
    engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
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
    D.barrier()
    _fault_hold(step)
    if D.is_main():
        with open(os.path.join(path, COMPLETE), "w") as f:
            f.write(f"{step}\n")
        prune(root, keep_last)
    D.barrier()
    return path


def _fault_hold(step: int) -> None:
    """Fault injection for tests: HART_FAULT_HOLD_CHECKPOINT="STEP:SECONDS" keeps the checkpoint of STEP
    written but unmarked for SECONDS, so a test can kill the run inside that window deterministically."""
    spec = os.environ.get("HART_FAULT_HOLD_CHECKPOINT")
    if spec:
        hold_step, seconds = spec.split(":")
        if int(hold_step) == step:
            time.sleep(float(seconds))


def ensure_universal(path: str) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0; cached in `path/universal`)."""
    out = os.path.join(path, "universal")
    if os.path.exists(os.path.join(out, "DONE")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path,
           "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"universal checkpoint conversion of {path} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(out, "DONE"), "w") as f:
        f.write("ok\n")
    return out


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
