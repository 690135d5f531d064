"""`hart-data shard`: image-caption source -> webdataset shards + manifest on any fsspec URL.

Pipeline (img2dataset's reader -> per-shard worker -> writer, with a per-shard done marker):

    parent:  source items in order -> read bytes -> sha256 -> drop duplicates / zero-byte /
             missing-caption / unreadable (counted) -> chunks of `samples_per_shard` = shard plans
    worker:  one plan -> decode, orient, RGB, filter, resize, encode each image (bad ones counted)
             -> shard-NNNNNN.tar (atomic) -> shard-NNNNNN.stats.json (atomic, the done marker)
    parent:  all plans done -> manifest.json (atomic, written last)

Design decisions:

- Dedup runs in the parent, in source order, so the first occurrence wins and a rerun makes the
  same plans; that determinism is what makes `--resume` correct: a plan whose stats file exists and
  whose tar has the recorded size is skipped, the rest are redone.
- Tars are written by webdataset's `TarWriter` (`open_shard_tar`, also used by `hart-data encode`)
  into `storage.atomic_open`, which keeps the atomicity, fsync and S3 upload semantics the library
  does not have. They are byte-reproducible (fixed mtime/mode/owner in every member header), so a
  resumed run gives the same shard checksums as an uninterrupted one.
- A resumed run re-reads and re-hashes the whole source (the plans depend on dedup), but skips the
  decode/encode/upload of done shards, which is where the time goes.
- A shard whose items were all filtered out gets a stats file but no tar, and no manifest entry.
- Workers are processes from a 'spawn' context (safe next to s3fs's threads); the parent keeps at
  most 2 plans per worker in flight so memory stays bounded by shard size, not dataset size.
  `workers=1` runs the worker function in-process.
- Options that change the output are recorded in every stats file and in the manifest; resuming
  with different options is an error rather than a silently mixed dataset.
- `--buckets` (aspect-ratio buckets, `data_tools.buckets`): every shard holds one bucket's samples, so
  a reader plans batches per bucket from the manifest alone. The parent picks each item's bucket from
  its header (`images.source_size`, no pixel decode; an unreadable header goes to the bucket nearest
  square and the worker skips the item with its usual reason) and keeps one open chunk per bucket,
  cut into a plan when it reaches `samples_per_shard`; the partial chunks are flushed at the end in
  bucket order. Shard numbers follow that emission order, which is a pure function of the source
  order, so `--resume` and byte-reproducibility hold as without buckets. The parent holds up to one
  chunk of source bytes per bucket (plus the plans in flight). Without `--buckets` nothing changes:
  no bucket key is written anywhere and the bytes are those of before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import sys
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import webdataset as wds
from tqdm import tqdm

from data_tools import buckets as bucketing
from data_tools import images, schema, sources, storage

_MTIME = 0  # fixed member mtime: identical input gives identical tar bytes
_MAX_LISTED_SKIPS = 10_000  # manifest lists at most this many parent-side skipped items


@dataclass
class PlanItem:
    source: str
    caption: str
    sha256: str
    data: bytes


@dataclass
class ShardPlan:
    index: int
    items: list[PlanItem]
    bucket: bucketing.Bucket | None = None  # every item is resized to it (a bucketed dataset)


@dataclass
class ShardJob:
    out: str
    plan: ShardPlan
    image_opts: images.ImageOptions
    options: dict


def shard_dataset(
    source: str,
    out: str,
    *,
    resolution: int | None = None,
    resize: str = "center-crop",
    fmt: str = "jpg",
    quality: int = 95,
    samples_per_shard: int = 1000,
    workers: int = 1,
    min_size: int = 0,
    max_aspect: float | None = None,
    resume: bool = False,
    overwrite: bool = False,
    limit: int | None = None,
    path_column: str = "path",
    caption_column: str = "caption",
    progress: bool = True,
    max_pixels: int = images.DEFAULT_MAX_PIXELS,
    buckets: str | None = None,
) -> schema.Manifest:
    """Shard `source` (see data_tools.sources) into `out`; returns the manifest written last.
    `buckets`: "default" or "W:H,W:H,..." pixel sizes (see data_tools.buckets), or None for square."""
    bucket_set = bucketing.parse_buckets(buckets, resolution) if buckets is not None else None
    image_opts = images.ImageOptions(resolution, resize, fmt, quality, min_size, max_aspect, max_pixels, bucket_set)
    image_opts.validate()
    if samples_per_shard < 1 or workers < 1 or (limit is not None and limit < 0):
        raise ValueError("--samples-per-shard and --workers must be >= 1 and --limit >= 0")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    options = {
        "source": storage.redact(source), "resolution": resolution, "resize": resize, "format": fmt,
        "quality": quality, "samples_per_shard": samples_per_shard, "min_size": min_size,
        "max_aspect": max_aspect, "max_pixels": max_pixels, "limit": limit,
        "path_column": path_column, "caption_column": caption_column,
    }  # fmt: skip
    if bucket_set is not None:  # only then: an unbucketed job's options (and resume checks) are as before
        options["buckets"] = [b.name for b in bucket_set]
    # the source is checked (eagerly, by iter_items) before the output is touched
    items = sources.iter_items(source, path_column=path_column, caption_column=caption_column, limit=limit)
    prepare_output(out, resume=resume, overwrite=overwrite)
    parent_skips = SkipLog()
    with tqdm(total=limit, unit="img", desc="shard", disable=not progress, file=sys.stderr) as bar:
        chooser = BucketChooser(bucket_set, max_pixels) if bucket_set is not None else None
        plans = plan_shards(_counted(items, bar), samples_per_shard, parent_skips, chooser)
        jobs = (ShardJob(out, plan, image_opts, options) for plan in plans)
        shard_stats = _run_jobs(jobs, workers, resume, bar)
    manifest = _build_manifest(shard_stats, options, parent_skips)
    storage.atomic_write_text(storage.join(out, schema.MANIFEST_NAME), manifest.to_json())
    return manifest


def _counted(items: Iterable[sources.SourceItem], bar: tqdm) -> Iterator[sources.SourceItem]:
    for item in items:
        bar.update(1)
        yield item


class SkipLog:
    """Skip reasons counted, plus the skipped items listed (up to a cap)."""

    def __init__(self, cap: int = _MAX_LISTED_SKIPS):
        self.counts: Counter[str] = Counter()
        self.items: list[dict] = []
        self.cap = cap

    def add(self, source: str, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.items) < self.cap:
            self.items.append({"source": source, "reason": reason, "detail": detail})


class BucketChooser:
    """The bucket of a source item, from its header (see the module docstring)."""

    def __init__(self, bucket_set: tuple[bucketing.Bucket, ...], max_pixels: int):
        self.bucket_set, self.max_pixels = bucket_set, max_pixels
        self.fallback = bucketing.nearest_bucket(1, 1, bucket_set)

    def __call__(self, data: bytes) -> bucketing.Bucket:
        size = images.source_size(data, self.max_pixels)
        return self.fallback if size is None or min(size) < 1 else bucketing.nearest_bucket(*size, self.bucket_set)


def plan_shards(items: Iterable[sources.SourceItem], samples_per_shard: int, skips: SkipLog,
                choose_bucket: BucketChooser | None = None) -> Iterator[ShardPlan]:
    """Drop unreadable/zero-byte/missing-caption/duplicate items (first occurrence wins) and cut the
    survivors, in source order, into plans of `samples_per_shard` items; with `choose_bucket`, each
    bucket's items separately (one open chunk per bucket, the partial ones flushed in bucket order)."""
    chunks: dict = {b: [] for b in choose_bucket.bucket_set} if choose_bucket is not None else {None: []}
    index = 0
    for item in _planned_items(items, skips):
        bucket = choose_bucket(item.data) if choose_bucket is not None else None
        chunks[bucket].append(item)
        if len(chunks[bucket]) == samples_per_shard:
            yield ShardPlan(index, chunks[bucket], bucket)
            index, chunks[bucket] = index + 1, []
    for bucket, chunk in chunks.items():
        if chunk:
            yield ShardPlan(index, chunk, bucket)
            index += 1


