"""Launchers, and runs that reproduce from their saved config.

Two simulated nodes x one rank (the per-node --no_ssh mode, as on Kubernetes or Slurm, through
launch/train.sh) started from nothing but the reference run's saved `config.yaml` train exactly like the
reference (one node x two ranks under torchrun): same losses at every step, bit for bit. A job started
with launch/train.sh survives preemption as schedulers deliver it (SIGTERM, SIGUSR1 to the whole process
group): it checkpoints, exits 0, and the same command continues bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from procs import REPO, env, free_port
from runs import assert_same_losses, losses, same_kernel


def launch_env() -> dict:
    # one thread per rank in both layouts: the wrapper would otherwise give the single rank of each
    # simulated node both cores, and a different thread count changes float summation order
    e = env()
    e.update(HART_DEVICE="cpu", HART_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return e


def test_two_simulated_nodes_from_the_saved_config_match_the_reference(tokenizer_reference, tmp_path):
    saved = tokenizer_reference / "config.yaml"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen(["bash", "launch/train.sh", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(r),
                               "--master_addr", "127.0.0.1", "--master_port", port, "--config", str(saved),
                               "--set", f"run.out_dir={tmp_path}", "--set", "run.name=two-nodes"],
                              cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(o[-3000:] for o in outputs)
    assert_same_losses(tmp_path / "two-nodes", tokenizer_reference)


def _train_sh(config: str, overrides: list[str], port: str) -> list[str]:
    cmd = ["bash", "launch/train.sh", "--num_gpus", "2", "--master_port", port, "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _preempt_at(cmd: list[str], run_dir: Path, step: int, sig: int) -> tuple[int, str]:
    """Start `cmd` as a job of its own (a new process group), send `sig` to the whole group once the
    run has logged `step`, and return (the launcher's exit code, its output)."""
    job = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and step in losses(run_dir)):
        assert job.poll() is None, f"the job exited ({job.returncode}) before step {step}:\n{job.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"step {step} not reached in 300 s"
        time.sleep(0.05)
    os.killpg(job.pid, sig)
    out = job.communicate(timeout=180)[0]
    try:  # nothing of the job is left: launcher, ranks, data workers
        os.killpg(job.pid, 0)
        left = True
    except ProcessLookupError:
        left = False
    assert not left, "processes of the preempted job are still running"
    return job.returncode, out


def test_launched_job_survives_sigterm_and_sigusr1_and_resumes_bit_for_bit(bf16_reference, t2i_args, tmp_path):
    """configs/t2i_256.yaml (bf16, ZeRO-3) at small width, 2 ranks under launch/train.sh: preempted by
    SIGTERM, relaunched, preempted by SIGUSR1, relaunched to the end: every preemption saves a checkpoint
    and exits 0, and the losses and final weights equal the uninterrupted run's bit for bit."""
    run_dir = tmp_path / "preempted"
    cmd = _train_sh("configs/t2i_256.yaml", t2i_args(tmp_path, "preempted", same_kernel(bf16_reference)),
                    str(free_port()))
    saved = []
    for at, sig in ((3, signal.SIGTERM), (7, signal.SIGUSR1)):
        rc, out = _preempt_at(cmd, run_dir, at, sig)
        assert rc == 0, f"{signal.Signals(sig).name}: launcher exited {rc}\n{out[-4000:]}"
        assert "preempted: saved at step" in out, out[-4000:]
        step = int(out.split("preempted: saved at step")[1].split(",")[0])
        assert at <= step < 12 and (run_dir / "ckpt" / f"step_{step:08d}" / "COMPLETE").exists()
        saved.append(step)
    assert saved[0] < saved[1]
    done = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {run_dir / 'ckpt' / f'step_{saved[1]:08d}'}" in done.stdout
    got, ref = losses(run_dir), losses(bf16_reference)
    assert sorted(got) == sorted(ref) == list(range(1, 13))
    for step in ref:
        for key in ("loss", "ce", "diff_loss", "grad_norm"):
            assert got[step][key] == ref[step][key], (step, key, got[step][key], ref[step][key])
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(run_dir / "ckpt" / "step_00000012" / name)
        b = load_file(bf16_reference / "ckpt" / "step_00000012" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_single_node_wrapper_refuses_incomplete_per_node_options(tmp_path):
    result = subprocess.run(["bash", "launch/train.sh", "--no_ssh", "--node_rank", "0", "--config", "x.yaml"],
                            cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--no_ssh needs --master_addr" in result.stderr


_SHM_PROBE = """
import json, os, torch
import deepspeed.comm.comm as dcomm
from hart_train import distributed as D
D.init("cpu", 60)
t = torch.full((1000,), float(D.rank() + 1))
dcomm.inference_all_reduce(t)  # DeepSpeed's shared-memory allreduce when all ranks share a machine
left = sorted(n for n in os.listdir(D.SHM_DIR) if n.startswith("deepspeed_allreduce_buffer"))
print(json.dumps({"shm_op": dcomm.cdb.shm_comm_op is not None, "sum": t.unique().tolist(), "left": left,
                  "own": D.shm_allreduce_buffer_name(D.rank())}))
D.barrier()
D.destroy()
"""


def test_deepspeed_shared_memory_buffers_do_not_outlive_the_ranks():
    """DeepSpeed's CPU allreduce buffers (~66 MB of /dev/shm per rank) are unlinked once every rank
    has them: the collective still works, and nothing of the run is left in /dev/shm."""
    from hart_train.distributed import SHM_DIR

    port = str(free_port())
    procs = []
    for rank in range(2):
        e = env()
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", LOCAL_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-c", _SHM_PROBE], cwd=REPO, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for out in outs:
        assert out["shm_op"], "DeepSpeed's shared-memory allreduce is not in use: this test checks nothing"
        assert out["sum"] == [3.0]
        assert out["own"] not in out["left"]
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in n]


