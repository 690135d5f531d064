"""Every run file under configs/ is a valid RunConfig (schema only: their data paths are placeholders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hart_train import config as C
from hart_train.models import HARTForT2I
from hart_train.run_config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_resolves(path):
    cfg = C.load(RunConfig, str(path))
    assert cfg.stage in ("tokenizer-vq", "tokenizer-hybrid", "t2i")
    again = C.resolve(RunConfig, __import__("yaml").safe_load(C.dump(cfg)))
    assert again == cfg  # the dumped config reproduces the run


def test_full_size_t2i_configs_are_the_released_model():
    import torch

    for res in (256, 512, 1024):
        cfg = C.load(RunConfig, str(Path(CONFIGS[0]).parent / f"t2i_{res}.yaml"))
        assert cfg.zero.stage == 3 and cfg.run.dtype == "bf16"
        with torch.device("meta"):
            model = HARTForT2I(cfg.t2i.model)
        assert sum(p.numel() for p in model.parameters()) == 732_497_472
        assert cfg.data.resolution == 16 * cfg.t2i.model.patch_nums[-1]
