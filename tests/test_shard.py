"""`hart-data shard`: sources, per-image processing, bad inputs, resume, local and S3 outputs; its tars read
back by the reader and by webdataset."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
import tarfile
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from data_helpers import (
    all_samples,
    cmyk_jpeg,
    decode,
    exif_rotated_jpeg,
    good_items,
    gray16_png,
    halves,
    image_bytes,
    la_png,
    noise_jpeg,
    palette_png_transparent,
    read_shard,
    rgba_png,
    solid,
    write_folder,
)

from data_tools import cli, schema, shard, sources, storage, verify
from data_tools.reader import ReaderConfig, StreamingReader
from data_tools.samples import decode_image
from data_tools.shard import shard_dataset

HAS_EMOJI = os.path.exists(sources.EMOJI_FONT) and os.path.exists(sources.EMOJI_NAMES)


def _meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def test_folder_round_trip_local(tmp_path):
    items = good_items(10)
    items["odd.png"] = (solid(30, 30, (1, 2, 3)), "  a\tcaption\n with \x00 junk\x07  ")
    src = write_folder(tmp_path / "src", items)
    # json captions with either key
    write_folder(tmp_path / "src", {"j1.jpg": (solid(20, 20, (9, 9, 9), "JPEG"), "from json")}, caption_ext=".json")
    with open(tmp_path / "src" / "j2.png", "wb") as f:
        f.write(solid(20, 20, (8, 8, 8)))
    (tmp_path / "src" / "j2.json").write_text(json.dumps({"text": "text key"}))
    out = str(tmp_path / "out")
    rc = cli.main(["shard", f"folder:{src}", out, "--resolution", "16", "--samples-per-shard", "4", "--no-progress"])
    assert rc == 0
    manifest = verify.load_manifest(out)
    assert manifest.num_samples == 13
    assert [s.name for s in manifest.shards] == [schema.shard_name(i) for i in range(4)]
    assert [s.num_samples for s in manifest.shards] == [4, 4, 4, 1]
    assert manifest.options["resolution"] == 16 and manifest.options["samples_per_shard"] == 4
    samples = all_samples(out)
    assert sorted(samples) == [schema.sample_key(i // 4, i % 4) for i in range(13)]
    captions = {s["txt"].decode() for s in samples.values()}
    assert {"a caption with junk", "from json", "text key", "item 0"} <= captions
    for s in samples.values():
        meta = _meta(s)
        assert set(meta) == set(schema.SAMPLE_META_FIELDS)
        assert decode(s["jpg"]).size == (16, 16) == (meta["width"], meta["height"])
        assert meta["source"].startswith(src)
    assert cli.main(["verify", out, "--no-progress"]) == 0


def test_folder_round_trip_s3_with_workers(tmp_path, s3_bucket):
    src = write_folder(tmp_path / "src", good_items(9))
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(src + "/", f"{s3_bucket}/src/", recursive=True)
    out = f"{s3_bucket}/data/v1"
    manifest = shard_dataset(
        f"folder:{s3_bucket}/src", out, resolution=24, samples_per_shard=4, workers=2, progress=False
    )
    assert manifest.num_samples == 9 and len(manifest.shards) == 3
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(out.removeprefix("s3://"), refresh=True)}
    assert {"manifest.json", "shard-000002.tar", "shard-000002.stats.json"} <= names
    sample = read_shard(fs.cat_file(f"{out}/shard-000000.tar"))["000000_000000"]
    assert _meta(sample)["source"] == f"{s3_bucket}/src/img000.png"
    assert decode(sample["jpg"]).size == (24, 24)
    report = verify.verify_dataset(out, workers=2, progress=False)
    assert report["ok"], report
    assert report["num_samples"] == 9
    again = shard_dataset(f"wds:{out}/shard-{{000000..000002}}.tar", f"{s3_bucket}/data/v2", progress=False)
    assert again.num_samples == 9 and again.stats["skipped"] == {}


@pytest.mark.skipif(not HAS_EMOJI, reason="apt-get install fonts-noto-color-emoji unicode-data")
@pytest.mark.parametrize("where", ["local", "s3"])
def test_emoji_round_trip(tmp_path, request, where):
    out = str(tmp_path / "emoji") if where == "local" else request.getfixturevalue("s3_bucket") + "/emoji"
    rc = cli.main(["shard", "emoji", out, "--limit", "64", "--resolution", "32", "--format", "png",
                   "--samples-per-shard", "40", "--no-progress"])  # fmt: skip
    assert rc == 0
    manifest = verify.load_manifest(out)
    assert manifest.num_samples == 64 and [s.num_samples for s in manifest.shards] == [40, 24]
    fs, path = storage.get_fs(out)
    first = read_shard(fs.cat_file(path + "/shard-000000.tar"))["000000_000000"]
    assert first["txt"] == b"grinning face"
    meta = _meta(first)
    assert (meta["orig_width"], meta["orig_height"]) == (136, 128)
    assert decode(first["png"]).mode == "RGB" and decode(first["png"]).size == (32, 32)
    assert cli.main(["verify", out, "--no-progress"]) == 0


def _list_source_dir(tmp_path):
    imgdir = tmp_path / "lists" / "imgs"
    imgdir.mkdir(parents=True)
    rows = []
    for i in range(5):
        (imgdir / f"{i}.png").write_bytes(solid(20 + i, 20, (i * 40, 0, 0)))
        rows.append({"file": f"imgs/{i}.png", "text": f"red {i}"})
    rows.append({"file": str(imgdir / "0.png").replace("0.png", "3.png"), "text": "absolute duplicate of 3"})
    rows.append({"file": "imgs/missing.png", "text": "gone"})
    return tmp_path / "lists", rows


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_list_sources(tmp_path, kind):
    base, rows = _list_source_dir(tmp_path)
    path = base / f"list.{kind}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["file", "text"])
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    out = str(tmp_path / "out")
    manifest = shard_dataset(
        f"{kind}:{path}", out, path_column="file", caption_column="text", resize="none", progress=False
    )
    expected_skips = {"duplicate": 1, "unreadable": 1} | ({"bad_record": 1} if kind == "jsonl" else {})
    assert manifest.stats["skipped"] == expected_skips
    samples = all_samples(out)
    assert [s["txt"].decode() for s in samples.values()] == [f"red {i}" for i in range(5)]
    assert [_meta(s)["orig_width"] for s in samples.values()] == [20, 21, 22, 23, 24]
    if kind == "jsonl":  # rows without the path field are counted, not fatal
        m = shard_dataset(f"{kind}:{path}", str(tmp_path / "out2"), progress=False)
        assert m.num_samples == 0 and m.stats["skipped"] == {"bad_record": 8}
    else:
        with pytest.raises(ValueError, match="no column 'path', 'caption'"):
            shard_dataset(f"{kind}:{path}", str(tmp_path / "out2"), progress=False)
        assert not os.path.exists(tmp_path / "out2")  # checked before the output is created


def test_wds_source_reshards_a_dataset(tmp_path):
    src = write_folder(tmp_path / "src", good_items(7, size=(40, 30)))
    first = str(tmp_path / "first")
    shard_dataset(f"folder:{src}", first, resize="none", fmt="png", samples_per_shard=3, progress=False)
    second = str(tmp_path / "second")
    manifest = shard_dataset(
        f"wds:{first}/shard-{{000000..000002}}.tar", second, resolution=20, samples_per_shard=5, progress=False
    )
    assert manifest.num_samples == 7 and [s.num_samples for s in manifest.shards] == [5, 2]
    old, new = all_samples(first), all_samples(second)
    assert [s["txt"] for s in new.values()] == [s["txt"] for s in old.values()]
    assert _meta(new["000000_000000"])["source"] == f"{first}/shard-000000.tar#000000_000000"
    assert (_meta(new["000000_000000"])["orig_width"], _meta(new["000000_000000"])["orig_height"]) == (40, 30)
    with pytest.raises(FileNotFoundError, match="tars not found"):
        shard_dataset(f"wds:{first}/shard-{{000000..000009}}.tar", str(tmp_path / "x"), progress=False)


def test_bad_inputs_are_counted_and_good_ones_land(tmp_path):
    good = good_items(3)
    truncated = noise_jpeg(64, 64)
    items = {
        **good,
        "zdup.png": (good["img001.png"][0], "same bytes as img001"),
        "garbage.jpg": (b"this is not an image at all", "garbage"),
        "empty.png": (b"", "zero bytes"),
        "cut.jpg": (truncated[: len(truncated) // 2], "truncated"),
        "nocap.png": (solid(30, 30, (5, 5, 5)), None),
        "blank.png": (solid(30, 30, (6, 6, 6)), " \n\t "),
        "bomb.png": (solid(200, 200, (7, 7, 7)), "too many pixels"),
        "bomb2.png": (solid(120, 120, (8, 8, 8)), "over the limit but under 2x"),
    }
    src = write_folder(tmp_path / "src", items)
    out = str(tmp_path / "out")
    manifest = shard_dataset(f"folder:{src}", out, max_pixels=10_000, samples_per_shard=4, progress=False)
    assert manifest.stats["skipped"] == {
        "decompression_bomb": 2, "duplicate": 1, "missing_caption": 2, "truncated": 1,
        "undecodable": 1, "zero_bytes": 1,
    }  # fmt: skip
    assert manifest.num_samples == 3
    assert sorted(s["txt"].decode() for s in all_samples(out).values()) == ["item 0", "item 1", "item 2"]
    assert manifest.stats["num_source_items"] == len(items)
    listed = {os.path.basename(x["source"]): x["reason"] for x in manifest.stats["skipped_before_decode"]}
    assert listed == {"zdup.png": "duplicate", "empty.png": "zero_bytes", "nocap.png": "missing_caption",
                      "blank.png": "missing_caption"}  # fmt: skip
    per_shard = [json.load(open(os.path.join(out, schema.shard_stats_name(i)))) for i in range(2)]
    decode_time = {os.path.basename(x["source"]): x["reason"] for s in per_shard for x in s["skipped_items"]}
    assert decode_time == {"garbage.jpg": "undecodable", "cut.jpg": "truncated", "bomb.png": "decompression_bomb",
                           "bomb2.png": "decompression_bomb"}  # fmt: skip
    assert cli.main(["verify", out, "--no-progress"]) == 0


def test_shard_with_all_items_filtered_is_not_written(tmp_path):
    items = {"a.png": (solid(10, 10, (1, 1, 1)), "tiny"), "b.png": (solid(10, 10, (2, 2, 2)), "tiny too"),
             "c.png": (solid(80, 20, (3, 3, 3)), "wide"), "d.png": (solid(40, 40, (4, 4, 4)), "fine")}  # fmt: skip
    src = write_folder(tmp_path / "src", items)
    out = str(tmp_path / "out")
    manifest = shard_dataset(f"folder:{src}", out, min_size=20, max_aspect=2.0, samples_per_shard=2, progress=False)
    assert manifest.stats["skipped"] == {"too_small": 2, "bad_aspect": 1}
    assert [s.name for s in manifest.shards] == ["shard-000001.tar"]
    assert manifest.stats["num_empty_shards"] == 1
    assert not os.path.exists(os.path.join(out, "shard-000000.tar"))
    assert os.path.exists(os.path.join(out, "shard-000000.stats.json"))


def test_exif_orientation_is_applied(tmp_path):
    src = write_folder(tmp_path / "src", {"rot.jpg": (exif_rotated_jpeg(40, 20, orientation=6), "rotated")})
    out = str(tmp_path / "out")
    shard_dataset(f"folder:{src}", out, resize="none", fmt="png", progress=False)
    (sample,) = all_samples(out).values()
    img = decode(sample["png"])
    meta = _meta(sample)
    assert img.size == (20, 40) and (meta["orig_width"], meta["orig_height"]) == (20, 40)
    # orientation 6 = rotate 90 degrees clockwise for display: the stored left (red) half is now on top
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_modes_are_converted_to_rgb(tmp_path):
    items = {"pal.png": (palette_png_transparent(20, 20), "palette"), "rgba.png": (rgba_png(20, 20), "rgba"),
             "la.png": (la_png(20, 20), "la"), "cmyk.jpg": (cmyk_jpeg(20, 20), "cmyk"),
             "g16.png": (gray16_png(20, 20), "gray16")}  # fmt: skip
    assert decode(items["g16.png"][0]).mode.startswith("I")
    assert decode(items["cmyk.jpg"][0]).mode == "CMYK"
    src = write_folder(tmp_path / "src", items)
    out = str(tmp_path / "out")
    manifest = shard_dataset(f"folder:{src}", out, resize="none", fmt="png", progress=False)
    assert manifest.num_samples == 5
    by_caption = {s["txt"].decode(): decode(s["png"]) for s in all_samples(out).values()}
    assert all(img.mode == "RGB" for img in by_caption.values())
    # (left pixel, right pixel): transparent parts are white, 16-bit full scale is 8-bit white
    expected = {"palette": ((255, 0, 0), (255, 255, 255)), "rgba": ((0, 255, 0), (255, 255, 255)),
                "la": ((0, 0, 0), (255, 255, 255)), "gray16": ((255, 255, 255), (0, 0, 0))}  # fmt: skip
    for caption, (left, right) in expected.items():
        assert by_caption[caption].getpixel((2, 10)) == left, caption
        assert by_caption[caption].getpixel((17, 10)) == right, caption
    r, g, b = by_caption["cmyk"].getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60


def test_resize_modes(tmp_path):
    # three vertical thirds: red | green | blue, 60x30; the centre crop must be green
    img = halves(60, 30, left=(255, 0, 0), right=(0, 0, 255))
    img.paste((0, 255, 0), (15, 0, 45, 30))
    src = write_folder(tmp_path / "src", {"t.png": (image_bytes(img), "thirds")})
    sizes = {}
    for mode in ("center-crop", "shorter-side", "none"):
        out = str(tmp_path / mode)
        shard_dataset(f"folder:{src}", out, resolution=16, resize=mode, fmt="png", progress=False)
        (sample,) = all_samples(out).values()
        stored = decode(sample["png"])
        sizes[mode] = stored.size
        if mode == "center-crop":
            corners = [stored.getpixel(p) for p in ((0, 0), (15, 0), (0, 15), (15, 15), (8, 8))]
            assert all(c[1] > 200 and c[0] < 60 and c[2] < 60 for c in corners), corners
    assert sizes == {"center-crop": (16, 16), "shorter-side": (32, 16), "none": (60, 30)}


def test_large_jpeg_draft_keeps_source_size(tmp_path):
    src = write_folder(tmp_path / "src", {"big.jpg": (noise_jpeg(800, 600), "big")})
    out = str(tmp_path / "out")
    shard_dataset(f"folder:{src}", out, resolution=64, progress=False)
    (sample,) = all_samples(out).values()
    meta = _meta(sample)
    assert (meta["orig_width"], meta["orig_height"], meta["width"], meta["height"]) == (800, 600, 64, 64)


def _interrupting(monkeypatch, fail_at: int, calls: list[int]):
    real = shard.write_shard

    def flaky(job):
        calls.append(job.plan.index)
        if job.plan.index == fail_at:
            raise RuntimeError("simulated crash")
        return real(job)

    monkeypatch.setattr(shard, "write_shard", flaky)


def test_interrupted_job_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    src = write_folder(tmp_path / "src", good_items(11))
    kw = dict(resolution=16, samples_per_shard=3, progress=False)
    reference = shard_dataset(f"folder:{src}", str(tmp_path / "ref"), **kw)
    out = str(tmp_path / "out")
    calls: list[int] = []
    _interrupting(monkeypatch, 2, calls)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shard_dataset(f"folder:{src}", out, **kw)
    assert not os.path.exists(os.path.join(out, schema.MANIFEST_NAME))
    assert os.path.exists(os.path.join(out, "shard-000001.stats.json"))
    report = verify.verify_dataset(out, progress=False)
    assert not report["ok"] and "incomplete" in report["problems"][0]["problem"]
    assert cli.main(["verify", out, "--no-progress"]) == 1
    # a truncated tar with a stats file must be redone too
    with open(os.path.join(out, "shard-000001.tar"), "r+b") as f:
        f.truncate(512)
    monkeypatch.undo()
    calls.clear()
    _interrupting(monkeypatch, -1, calls)
    resumed = shard_dataset(f"folder:{src}", out, resume=True, **kw)
    assert calls == [1, 2, 3]
    assert resumed.shards == reference.shards  # names, counts, bytes and sha256
    assert verify.verify_dataset(out, progress=False)["ok"]


def test_existing_output_needs_resume_or_overwrite(tmp_path, capsys):
    src = write_folder(tmp_path / "src", good_items(3))
    out = str(tmp_path / "out")
    args = ["shard", f"folder:{src}", out, "--no-progress"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hart-data: error:") and "--overwrite" in err and "Traceback" not in err
    assert cli.main(args + ["--resolution", "8", "--resume"]) == 2
    assert "different options" in capsys.readouterr().err
    assert cli.main(args + ["--resolution", "8", "--overwrite"]) == 0
    assert verify.load_manifest(out).options["resolution"] == 8
    assert cli.main(args + ["--resolution", "8", "--resume"]) == 0  # already complete: same manifest


def test_user_errors_are_one_line(tmp_path, capsys, s3_server):
    cases = [
        (["shard", "nosuch:x", str(tmp_path / "o")], "KIND:LOCATION"),
        (["shard", f"folder:{tmp_path}/absent", str(tmp_path / "o")], "source folder not found"),
        (["shard", "emoji", "s3://no-such-bucket-hd/x", "--no-progress"], "does not exist"),
        (["shard", "emoji", str(tmp_path / "o"), "--resize", "none", "--quality", "0"], "--quality"),
        (["stats", str(tmp_path / "absent")], "no manifest.json"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_unreachable_s3_output_is_a_clear_error(tmp_path):
    # a fresh process, so no cached filesystem from the moto fixture: nothing listens on port 1
    env = dict(os.environ, AWS_ENDPOINT_URL="http://127.0.0.1:1", AWS_ACCESS_KEY_ID="k",
               AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1", AWS_MAX_ATTEMPTS="1")  # fmt: skip
    src = write_folder(tmp_path / "src", good_items(1))
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools.cli", "shard", f"folder:{src}", "s3://bucket/x", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("hart-data: error: cannot reach s3://bucket/x: EndpointConnectionError")
    assert "Traceback" not in proc.stderr


_CRASH_SCRIPT = """
import contextlib, os, sys
from data_tools import cli, storage

