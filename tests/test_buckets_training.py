"""Aspect-ratio buckets end to end, as a user runs them: emoji padded to three aspects (square, 5:3, 3:5) are
sharded with `hart-data shard --buckets`, a tiny tokenizer-vq trains on them (2 gloo ranks), then
configs/t2i_256.yaml at small width (bf16, ZeRO-3, the shipped settings) with `t2i.buckets` trains on them
from that tokenizer, with the held-out evaluation on the same set; its 2-rank checkpoint resumes on 1 rank
and `hart-sample --aspect` samples every bucket. `run.log_samples` records which samples each rank trained
at each step: every step is one bucket on every rank, and an epoch trains each sample once, across the
change of world size too.

Tiny geometry: the tiny tokenizer downsamples 4x and the t2i schedule is (1, 2, 4), so the buckets are the
token grids 4x4, 3x5 and 5x3 (16x16, 20x12 and 12x20 px, width x height)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import cli as data_cli
from data_tools.sources import iter_items
from hart_train import config as C
from hart_train import sample_cli
from hart_train.run_config import RunConfig
from hart_train.stages import validate_paths
from procs import check, run_train
from runs import losses

T2I = "configs/t2i_256.yaml"
TOKENIZER = "configs/tokenizer_vq_tiny.yaml"
PIXEL_BUCKETS = "16:16,20:12,12:20"  # W:H
TOKEN_BUCKETS = "t2i.buckets=[4x4,3x5,5x3]"  # height x width
ASPECTS = [(1, 1), (5, 3), (3, 5)]  # sample i is padded to ASPECTS[i % 3] (width:height)
NUM = 96  # 32 per bucket: 2 ranks x 8 = one step's 16 samples divide each bucket


def _padded_emoji(root: Path) -> Path:
    """A folder of NUM emoji, each centred on a white canvas of its aspect, with its caption."""
    root.mkdir(parents=True)
    for i, item in enumerate(iter_items("emoji", limit=NUM)):
        img = Image.open(io.BytesIO(item.data)).convert("RGB")
        side = max(img.size)
        aw, ah = ASPECTS[i % 3]
        canvas = Image.new("RGB", (side * aw // min(aw, ah), side * ah // min(aw, ah)), (255, 255, 255))
        canvas.paste(img, ((canvas.width - img.width) // 2, (canvas.height - img.height) // 2))
        canvas.save(root / f"e{i:03d}.png")
        (root / f"e{i:03d}.txt").write_text(item.caption)
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("mixed")
    src = _padded_emoji(root / "src")
    out = str(root / "shards")
    assert data_cli.main(["shard", f"folder:{src}", out, "--resolution", "16", "--buckets", PIXEL_BUCKETS,
                          "--format", "png", "--samples-per-shard", "16", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer_run(mixed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    check(run_train(TOKENIZER, [f"data.urls=[{mixed}]", f"run.out_dir={out}", "run.name=tok", "run.max_steps=8",
                                "run.save_every=8", "run.log_every=1", "data.batch_size=8", "run.log_samples=true",
                                f"tokenizer.eval_url={mixed}", "tokenizer.eval_samples=48"]))
    return out / "tok"


def _t2i_args(t2i_args, mixed: str, tokenizer_run: Path, out: Path, name: str, *extra: str) -> list[str]:
    return t2i_args(out, name, f"data.urls=[{mixed}]", f"t2i.tokenizer_ckpt={tokenizer_run / 'ckpt' / 'step_00000008'}",
                    TOKEN_BUCKETS, "run.log_samples=true", f"t2i.eval_url={mixed}", "t2i.eval_samples=40", *extra)


@pytest.fixture(scope="module")
def t2i_run(mixed, tokenizer_run, t2i_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("t2i")
    check(run_train(T2I, _t2i_args(t2i_args, mixed, tokenizer_run, out, "ref")))
    return out / "ref"


def _bucket_of_key(dataset: str) -> dict[str, tuple[int, int]]:
    """sample key -> its bucket (width, height) px: the manifest's bucket of the shard whose tar holds it."""
    manifest = json.loads((Path(dataset) / "manifest.json").read_text())
    of = {}
    for shard in manifest["shards"]:
        w, h = (int(v) for v in shard["bucket"].split("x"))
        with tarfile.open(Path(dataset) / shard["name"]) as tar:
            of.update({name.split(".")[0]: (w, h) for name in tar.getnames()})
    return of


