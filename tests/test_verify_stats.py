"""`hart-data verify` finds what is wrong and where; `hart-data stats` reports the right numbers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import pytest
from data_helpers import decode, good_items, read_shard, solid, write_folder

from data_tools import cli, schema, verify
from data_tools.shard import shard_dataset


@pytest.fixture
def dataset(tmp_path):
    """9 samples in 3 shards of 3, 16x16 jpg."""
    src = write_folder(tmp_path / "src", good_items(9))
    out = str(tmp_path / "out")
    shard_dataset(f"folder:{src}", out, resolution=16, samples_per_shard=3, progress=False)
    return out


def _verify_json(out: str, capsys, *extra: str) -> tuple[int, dict]:
    rc = cli.main(["verify", out, "--json", "--no-progress", *extra])
    return rc, json.loads(capsys.readouterr().out)


def test_clean_dataset_verifies(dataset, capsys):
    rc, report = _verify_json(dataset, capsys)
    assert rc == 0 and report["ok"] and report["problems"] == []
    assert (report["num_shards"], report["num_samples"]) == (3, 9)


def test_corrupted_shard_is_named(dataset, capsys):
    path = os.path.join(dataset, "shard-000001.tar")
    data = bytearray(open(path, "rb").read())
    for i in range(1500, 1600):  # inside the first image member
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))
    rc, report = _verify_json(dataset, capsys, "--workers", "2")
    assert rc == 1 and not report["ok"]
    assert {p["shard"] for p in report["problems"]} == {"shard-000001.tar"}
    assert any("sha256" in p["problem"] for p in report["problems"])


def test_missing_shard_is_named(dataset, capsys):
    os.remove(os.path.join(dataset, "shard-000002.tar"))
    rc = cli.main(["verify", dataset, "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "shard-000002.tar: shard is missing" in out and "FAILED" in out


def test_missing_manifest_is_incomplete(dataset, capsys):
    os.remove(os.path.join(dataset, schema.MANIFEST_NAME))
    rc, report = _verify_json(dataset, capsys)
    assert rc == 1 and "incomplete" in report["problems"][0]["problem"]


def _rewrite_shard(out: str, name: str, edit) -> None:
    """Apply `edit(samples)` to a shard's samples, rewrite it, and fix the manifest's size and sha256,
    so only the sample-level checks can find the damage."""
    path = os.path.join(out, name)
    samples = read_shard(path)
    edit(samples)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples.items():
            for ext, blob in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    open(path, "wb").write(buf.getvalue())
    manifest = verify.load_manifest(out)
    for s in manifest.shards:
        if s.name == name:
            s.bytes, s.sha256 = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    open(os.path.join(out, schema.MANIFEST_NAME), "w").write(manifest.to_json())


def test_bad_samples_are_named_by_key(dataset, capsys):
    def edit(samples):
        del samples["000000_000000"]["txt"]
        samples["000000_000001"]["jpg"] = b"\xff\xd8 not really a jpeg"
        samples["000000_000002"]["png"] = solid(16, 16)
        samples["000000_000002"]["json"] = json.dumps({"width": 16}).encode()

    _rewrite_shard(dataset, "shard-000000.tar", edit)
    rc, report = _verify_json(dataset, capsys)
    assert rc == 1
    found = {(p["shard"], p["key"]): p["problem"] for p in report["problems"]}
    assert set(found) == {("shard-000000.tar", f"000000_00000{i}") for i in range(3)}
    assert "0 txt" in found[("shard-000000.tar", "000000_000000")]
    assert "does not decode" in found[("shard-000000.tar", "000000_000001")]
    assert "2 image" in found[("shard-000000.tar", "000000_000002")]


def test_wrong_recorded_size_is_found(dataset, capsys):
    def edit(samples):
        samples["000001_000000"]["json"] = json.dumps(
            json.loads(samples["000001_000000"]["json"]) | {"width": 99}
        ).encode()

    _rewrite_shard(dataset, "shard-000001.tar", edit)
    rc, report = _verify_json(dataset, capsys)
    assert rc == 1
    assert report["problems"] == [
        {"shard": "shard-000001.tar", "key": "000001_000000", "problem": "image is 16x16, json says 99x16"}
    ]


def test_stats_numbers_for_a_known_dataset(tmp_path, capsys):
    items = {
        "a.png": (solid(40, 20, (1, 0, 0)), "one"),  # aspect 2.0
        "b.png": (solid(20, 20, (2, 0, 0)), "one two"),  # aspect 1.0
        "c.png": (solid(30, 60, (3, 0, 0)), "one two three four"),  # aspect 0.5
        "d.png": (solid(300, 150, (4, 0, 0)), "x" * 10),  # aspect 2.0, shorter side 150
        "e.png": (b"", "skipped"),
    }
    src = write_folder(tmp_path / "src", items)
    out = str(tmp_path / "out")
    shard_dataset(f"folder:{src}", out, resize="none", fmt="png", samples_per_shard=3, progress=False)
    plot = tmp_path / "stats.png"
    assert cli.main(["stats", out, "--json", "--plot", str(plot)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["num_samples"], st["num_shards"], st["skipped"]) == (4, 2, {"zero_bytes": 1})
    assert st["resolutions"] == {"40x20": 1, "20x20": 1, "30x60": 1, "300x150": 1}
    nonzero = lambda hist: {(b["lo"], b["hi"]): b["count"] for b in hist if b["count"]}  # noqa: E731
    assert nonzero(st["aspect_hist"]) == {(2.0, None): 2, (0.95, 1.05): 1, (0.5, 0.67): 1}
    assert nonzero(st["short_side_hist"]) == {(0, 64): 3, (128, 256): 1}
    assert nonzero(st["caption_words_hist"]) == {(1, 2): 2, (2, 4): 1, (4, 8): 1}
    assert st["caption_words"] | {"mean": None} == {"min": 1, "max": 4, "mean": None, "p50": 2, "p90": 4, "p99": 4}
    assert st["caption_words"]["mean"] == pytest.approx(2.0)
    assert st["caption_chars"]["max"] == 18 and st["caption_chars"]["min"] == 3
    assert decode(plot.read_bytes()).format == "PNG"
    assert cli.main(["stats", out]) == 0
    assert "4 samples in 2 shards" in capsys.readouterr().out
