"""Surviving faults, with real processes, real signals, a real S3 server and a real full disk.

Every run here uses the reference run's settings (runs.tokenizer_overrides), so "continues bit for bit"
means: the per-step losses equal the uninterrupted reference run's exactly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import fsspec
import pytest
from safetensors.torch import load_file

from faultproxy import FaultProxy
from procs import check, free_port, run_train, start_ranks, wait_for
from runs import TOKENIZER_CONFIG, assert_no_secret_in, assert_same_losses, losses, tokenizer_overrides


def _wait_step(run_dir: Path, step: int, procs, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while True:
        f = run_dir / "metrics.jsonl"
        if f.exists() and step in losses(run_dir):
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited early:\n" + "\n".join(p.stdout.read()[-2000:] for p in procs))
        if time.time() > deadline:
            raise AssertionError(f"step {step} not reached in {timeout}s")
        time.sleep(0.05)


def test_sigkill_of_one_rank_stops_the_other_then_resumes_bit_for_bit(emoji_dataset, tokenizer_reference, tmp_path):
    timeout_s = 30
    args = tokenizer_overrides(emoji_dataset, tmp_path, "killed", f"run.collective_timeout_s={timeout_s}")
    ranks = start_ranks(TOKENIZER_CONFIG, args)
    _wait_step(tmp_path / "killed", 5, ranks)
    killed_at = time.time()
    os.kill(ranks[1].pid, signal.SIGKILL)
    survivor_rc = ranks[0].wait(timeout=timeout_s + 30)
    elapsed = time.time() - killed_at
    ranks[1].wait()
    assert survivor_rc != 0 and elapsed < timeout_s + 10, (survivor_rc, elapsed)
    print(f"SIGKILL of rank 1 -> rank 0 exited ({survivor_rc}) after {elapsed:.1f} s")
    check(run_train(TOKENIZER_CONFIG, args, nproc=2))  # the same command resumes
    assert_same_losses(tmp_path / "killed", tokenizer_reference)


def test_kill_during_checkpoint_write_resumes_from_the_previous_one(emoji_dataset, tokenizer_reference, tmp_path):
    args = tokenizer_overrides(emoji_dataset, tmp_path, "midsave")
    ckpt = tmp_path / "midsave" / "ckpt"
    # the save of step 8 is held open before COMPLETE for 60 s, so the kill lands inside it however fast
    # the machine is (the hold only widens the window; the kill comes as soon as the directory appears)
    ranks = start_ranks(TOKENIZER_CONFIG, args, extra_env={"HART_FAULT_HOLD_CHECKPOINT": "8:60"})
    wait_for(ckpt / "step_00000008", ranks[0])  # the save of step 8 has begun
    for p in ranks:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert (ckpt / "step_00000004" / "COMPLETE").exists()
    assert not (ckpt / "step_00000008" / "COMPLETE").exists()
    # a second, deterministic kind of partial checkpoint: files present, marker missing
    shutil.copytree(ckpt / "step_00000004", ckpt / "step_00000009")
    (ckpt / "step_00000009" / "COMPLETE").unlink()
    result = run_train(TOKENIZER_CONFIG, args, nproc=2)
    check(result)
    assert "removed partial checkpoint" in result.stdout and "resumed from" in result.stdout
    assert f"{ckpt / 'step_00000004'} at step 4" in result.stdout
    assert not (ckpt / "step_00000009").exists()
    assert_same_losses(tmp_path / "midsave", tokenizer_reference)


def test_unwritable_output_is_a_clear_error_before_training(emoji_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_train(TOKENIZER_CONFIG, tokenizer_overrides(emoji_dataset, blocker / "runs", "x"), nproc=1)
    assert result.returncode == 2
    assert "not writable" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A real 40 MiB filesystem (tmpfs): room for one checkpoint of the tiny tokenizer (~27 MiB), not two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(emoji_dataset, tokenizer_reference, small_disk):
    args = tokenizer_overrides(emoji_dataset, small_disk, "full", "run.keep_last=1")
    result = run_train(TOKENIZER_CONFIG, args, nproc=2)
    assert result.returncode != 0
    assert "saving the checkpoint of step 8 failed" in result.stdout + result.stderr
    ckpt = small_disk / "full" / "ckpt"
    assert (ckpt / "step_00000004" / "COMPLETE").exists()
    assert not (ckpt / "step_00000008" / "COMPLETE").exists()
    # the previous checkpoint is whole: its weights equal the reference run's at the same step
    kept = load_file(ckpt / "step_00000004" / "model.safetensors")
    ref = load_file(tokenizer_reference / "ckpt" / "step_00000004" / "model.safetensors")
    assert kept.keys() == ref.keys() and all((kept[k] == ref[k]).all() for k in ref)


def test_disk_too_small_for_one_checkpoint_is_a_clear_error(emoji_dataset, tmp_path):
    mnt = tmp_path / "tiny-disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        result = run_train(TOKENIZER_CONFIG, tokenizer_overrides(emoji_dataset, mnt, "x"), nproc=1)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert result.returncode == 2 and "not enough disk" in result.stderr


def _upload(local: str, url: str) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for f in sorted(Path(local).iterdir()):
        fs.put_file(str(f), f"{url}/{f.name}")


def test_s3_faults_during_training_change_nothing(emoji_dataset, tokenizer_reference, s3_server, s3_bucket, tmp_path):
    url = f"{s3_bucket}/emoji"
    _upload(emoji_dataset, url)
    schedule = ["pass", "reset", "pass", "503", "pass", "stall", "pass", "pass"]
    with FaultProxy(s3_server, schedule, stall_seconds=4.0) as proxy:
        args = tokenizer_overrides(url, tmp_path, "s3faults", "data.io_timeout=1.5",
                                   "data.retry_base_delay=0.1", f"tokenizer.eval_url={emoji_dataset}")
        os.environ["AWS_ENDPOINT_URL"], saved = proxy.endpoint, os.environ["AWS_ENDPOINT_URL"]
        try:
            result = run_train(TOKENIZER_CONFIG, args, nproc=2)
        finally:
            os.environ["AWS_ENDPOINT_URL"] = saved
    check(result)
    assert proxy.counts["reset"] > 0 and proxy.counts["503"] > 0 and proxy.counts["stall"] > 0, proxy.counts
    assert_same_losses(tmp_path / "s3faults", tokenizer_reference)
    # credentials came from the environment only, and never reached a log, a config or wandb
    assert_no_secret_in(tmp_path / "s3faults", os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"])
    assert (tmp_path / "s3faults" / "wandb").is_dir()


def _moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    fs = fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            fs.ls("")
            return proc
        except Exception:
            time.sleep(0.2)
    raise AssertionError("moto_server did not start")


def _fill(port: int, local: str) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True, client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
    fs.mkdir("restart-bucket")
    for f in sorted(Path(local).iterdir()):
        fs.put_file(str(f), f"s3://restart-bucket/emoji/{f.name}")


def test_s3_server_restart_mid_epoch(emoji_dataset, tokenizer_reference, s3_server, tmp_path, monkeypatch):
    """The S3 endpoint goes away mid-epoch (connections refused) while its server process is restarted,
    then comes back with its data. moto keeps objects in memory, so the new server is refilled before
    the endpoint reopens, as a real store would still hold them."""
    moto_port = free_port()
    server = _moto(moto_port)
    _fill(moto_port, emoji_dataset)
    endpoint = FaultProxy(f"http://127.0.0.1:{moto_port}", ["pass"]).__enter__()
    port = int(endpoint.endpoint.rsplit(":", 1)[1])
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint.endpoint)
    args = tokenizer_overrides("s3://restart-bucket/emoji", tmp_path, "restart", "data.retry_base_delay=0.5",
                               "data.io_timeout=2", f"tokenizer.eval_url={emoji_dataset}")
    ranks = start_ranks(TOKENIZER_CONFIG, args)
    try:
        _wait_step(tmp_path / "restart", 2, ranks)
        endpoint.__exit__()
        server.terminate()
        server.wait()
        moto_port = free_port()
        server = _moto(moto_port)
        _fill(moto_port, emoji_dataset)
        time.sleep(1.0)
        endpoint = FaultProxy(f"http://127.0.0.1:{moto_port}", ["pass"], port=port).__enter__()
        outputs = [p.communicate(timeout=300)[0] for p in ranks]
        assert [p.returncode for p in ranks] == [0, 0], outputs[0][-3000:]
        assert endpoint.counts["pass"] > 0  # the run kept reading from the restarted server
    finally:
        endpoint.__exit__()
        server.terminate()
    assert_same_losses(tmp_path / "restart", tokenizer_reference)


FSYNC_HOOK = '''
import os
_log = os.environ.get("HART_TEST_FSYNC_LOG")
if _log:
    _fsync = os.fsync

    def fsync(fd):
        _fsync(fd)
        with open(_log, "a") as f:  # O_APPEND: whole lines, in the order the ranks made the calls
            f.write(os.readlink(f"/proc/self/fd/{fd}") + "\\n")

    os.fsync = fsync
'''


def test_complete_is_written_only_after_every_file_and_directory_is_on_disk(emoji_dataset, tmp_path, monkeypatch):
    """Durable checkpoints: each rank's files and the directories are fsynced before COMPLETE, which is
    fsynced itself, and the step directory after it. A power loss cannot be staged here, so the test
    records every fsync of the real 2-rank run (a sitecustomize wraps os.fsync in each rank)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FSYNC_HOOK)
    log = tmp_path / "fsync.log"
    monkeypatch.setenv("PYTHONPATH", f"{hook}:{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("HART_TEST_FSYNC_LOG", str(log))
    check(run_train(TOKENIZER_CONFIG, tokenizer_overrides(emoji_dataset, tmp_path, "d", "run.max_steps=4",
                                                          "run.save_every=2")))
    synced = log.read_text().splitlines()
    for step in (2, 4):
        ckpt = (tmp_path / "d" / "ckpt" / f"step_{step:08d}").resolve()
        complete = synced.index(str(ckpt / "COMPLETE"))
        before = set(synced[:complete])
        files = {str(p) for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE"}
        dirs = {str(p) for p in ckpt.rglob("*") if p.is_dir()} | {str(ckpt), str(ckpt.parent)}
        assert len(files) >= 8 and files <= before, sorted(files - before)
        assert dirs <= before, sorted(dirs - before)
        assert str(ckpt) in synced[complete + 1:]  # the marker's directory entry, after the marker
