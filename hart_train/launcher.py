"""The per-node launcher behind `launch/train.sh`: starts this node's ranks and survives preemption.

    python -m hart_train.launcher --nproc_per_node 8 [--nnodes N --node_rank R --master_addr A
                                  --master_port P] -- hart_train.cli run --config FILE [--set k=v ...]

Each rank is `python -m <module> <args>` with the torch.distributed variables in its environment
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR,
MASTER_PORT). A hostfile (`host slots=N` lines, DeepSpeed's format) gives every node its own slot count.

Schedulers preempt by signalling: Kubernetes and `scancel` send SIGTERM, Slurm's `--signal=USR1@T` sends
SIGUSR1, to every process of the job, or (Kubernetes) only to the container's first process. The
trainer saves a checkpoint and exits 0 on either signal, so this launcher forwards SIGTERM and SIGUSR1
to its ranks, keeps waiting, and exits 0 when they have. (DeepSpeed's launcher kills its ranks on
SIGTERM and dies of SIGUSR1; torchrun's agent does the same.) The scheduler's own grace period bounds the
wait: it sends SIGKILL when it runs out.

A rank that exits with an error ends the node: the other ranks are killed at once (they would wait in
their next collective until `run.collective_timeout_s`) and the launcher exits with the failed rank's
code (128 + signal number for a rank killed by a signal). SIGINT (Ctrl-C) kills the ranks too.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """[(host, slots)] in file order; `#` comments and blank lines skipped."""
    hosts = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            slots = [x for x in fields[1:] if x.startswith("slots=")]
            if not slots or not slots[0][6:].isdigit() or int(slots[0][6:]) < 1:
                raise SystemExit(f"launcher: {path}:{n}: expected 'HOST slots=N' (N >= 1), got {line.strip()!r}")
            hosts.append((fields[0], int(slots[0][6:])))
    if not hosts:
        raise SystemExit(f"launcher: {path} lists no hosts")
    return hosts


def rank_layout(args) -> tuple[int, int, int, int]:
    """(first global rank of this node, ranks on this node, world size, number of nodes)."""
    if args.hostfile:
        slots = [s if args.nproc_per_node is None else args.nproc_per_node for _, s in read_hostfile(args.hostfile)]
    else:
        slots = [args.nproc_per_node or 1] * args.nnodes
    if not 0 <= args.node_rank < len(slots):
        raise SystemExit(f"launcher: node_rank {args.node_rank} outside the {len(slots)} nodes")
    return sum(slots[: args.node_rank]), slots[args.node_rank], sum(slots), len(slots)


def rank_env(base: dict, args, first: int, local: int, local_size: int, world: int, nnodes: int) -> dict:
    env = dict(base)
    env.update(RANK=str(first + local), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(local_size), LOCAL_SIZE=str(local_size), CROSS_RANK=str(args.node_rank),
               CROSS_SIZE=str(nnodes), MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port))
    return env


def exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc  # Popen reports death by signal N as -N; shells as 128 + N


class Node:
    """This node's rank processes, and what the launcher does when they or it are signalled."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.interrupted = False

    def forward(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        print(f"launcher: {name} received, forwarded to the ranks; waiting for their checkpoint", flush=True)
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signum)

    def interrupt(self, signum, frame) -> None:
        self.interrupted = True

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def wait(self) -> int:
        """0 when every rank exited 0; else the first failure's code, after killing the others."""
        while True:
            if self.interrupted:
                self.kill_all()
                print("launcher: interrupted, ranks killed", file=sys.stderr, flush=True)
                return 130
            codes = [p.poll() for p in self.procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                local, rc = failed[0]
                self.kill_all()
                print(f"launcher: local rank {local} exited with {exit_code(rc)}; stopped the other ranks",
                      file=sys.stderr, flush=True)
                return exit_code(rc)
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hart_train.launcher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hostfile", help="'HOST slots=N' per node; node_rank indexes it")
    parser.add_argument("--nproc_per_node", type=int, help="ranks on this node (default: the hostfile's slots, or 1)")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes, when there is no hostfile")
    parser.add_argument("--node_rank", type=int, default=0)
    parser.add_argument("--master_addr", default="127.0.0.1")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("module", help="the Python module each rank runs (python -m MODULE ARGS...)")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    first, local_size, world, nnodes = rank_layout(args)

    node = Node([])
    # handlers before the first rank starts: a signal that arrives during the start is still forwarded
    for sig in FORWARDED:
        signal.signal(sig, node.forward)
    signal.signal(signal.SIGINT, node.interrupt)
    for local in range(local_size):
        node.procs.append(subprocess.Popen([sys.executable, "-u", "-m", args.module, *args.args],
                                           env=rank_env(os.environ, args, first, local, local_size, world, nnodes)))
    return node.wait()


if __name__ == "__main__":
    sys.exit(main())