real_open = storage.atomic_open

@contextlib.contextmanager
def dying_open(url):
    with real_open(url) as f:
        if url.endswith("shard-000002.tar"):
            f.write(b"partial tar bytes")
            os._exit(3)  # a hard crash mid-write: no finally blocks, no upload completion
        yield f

storage.atomic_open = dying_open
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["local", "s3"])
def test_hard_crash_mid_shard_leaves_no_partial_dataset(tmp_path, request, where):
    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    src = write_folder(tmp_path / "src", good_items(10))
    args = [f"folder:{src}", "--resolution", "16", "--samples-per-shard", "3", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, "shard", args[0], f"{base}/crashed", *args[1:]],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    fs, path = storage.get_fs(f"{base}/crashed")
    fs.invalidate_cache()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    assert {"shard-000000.tar", "shard-000001.stats.json"} <= names
    assert not names & {"manifest.json", "shard-000002.tar", "shard-000002.stats.json"}, names
    assert not verify.verify_dataset(f"{base}/crashed", progress=False)["ok"]
    assert cli.main(["shard", args[0], f"{base}/crashed", *args[1:], "--resume"]) == 0
    assert cli.main(["shard", args[0], f"{base}/clean", *args[1:]]) == 0
    assert verify.load_manifest(f"{base}/crashed").shards == verify.load_manifest(f"{base}/clean").shards
    assert verify.verify_dataset(f"{base}/crashed", progress=False)["ok"]


