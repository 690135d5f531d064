"""`hart-eval fid` and `hart-eval clip` as a user runs them (`cli.main([...])`), on networks with random
weights built here and saved in the formats the real loaders read: the FID Inception as the state dict
of the published weights file, CLIP as a transformers model directory with its tokenizer and
preprocessor config. Only the weights differ from a real run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hart_train.evaluation import cli
from hart_train.evaluation.inception import WEIGHTS_ENV, WEIGHTS_FILE, FIDInceptionV3
from text_models import captions

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_IMAGES = 8
NOISE_LEVELS = (8, 24, 64)


def _scene(i: int) -> np.ndarray:
    """A 48 px image of coloured waves, different for every i."""
    r = np.random.default_rng(i)
    y, x = np.mgrid[0:48, 0:48]
    waves = [127 + 100 * np.sin(x / r.uniform(2, 9) + r.uniform(0, 6)) * np.cos(y / r.uniform(2, 9)) for _ in range(3)]
    return np.stack(waves, axis=-1)


def _save(img: np.ndarray, path) -> None:
    Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A random-weight FID Inception saved as a state dict, the published file's format. Its BatchNorm
    statistics are those of one batch of random images, so activations keep a sane scale through the
    network (as trained statistics do)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats = this batch's stats
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 299, 299) * 255)
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """real/: images with .txt captions; noise<sigma>/: the same images plus Gaussian noise, each with
    the JSON sidecar `hart-eval generate` writes."""
    root = tmp_path_factory.mktemp("sets")
    texts = captions(NUM_IMAGES, seed=1)
    (root / "real").mkdir()
    for i in range(NUM_IMAGES):
        _save(_scene(i), root / "real" / f"{i:03d}.png")
        (root / "real" / f"{i:03d}.txt").write_text(texts[i])
    for sigma in NOISE_LEVELS:
        d = root / f"noise{sigma}"
        d.mkdir()
        for i in range(NUM_IMAGES):
            noise = np.random.default_rng(1000 * sigma + i).normal(0, sigma, (48, 48, 3))
            _save(_scene(i) + noise, d / f"{i:03d}.png")
            (d / f"{i:03d}.json").write_text(json.dumps({"prompt": texts[i], "seed": i}))
        (d / "settings.json").write_text(json.dumps({"tool": "hart-eval generate", "settings": {"cfg": 4.5}}))
    return root


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().err


def _fid(capsys, real, fake, out, weights, cache) -> dict:
    rc, err = _run(capsys, "fid", "--real", str(real), "--fake", str(fake), "--out", str(out),
                   "--inception-weights", str(weights), "--cache-dir", str(cache), "--num-samples", "4")
    assert rc == 0, err
    return json.loads((out / "fid.json").read_text())


def test_fid_self_noise_and_reference_cache(inception_weights, image_sets, s3_bucket, tmp_path, capsys):
    from data_tools.shard import shard_dataset

    cache = tmp_path / "cache"
    real = image_sets / "real"

    # The same images as a shard dataset on S3 (PNG, as stored) against the folder: FID ~ 0.
    shards = s3_bucket + "/real"
    shard_dataset(f"folder:{real}", shards, fmt="png", samples_per_shard=5, progress=False)
    same = _fid(capsys, shards, real, tmp_path / "self", inception_weights, cache)
    assert same["numbers"]["num_real"] == same["numbers"]["num_fake"] == NUM_IMAGES

    # Growing noise: growing FID. The first run fills the cache, the others read it.
    results = [_fid(capsys, real, image_sets / f"noise{s}", tmp_path / f"n{s}", inception_weights, cache)
               for s in NOISE_LEVELS]
    fids = [r["numbers"]["fid"] for r in results]
    assert fids[0] < fids[1] < fids[2], fids
    assert abs(same["numbers"]["fid"]) < 1e-4 * fids[0], (same["numbers"]["fid"], fids)
    assert [r["settings"]["reference_cache"] for r in results] == ["written", "hit", "hit"]
    assert [r["settings"]["real_images_encoded"] for r in results] == [NUM_IMAGES, 0, 0]
    cache_file = Path(results[0]["settings"]["reference_cache_file"])
    assert {r["settings"]["reference_cache_file"] for r in results} == {str(cache_file)}
    assert len(list(cache.glob("ref-*.npz"))) == 2  # the S3 set's and the folder's
    written_at = cache_file.stat().st_mtime_ns

    # A changed reference image is another reference set: recomputed, cached beside the first.
    changed = tmp_path / "real_changed"
    shutil.copytree(real, changed)
    _save(_scene(3)[::-1], changed / "003.png")
    again = _fid(capsys, changed, image_sets / f"noise{NOISE_LEVELS[0]}", tmp_path / "again", inception_weights, cache)
    assert again["settings"]["reference_cache"] == "written"
    assert again["settings"]["real_images_encoded"] == NUM_IMAGES
    assert again["settings"]["reference_cache_file"] != str(cache_file)
    assert again["numbers"]["fid"] != fids[0]
    assert cache_file.stat().st_mtime_ns == written_at and len(list(cache.glob("ref-*.npz"))) == 3

    # The report: the JSON's number in the markdown, the settings, a sheet of 4 samples with their prompts.
    out = tmp_path / f"n{NOISE_LEVELS[1]}"
    md = (out / "fid.md").read_text()
    assert f"**{round(fids[1], 4)}**" in md and "clean-fid 'clean'" in md
    assert results[1]["settings"]["inception_weights_published"] is False
    assert results[1]["fake_generation"]["settings"] == {"cfg": 4.5} and "noise24/settings.json" in md
    prompts = [json.loads((image_sets / "noise24" / f"{i:03d}.json").read_text())["prompt"] for i in (0, 2, 5, 7)]
    assert results[1]["samples"] == prompts and all(p in md for p in prompts)
    with Image.open(out / "fid_samples.png") as sheet:
        assert sheet.width > 4 * 192  # 48 px images enlarged 5x into 256 px cells, 4 to a row


def test_fid_missing_weights_is_one_clear_error(image_sets, tmp_path, capsys, monkeypatch):
    real, fake = str(image_sets / "real"), str(image_sets / "noise8")
    missing = tmp_path / "nowhere" / WEIGHTS_FILE
    rc, err = _run(capsys, "fid", "--real", real, "--fake", fake, "--out", str(tmp_path / "o"),
                   "--inception-weights", str(missing))
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert str(missing) in err and "torch-fidelity/releases" in err and "sha256" in err
    monkeypatch.setenv(WEIGHTS_ENV, str(missing))
    rc, err = _run(capsys, "fid", "--real", real, "--fake", fake, "--out", str(tmp_path / "o"))
    assert rc == 2 and str(missing) in err
    monkeypatch.delenv(WEIGHTS_ENV)
    rc, err = _run(capsys, "fid", "--real", real, "--fake", fake, "--out", str(tmp_path / "o"))
    assert rc == 2 and "--inception-weights" in err and WEIGHTS_ENV in err
    assert not (tmp_path / "o").exists()


def _tiny_clip(d):
    """A 2-layer CLIP (width 32, 32 px, 16 text tokens) with random weights, a character-level CLIP
    tokenizer and a PIL image preprocessor config, saved as a model directory. logit_scale = ln 100, so
    the model's own logits are 100 * cosine."""
    import transformers
    from tokenizers import pre_tokenizers

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    torch.manual_seed(6)  # a draw whose cosines on the test's pairs have both signs
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=math.log(100.0))
    transformers.CLIPModel(cfg).save_pretrained(d)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(d)
    return d


