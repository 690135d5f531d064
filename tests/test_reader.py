"""The streaming reader end to end: tiny schema-conforming datasets on local disk and on moto S3."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
import time
from collections import Counter

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from data_tools import plan, s3io, schema, tars
from data_tools.reader import ReaderConfig, StreamingReader, TooManyBadSamplesError
from data_tools.samples import RingReceiver, SharedBatchRing, to_unit_range
from data_tools.s3io import StorageReadError
from faultproxy import FaultProxy

SHARD_SIZES = (12, 9, 15, 10, 14)  # 60 samples


def _png(rng: np.random.Generator, size: int) -> bytes:
    pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_dataset(root, sizes=SHARD_SIZES, bad=None, seed=0) -> list[str]:
    """Shard tars + manifest.json under `root`; `bad` maps (shard, index) to a fault kind.
    Returns the keys of the good samples."""
    bad = bad or {}
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    shards, good = [], []
    for s, n in enumerate(sizes):
        path = os.path.join(root, schema.shard_name(s))
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(n):
                key, kind = schema.sample_key(s, i), bad.get((s, i))
                image = b"not an image" if kind == "image" else _png(rng, 16 + (i % 3) * 4)
                meta = b"{broken" if kind == "json" else json.dumps({"width": 16, "height": 16}).encode()
                _add(tf, f"{key}.png", image)
                if kind != "txt":
                    _add(tf, f"{key}.txt", f"caption of {key}".encode())
                _add(tf, f"{key}.json", meta)
                if kind in (None, "json"):  # the reader does not read the metadata (verify checks it)
                    good.append(key)
        data = open(path, "rb").read()
        shards.append(schema.ShardInfo(schema.shard_name(s), n, len(data), hashlib.sha256(data).hexdigest()))
    manifest = schema.Manifest(schema.SCHEMA_VERSION, shards)
    with open(os.path.join(root, schema.MANIFEST_NAME), "w") as f:
        f.write(manifest.to_json())
    return good


def upload(local: str, url: str) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    for name in sorted(os.listdir(local)):
        fs.put_file(os.path.join(local, name), url.removeprefix("s3://") + "/" + name)


def config(url, **kw) -> ReaderConfig:
    base = dict(urls=[url], resolution=16, batch_size=4, num_workers=2, shuffle_window=7, seed=1,
                retry_attempts=4, retry_base_delay=0.01, io_timeout=5.0, read_block_bytes=1 << 16)
    base.update(kw)
    return ReaderConfig(**base)


def take(reader: StreamingReader, n: int) -> list[dict]:
    return list(itertools.islice(iter(reader), n))


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["caption"] == y["caption"]
        assert torch.equal(x["image"], y["image"])


@pytest.fixture(scope="module")
def local_ds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ds") / "ds")
    return root, write_dataset(root)


def test_batches_are_images_captions_keys(local_ds):
    url, keys = local_ds
    reader = StreamingReader(config(url, resolution=12, num_workers=0))
    batch = take(reader, 1)[0]
    assert batch["image"].shape == (4, 3, 12, 12) and batch["image"].dtype == torch.uint8
    assert batch["caption"] == [f"caption of {k}" for k in batch["key"]]
    assert batch["epoch"] == 0 and batch["num_bad"] == 0
    unit = to_unit_range(batch["image"])
    assert unit.dtype == torch.float32 and unit.min() >= -1 and unit.max() <= 1
    assert torch.equal(unit[0, :, 0, 0], batch["image"][0, :, 0, 0].float() / 127.5 - 1)


def test_several_datasets_are_one_epoch(tmp_path, local_ds):
    url, keys = local_ds
    other_keys = write_dataset(str(tmp_path / "other"), sizes=(6, 5), seed=7)
    reader = StreamingReader(config(url, urls=[url, str(tmp_path / "other")]))
    assert reader.num_samples == len(keys) + len(other_keys)
    batches = take(reader, reader.steps_left_in_epoch())
    captions = [c for b in batches for c in b["caption"]]
    assert len(captions) == reader.num_samples
    assert Counter(captions) == Counter(f"caption of {k}" for k in keys + other_keys)


def test_missing_manifest_is_refused(tmp_path, local_ds):
    os.makedirs(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        StreamingReader(config(str(tmp_path / "half")))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        ReaderConfig(urls=["x"], batch_size=0)
    with pytest.raises(ValueError, match="urls"):
        ReaderConfig(urls="x")
    ReaderConfig()  # defaults are valid, so a trainer config can embed it
    with pytest.raises(ValueError, match="urls is empty"):
        StreamingReader(ReaderConfig())
    with pytest.raises(ValueError, match="max_bad_fraction"):
        ReaderConfig(urls=["x"], max_bad_fraction=2.0)


def test_ranks_and_workers_split_the_epoch_exactly(local_ds):
    url, keys = local_ds
    steps = plan.num_steps(len(keys), 2, 4)
    per_rank = []
    for rank in range(2):
        batches = take(StreamingReader(config(url), rank=rank, world_size=2), steps)
        assert all(b["epoch"] == 0 for b in batches)
        by_worker = [keys_of(batches[w::2]) for w in range(2)]  # batch t comes from worker t % 2
        assert not set(by_worker[0]) & set(by_worker[1])
        per_rank.append(keys_of(batches))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)


def test_resume_is_bit_identical(local_ds):
    """2 ranks x 2 worker processes: save after 3 batches, rebuild, load -> the same next batches."""
    url, _ = local_ds
    states = []
    for rank in range(2):
        reader = StreamingReader(config(url), rank=rank, world_size=2)
        it = iter(reader)
        list(itertools.islice(it, 3))
        states.append(reader.state_dict())
        expected = list(itertools.islice(it, 4))
        restored = StreamingReader(config(url), rank=rank, world_size=2)
        restored.load_state_dict(json.loads(json.dumps(states[-1])))
        assert restored.state_dict() == states[-1]
        assert_same_batches(take(restored, 4), expected)
    assert states[0] == states[1]  # global state: identical on every rank
    assert states[0]["samples_consumed"] == 3 * 2 * 4
    with pytest.raises(ValueError, match="shuffle_window"):
        StreamingReader(config(url, shuffle_window=8)).load_state_dict(states[0])
    with pytest.raises(ValueError, match="seed"):
        StreamingReader(config(url, seed=2)).load_state_dict(states[0])


def test_epoch_boundary_and_second_epoch_order(local_ds):
    url, keys = local_ds
    cfg = config(url, num_workers=0)
    steps = plan.num_steps(len(keys), 1, 4)
    reader = StreamingReader(cfg)
    it = iter(reader)
    first = list(itertools.islice(it, steps))
    assert reader.state_dict()["epoch"] == 1 and reader.state_dict()["samples_consumed"] == 0
    second = list(itertools.islice(it, steps))
    assert {b["epoch"] for b in first} == {0} and {b["epoch"] for b in second} == {1}
    assert sorted(keys_of(first)) == sorted(keys_of(second)) == sorted(keys)
    assert keys_of(first) != keys_of(second)


def test_workers_carry_on_across_epochs(local_ds):
    """One DataLoader serves every epoch. 60 samples in batches of 4 are 15 steps, odd, so the two
    workers swap planned roles at each epoch end; every batch must still equal what a reader restarted
    from the saved state gives, and batches held by the caller must survive the workers' reuse of
    their shared buffers (45 batches held)."""
    url, keys = local_ds
    reader = StreamingReader(config(url))
    steps = reader.steps_left_in_epoch()
    assert steps == 15
    it = iter(reader)
    held, states = [], []
    for batch in itertools.islice(it, 3 * steps):
        held.append(batch)
        states.append(json.loads(json.dumps(reader.state_dict())))
    reader.close()
    for e in range(3):
        epoch = held[e * steps : (e + 1) * steps]
        assert {b["epoch"] for b in epoch} == {e}
        assert sorted(keys_of(epoch)) == sorted(keys)
    # restarts: at an epoch end, and mid-epoch at an odd step (the resumed segment then runs on into
    # the next epochs with the roles rotated from there)
    for after in (steps - 1, 5):
        restored = StreamingReader(config(url))
        restored.load_state_dict(states[after])
        assert_same_batches(take(restored, 3 * steps - after - 1), held[after + 1 :])
        restored.close()


def test_ring_slots_are_reused_only_once_their_batch_is_released():
    """Batches reach the caller as views of a worker's shared slots. A slot is written again only after
    nothing in the main process references its batch; while the caller holds batches the worker adds
    slots instead, and a slot whose state does not match its batch raises instead of passing it on."""
    ring = SharedBatchRing(worker=0, max_shape=(2, 4, 4, 3))
    receiver = RingReceiver()

    def fill(*values):
        rows = ring.open_slot()
        for i, v in enumerate(values):
            rows[i] = v
        return ring.close_slot(len(values))

    first = receiver.take({"_ring": fill(1, 2), "key": ["a", "b"]})
    assert first["image"].shape == (2, 3, 4, 4) and first["image"][1].unique().tolist() == [2]
    view = first["image"][1:].float()[0, 0]  # a derived tensor is a copy; a view keeps the slot lent
    kept = first["image"][0].numpy()
    del first
    held = [receiver.take({"_ring": fill(v), "key": [str(v)]}) for v in (3, 4, 5)]
    assert ring.num_slots == 4  # slot 0 is still referenced through `kept`: never refilled
    assert kept.min() == kept.max() == 1 and view.unique().tolist() == [2.0]
    assert [int(b["image"].max()) for b in held] == [3, 4, 5]
    del kept, held
    receiver.release_unused()
    for v in range(6, 30):  # the caller now drops each batch before the next: no more slots
        batch = receiver.take({"_ring": fill(v), "key": [str(v)]})
        assert batch["image"].unique().tolist() == [v]
        del batch
    assert ring.num_slots == 4
    published = fill(7)
    SharedBatchRing.views(ring._slots[published["slot"]][0], (0,))[0].fill_(SharedBatchRing.WRITING)
    with pytest.raises(RuntimeError, match="torn"):
        receiver.take({"_ring": published, "key": ["x"]})


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_a_different_rank_count_sees_each_sample_once(local_ds, new_world):
    url, keys = local_ds
    seen, states = [], []
    for rank in range(2):
        reader = StreamingReader(config(url), rank=rank, world_size=2)
        seen += keys_of(take(reader, 3))
        states.append(reader.state_dict())
    assert states[0] == states[1]
    for rank in range(new_world):
        reader = StreamingReader(config(url, batch_size=3), rank=rank, world_size=new_world)
        reader.load_state_dict(states[0])
        steps = reader.steps_left_in_epoch()
        batches = take(reader, steps)
        assert {b["epoch"] for b in batches} == {0}
        seen += keys_of(batches)
        assert reader.state_dict()["epoch"] == 1
    assert sorted(seen) == sorted(keys)  # none lost, none repeated


def test_bad_samples_are_skipped_and_counted(tmp_path):
    bad = {(0, 3): "image", (2, 5): "txt", (4, 1): "json"}
    good = write_dataset(str(tmp_path / "ds"), bad=bad)
    reader = StreamingReader(config(str(tmp_path / "ds"), num_workers=0, max_bad_fraction=0.2))
    batches = take(reader, plan.num_steps(sum(SHARD_SIZES), 1, 4))
    assert sorted(keys_of(batches)) == sorted(good)
    assert batches[-1]["bad_samples"] == {"bad_image": 1, "missing_caption": 1}
    assert batches[-1]["num_bad"] == 2


def test_truncated_shard_counts_its_lost_samples(tmp_path):
    root = str(tmp_path / "ds")
    keys = write_dataset(root)
    path = os.path.join(root, schema.shard_name(2))
    with tarfile.open(path) as tf:
        cut = tf.getmembers()[-3].offset_data + 100  # inside the last sample's image
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # a shard cut mid-member, as by a failed copy; the manifest is unchanged
        f.write(data[:cut])
    reader = StreamingReader(config(root, num_workers=0, max_bad_fraction=0.5))
    batches = take(reader, plan.num_steps(len(keys), 1, 4))
    got = keys_of(batches)
    assert len(got) == len(set(got))
    assert set(got) >= {k for k in keys if not k.startswith("000002_")}
    assert set(keys) - set(got) == {schema.sample_key(2, SHARD_SIZES[2] - 1)}
    assert batches[-1]["bad_samples"] == {"missing_sample": 1}


def test_too_many_bad_samples_stop_the_run(tmp_path):
    bad = {(s, i): "image" for s, n in enumerate(SHARD_SIZES) for i in range(0, n, 4)}
    write_dataset(str(tmp_path / "ds"), bad=bad)
    cfg = config(str(tmp_path / "ds"), num_workers=0, max_bad_fraction=0.1, min_samples_for_bad_check=20)
    with pytest.raises(TooManyBadSamplesError, match="bad_image"):
        take(StreamingReader(cfg), 100)


def test_local_and_s3_give_the_same_batches(local_ds, s3_bucket):
    url, _ = local_ds
    upload(url, s3_bucket + "/ds")
    local = take(StreamingReader(config(url), rank=1, world_size=2), 5)
    remote = take(StreamingReader(config(s3_bucket + "/ds"), rank=1, world_size=2), 5)
    assert_same_batches(local, remote)


def test_s3_without_manifest_is_refused(s3_bucket):
    fsspec.filesystem("s3", skip_instance_cache=True).pipe_file(s3_bucket.removeprefix("s3://") + "/half/x", b"1")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        StreamingReader(config(s3_bucket + "/half"))


def test_transient_s3_faults_are_retried(local_ds, s3_bucket, s3_server, monkeypatch):
    url, keys = local_ds
    upload(url, s3_bucket + "/ds")
    cfg = config(s3_bucket + "/ds", io_timeout=0.5, retry_attempts=5)
    steps = plan.num_steps(len(keys), 1, 4)
    expected = take(StreamingReader(cfg), steps)
    schedule = ["reset", "pass", "503", "pass", "stall", "pass", "pass"]
    with FaultProxy(s3_server, schedule, stall_seconds=1.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        got = take(StreamingReader(cfg), steps)
    assert_same_batches(got, expected)
    assert proxy.counts["reset"] >= 1 and proxy.counts["503"] >= 1 and proxy.counts["stall"] >= 1


def test_exhausted_retries_give_a_clear_error(local_ds, s3_bucket, s3_server, monkeypatch):
    url, _ = local_ds
    upload(url, s3_bucket + "/ds")
    cfg = config(s3_bucket + "/ds", num_workers=0, retry_attempts=3)
    with FaultProxy(s3_server, ["503"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with pytest.raises(StorageReadError, match="after 3 attempts") as info:
            take(StreamingReader(cfg), 1)
    assert "testing-secret-value" not in str(info.value)
    # every shard gets at most 3 attempts (the next shard's first range is requested ahead, in the
    # background, and gives up on its own) and the failing one had all 3
    assert max(proxy.per_object.values()) == 3 and sum(proxy.per_object.values()) == proxy.counts["503"]


@pytest.mark.parametrize("cut", [None, 5000, 1030])
def test_mapped_and_ranged_shard_readers_agree(tmp_path, cut):
    """Local shards are memory-mapped, S3 ones read in ranges: the same bytes, the same samples, the same
    end of a truncated shard (`cut` bytes kept)."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(6):
            for ext, size in (("jpg", 700 * i + 5), ("txt", 9), ("json", 2)):
                _add(tf, f"{i:06d}_000000.{ext}", bytes([i]) * size)
    if cut is not None:
        path.write_bytes(path.read_bytes()[:cut])
    size = os.path.getsize(path) if cut is None else 1 << 20  # a manifest that promises more than is there
    fs = fsspec.filesystem("file")
    policy = s3io.RetryPolicy(1, 0, 0)

    def samples(reader):
        got = []
        with reader:
            try:
                for sample in tars.iter_shard(reader, {0, 2, 3, 5}, 5):
                    got.append(sample)
            except tars.TarFormatError as e:
                got.append(str(e))
        return got

    mapped = samples(s3io.open_shard(fs, str(path), size, policy, 1 << 10))
    ranged = samples(s3io.ChunkedReader(fs, str(path), size, policy, 1 << 10))
    assert isinstance(s3io.open_shard(fs, str(path), size, policy, 1 << 10), s3io.MappedReader)
    assert mapped == ranged
    assert [s[0] for s in mapped if isinstance(s, tuple)] == ([0, 2, 3, 5] if cut is None else [0] if cut == 5000 else [])


