"""The reference tokenizer run shared by the runtime, launcher and fault tests."""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_CONFIG = "configs/tokenizer_vq_tiny.yaml"


def tokenizer_overrides(data: str, out: Path, name: str, *extra: str) -> list[str]:
    """12 steps, a checkpoint every 4, one log line per step, the GAN from step 6, dead-code restarts.

    Small shuffle windows and 8 KiB reads keep the reader fetching throughout the run (with the
    config's window, a rank's first window already holds every sample 12 steps use), so S3 faults
    injected mid-run really hit reads."""
    return [f"data.urls=[{data}]", f"run.out_dir={out}", f"run.name={name}", "run.max_steps=12",
            "run.save_every=4", "run.keep_last=5", "run.log_every=1", "tokenizer.loss.disc_start_step=6",
            "tokenizer.loss.dead_code_steps=3", "data.shuffle_window=16", "data.read_block_bytes=8192",
            f"tokenizer.eval_url={data}", "tokenizer.eval_samples=16", *extra]


def losses(run_dir: Path) -> dict[int, dict]:
    """step -> the training log line of that step."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def assert_same_losses(got_dir: Path, ref_dir: Path, keys=("loss", "recon", "vq")) -> None:
    got, ref = losses(got_dir), losses(ref_dir)
    assert sorted(got) == sorted(ref), (sorted(got), sorted(ref))
    for step in sorted(ref):
        for key in keys:
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])


def assert_no_secret_in(run_dir: Path, *secrets: str) -> None:
    """No file the run wrote (logs, configs, checkpoints, wandb's offline files) holds a credential."""
    files = [p for p in Path(run_dir).rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} leaked into {p}"