def _planned_items(items: Iterable[sources.SourceItem], skips: SkipLog) -> Iterator[PlanItem]:
    """The items worth a worker's time, in source order; the rest are counted in `skips`."""
    seen: set[bytes] = set()
    for item in items:
        if item.skip is not None:
            skips.add(item.source, item.skip, item.detail)
            continue
        if not item.data:
            skips.add(item.source, "zero_bytes")
            continue
        if item.caption is None:
            skips.add(item.source, "missing_caption")
            continue
        digest = hashlib.sha256(item.data).digest()
        if digest in seen:
            skips.add(item.source, "duplicate", digest.hex())
            continue
        seen.add(digest)
        yield PlanItem(item.source, item.caption, digest.hex(), item.data)


def prepare_output(out: str, *, resume: bool, overwrite: bool) -> None:
    """Fail early on an unusable output; refuse to mix with an existing dataset unless told how."""
    check_writable(out)
    existing = existing_dataset_files(out)
    if not existing or resume:
        return
    if not overwrite:
        raise ValueError(
            f"{out} already holds a dataset ({len(existing)} manifest/shard files); "
            "pass --resume to complete it or --overwrite to replace it"
        )
    # the manifest goes first, so an interrupted overwrite never looks complete
    manifest = storage.join(out, schema.MANIFEST_NAME)
    storage.remove(manifest)
    for url in existing:
        if url != manifest:
            storage.remove(url)


