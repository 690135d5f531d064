"""The typed config system: defaults <- YAML <- --set overrides, one clear error naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from hart_train import config as C


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    sched: Literal["cosine", "linear"] = "cosine"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class Run:
    name: str = "x"
    steps: int = 10
    bf16: bool = False
    patch_nums: tuple[int, ...] = (1, 2, 4)
    urls: list[str] = field(default_factory=list)
    init_from: Optional[str] = None
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_then_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("name: demo\noptim:\n  lr: 3.0e-4\npatch_nums: [1, 2, 3]\n")
    cfg = C.load(Run, str(p), ["optim.lr=1e-3", "steps=5", "urls=[s3://b/x, /d]", "optim.sched=linear"])
    assert cfg.name == "demo" and cfg.steps == 5
    assert cfg.optim.lr == pytest.approx(1e-3)  # PyYAML reads "1e-3" as a string; converted to float
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.patch_nums == (1, 2, 3)
    assert cfg.urls == ["s3://b/x", "/d"]
    assert cfg.optim.sched == "linear"


def test_round_trip_through_yaml(tmp_path):
    cfg = C.resolve(Run, {"init_from": "runs/a"}, ["optim.betas=[0.8, 0.99]"])
    p = tmp_path / "resolved.yaml"
    p.write_text(C.dump(cfg))
    assert C.load(Run, str(p)) == cfg


@pytest.mark.parametrize(
    "data,overrides,key",
    [
        ({"nme": "x"}, [], "nme"),
        ({"optim": {"lrr": 1}}, [], "optim.lrr"),
        ({}, ["optim.beta=1"], "optim.beta"),
        ({}, ["steps=ten"], "steps"),
        ({}, ["bf16=1"], "bf16"),
        ({}, ["optim.sched=step"], "optim.sched"),
        ({"patch_nums": [1, "a"]}, [], "patch_nums[1]"),
        ({"optim": {"betas": [0.9]}}, [], "optim.betas"),
        ({}, ["optim.lr=-1"], "lr must be > 0"),
        ({"optim": 3}, [], "optim"),
        ({}, ["steps"], "KEY=VALUE"),
    ],
)
def test_bad_key_or_value_names_the_key(data, overrides, key):
    with pytest.raises(C.ConfigError) as e:
        C.resolve(Run, data, overrides)
    assert key in str(e.value)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(C.ConfigError):
        C.load(Run, str(p))


def test_missing_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        C.load(Run, "nope.yaml")


def test_fp16_is_refused_with_a_reason():
    from pathlib import Path

    from hart_train.run_config import RunConfig

    config = str(Path(__file__).resolve().parents[1] / "configs" / "t2i_256.yaml")
    with pytest.raises(C.ConfigError, match="run.*fp16 is not supported.*bf16"):
        C.load(RunConfig, config, ["run.dtype=fp16"])
    assert C.load(RunConfig, config, ["run.dtype=bf16"]).run.dtype == "bf16"


@pytest.mark.parametrize("override, message", [
    ("run.activation_checkpointing=true", "activation_checkpointing.*tokenizer-vq stage does not checkpoint"),
    ("run.attention=auto", "attention.*no block-causal attention"),
    ("zero.stage=3", "zero.stage.*tokenizer-vq stage trains under ZeRO stages 0-2"),
])
def test_t2i_only_settings_are_refused_on_a_tokenizer_stage(override, message):
    """The tokenizer stages have no use for these: refused with a message, not ignored."""
    from pathlib import Path

    from hart_train.run_config import RunConfig

    config = str(Path(__file__).resolve().parents[1] / "configs" / "tokenizer_vq.yaml")
    with pytest.raises(C.ConfigError, match=message):
        C.load(RunConfig, config, [override])
    t2i = str(Path(__file__).resolve().parents[1] / "configs" / "t2i_256.yaml")
    assert C.load(RunConfig, t2i, [override]).run.activation_checkpointing
