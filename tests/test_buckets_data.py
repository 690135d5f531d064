"""Aspect-ratio buckets on the data side: `hart-data shard --buckets`, stats and verify of a bucketed
dataset, the per-bucket plan (one bucket per step on every rank, exact resume across rank changes) and
the streaming reader's bucketed batches."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections import Counter

import numpy as np
import pytest
from data_helpers import all_samples, decode, exif_rotated_jpeg, image_bytes, read_shard, write_folder
from PIL import Image
from test_verify_stats import _rewrite_shard

from data_tools import buckets, cli, plan, schema, verify
from data_tools.reader import ReaderConfig, StreamingReader

# W:H pixel buckets; canonical order is by aspect ratio: 24x40, 32x32, 40x24, 48x16
SPEC = "32:32,40:24,24:40,48:16"
# source sizes -> the bucket each must land in (48x16 is a tiny bucket: 2 samples)
SOURCES = ([((40, 40), "32x32")] * 14 + [((60, 36), "40x24")] * 12 + [((36, 60), "24x40")] * 10
           + [((80, 20), "48x16")] * 2)


def _noise_png(w: int, h: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image_bytes(Image.fromarray(pixels))


def mixed_source(root) -> tuple[str, dict[str, str]]:
    """A folder of images of four aspect ratios (plus one EXIF-rotated JPEG and one broken file);
    returns it and the bucket each good image belongs in, by source file name."""
    items, expected = {}, {}
    for i, ((w, h), bucket) in enumerate(SOURCES):
        name = f"im{i:03d}.png"
        items[name] = (_noise_png(w, h, i), f"image {i}")
        expected[name] = bucket
    items["rotated.jpg"] = (exif_rotated_jpeg(60, 30), "rotated")  # stored 60x30, upright 30x60: portrait
    expected["rotated.jpg"] = "24x40"
    items["broken.png"] = (b"\x89PNG not really", "broken")
    return write_folder(root, items), expected


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    """The mixed source sharded with --buckets SPEC, 4 samples per shard: (dataset dir, expected buckets)."""
    root = tmp_path_factory.mktemp("buckets")
    src, expected = mixed_source(root / "src")
    out = str(root / "out")
    rc = cli.main(["shard", f"folder:{src}", out, "--resolution", "32", "--buckets", SPEC, "--format", "png",
                   "--samples-per-shard", "4", "--no-progress"])
    assert rc == 0
    return out, expected


# ----------------------------------------------------------------------------- bucket geometry


def test_bucket_sets_and_nearest():
    got = buckets.parse_buckets("1024:1024, 896:1152,1152x896", None)
    assert [b.name for b in got] == ["896x1152", "1024x1024", "1152x896"]  # canonical: by aspect ratio
    names = [b.name for b in buckets.parse_buckets("default", 1024)]
    assert names == ["704x1472", "768x1344", "832x1280", "896x1152", "1024x1024",
                     "1152x896", "1280x832", "1344x768", "1472x704"]
    assert [b.name for b in buckets.default_buckets(256)][4] == "256x256"
    for bad, match in (("1024:1024,512:512", "same aspect"), ("32:32,32:32", "twice"), ("32-32", "WIDTH:HEIGHT"),
                       ("0:32", "positive")):
        with pytest.raises(ValueError, match=match):
            buckets.parse_buckets(bad, None)
    with pytest.raises(ValueError, match="needs --resolution"):
        buckets.parse_buckets("default", None)
    with pytest.raises(ValueError, match="multiples of 256"):
        buckets.parse_buckets("default", 300)
    four = buckets.parse_buckets(SPEC, 32)
    assert buckets.nearest_bucket(1920, 1080, four).name == "40x24"
    assert buckets.nearest_bucket(1000, 1001, four).name == "32x32"
    assert buckets.nearest_bucket(10, 1000, four).name == "24x40"
    # an exact tie (aspect 1:1 between 1:2 and 2:1) goes to the first bucket of the set
    pair = buckets.parse_buckets("20:40,40:20", None)
    assert buckets.nearest_bucket(30, 30, pair).name == "20x40"
    # from 32x32: itself, then 24x40 and 40x24 (both 5:3 away; the lower index first), then 48x16 (3:1)
    assert buckets.by_distance(four[1], four) == (1, 0, 2, 3)
    assert buckets.by_distance(four[3], four) == (3, 2, 1, 0)
    assert buckets.cover_box(50, 30, 32, 32) == (10.0, 0.0, 40.0, 30.0)  # the centred min-side square
    assert buckets.cover_box(40, 40, 40, 24) == (0.0, 8.0, 40.0, 32.0)


# ----------------------------------------------------------------------------- shard, stats, verify


def test_shard_puts_each_image_in_its_nearest_bucket_one_bucket_per_shard(bucketed):
    out, expected = bucketed
    manifest = verify.load_manifest(out)
    assert manifest.options["buckets"] == ["24x40", "32x32", "40x24", "48x16"]
    assert manifest.options["resolution"] == 32
    assert manifest.stats["skipped"] == {"undecodable": 1}
    assert manifest.stats["buckets"] == {"24x40": 11, "32x32": 14, "40x24": 12, "48x16": 2}
    # one open chunk per bucket, cut at 4 items; the partial chunks flushed in bucket order at the end. The
    # folder lists broken.png first: its header does not parse, so it takes a slot of the bucket nearest
    # square and the worker skips it (3 samples in shard 0); rotated.jpg comes last.
    assert [(s.bucket, s.num_samples) for s in manifest.shards] == [
        ("32x32", 3), ("32x32", 4), ("32x32", 4), ("40x24", 4), ("40x24", 4), ("40x24", 4), ("24x40", 4),
        ("24x40", 4), ("24x40", 3), ("32x32", 3), ("48x16", 2)]
    for s in manifest.shards:
        w, h = map(int, s.bucket.split("x"))
        for key, sample in read_shard(os.path.join(out, s.name)).items():
            meta = json.loads(sample["json"])
            assert meta["bucket"] == s.bucket and (meta["width"], meta["height"]) == (w, h)
            assert decode(sample["png"]).size == (w, h)
            assert meta["bucket"] == expected[os.path.basename(meta["source"])]
    metas = [json.loads(s["json"]) for s in all_samples(out).values()]
    rotated = [m for m in metas if m["source"].endswith(".jpg")]
    assert [(m["orig_width"], m["orig_height"], m["bucket"]) for m in rotated] == [(30, 60, "24x40")]


def test_bucketed_shards_are_reproducible_and_resumable(bucketed, tmp_path):
    out, _ = bucketed
    src = verify.load_manifest(out).options["source"]
    again = str(tmp_path / "again")
    args = ["shard", src, again, "--resolution", "32", "--buckets", "24:40,48:16,40:24,32:32", "--format", "png",
            "--samples-per-shard", "4", "--no-progress"]  # the same set, listed in another order
    assert cli.main(args) == 0
    first = open(os.path.join(out, schema.MANIFEST_NAME)).read()
    assert open(os.path.join(again, schema.MANIFEST_NAME)).read() == first
    for name in ("shard-000004.tar", "shard-000004.stats.json", "shard-000010.tar", schema.MANIFEST_NAME):
        os.remove(os.path.join(again, name))
    assert cli.main([*args, "--resume"]) == 0
    names = sorted(n for n in os.listdir(out) if n.endswith(".tar")) + [schema.MANIFEST_NAME]
    assert len(names) == 12
    for name in names:  # (stats files name a decode error's BytesIO address in `detail`: not compared)
        assert open(os.path.join(again, name), "rb").read() == open(os.path.join(out, name), "rb").read(), name


def test_unbucketed_shards_carry_no_bucket(tmp_path):
    src, _ = mixed_source(tmp_path / "src")
    out = str(tmp_path / "out")
    assert cli.main(["shard", f"folder:{src}", out, "--resolution", "16", "--no-progress"]) == 0
    text = open(os.path.join(out, schema.MANIFEST_NAME)).read()
    assert "\"bucket" not in text  # no key (the tmp path holds the word)
    assert all("bucket" not in json.loads(s["json"]) for s in all_samples(out).values())
    assert cli.main(["shard", f"folder:{src}", str(tmp_path / "x"), "--buckets", SPEC, "--no-progress"]) == 2
    assert cli.main(["shard", f"folder:{src}", str(tmp_path / "x"), "--resolution", "32", "--buckets", SPEC,
                     "--resize", "none", "--no-progress"]) == 2


def test_stats_show_the_bucket_histogram(bucketed, tmp_path, capsys):
    out, _ = bucketed
    plot = tmp_path / "stats.png"
    assert cli.main(["stats", out, "--json", "--plot", str(plot)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["buckets"] == {"24x40": 11, "32x32": 14, "40x24": 12, "48x16": 2}
    assert decode(plot.read_bytes()).format == "PNG"
    assert cli.main(["stats", out]) == 0
    assert "buckets (WxH): 24x40: 11, 32x32: 14, 40x24: 12, 48x16: 2" in capsys.readouterr().out


def test_verify_finds_a_sample_of_the_wrong_size_for_its_bucket(bucketed, tmp_path, capsys):
    src, _ = bucketed
    out = str(tmp_path / "copy")
    os.makedirs(out)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(out, name), "wb") as g:
            g.write(f.read())
    assert cli.main(["verify", out, "--no-progress"]) == 0
    capsys.readouterr()

    def edit(samples):  # a 32x32 image, with metadata that agrees with it, in a 40x24 shard
        key = "000003_000001"
        samples[key]["png"] = _noise_png(32, 32, 99)
        samples[key]["json"] = json.dumps(json.loads(samples[key]["json"]) | {"width": 32, "height": 32}).encode()
        other = "000003_000002"
        samples[other]["json"] = json.dumps(json.loads(samples[other]["json"]) | {"bucket": "24x40"}).encode()

    _rewrite_shard(out, "shard-000003.tar", edit)
    assert cli.main(["verify", out, "--json", "--no-progress"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == [
        {"shard": "shard-000003.tar", "key": "000003_000001", "problem": "image is 32x32, its shard's bucket is 40x24"},
        {"shard": "shard-000003.tar", "key": "000003_000002",
         "problem": "json bucket '24x40' is not its shard's bucket 40x24"},
    ]


def test_manifest_bucket_entries_are_checked():
    shards = [schema.ShardInfo("shard-000000.tar", 1, 10, "x", "32x32")]
    text = schema.Manifest(1, shards, {"buckets": ["24x40"]}).to_json()
    with pytest.raises(ValueError, match="not one of options.buckets"):
        schema.Manifest.from_json(text)
    with pytest.raises(ValueError, match="options.buckets is missing"):
        schema.Manifest.from_json(schema.Manifest(1, shards).to_json())
    good = schema.Manifest(1, shards, {"buckets": ["32x32"]})
    assert schema.Manifest.from_json(good.to_json()) == good


def test_encode_refuses_a_bucketed_source(bucketed, tmp_path, capsys):
    out, _ = bucketed
    ckpt = tmp_path / "tok"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "config.yaml").write_text("tokenizer:\n  model: {}\n")
    rc = cli.main(["encode", out, str(tmp_path / "tokens"), "--tokenizer-ckpt", str(ckpt), "--text-encoder", "minilm",
                   "--no-progress"])
    assert rc == 2 and "is bucketed" in capsys.readouterr().err
    assert not (tmp_path / "tokens").exists()


# ----------------------------------------------------------------------------- the plan

WINDOW = 5


def make_buckets(counts, of_shard, num_buckets) -> plan.Buckets:
    """Buckets along a line of aspect ratios: bucket i's nearest are i, then i-1 / i+1 (lower first), ..."""
    nearest = [sorted(range(num_buckets), key=lambda j: (abs(i - j), j)) for i in range(num_buckets)]
    return plan.Buckets.from_shards(np.asarray(counts), of_shard, nearest)