def check_writable(out: str) -> None:
    """Create a local OUT; for S3 check that the endpoint answers and the bucket exists; for any remote
    store, that it accepts a write. All before a worker starts or a source byte is read."""
    if storage.is_local(out):
        try:
            storage.makedirs(out)
        except OSError as e:
            raise ValueError(f"cannot create output directory {out}: {e}") from None
        return
    fs, path = storage.get_fs(out)
    bucket = path.split("/", 1)[0]
    if hasattr(fs, "call_s3"):
        # not fs.exists(): it retries for ~20 s and then reports an unreachable endpoint as "missing"
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise ValueError(f"output bucket {bucket!r} of {out} does not exist (create it first)") from None
        except Exception as e:  # connection and permission errors come in many types
            raise ValueError(f"cannot reach {out}: {type(e).__name__}: {storage.redact(str(e))}") from None
    probe = storage.join(out, ".hart-data-write-probe")
    try:
        storage.atomic_write_bytes(probe, b"")
        storage.remove(probe)
    except Exception as e:
        raise ValueError(f"cannot write to {out}: {type(e).__name__}: {storage.redact(str(e))}") from None


def existing_dataset_files(out: str) -> list[str]:
    """URLs of the manifest, shard tars and shard stats files under OUT."""
    fs, path = storage.get_fs(out)
    fs.invalidate_cache(path)  # s3fs caches listings; another process may have written since
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return [
        storage.join(out, n)
        for n in sorted(names)
        if n == schema.MANIFEST_NAME or (n.startswith("shard-") and (n.endswith(".tar") or n.endswith(".stats.json")))
    ]


def _run_jobs(jobs: Iterable[ShardJob], workers: int, resume: bool, bar: tqdm) -> list[dict]:
    """Run every job not already done; at most 2 per worker in flight. Returns all shards' stats."""
    results: list[dict] = []
    todo = _skip_done(jobs, resume, results)
    if workers == 1:
        for job in todo:
            results.append(_report(write_shard(job), bar))
        return results
    in_flight: deque[Future] = deque()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        try:
            for job in todo:
                in_flight.append(pool.submit(write_shard, job))
                while len(in_flight) >= 2 * workers:
                    results.append(_report(in_flight.popleft().result(), bar))
            while in_flight:
                results.append(_report(in_flight.popleft().result(), bar))
        except BaseException:
            for fut in in_flight:
                fut.cancel()
            raise
    return results


def _report(stats: dict, bar: tqdm) -> dict:
    bar.set_postfix(shards=stats["index"] + 1, kept=stats["num_samples"], skipped=stats["num_skipped"], refresh=False)
    return stats


def _skip_done(jobs: Iterable[ShardJob], resume: bool, results: list[dict]) -> Iterator[ShardJob]:
    """Yield the jobs still to do; with `resume`, done shards' stats go straight to `results`."""
    for job in jobs:
        stats = load_done_stats(job.out, job.plan.index, job.options) if resume else None
        if stats is not None and stats.get("bucket") != _bucket_name(job.plan.bucket):
            stats = None  # cannot happen with equal options (plans are a pure function of the source)
        if stats is None:
            yield job
        else:
            results.append(stats)


def load_done_stats(out: str, index: int, options: dict) -> dict | None:
    """The stats of shard `index` if it is complete: stats file present and tar of the recorded size."""
    stats_url = storage.join(out, schema.shard_stats_name(index))
    if not storage.exists(stats_url):
        return None
    stats = json.loads(storage.read_text(stats_url))
    if stats.get("options") != options:
        raise ValueError(
            f"cannot resume: {stats_url} was written with different options "
            f"({stats.get('options')} vs {options}); use --overwrite to start again"
        )
    if stats["num_samples"] == 0:
        return stats
    tar_url = storage.join(out, schema.shard_name(index))
    if storage.exists(tar_url) and storage.size(tar_url) == stats["bytes"]:
        return stats
    return None