def test_center_crop_never_rounds_past_the_image_edge():
    """392x480 made the old crop box start at -3e-14 ("box offset can't be negative")."""
    from PIL import Image

    from data_tools.images import resize

    for w, h in [(392, 480), (480, 392), (257, 1000), (999, 256)]:
        assert resize(Image.new("RGB", (w, h)), 256, "center-crop").size == (256, 256)


def test_s3_endpoint_change_takes_effect_in_process(s3_server, s3_bucket, monkeypatch):
    """fsspec caches S3 clients; a client made for another endpoint must not be reused after a change."""
    from data_tools import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    stale, _ = storage.get_fs(f"{s3_bucket}/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage.atomic_write_bytes(f"{s3_bucket}/x/probe", b"ok")
    assert storage.read_bytes(f"{s3_bucket}/x/probe") == b"ok"
    fresh, _ = storage.get_fs(f"{s3_bucket}/x")
    assert fresh is not stale


def test_shards_read_back_identically_by_the_reader_and_webdataset(tmp_path):
    """Shards written through webdataset's TarWriter: the project's reader and the vanilla
    `webdataset.WebDataset` pipeline see the same samples, bit for bit after the same decode."""
    items = good_items(7, size=(40, 30))
    items["odd.png"] = (noise_jpeg(50, 70), "a noisy one")
    src = write_folder(tmp_path / "src", items)
    out = str(tmp_path / "out")
    manifest = shard_dataset(f"folder:{src}", out, resolution=24, fmt="png", samples_per_shard=3, progress=False)
    assert [s.num_samples for s in manifest.shards] == [3, 3, 2]

    reader = StreamingReader(ReaderConfig(urls=[out], resolution=16, batch_size=3, num_workers=0))
    ours = {}
    for batch in itertools.islice(reader, reader.steps_left_in_epoch()):
        for key, caption, image in zip(batch["key"], batch["caption"], batch["image"]):
            ours[key] = (caption, image.permute(1, 2, 0).numpy().copy())
    urls = [os.path.join(out, s.name) for s in manifest.shards]
    theirs = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert set(sample) - {"__url__", "__local_path__"} == {"__key__", "png", "txt", "json"}
        theirs[sample["__key__"]] = (sample["txt"].decode("utf-8"), decode_image(sample["png"], 16))
    assert sorted(ours) == sorted(theirs) == [schema.sample_key(i // 3, i % 3) for i in range(8)]
    for key, (caption, image) in ours.items():
        assert caption == theirs[key][0]
        assert np.array_equal(image, theirs[key][1]), key
    assert {c for c, _ in ours.values()} == {f"item {i}" for i in range(7)} | {"a noisy one"}


def test_shard_tars_are_byte_reproducible(tmp_path):
    """Two runs over the same source write the same bytes: TarWriter is given every header field
    that would otherwise vary (mtime, mode, owner); the per-shard stats too (a skipped image's reason
    carries Pillow's message, without the address of the bytes it read)."""
    src = write_folder(tmp_path / "src", {**good_items(5), "zgarbage.jpg": (b"not an image", "garbage")})
    first = shard_dataset(f"folder:{src}", str(tmp_path / "a"), resolution=16, samples_per_shard=2, progress=False)
    time.sleep(1.1)  # a header taking the clock would now differ
    second = shard_dataset(f"folder:{src}", str(tmp_path / "b"), resolution=16, samples_per_shard=2, progress=False)
    assert first.shards == second.shards  # names, counts, bytes and sha256
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"000000_00000{i}.{ext}" for i in range(2) for ext in ("jpg", "json", "txt")]
    assert {(m.mtime, m.mode, m.uname, m.gname, m.uid, m.gid) for m in members} == {(0, 0o644, "hart", "hart", 0, 0)}
    stats = [schema.shard_stats_name(i) for i in range(len(first.shards))]
    assert [(tmp_path / "a" / n).read_bytes() for n in stats] == [(tmp_path / "b" / n).read_bytes() for n in stats]
    assert b"cannot identify image file the image bytes" in b"".join((tmp_path / "a" / n).read_bytes() for n in stats)


def test_wds_source_takes_webdatasets_url_syntax(tmp_path, monkeypatch, capsys):
    src = write_folder(tmp_path / "src", good_items(5))
    first = str(tmp_path / "first")
    shard_dataset(f"folder:{src}", first, resize="none", fmt="png", samples_per_shard=2, progress=False)
    monkeypatch.setenv("WDS_ROOT", first)
    # `::` joins patterns and ${NAME} is read from WDS_NAME, as in webdataset.WebDataset(url)
    spec = "wds:${ROOT}/shard-000002.tar::" + first + "/shard-{000000..000001}.tar"
    manifest = shard_dataset(spec, str(tmp_path / "second"), resize="none", fmt="png", progress=False)
    captions = [s["txt"].decode() for s in all_samples(str(tmp_path / "second")).values()]
    assert manifest.num_samples == 5 and captions == ["item 4", "item 0", "item 1", "item 2", "item 3"]
    assert cli.main(["shard", "wds:${NOPE}/shard-000000.tar", str(tmp_path / "third"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "WDS_NAME" in err and err.count("\n") == 1, err