def segment_batches(remaining, layout, seg, buckets_):
    """Every batch of a segment's first seg.steps global steps: {(step, rank): (group root, ids)}."""
    out = {}
    for rank in range(seg.ranks):
        for worker in range(seg.workers):
            for p in plan.worker_plans(remaining, layout, 0, rank, worker, WINDOW, buckets_):
                order = p.ids[plan.permuted_order(p)]
                for pos, ids in zip(p.positions, np.split(order, np.cumsum(p.sizes)[:-1])):
                    assert pos % seg.workers == worker
                    if pos < seg.steps:
                        out[(int(pos), rank)] = (p.bucket, ids)
    return out


def run_epoch(counts, of_shard, num_buckets, history, seed=3, epoch=1):
    """Play the (ranks, workers, batch, steps) segments of `history` through the plan (steps None: to the
    epoch's end; ranks capped at the samples left); returns the ids consumed in order and every batch as
    (segment, step, rank, root, ids)."""
    counts = np.asarray(counts)
    b = make_buckets(counts, of_shard, num_buckets)
    segments, consumed, batches = [], [], []
    for ranks, workers, batch, steps in history:
        ranks = min(ranks, int(counts.sum()) - len(consumed))
        layout = plan.segment_layouts(counts, [*segments, plan.Segment(ranks, workers, batch)], seed, epoch, b)[-1]
        steps = layout.num_steps if steps is None else min(steps, layout.num_steps)
        seg = plan.Segment(ranks, workers, batch, steps)
        remaining = plan.remaining_ids(counts, seed, epoch, segments, WINDOW, b)
        got = segment_batches(remaining, layout, seg, b)
        assert sorted(got) == [(t, r) for t in range(steps) for r in range(ranks)]  # every rank steps each step
        seg_ids = []
        for t in range(steps):
            roots = {got[(t, r)][0] for r in range(ranks)}
            assert len(roots) == 1, f"step {t} draws from groups {roots}"
            for r in range(ranks):
                root, ids = got[(t, r)]
                assert 1 <= len(ids) <= batch
                assert set(layout.root_of[b.of_id[ids]]) == {root}  # the batch is of the group's buckets
                batches.append((len(segments), t, r, root, ids))
                seg_ids += ids.tolist()
        # what the resume state says was consumed is exactly what was emitted
        mask = plan.consumed_mask(remaining, seg, len(segments), seed, epoch, WINDOW, layout, b)
        assert sorted(remaining[mask].tolist()) == sorted(seg_ids)
        consumed += seg_ids
        segments.append(seg)
        assert plan.samples_consumed(counts, segments, seed, epoch, b) == len(consumed)
    return consumed, batches


