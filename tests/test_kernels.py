"""models/kernels.py: `run.attention: auto` measures and checks before it chooses, and a run keeps its choice."""

from __future__ import annotations

import json

import pytest
import torch

from hart_train.models import kernels

PROBLEM = {"batch": 2, "heads": 4, "head_dim": 16, "seg_lens": [16, 4, 16, 24], "scale": 0.25 / 4}


def configure(requested, run_dir, problem=PROBLEM):
    return kernels.configure(requested, problem, torch.device("cpu"), torch.float32, str(run_dir),
                             broadcast=lambda x: x, is_main=True)


@pytest.fixture(autouse=True)
def restore_attention():
    saved = kernels.active_attention()
    yield
    kernels.set_attention(saved)


def test_auto_takes_the_fastest_passing_kernel_and_a_resumed_run_keeps_it(tmp_path):
    record = configure("auto", tmp_path)
    measured = record["measured"]
    assert set(measured) == {"key_prefix", "dense_mask"}
    assert all(m["ok"] and m["max_rel_err"] < 1e-5 and m["s"] > 0 for m in measured.values())
    assert record["attention"] == min(measured, key=lambda n: measured[n]["s"])
    assert kernels.active_attention() == record["attention"]
    assert json.loads((tmp_path / "kernels.json").read_text())["attention"] == record["attention"]
    # a resumed run reuses the file, whatever it would measure now; a different explicit choice is refused
    (tmp_path / "kernels.json").write_text(json.dumps({**record, "attention": "dense_mask"}))
    assert configure("auto", tmp_path)["attention"] == "dense_mask"
    assert configure("dense_mask", tmp_path)["attention"] == "dense_mask"
    with pytest.raises(ValueError, match="started with 'dense_mask'"):
        configure("key_prefix", tmp_path)


def test_a_kernel_that_gives_wrong_results_is_never_chosen(monkeypatch, tmp_path):
    # faster than both real kernels (it does no attention at all), and wrong
    monkeypatch.setitem(kernels.ATTENTION, "wrong", lambda q, k, v, seg, scale: v * 1.0)
    record = configure("auto", tmp_path)
    assert record["measured"]["wrong"]["ok"] is False
    assert record["measured"]["wrong"]["s"] < min(record["measured"][n]["s"] for n in ("key_prefix", "dense_mask"))
    assert record["attention"] in ("key_prefix", "dense_mask")


def test_cpu_runs_the_torch_kernels(tmp_path):
    record = configure("key_prefix", tmp_path)
    assert (record["attention"], record["rms_norm"], record["optimizer"]) == ("key_prefix", "torch", "torch.AdamW")
    assert record["measured"] is None
    opt = kernels.adamw([{"params": [torch.nn.Parameter(torch.ones(3))], "weight_decay": 0.1}], 1e-3,
                        (0.9, 0.95), 1e-8, "cpu")
    assert type(opt) is torch.optim.AdamW
    with pytest.raises(ValueError, match="expected one of"):
        kernels.set_attention("flash")
