"""`hart-data encode`: a real (tiny) image dataset, a tiny random tokenizer saved in the checkpoint
format, the packaged MiniLM text encoder; the token shards are checked against recomputation."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from data_tools import cli, encode, schema
from data_tools.samples import decode_image, to_unit_range
from data_tools.shard import shard_dataset
from data_tools.text_encoder import TextEncoder, TextEncoderConfig
from data_helpers import all_samples, write_folder
from tokenizer.autoencoder import HARTAutoEncoderWithDisc, config_to_dict, tokenizer_config

NUM_IMAGES = 12  # -> source shards of 4, 4, 4
MAX_LEN = 16
CAPTIONS = ["a red fox in snow", "a blue whale at night", "an owl on a tree", "a small green frog",
            "a city street at dusk"]  # fmt: skip


def _noise_png(seed: int, size: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _image_dataset(root, size: int) -> str:
    items = {f"img{i:03d}.png": (_noise_png(i, size), f"{CAPTIONS[i % 5]} number {i}") for i in range(NUM_IMAGES)}
    folder = write_folder(root / "imgs", items)
    out = str(root / "shards")
    shard_dataset(f"folder:{folder}", out, resolution=size, fmt="png", samples_per_shard=4, progress=False)
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return _image_dataset(tmp_path_factory.mktemp("src16"), 16)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A hart-train checkpoint dir: model.safetensors (vae.* + disc.*) and config.yaml (tokenizer: model:)."""
    d = tmp_path_factory.mktemp("tok_ckpt")
    torch.manual_seed(0)
    cfg = tokenizer_config("tiny")
    model = HARTAutoEncoderWithDisc(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    run_config = {"stage": "tokenizer-vq", "tokenizer": {"model": config_to_dict(cfg), "eval_samples": 8}}
    (d / "config.yaml").write_text(yaml.safe_dump(run_config))
    return str(d)


@pytest.fixture(scope="module")
def encoded(source, ckpt, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tokens") / "out")
    rc = cli.main(["encode", source, out, "--tokenizer-ckpt", ckpt, "--text-encoder", "minilm",
                   "--max-length", str(MAX_LEN), "--batch-size", "3", "--no-progress"])  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(TextEncoderConfig(kind="minilm", max_length=MAX_LEN))


def _manifest(url: str) -> schema.Manifest:
    with open(os.path.join(url, schema.MANIFEST_NAME)) as f:
        return schema.Manifest.from_json(f.read())


def test_manifest_counts_and_options(source, encoded, ckpt):
    src, out = _manifest(source), _manifest(encoded)
    assert out.num_samples == src.num_samples == NUM_IMAGES
    assert [(s.name, s.num_samples) for s in out.shards] == [(s.name, s.num_samples) for s in src.shards]
    opts = out.options
    assert opts["format"] == encode.TOKEN_FORMAT and opts["patch_nums"] == [1, 2, 4] and opts["vocab_size"] == 64
    assert opts["tokenizer_ckpt"] == os.path.realpath(ckpt) and len(opts["tokenizer_sha256"]) == 64
    assert opts["resolution"] == 16 and opts["store_dtype"] == "float16" and opts["idx_dtype"] == "int16"
    te = opts["text_encoder"]
    assert (te["kind"], te["max_length"], te["use_system_prompt"], te["dtype"], te["hidden_size"]) == (
        "minilm", MAX_LEN, False, "fp32", 384)
    assert set(all_samples(encoded)) == set(all_samples(source))  # same keys


def test_stored_tokens_match_recomputation(source, encoded, ckpt, minilm):
    tok = encode.load_tokenizer(ckpt)
    src = all_samples(source)
    got = dict(encode.iter_token_samples(encoded))
    assert len(got) == NUM_IMAGES
    for key in sorted(got)[::2]:  # a handful, across shards and batch positions
        sample = got[key]
        image = decode_image(src[key]["png"], 16)
        img = to_unit_range(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].contiguous())
        idx_Bl, frest = tok.img_to_idxBl_and_frest(img)
        assert [t.shape for t in sample["idx_Bl"]] == [(1,), (4,), (16,)]
        for stored, want in zip(sample["idx_Bl"], idx_Bl):
            assert torch.equal(stored, want[0])
        torch.testing.assert_close(sample["frest"], frest[0].half().float(), rtol=2e-3, atol=2e-3)
        caption = src[key]["txt"].decode()
        assert sample["caption"] == caption
        ctx, mask, pos = minilm.encode([caption])
        torch.testing.assert_close(sample["context"], ctx[0].half().float(), rtol=2e-3, atol=2e-3)
        assert torch.equal(sample["mask"], mask[0]) and torch.equal(sample["position_ids"], pos[0])
        assert sample["meta"]["patch_nums"] == [1, 2, 4] and sample["meta"]["frest_shape"] == [16, 8]


def _encode_args(source, out, ckpt, *extra):
    return ["encode", source, out, "--tokenizer-ckpt", ckpt, "--text-encoder", "minilm",
            "--max-length", str(MAX_LEN), "--no-progress", *extra]  # fmt: skip


def test_bad_tokenizer_path_fails_before_work(source, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(_encode_args(source, out, str(tmp_path / "nope"))) == 2
    assert "tokenizer checkpoint directory not found" in capsys.readouterr().err
    assert not os.path.exists(out)
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    assert cli.main(_encode_args(source, out, str(empty))) == 2
    assert "has no model.safetensors" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_mismatched_resolution_fails_before_work(source, ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(_encode_args(source, out, ckpt, "--resolution", "32")) == 2
    assert "does not match the tokenizer" in capsys.readouterr().err
    small = _image_dataset(tmp_path, 8)  # sharded at 8px: the 16px tokenizer would upsample
    assert cli.main(_encode_args(small, out, ckpt)) == 2
    assert "sharded at 8px" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_bad_text_encoder_fails_before_work(source, ckpt, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(_encode_args(source, out, ckpt, "--text-encoder", f"t5:{tmp_path / 't5'}")) == 2
    assert "text encoder directory not found" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_weights_not_matching_config_is_an_error(ckpt, tmp_path):
    bad = tmp_path / "bad_ckpt"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(open(os.path.join(ckpt, "model.safetensors"), "rb").read())
    cfg = config_to_dict(tokenizer_config("tiny", vocab_size=128))
    (bad / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"model": cfg}}))
    with pytest.raises(ValueError, match="do not match"):
        encode.load_tokenizer(str(bad))
    (bad / "config.yaml").write_text(yaml.safe_dump({"tokenizer": {"model": {**cfg, "bogus": 1}}}))
    with pytest.raises(ValueError, match="bogus"):
        encode.load_tokenizer(str(bad))


def test_interrupted_run_has_no_manifest_and_resumes(source, ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    args = _encode_args(source, out, ckpt, "--batch-size", "3", "--store-dtype", "float32")
    real = encode._ShardEncoder.members
    calls, interrupt = [], [True]

    def members(self, images, captions, keys):
        calls.append(keys[0].split("_")[0])
        if interrupt[0] and calls[-1] == "000001":  # the second shard
            raise KeyboardInterrupt
        return real(self, images, captions, keys)

    monkeypatch.setattr(encode._ShardEncoder, "members", members)
    assert cli.main(args) == 130
    assert not os.path.exists(os.path.join(out, schema.MANIFEST_NAME))
    first = os.path.join(out, schema.shard_name(0))
    assert os.path.exists(os.path.join(out, schema.shard_stats_name(0))) and os.path.exists(first)
    assert cli.main(args) == 2  # refuses to mix with the partial output without --resume
    before = open(first, "rb").read()

    calls.clear()
    interrupt[0] = False
    assert cli.main(args + ["--resume"]) == 0
    assert set(calls) == {"000001", "000002"}  # the finished shard was not encoded again
    assert open(first, "rb").read() == before
    manifest = _manifest(out)
    assert manifest.num_samples == NUM_IMAGES and manifest.options["store_dtype"] == "float32"
    members = all_samples(out)
    assert len(members) == NUM_IMAGES
    one = next(iter(members.values()))
    assert np.load(io.BytesIO(one["frest.npy"])).dtype == np.float32
    assert np.load(io.BytesIO(one["ctx.npy"])).dtype == np.float32
    assert np.load(io.BytesIO(one["idx.npy"])).dtype == np.int16
    assert np.load(io.BytesIO(one["mask.npy"])).dtype == np.uint8
    # a resume with other options is refused instead of mixing
    assert cli.main(args[:-2] + ["--store-dtype", "float16", "--resume"]) == 2


def test_read_token_sample_rejects_incomplete_members(encoded):
    members = next(iter(all_samples(encoded).values()))
    del members["ctx.npy"]
    with pytest.raises(ValueError, match="ctx.npy"):
        encode.read_token_sample(members)


def test_text_encoder_spec_and_system_prompt_default():
    cfg = encode.text_encoder_config("minilm", 32, None, "fp32")
    assert (cfg.kind, cfg.path, cfg.max_length, cfg.use_system_prompt) == ("minilm", "", 32, False)
    with pytest.raises(ValueError, match="KIND"):
        encode.text_encoder_config(":x", 32, None, "fp32")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        encode.text_encoder_config("qwen2:/nowhere", 32, None, "fp32")
    assert json.loads(json.dumps(encode.STORE_DTYPES and list(encode.STORE_DTYPES))) == ["float16", "float32"]


def _corrupt_images_of_shard(src: str, dst: str, name: str) -> None:
    """Copy dataset `src` to `dst` with every image of shard `name` replaced by undecodable bytes."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, name)
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member_name, data in members:
            data = b"not an image" if member_name.endswith(".png") else data
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = _manifest(dst)
    manifest.shards = [dataclasses.replace(s, bytes=os.path.getsize(path)) if s.name == name else s
                       for s in manifest.shards]  # fmt: skip
    with open(os.path.join(dst, schema.MANIFEST_NAME), "w") as f:
        f.write(manifest.to_json())


def test_bad_source_samples_are_skipped_and_counted(source, ckpt, tmp_path):
    broken = str(tmp_path / "broken")
    _corrupt_images_of_shard(source, broken, schema.shard_name(1))
    out = str(tmp_path / "out")
    assert cli.main(_encode_args(broken, out, ckpt)) == 0
    manifest = _manifest(out)
    assert [s.name for s in manifest.shards] == [schema.shard_name(0), schema.shard_name(2)]
    assert manifest.num_samples == NUM_IMAGES - 4
    assert manifest.stats["skipped"] == {"bad_image": 4}
    assert not os.path.exists(os.path.join(out, schema.shard_name(1)))  # all bad: no tar, no manifest entry