def test_one_bucket_per_step_on_every_rank_and_each_id_once():
    counts = [6, 9, 7, 4, 12, 5, 8, 3]
    of_shard = [0, 1, 2, 1, 0, 2, 1, 3]
    consumed, batches = run_epoch(counts, of_shard, 4, [(3, 2, 4, None)])
    assert sorted(consumed) == list(range(sum(counts)))
    # every bucket has >= 3 samples: no merge, each batch holds its own bucket only
    of_id = np.repeat(of_shard, counts)
    assert all(set(of_id[ids]) == {root} for *_, root, ids in batches)
    roots = [root for seg, t, r, root, _ in batches if r == 0]
    assert len(set(roots)) == 4 and roots != sorted(roots)  # buckets take turns, shuffled


def test_a_bucket_smaller_than_the_rank_count_joins_its_nearest():
    counts = [10, 2, 9]  # bucket 1 has 2 samples, fewer than 3 ranks; 0 and 2 are equally near, 0 is first
    consumed, batches = run_epoch(counts, [0, 1, 2], 3, [(3, 1, 2, None)])
    assert sorted(consumed) == list(range(21))
    assert {root for *_, root, ids in batches if {10, 11} & set(ids.tolist())} == {0}
    consumed, _ = run_epoch(counts, [0, 1, 2], 3, [(2, 1, 2, None)])  # 2 ranks: no merge needed
    assert sorted(consumed) == list(range(21))
    consumed, batches = run_epoch([1, 1, 2], [0, 1, 2], 3, [(3, 1, 2, None)])  # none has 3: all join the largest
    assert sorted(consumed) == list(range(4)) and {root for *_, root, _ in batches} == {2}