_PROBE_RANK = """
import json, os, signal, sys, time
rank = int(os.environ["RANK"])
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT")
sys.stdout.write(json.dumps({k: os.environ[k] for k in keys}) + "\\n")  # one write: ranks share stdout
mode = sys.argv[1]
if mode == "fail" and rank % 2 == 1:
    sys.exit(3)
if mode == "signal":
    signal.signal(signal.SIGTERM, lambda s, f: (sys.stdout.write(f"rank {rank} got SIGTERM\\n"), sys.exit(0)))
if mode != "env":
    time.sleep(120)
"""


def _launcher(tmp_path: Path, *args: str) -> subprocess.Popen:
    (tmp_path / "probe_rank.py").write_text(_PROBE_RANK)
    e = launch_env()
    e["PYTHONPATH"] = str(tmp_path)
    return subprocess.Popen([sys.executable, "-m", "hart_train.launcher", *args], cwd=REPO, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_launcher_numbers_ranks_from_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes, uneven\nnode0 slots=2\nnode1 slots=3\n")
    job = _launcher(tmp_path, "--hostfile", str(hostfile), "--node_rank", "1", "--master_addr", "10.0.0.1",
                    "--master_port", "1234", "probe_rank", "env")
    out = job.communicate(timeout=60)[0]
    assert job.returncode == 0, out
    ranks = sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: int(r["RANK"]))
    assert [(r["RANK"], r["LOCAL_RANK"]) for r in ranks] == [("2", "0"), ("3", "1"), ("4", "2")]
    assert {(r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["CROSS_RANK"], r["CROSS_SIZE"], r["MASTER_ADDR"], r["MASTER_PORT"])
            for r in ranks} == {("5", "3", "1", "2", "10.0.0.1", "1234")}


def test_launcher_stops_the_node_when_a_rank_fails(tmp_path):
    start = time.time()
    job = _launcher(tmp_path, "--nproc_per_node", "2", "probe_rank", "fail")
    out = job.communicate(timeout=60)[0]
    assert job.returncode == 3 and time.time() - start < 30, (job.returncode, out)
    assert "local rank 1 exited with 3" in out


def test_launcher_forwards_sigterm_sent_to_it_alone(tmp_path):
    """Kubernetes signals only the container's first process: the ranks must still hear it."""
    job = _launcher(tmp_path, "--nproc_per_node", "2", "probe_rank", "signal")
    deadline = time.time() + 60
    started = 0
    while started < 2:  # both ranks printed their environment, so their handlers are installed
        line = job.stdout.readline()
        started += line.startswith("{")
        assert time.time() < deadline and line, "ranks did not start"
    job.send_signal(signal.SIGTERM)
    out = job.communicate(timeout=60)[0]
    assert job.returncode == 0, out
    assert "rank 0 got SIGTERM" in out and "rank 1 got SIGTERM" in out
