"""Launchers: two simulated nodes x one rank (DeepSpeed's per-node --no_ssh mode, as on Kubernetes or
Slurm) train exactly like one node x two ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from procs import REPO, env, free_port


def launch_env() -> dict:
    e = env()
    # one thread per rank in both layouts: the wrapper would otherwise give the single rank of each
    # simulated node both cores, and a different thread count changes float summation order
    e.update(HART_DEVICE="cpu", HART_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return e


def train_args(data: str, out: Path, name: str) -> list[str]:
    return ["--config", "configs/tokenizer_vq_tiny.yaml", "--set", f"data.urls=[{data}]", "--set", f"run.out_dir={out}",
            "--set", f"run.name={name}", "--set", "run.max_steps=6", "--set", "run.log_every=1",
            "--set", "run.save_every=0", "--set", "tokenizer.loss.disc_start_step=3"]


def losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["recon"]) for r in rows if "loss" in r]


def test_two_simulated_nodes_match_one_node(emoji_dataset, tmp_path):
    one_node = subprocess.run(["bash", "launch/train.sh", "--num_gpus", "2", "--master_port", str(free_port()),
                               *train_args(emoji_dataset, tmp_path, "one-node")],
                              cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert one_node.returncode == 0, one_node.stdout[-3000:] + one_node.stderr[-3000:]

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", "launch/train.sh", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", port,
                               *train_args(emoji_dataset, tmp_path, "two-nodes")],
                              cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outputs)

    expected = losses(tmp_path / "one-node")
    assert [s for s, *_ in expected] == list(range(1, 7))
    assert losses(tmp_path / "two-nodes") == expected
    shards = json.loads((tmp_path / "two-nodes" / "param_shards.json").read_text())
    assert len(shards["per_rank"]) == 2