@pytest.mark.parametrize("before,after", [((2, 2, 3), (1, 1, 4)), ((1, 2, 3), (3, 3, 2))])
def test_kill_at_every_step_and_resume_on_other_ranks_workers_and_batch(before, after):
    """2 -> 1 and 1 -> 3 ranks (with other workers and micro-batch), killed after each possible step of
    the first segment, on a dataset with a 2-sample bucket: every id of the epoch exactly once."""
    counts, of_shard = [5, 7, 2, 6, 4, 9], [0, 1, 3, 2, 1, 0]
    b = make_buckets(np.array(counts), of_shard, 4)
    total_steps = plan.segment_layouts(np.array(counts), [plan.Segment(*before)], 0, 0, b)[0].num_steps
    for kill in range(total_steps + 1):
        consumed, _ = run_epoch(counts, of_shard, 4, [(*before, kill), (*after, None)], seed=kill)
        assert sorted(consumed) == list(range(sum(counts)))


@pytest.mark.parametrize("trial", range(40))
def test_random_kill_and_resume_histories_consume_each_id_once(trial):
    """Random datasets (tiny buckets included) and random histories of (ranks, workers, micro-batch)
    changes, each segment killed after a random number of steps: one bucket group per step on all ranks,
    and over the epoch every id exactly once."""
    rng = np.random.default_rng(trial)
    num_buckets = int(rng.integers(1, 6))
    num_shards = int(rng.integers(num_buckets, 14))
    counts = rng.integers(1, 15, num_shards)
    of_shard = np.concatenate([np.arange(num_buckets), rng.integers(0, num_buckets, num_shards - num_buckets)])
    history = [(int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(2, 6)), int(rng.integers(0, 6)))
               for _ in range(int(rng.integers(1, 6)))]
    history.append((int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(2, 6)), None))
    consumed, _ = run_epoch(counts, of_shard, num_buckets, history, seed=trial)
    assert sorted(consumed) == list(range(int(counts.sum())))