def _steps(run: Path) -> dict[int, list[dict]]:
    """step -> the micro-batch record of every rank (run.log_samples), in rank order."""
    by_step: dict[int, list[dict]] = {}
    for path in sorted((run / "samples").glob("rank_*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], []).append(rec)
    return by_step


def _check_one_bucket_per_step(steps: dict[int, list[dict]], dataset: str) -> None:
    of = _bucket_of_key(dataset)
    for step, records in steps.items():
        assert len({tuple(r["bucket"]) for r in records}) == 1, (step, records)  # every rank: one bucket
        for r in records:
            assert {of[k] for k in r["keys"]} == {tuple(r["bucket"])}, (step, r)  # the images are that bucket's


def _epoch_keys(steps: dict[int, list[dict]], epoch: int) -> Counter:
    return Counter(k for records in steps.values() for r in records if r["epoch"] == epoch for k in r["keys"])


def test_the_shards_hold_three_buckets(mixed):
    assert Counter(_bucket_of_key(mixed).values()) == {(16, 16): 32, (20, 12): 32, (12, 20): 32}


def test_tokenizer_trains_on_every_bucket(tokenizer_run, mixed):
    steps = _steps(tokenizer_run)
    assert sorted(steps) == list(range(1, 9))
    _check_one_bucket_per_step(steps, mixed)
    assert {tuple(r[0]["bucket"]) for r in steps.values()} == {(16, 16), (20, 12), (12, 20)}
    loss = losses(tokenizer_run)
    assert np.mean([loss[s]["loss"] for s in (6, 7, 8)]) < np.mean([loss[s]["loss"] for s in (1, 2, 3)])
    evals = [json.loads(line) for line in (tokenizer_run / "metrics.jsonl").read_text().splitlines()]
    psnr = [r["eval/psnr_discrete"] for r in evals if "eval/psnr_discrete" in r]
    assert psnr and all(np.isfinite(psnr)) and psnr[-1] > 5  # evaluated on the three buckets' images


def test_t2i_trains_on_buckets_one_per_step_and_each_sample_once(t2i_run, mixed):
    steps = _steps(t2i_run)
    assert sorted(steps) == list(range(1, 13))
    _check_one_bucket_per_step(steps, mixed)
    assert _epoch_keys(steps, 0) == Counter({k: 1 for k in _bucket_of_key(mixed)})  # 6 steps of 16: all, once
    loss = losses(t2i_run)
    assert np.mean([loss[s]["loss"] for s in range(9, 13)]) < np.mean([loss[s]["loss"] for s in range(1, 5)])
    records = [json.loads(line) for line in (t2i_run / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if "eval/loss" in r]
    assert held_out and np.isfinite(held_out[-1]["eval/loss"]) and np.isfinite(held_out[-1]["eval_ema/loss"])


def test_two_rank_checkpoint_resumes_on_one_rank_with_each_sample_once(t2i_run, mixed, tokenizer_run, t2i_args,
                                                                      tmp_path):
    run = tmp_path / "ref"
    shutil.copytree(t2i_run, run)
    for later in (8, 12):
        shutil.rmtree(run / "ckpt" / f"step_{later:08d}")
    result = run_train(T2I, _t2i_args(t2i_args, mixed, tokenizer_run, tmp_path, "ref"), nproc=1)
    check(result)
    assert "converting to a universal checkpoint" in result.stdout
    steps, ref = _steps(run), losses(t2i_run)
    assert sorted(steps) == list(range(1, 13))
    assert all(len(steps[s]) == 2 for s in range(1, 5)) and all(len(steps[s]) == 1 for s in range(5, 13))
    _check_one_bucket_per_step(steps, mixed)
    # 64 samples on 2 ranks before the checkpoint, the other 32 on 1 rank after it: each once
    assert _epoch_keys(steps, 0) == Counter({k: 1 for k in _bucket_of_key(mixed)})
    got = losses(run)
    assert all(got[s]["loss"] == ref[s]["loss"] for s in range(1, 5))
    assert all(np.isfinite(got[s]["loss"]) for s in range(5, 13))


@pytest.mark.parametrize("aspect, size", [("1:1", (16, 16)), ("16:9", (20, 12)), ("9:16", (12, 20))])
def test_hart_sample_samples_each_bucket(t2i_run, tmp_path, aspect, size, capsys):
    out = tmp_path / "grid.png"
    ckpt = t2i_run / "ckpt" / "step_00000012"
    assert sample_cli.main(["--model", str(ckpt), "--prompt", "red apple", "--prompt", "rocket", "--batch", "2",
                            "--aspect", aspect, "--out", str(out)]) == 0
    grid = np.asarray(Image.open(out))
    w, h = size
    assert grid.shape == (2 * h, 2 * w, 3)
    tiles = [grid[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(2) for c in range(2)]
    assert not np.array_equal(tiles[0], tiles[2])  # two prompts, two images


def test_a_bucket_missing_from_t2i_buckets_is_refused_before_training(mixed, t2i_args, tmp_path):
    cfg = C.load(RunConfig, T2I, t2i_args(tmp_path, "x", f"data.urls=[{mixed}]", "t2i.buckets=[4x4,3x5]"))
    with pytest.raises(C.ConfigError, match=r"holds bucket 12x20 px \(5x3 tokens\).*add it to t2i.buckets"):
        validate_paths(cfg)
    # square images (the session's emoji set, not bucketed) train on the square bucket, which must be listed
    cfg = C.load(RunConfig, T2I, t2i_args(tmp_path, "x", "t2i.buckets=[3x5,5x3]"))
    with pytest.raises(C.ConfigError, match=r"holds square images .* the square bucket 4x4 is not in"):
        validate_paths(cfg)