def test_tar_checksum_by_adler32_is_the_exact_byte_sum():
    rng = np.random.default_rng(0)
    blocks = [bytes(512), b"\xff" * 512, b"\xff" * 256 + bytes(256)] + [rng.bytes(512) for _ in range(200)]
    assert [tars._byte_sum(b) for b in blocks] == [sum(b) for b in blocks]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_parser_matches_tarfile(fmt):
    names = ["a/000000_000000.jpg", "d" * 60 + "/" + "k" * 90 + ".txt", "000000_000001.json"]
    if fmt == tarfile.USTAR_FORMAT:
        names[1] = "d" * 60 + "/" + "k" * 40 + ".txt"  # ustar splits long paths into prefix + name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i, name in enumerate(names):
            _add(tf, name, bytes([i]) * (700 * i + 3))
        directory = tarfile.TarInfo("a-dir")
        directory.type = tarfile.DIRTYPE
        tf.addfile(directory)  # not a regular file: not yielded
    buf.seek(0)

    class Stream(io.BytesIO):
        def skip(self, n):
            return len(self.read(n))

    got = list(tars.iter_tar(Stream(buf.getvalue()), want=lambda n: not n.endswith(".json")))
    assert [n for n, _ in got] == names
    assert got[0][1] == b"\0" * 3 and got[1][1] == b"\1" * 703 and got[2][1] is None
    with pytest.raises(tars.TarFormatError, match="checksum"):
        broken = bytearray(buf.getvalue())
        broken[10] ^= 0xFF
        list(tars.iter_tar(Stream(bytes(broken)), want=lambda n: True))


_HOLD_ITERATOR_AND_EXIT = """
import sys
from data_tools.reader import ReaderConfig, StreamingReader
reader = StreamingReader(ReaderConfig(urls=[sys.argv[1]], resolution=16, batch_size=4, num_workers=2, seed=1))
batches = iter(reader)  # still referenced when the interpreter exits
print(len(next(batches)["key"]), *(w.pid for w in reader._batches._workers), flush=True)
if sys.argv[2] == "raise":
    raise RuntimeError("the training loop failed")
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["return", "raise"])
def test_interpreter_exit_with_a_live_iterator_stops_the_workers(local_ds, how):
    """Workers ignore SIGTERM (the trainer owns stop signals), so multiprocessing's exit handler, which
    terminates and then joins them, would wait forever when a script ends (or dies of an uncaught
    exception) with a reader's iterator still referenced, unless the reader's own exit hook closes it."""
    import subprocess
    import sys

    url, _ = local_ds
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _HOLD_ITERATOR_AND_EXIT, url, how], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == (0 if how == "return" else 1), proc.stderr[-2000:]
    count, *pids = (int(v) for v in proc.stdout.split())
    assert count == 4 and len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_running(p) for p in pids), f"workers {pids} outlived their interpreter"
