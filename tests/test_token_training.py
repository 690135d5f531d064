"""The t2i stage trained from `hart-data encode` token shards (`data.kind: tokens`): the emoji dataset is
encoded once with a tiny random tokenizer and the packaged MiniLM; token batches give the same model inputs
as the on-the-fly path, the token reader resumes exactly and counts bad samples, a 2-rank ZeRO-3 run
learns, and token shards that do not match the run are refused before training."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from data_tools import cli as data_cli
from data_tools import schema
from data_tools.reader import ReaderConfig, StreamingReader
from hart_train import config as C
from hart_train.config import ConfigError
from hart_train.run_config import RunConfig
from hart_train.stages import validate_paths
from hart_train.stages.t2i_stage import T2IStage
from procs import REPO, check, run_train
from runs import make_tokenizer_ckpt

CONFIG = "configs/t2i_tiny_tokens.yaml"
IMAGE_CONFIG = "configs/t2i_tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokens(emoji_dataset, tokenizer_ckpt, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tokens") / "emoji-tokens")
    rc = data_cli.main(["encode", emoji_dataset, out, "--tokenizer-ckpt", str(tokenizer_ckpt), "--text-encoder",
                        "minilm", "--max-length", "16", "--batch-size", "64", "--no-progress"])
    assert rc == 0
    return out


def overrides(data, out, name, tok, *extra) -> list[str]:
    """As tests/test_t2i_training.py's runs: 12 steps of the tiny model on the tiny tokenizer."""
    return [f"data.urls=[{data}]", f"run.out_dir={out}", f"run.name={name}", f"t2i.tokenizer_ckpt={tok}",
            "run.max_steps=12", "run.save_every=4", "run.keep_last=5", "run.log_every=1", "t2i.model.vocab_size=64",
            "t2i.model.Cvae=8", *extra]


def records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "ce" in r}


def run_config(config: str, data: str, tok: Path, *extra: str) -> RunConfig:
    return C.load(RunConfig, str(REPO / config), overrides(data, "unused", "unused", tok, *extra))


def test_token_inputs_equal_on_the_fly_inputs(emoji_dataset, tokens, tokenizer_ckpt):
    token_stage = T2IStage(run_config(CONFIG, tokens, tokenizer_ckpt, "data.num_workers=0"), torch.device("cpu"))
    image_stage = T2IStage(run_config(IMAGE_CONFIG, emoji_dataset, tokenizer_ckpt, "data.num_workers=0"), torch.device("cpu"))
    token_batches, image_batches = iter(token_stage.make_reader(0, 1)), iter(image_stage.make_reader(0, 1))
    for step in range(3):
        tb, ib = next(token_batches), next(image_batches)
        assert tb["key"] == ib["key"]  # the same plan over the same shard counts: the same samples
        assert tb["idx"].dtype == torch.long and tb["idx"].shape == (8, 1 + 4 + 16)
        assert tb["frest"].shape == (8, 16, 8) and tb["context"].shape == (8, 16, 384)
        assert tb["context"].dtype == torch.float32 and tb["context_mask"].dtype == torch.long
        assert T2IStage.batch_size(tb) == T2IStage.batch_size(ib) == 8
        got, want = token_stage.prepare(tb, step), image_stage.prepare(ib, step)
        assert len(got["gt_idx"]) == 3
        for stored, computed in zip(got["gt_idx"], want["gt_idx"]):
            assert torch.equal(stored, computed)
        assert torch.equal(got["x_BLCv_wo_first_l"], want["x_BLCv_wo_first_l"])
        for name in ("f_rest_last", "context"):  # stored as float16
            torch.testing.assert_close(got[name], want[name].half().float(), rtol=2e-3, atol=2e-3)
        for name in ("context_mask", "context_position_ids"):
            assert torch.equal(got[name], want[name])
    assert token_stage._text_encoder is None  # never built for training inputs


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def test_token_reader_resumes_exactly(tokens):
    cfg = ReaderConfig(urls=[tokens], kind="tokens", batch_size=8, num_workers=2, shuffle_window=64, seed=3)
    first = iter(reader := StreamingReader(cfg))
    _take(first, 5)
    state = json.loads(json.dumps(reader.state_dict()))
    want = _take(first, 4)
    resumed = StreamingReader(cfg)
    resumed.load_state_dict(state)
    got = _take(iter(resumed), 4)
    for g, w in zip(got, want):
        assert g["key"] == w["key"] and g["caption"] == w["caption"]
        for name in ("idx", "frest", "context", "context_mask", "context_position_ids"):
            assert torch.equal(g[name], w[name]), name