def test_unbucketed_plan_is_unchanged():
    """The order of an unbucketed dataset, pinned: (rank, worker) emission orders, sizes and resume points
    over a chain of segments (a digest of the plan as it was before buckets existed)."""
    counts = np.array([7, 12, 5, 9, 11, 3, 20, 1], dtype=np.int64)
    chain = [plan.Segment(2, 2, 4, steps=3), plan.Segment(3, 1, 3, steps=2), plan.Segment(1, 3, 5, steps=1)]
    got = {}
    for seed, epoch in [(0, 0), (5, 2)]:
        remaining, parts = plan.epoch_order(counts, seed, epoch), []
        for i, seg in enumerate(chain):
            h = hashlib.sha256()
            for r in range(seg.ranks):
                for w in range(seg.workers):
                    p = plan.worker_plan(remaining, seg, i, seed, epoch, r, w, 6)
                    h.update(p.ids[plan.permuted_order(p)].tobytes())
                    h.update(p.sizes.tobytes())
                    h.update(str(p.first_batch).encode())
            parts.append(h.hexdigest())
            remaining = remaining[~plan.consumed_mask(remaining, seg, i, seed, epoch, 6)]
        parts.append(plan.remaining_ids(counts, seed, epoch, chain, 6).tolist())
        parts.append(plan.samples_consumed(counts, chain))
        got[f"{seed},{epoch}"] = parts
    digest = hashlib.sha256(json.dumps(got).encode()).hexdigest()
    assert digest == "d754c42cc2d3e1179963f0b116fb7c05c9b32cba07adb075258c0cfd832dff42"


# ----------------------------------------------------------------------------- the reader


def reader_config(url, **kw) -> ReaderConfig:
    base = dict(urls=[url], resolution=32, batch_size=3, num_workers=2, shuffle_window=5, seed=4)
    base.update(kw)
    return ReaderConfig(**base)


def shard_buckets(url: str) -> dict[str, str]:
    """Sample key -> its shard's bucket ("WxH")."""
    manifest = verify.load_manifest(url)
    return {schema.sample_key(schema.shard_index(s.name), i): s.bucket
            for s in manifest.shards for i in range(s.num_samples)}


def take_steps(readers: list[StreamingReader], steps: int) -> list[list[dict]]:
    """`steps` batches of every rank's reader: [step][rank]."""
    per_rank = [list(itertools.islice(iter(r), steps)) for r in readers]
    return [list(step) for step in zip(*per_rank)]


