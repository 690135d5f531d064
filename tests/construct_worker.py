"""One rank of a torchrun launch that builds a t2i model as the trainer does (`trainer.build_model`:
partitioned under ZeRO-3, `run.init_from` loaded one tensor at a time), then reports as JSON in
OUT/rank_N.json: the rank's peak memory while building, the parameter elements it holds, and (rank 0)
the largest difference between the gathered weights and the init file's, rounded to the dtype the parameters were built in.

    python -m torch.distributed.run --nproc_per_node=2 tests/construct_worker.py CONFIG OUT [KEY=VALUE ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from hart_train import config as C
from hart_train import distributed as D
from hart_train import engine as E
from hart_train import zero_utils
from hart_train.run_config import RunConfig
from hart_train.stages import make_stage
from hart_train.trainer import build_model


def main(config: str, out: str, overrides: list[str]) -> None:
    cfg = C.load(RunConfig, config, overrides)
    device = D.init(cfg.run.device, cfg.run.collective_timeout_s)
    stage = make_stage(cfg, device)
    model, peak = build_model(cfg, stage, E.deepspeed_config(cfg), device, cfg.run.init_from)
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    report = {"peak_bytes": peak, "held": held, "dtype": str(next(model.parameters()).dtype),
              "total": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}
    state = zero_utils.full_state_dict(model, device, D.rank())
    if D.is_main() and cfg.run.init_from:
        want = load_file(f"{cfg.run.init_from}/model.safetensors")
        dtype = next(model.parameters()).dtype  # bf16 when built partitioned; else fp32 until DeepSpeed casts it
        report["max_abs_diff"] = max((state[k] - want[k].to(dtype).float()).abs().max().item()
                                     for k, _ in model.named_parameters())
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank_{D.rank()}.json").write_text(json.dumps(report))
    D.destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