def _damage_first_two_samples(src: str, dst: str) -> None:
    """Copy token dataset `src` to `dst`; in shard 0, one sample gets an undecodable ctx.npy and the
    next loses its mask.npy (the manifest's byte count is updated; the sample count stays)."""
    shutil.copytree(src, dst)
    manifest = schema.Manifest.from_json(Path(dst, schema.MANIFEST_NAME).read_text())
    path = Path(dst, manifest.shards[0].name)
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    keys = sorted({schema.split_key(name)[0] for name, _ in members})[:2]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name == f"{keys[1]}.mask.npy":
                continue
            data = b"not an npy" if name == f"{keys[0]}.ctx.npy" else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest.shards[0] = dataclasses.replace(manifest.shards[0], bytes=path.stat().st_size)
    Path(dst, schema.MANIFEST_NAME).write_text(manifest.to_json())


def test_bad_token_samples_are_skipped_and_counted(tokens, tmp_path):
    broken = str(tmp_path / "broken")
    _damage_first_two_samples(tokens, broken)
    cfg = ReaderConfig(urls=[broken], kind="tokens", batch_size=64, num_workers=0, shuffle_window=512)
    keys, last = [], None
    for batch in StreamingReader(cfg):
        if batch["epoch"] > 0:
            break
        keys += batch["key"]
        last = batch
    assert len(keys) == len(set(keys)) == 510
    assert last["bad_samples"] == {"bad_tokens": 1, "missing_tokens": 1} and last["num_bad"] == 2


def test_reader_refuses_the_other_kind(emoji_dataset, tokens):
    with pytest.raises(ValueError, match="kind is 'images'"):
        StreamingReader(ReaderConfig(urls=[tokens], kind="images"))
    with pytest.raises(ValueError, match="kind is 'tokens'"):
        StreamingReader(ReaderConfig(urls=[emoji_dataset], kind="tokens"))
    with pytest.raises(ValueError, match="ReaderConfig.kind"):
        ReaderConfig(kind="latents")


def test_mismatched_tokens_are_refused(emoji_dataset, tokens, tokenizer_ckpt, tmp_path):
    validate_paths(run_config(CONFIG, tokens, tokenizer_ckpt))  # the matching run passes
    other = make_tokenizer_ckpt(tmp_path, seed=1)  # same architecture, other weights
    with pytest.raises(ConfigError, match=r"^t2i\.tokenizer_ckpt: .*tokenizer weights sha256"):
        validate_paths(run_config(CONFIG, tokens, other))
    shorter = ("t2i.text_encoder.max_length=8", "t2i.model.context_token=8")
    with pytest.raises(ConfigError, match=r"^t2i\.text_encoder\.max_length: .*max_length 16"):
        validate_paths(run_config(CONFIG, tokens, tokenizer_ckpt, *shorter))
    with pytest.raises(ConfigError, match=r"^data\.kind: 'images'.*holds tokens"):
        validate_paths(run_config(IMAGE_CONFIG, tokens, tokenizer_ckpt))
    with pytest.raises(ConfigError, match=r"^data\.kind: 'tokens'.*holds images"):
        validate_paths(run_config(CONFIG, emoji_dataset, tokenizer_ckpt))


def test_cli_refuses_other_tokenizer_before_training(tokens, tmp_path):
    other = make_tokenizer_ckpt(tmp_path, seed=1)
    result = run_train(CONFIG, overrides(tokens, tmp_path, "refused", other), nproc=1, timeout=300)
    assert result.returncode != 0
    assert "t2i.tokenizer_ckpt" in result.stderr and "sha256" in result.stderr
    assert not (tmp_path / "refused").exists()


def test_t2i_trains_from_token_shards(tokens, tokenizer_ckpt, tmp_path):
    check(run_train(CONFIG, overrides(tokens, tmp_path, "tokens", tokenizer_ckpt), nproc=2))
    steps = records(tmp_path / "tokens")
    assert sorted(steps) == list(range(1, 13))
    first, last = (steps[1]["ce"] + steps[2]["ce"]) / 2, (steps[11]["ce"] + steps[12]["ce"]) / 2
    assert last < first - 0.2, (first, last)
    assert all(torch.isfinite(torch.tensor(steps[s]["diff_loss"])) for s in steps)
    assert (tmp_path / "tokens" / "images" / "samples_step00000012.png").exists()  # text encoder built lazily