def write_shard(job: ShardJob) -> dict:
    """Worker: process one plan's images, write the tar (if any survive) and then its stats file."""
    index = job.plan.index
    skips = SkipLog()
    samples: list[dict] = []
    bucket = job.plan.bucket
    for item in job.plan.items:
        try:
            img = images.process_image(item.data, job.image_opts, bucket)
        except images.SkipImage as e:
            skips.add(item.source, e.reason, e.detail)
            continue
        meta = {"width": img.width, "height": img.height, "orig_width": img.orig_width,
                "orig_height": img.orig_height, "source": item.source, "sha256": item.sha256}  # fmt: skip
        if bucket is not None:
            meta[schema.BUCKET_FIELD] = bucket.name
        samples.append({
            "__key__": schema.sample_key(index, len(samples)), job.image_opts.fmt: img.data,
            schema.CAPTION_EXT: item.caption.encode("utf-8"),
            schema.META_EXT: json.dumps(meta, sort_keys=True).encode("utf-8"),
        })  # fmt: skip
    tar_bytes, digest = 0, ""
    if samples:
        with open_shard_tar(storage.join(job.out, schema.shard_name(index))) as (tar, sink):
            for sample in samples:
                tar.write(sample)
        tar_bytes, digest = sink.count, sink.hash.hexdigest()
    stats = {
        "index": index, "name": schema.shard_name(index), "num_items": len(job.plan.items),
        "num_samples": len(samples), "num_skipped": len(job.plan.items) - len(samples),
        "skipped": dict(skips.counts), "skipped_items": skips.items, "bytes": tar_bytes, "sha256": digest,
        "options": job.options,
    }  # fmt: skip
    if bucket is not None:
        stats[schema.BUCKET_FIELD] = bucket.name
    storage.atomic_write_text(storage.join(job.out, schema.shard_stats_name(index)), json.dumps(stats, indent=1))
    return stats


@contextlib.contextmanager
def open_shard_tar(url: str) -> Iterator[tuple[wds.TarWriter, storage.HashingWriter]]:
    """(webdataset's `TarWriter`, the sink it writes through) for the shard tar `url`: pass each
    sample to `write` as {"__key__": key, ext: bytes, ...}. The tar appears whole or not at all
    (`storage.atomic_open`); after the block, the sink holds its byte count and sha256.

    Every header field that would otherwise vary is fixed (mtime 0, mode 0644, owner hart; uid and gid
    stay 0), the writer puts a sample's members in extension order and stores the bytes as given
    (`encoder=False`): the same samples give the same tar bytes."""
    with storage.atomic_open(url) as f:
        sink = storage.HashingWriter(f)
        with wds.TarWriter(sink, encoder=False, mtime=_MTIME, mode=0o644, user="hart", group="hart") as tar:
            yield tar, sink


def _bucket_name(bucket: bucketing.Bucket | None) -> str | None:
    return None if bucket is None else bucket.name


def _build_manifest(shard_stats: list[dict], options: dict, parent_skips: SkipLog) -> schema.Manifest:
    shard_stats = sorted(shard_stats, key=lambda s: s["index"])
    shards = [
        schema.ShardInfo(s["name"], s["num_samples"], s["bytes"], s["sha256"], s.get(schema.BUCKET_FIELD))
        for s in shard_stats if s["num_samples"]
    ]
    skipped = Counter(parent_skips.counts)
    for s in shard_stats:
        skipped.update(s["skipped"])
    num_samples = sum(s.num_samples for s in shards)
    stats = {
        "num_samples": num_samples,
        "num_skipped": sum(skipped.values()),
        "num_source_items": num_samples + sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "skipped_before_decode": parent_skips.items,  # per-shard stats files list the decode-time ones
        "num_shards": len(shards),
        "num_empty_shards": len(shard_stats) - len(shards),
        "num_bytes": sum(s.bytes for s in shards),
    }
    if "buckets" in options:
        per_bucket = Counter({name: 0 for name in options["buckets"]})
        for s in shards:
            per_bucket[s.bucket] += s.num_samples
        stats["buckets"] = dict(per_bucket)
    return schema.Manifest(schema.SCHEMA_VERSION, shards, options, stats)
