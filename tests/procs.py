"""Run `hart-train` the way users do: one bare process, or N ranks under torchrun, as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(config: str, overrides: list[str], nproc: int) -> list[str]:
    args = ["-m", "hart_train.cli", "run", "--config", config]
    for o in overrides:
        args += ["--set", o]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", *args]


def env() -> dict:  # the environment a user-run launcher would give the ranks
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             PYTHONWARNINGS="ignore")
    # DeepSpeed JIT-builds a comm op once per environment: keep the build beside this venv, so that
    # another venv sharing ~/.cache cannot invalidate it (each rebuild costs 20-90 s per process start)
    e.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return e


def run_train(config: str, overrides: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, overrides, nproc), cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def start_train(config: str, overrides: list[str], nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(config, overrides, nproc), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {path} appeared:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def start_ranks(config: str, overrides: list[str], world: int = 2, extra_env: dict | None = None) -> list[subprocess.Popen]:
    """Start `world` ranks as plain processes (no launcher in between), so a test can signal one rank
    and watch what the others do by themselves."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = env()
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                 LOCAL_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **(extra_env or {}))
        procs.append(subprocess.Popen(train_cmd(config, overrides, 1), cwd=REPO, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    return procs