def check_steps(steps: list[list[dict]]) -> None:
    for batches in steps:
        assert len({b["bucket"] for b in batches}) == 1  # all ranks of a step: one bucket, one token count
        for b in batches:
            width, height = b["bucket"]
            assert b["image"].shape == (len(b["key"]), 3, height, width)
            assert b["epoch"] == 0


def test_reader_batches_are_one_bucket_per_step(bucketed):
    url, _ = bucketed
    of_key = shard_buckets(url)
    readers = [StreamingReader(reader_config(url), rank=r, world_size=2) for r in range(2)]
    assert readers[0].buckets == [(24, 40), (32, 32), (40, 24), (48, 16)]
    steps = take_steps(readers, readers[0].steps_left_in_epoch())
    check_steps(steps)
    keys = [k for batches in steps for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(of_key)  # the whole epoch, each sample once
    for batches in steps:  # 2 ranks: no bucket is too small to split, so every image is of its own bucket
        for b in batches:
            assert {of_key[k] for k in b["key"]} == {"{}x{}".format(*b["bucket"])}
    assert Counter(batches[0]["bucket"] for batches in steps) == Counter(
        {(32, 32): 3, (40, 24): 2, (24, 40): 2, (48, 16): 1})
    assert readers[0].state_dict()["epoch"] == 1
    assert readers[0].state_dict()["buckets"] == ["24x40", "32x32", "40x24", "48x16"]
    for r in readers:
        r.close()


@pytest.mark.parametrize("before,after", [((2, 2, 3), (1, 1, 4)), ((1, 2, 3), (3, 2, 2))])
def test_reader_resume_across_rank_worker_and_batch_changes(bucketed, before, after):
    """Kill after 3 steps on `before` = (ranks, workers, batch), resume on `after`: each sample of the
    epoch once, one bucket per step on all ranks (on 3 ranks the 2-sample bucket joins its nearest and
    its images come cropped to that bucket's size); the same shape resumes bit for bit."""
    url, _ = bucketed
    of_key = shard_buckets(url)
    ranks, workers, batch = before
    readers = [StreamingReader(reader_config(url, num_workers=workers, batch_size=batch), rank=r, world_size=ranks)
               for r in range(ranks)]
    first = take_steps(readers, 3)
    states = [json.loads(json.dumps(r.state_dict())) for r in readers]
    assert all(s == states[0] for s in states)
    expected = take_steps(readers[:1], 2)  # what rank 0 gives next, for the bit-exact check
    for r in readers:
        r.close()
    same = StreamingReader(reader_config(url, num_workers=workers, batch_size=batch), rank=0, world_size=ranks)
    same.load_state_dict(states[0])
    for want, got in zip(expected, take_steps([same], 2)):
        assert want[0]["key"] == got[0]["key"] and want[0]["bucket"] == got[0]["bucket"]
        assert (want[0]["image"] == got[0]["image"]).all()
    same.close()

    ranks, workers, batch = after
    resumed = [StreamingReader(reader_config(url, num_workers=workers, batch_size=batch), rank=r, world_size=ranks)
               for r in range(ranks)]
    for r in resumed:
        r.load_state_dict(states[0])
    rest = take_steps(resumed, resumed[0].steps_left_in_epoch())
    check_steps(first + rest)
    keys = [k for batches in first + rest for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(of_key)  # none lost, none repeated
    assert all(r.state_dict()["epoch"] == 1 for r in resumed)
    merged = [b for batches in rest for b in batches if any(of_key[k] == "48x16" for k in b["key"])]
    assert merged and all(b["bucket"] == ((40, 24) if ranks == 3 else (48, 16)) for b in merged)
    for r in resumed:
        r.close()


def test_reader_refuses_mismatched_resolution_and_state(bucketed, tmp_path):
    url, _ = bucketed
    with pytest.raises(ValueError, match="bucketed for resolution 32"):
        StreamingReader(reader_config(url, resolution=64))
    state = StreamingReader(reader_config(url)).state_dict()
    plain = str(tmp_path / "plain")
    assert cli.main(["shard", verify.load_manifest(url).options["source"], plain, "--resolution", "32",
                     "--format", "png", "--no-progress"]) == 0
    with pytest.raises(ValueError, match="buckets"):
        StreamingReader(reader_config(plain)).load_state_dict(state)
