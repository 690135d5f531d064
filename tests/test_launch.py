"""Launchers, and runs that reproduce from their saved config.

Two simulated nodes x one rank (DeepSpeed's per-node --no_ssh mode, as on Kubernetes or Slurm, through
launch/train.sh) started from nothing but the reference run's saved `config.yaml` train exactly like the
reference (one node x two ranks under torchrun): same losses at every step, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from procs import REPO, env, free_port
from runs import assert_same_losses


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
