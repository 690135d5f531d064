"""Metrics logging as a resumed or troubled run meets it: wandb's offline records of a resumed run
rebuild one continuous, correct history, and a dead wandb service does not end the run.

The offline `.wandb` files are read directly (wandb's LevelDB-style record log: a 7-byte file header,
32 KiB blocks, records with a 7-byte header of checksum, length and type, protobuf `Record` payloads), so
the test sees exactly what `wandb sync` would upload."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from procs import REPO, env

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """The protobuf Records of one offline `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb record log"
    pos, records, parts = _HEADER, [], []
    while pos + _HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER:  # too little room for a record header: zero padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:
            break
        parts.append(data[pos + _HEADER:pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            records.append(rec)
            parts = []
    return records


def offline_run(d: Path) -> dict:
    """{"run_id", "start" (ns), "branch_step" (None if not a rewind), "history": {step: {key: value}}} of one
    offline run."""
    (log,) = d.glob("*.wandb")
    out = {"run_id": None, "start": None, "branch_step": None, "history": {}}
    for rec in wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            out["start"] = rec.run.start_time.ToNanoseconds()
            if rec.run.HasField("branch_point"):
                out["branch_step"] = int(rec.run.branch_point.value)
                assert rec.run.branch_point.run == rec.run.run_id
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out["history"][int(rec.history.step.num)] = items
    return out


_ATTEMPTS = """
import sys
from hart_train.metrics import MetricsLogger
from hart_train.run_config import WandbSection
run_dir = sys.argv[1]
for resumed_at, steps, offset in ((None, range(1, 7), 0.0), (3, range(4, 9), 100.0), (6, range(7, 11), 200.0)):
    log = MetricsLogger(run_dir, {"run": {"name": "x"}}, WandbSection(mode="offline"), enabled=True, resumed_at=resumed_at)
    for s in steps:
        log.log(s, {"loss": offset + s})
    log.close()
"""


def test_resumed_runs_rewind_wandb_to_their_checkpoint(tmp_path):
    """Three attempts of one run: steps 1-6 (killed), resumed from the checkpoint of step 3 (steps 4-8,
    new values), resumed from step 6 (steps 7-10). Replaying the offline runs in order, each rewinding
    to its branch point, gives exactly one value per step: the surviving attempt's."""
    r = subprocess.run([sys.executable, "-c", _ATTEMPTS, str(tmp_path)], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((offline_run(d) for d in (tmp_path / "wandb").glob("offline-run-*")), key=lambda run: run["start"])
    assert len(runs) == 3 and len({run["run_id"] for run in runs}) == 1
    assert [run["branch_step"] for run in runs] == [None, 3, 6]
    chart: dict[int, float] = {}
    for run in runs:
        if run["branch_step"] is not None:
            chart = {s: v for s, v in chart.items() if s <= run["branch_step"]}
        for step, items in run["history"].items():
            assert step not in chart, f"step {step} logged twice"
            chart[step] = items["loss"]
    assert chart == {1: 1.0, 2: 2.0, 3: 3.0, 4: 104.0, 5: 105.0, 6: 106.0, 7: 207.0, 8: 208.0, 9: 209.0, 10: 210.0}


_SERVICE_DIES = """
import os, signal, sys, time
from hart_train.metrics import MetricsLogger
from hart_train.run_config import WandbSection
log = MetricsLogger(sys.argv[1], {}, WandbSection(mode="offline"), enabled=True)
log.log(1, {"loss": 1.0})
for pid in filter(str.isdigit, os.listdir("/proc")):  # wandb's service process: started with --pid <ours>
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
    except OSError:
        continue
    if b"--pid" in cmd and cmd[cmd.index(b"--pid") + 1] == str(os.getpid()).encode():
        os.kill(int(pid), signal.SIGKILL)
        print("killed the wandb service", flush=True)
time.sleep(1)
log.log(2, {"loss": 2.0})
log.log(3, {"loss": 3.0})
log.close()
print("finished", flush=True)
"""


def test_a_dead_wandb_service_does_not_end_the_run(tmp_path):
    r = subprocess.run([sys.executable, "-c", _SERVICE_DIES, str(tmp_path)], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "killed the wandb service" in r.stdout and "finished" in r.stdout
    assert r.stderr.count("warning: wandb failed") == 1
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
