"""Metrics on rank 0: one line per log interval on stdout, a JSONL file, and wandb.

wandb runs offline unless the config says otherwise (`WANDB_MODE=offline` behaviour, no network);
its run id is kept in `<run>/wandb_id.txt`, so a resumed run continues the same wandb run. A run resumed
from the checkpoint of step S rewinds the wandb run to S (wandb's `resume_from="<id>?_step=S"`): the
steps after S that the interrupted run logged are replaced by the ones the resumed run logs again, so
the charts are one continuous, correct history (as `metrics.jsonl`, which the trainer truncates at S).
In offline mode the rewind is recorded in the resumed offline run (its branch point) and applied when
the offline runs are synced in order.

wandb is a view, not the record: if it fails (its service process dies, the network goes), the run
says so once and carries on with stdout and `metrics.jsonl`. The config handed to wandb is the
resolved run config, which by construction holds no credentials; it still goes through `redact` as a
second line of defence.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

import numpy as np
from PIL import Image

from data_tools.storage import redact


class MetricsLogger:
    def __init__(self, run_dir: str, config_dict: dict, wandb_cfg, enabled: bool, resumed_at: int | None = None):
        """`resumed_at`: the step of the checkpoint this run resumed from (None for a new run)."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if wandb_cfg.mode != "disabled":
            self.wandb = self._init_wandb(config_dict, wandb_cfg, resumed_at)

    def _init_wandb(self, config_dict: dict, wandb_cfg, resumed_at: int | None):
        import wandb

        id_file = os.path.join(self.run_dir, "wandb_id.txt")
        if os.path.exists(id_file):  # an earlier attempt: rewind its run to where this one starts
            run_id = open(id_file).read().strip()
            where = dict(resume_from=f"{run_id}?_step={resumed_at or 0}")
        else:
            run_id = uuid.uuid4().hex[:12]
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
            where = dict(id=run_id, resume="allow")
        safe_config = json.loads(redact(json.dumps(config_dict)))
        return wandb.init(
            project=wandb_cfg.project, name=os.path.basename(os.path.abspath(self.run_dir)), **where,
            dir=self.run_dir, mode=wandb_cfg.mode, config=safe_config,
            settings=wandb.Settings(silent=True, console="off"),
        )

    def _to_wandb(self, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the view must not end the run
            self.wandb = None
            print(f"warning: wandb failed ({type(e).__name__}: {e}); metrics continue in {self.path} and on stdout",
                  file=sys.stderr, flush=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        print(f"step {step:>7d} | {shown}", flush=True)
        if self.wandb is not None:
            self._to_wandb(self.wandb.log, values, step=step)

    def log_images(self, step: int, images: dict[str, np.ndarray]) -> list[str]:
        """Save HWC uint8 images as PNG under `<run>/images/` and send them to wandb."""
        if not self.enabled or not images:
            return []
        out_dir = os.path.join(self.run_dir, "images")
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for name, arr in images.items():
            path = os.path.join(out_dir, f"{name}_step{step:08d}.png")
            Image.fromarray(arr).save(path)
            paths.append(path)
        if self.wandb is not None:
            import wandb

            self._to_wandb(self.wandb.log, {k: wandb.Image(v) for k, v in images.items()}, step=step)
        return paths

    def close(self) -> None:
        if self.wandb is not None:
            self._to_wandb(self.wandb.finish)
            self.wandb = None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