def _by_hand(model_dir, image_paths, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(100 * cosine, the model's own diagonal logits) of each pair, through transformers directly."""
    import transformers

    model = transformers.CLIPModel.from_pretrained(model_dir).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(model_dir)
    proc = transformers.CLIPImageProcessorPil.from_pretrained(model_dir)
    text = tok(prompts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    pixels = proc(images=[Image.open(p).convert("RGB") for p in image_paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output.double()
        txt = model.get_text_features(**text).pooler_output.double()
        logits = model(**text, pixel_values=pixels).logits_per_image.double()
    cosine = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return (100 * cosine).numpy(), torch.diagonal(logits).numpy()


def test_clip_score_is_the_defined_quantity(image_sets, tmp_path, capsys):
    """With random weights, matched and shuffled prompts mean nothing; what is checked is the definition:
    mean of max(100 * cosine, 0) over the pairs, each image with the prompt it should get."""
    model_dir = _tiny_clip(tmp_path / "clip")
    images = image_sets / "noise8"
    paths = sorted(images.glob("*.png"))
    sidecar = [json.loads(p.with_suffix(".json").read_text())["prompt"] for p in paths]
    shuffled = [sidecar[(i + 5) % len(sidecar)] for i in range(len(sidecar))]
    (tmp_path / "prompts.txt").write_text("\n".join(shuffled) + "\n")

    runs = (("sidecars", [], sidecar), ("file", ["--prompts", str(tmp_path / "prompts.txt")], shuffled))
    for name, extra, prompts in runs:
        rc, err = _run(capsys, "clip", "--images", str(images), "--clip-model", str(model_dir),
                       "--out", str(tmp_path / name), "--batch-size", "5", *extra)
        assert rc == 0, err
        got = json.loads((tmp_path / name / "clip.json").read_text())
        raw, logits = _by_hand(model_dir, paths, prompts)
        np.testing.assert_allclose(raw, logits, rtol=1e-4, atol=1e-4)  # 100 * cosine is the model's logit
        assert (raw < 0).any() and (raw > 0).any()  # clipping at 0 is exercised
        per_image = got["per_image"]
        assert [p["image"] for p in per_image] == [p.name for p in paths]
        assert [p["prompt"] for p in per_image] == prompts
        np.testing.assert_allclose([p["score"] for p in per_image], np.maximum(raw, 0), rtol=1e-5, atol=1e-5)
        assert got["numbers"]["clip_score"] == pytest.approx(np.maximum(raw, 0).mean(), abs=1e-4)
        assert got["numbers"]["num_images"] == NUM_IMAGES
        num_tokens = [len(p.replace(" ", "")) + 2 for p in prompts]  # a token a letter, no merges; bos, eos
        assert got["settings"]["prompts_truncated"] == sum(n > 16 for n in num_tokens)
        assert f"**{got['numbers']['clip_score']}**" in (tmp_path / name / "clip.md").read_text()
        assert (tmp_path / name / "clip_samples.png").is_file()


def test_clip_missing_model_is_one_clear_error(image_sets, tmp_path, capsys):
    rc, err = _run(capsys, "clip", "--images", str(image_sets / "noise8"), "--clip-model", str(tmp_path / "none"),
                   "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / "none") in err
    assert "openai/clip-vit-large-patch14" in err


def test_report_images_are_enlarged_without_smoothing():
    from hart_train.evaluation import report

    small = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    fit = report.fit_image(Image.fromarray(small), 256)
    assert np.array_equal(np.asarray(fit), small.repeat(16, axis=0).repeat(16, axis=1))  # 16x, each pixel a block
    big = report.fit_image(Image.new("RGB", (1000, 500)), 256)
    assert big.size == (256, 128)
    sheet = report.prompt_rows([("a red fox " * 20, [Image.fromarray(small)] * 3), ("a cat", [Image.fromarray(small)])])
    assert sheet.width == 3 * (report.CELL_PX + 6) + 6 and sheet.height > 2 * report.CELL_PX
