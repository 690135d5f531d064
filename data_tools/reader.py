"""The streaming reader used by every training stage.

Pipeline: manifests -> shard list -> seeded shard shuffle -> split by rank -> split by worker ->
tar -> samples -> window shuffle -> decode, resize, center crop -> batches. The order is planned on
sample *positions* by ``data_tools.plan`` (read its docstring), from the manifests' sample counts
alone, so the resume state is tiny and global: ``{seed, epoch, samples_consumed, segments}``.

Design decisions:
- Ranks and workers are split by the plan, not by webdataset's splitters (its default node splitter
  raises with WORLD_SIZE > 1, and it has no s3:// handler). Tars are parsed by ``tars.iter_shard``
  over ``s3io.open_shard`` (local files memory-mapped, S3 objects read in retrying ranged reads).
- Rank and world size are constructor arguments (the trainer passes torch.distributed's); the
  reader never reads them from the environment. S3 endpoint and credentials come only from the
  environment / AWS config, never from ``ReaderConfig``.
- Workers yield whole batches; the DataLoader runs with ``batch_size=None`` and its in-order
  round-robin, so the DataLoader's g-th batch is loader worker ``g % K``'s, deterministically. One
  DataLoader serves every epoch: its workers start once and walk epoch after epoch, each playing the
  planned worker whose steps its round-robin turns land on (``worker_plans``).
  ``num_workers=0`` runs the single worker in the main process (same plan as one worker).
- Images come out as **uint8** ``(B, 3, H, W)`` tensors (4x less inter-process traffic than float)
  in channels_last memory layout (decoders produce HWC; no transpose copy); ``samples.to_unit_range`` maps
  them to float in [-1, 1] (call ``.contiguous()`` if a consumer needs NCHW-contiguous memory).
  A worker writes its batches into a few shared-memory slots that the main process hands on in place
  and gives back once nothing references them (``samples.SharedBatchRing``, ``samples.RingReceiver``):
  a fresh shared buffer per batch cost a third of the decode time in page faults, a copy in the main
  process ~30 us per 256² image. The images of a batch live in that shared memory: ``.clone()`` them
  before sending them to another process (the slot is reused once this process lets go of it).
- A worker parses its tars in its own thread, inline with decoding; only S3 transfers run in the
  background: `s3io.ChunkedReader` fetches a shard's next range while the current one is parsed, and
  the next shard of the plan is opened (its first range requested) when the current one starts, so
  S3 latency overlaps decoding. (A thread that parsed whole windows ahead cost ~3% more worker CPU
  in GIL hand-overs and wake-ups than parsing inline, and local shards, memory-mapped, have no
  latency to hide.) Raw bytes in memory per worker: one shuffle window's samples and up to three ranges (of
  each bucket group, in a bucketed dataset: its groups are read interleaved).
- A bad sample (undecodable image, missing image or caption, unreadable caption, or missing from its
  shard) still occupies its position: it counts as consumed and is skipped, so a batch can
  come out smaller. Each worker stops the run once its bad fraction exceeds ``max_bad_fraction``
  (judged after ``min_samples_for_bad_check`` samples).
- ``kind="tokens"`` reads `hart-data encode` output with the same plan, resume state, sharding and
  retries; only the per-sample decoder (``token_format.read_token_sample``) and the collation differ
  (``samples.decode_token_sample``, ``samples.collate_tokens``). A dataset of the other kind (manifest
  ``options.format``) is refused when the reader is built. Token batches are stacked with
  ``torch.stack``: they are small (no image), so the DataLoader's copy into shared memory is cheap.
- A bucketed dataset (`hart-data shard --buckets`; data_tools.plan, "Buckets") gives batches of one
  bucket each, the same bucket on every rank at each step, with images (B, 3, H_b, W_b) and
  ``batch["bucket"] = (W_b, H_b)`` (pixels, width first). Its manifest must be for
  ``ReaderConfig.resolution`` (its ``options.resolution``). Datasets can be mixed: the shards of an
  unbucketed one are then the square bucket (resolution, resolution). Image batches of an unbucketed
  read say ``bucket = (resolution, resolution)``; token batches carry no bucket (tokens are square).
  A bucketed read's state also lists the buckets (``buckets``), checked on load.
- Iterating the reader is infinite across epochs; each batch says its ``epoch``. ``state_dict()``
  counts the batches handed to the caller, never prefetched ones, and must be called between batches;
  ``load_state_dict()`` and a new ``iter()`` restart the workers from the reader's state.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import multiprocessing.util  # noqa: F401 - its exit handler must be registered before ours (see below)
import os
import signal
import weakref
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools import buckets as bucketing
from data_tools import plan as planning
from data_tools import s3io, schema, storage, tars, token_format
from data_tools.samples import (ImageBatch, RingReceiver, SharedBatchRing, TokenBatch, decode_sample,
                                decode_token_sample)

KINDS = ("images", "tokens")


class TooManyBadSamplesError(RuntimeError):
    """The fraction of bad samples exceeded ``ReaderConfig.max_bad_fraction``."""


@dataclass
class ReaderConfig:
    """Reader settings; plain types so the trainer's typed config can embed it."""

    urls: list[str] = field(default_factory=list)  # dataset directories, concatenated in this order
    resolution: int = 256  # output images are resolution x resolution
    batch_size: int = 8  # micro-batch per rank
    num_workers: int = 2  # DataLoader worker processes per rank (0: read in the main process)
    shuffle_window: int = 1000  # samples per window shuffle (up to two windows of raw bytes in memory)
    seed: int = 0
    max_bad_fraction: float = 0.01
    min_samples_for_bad_check: int = 50
    retry_attempts: int = 6
    retry_base_delay: float = 0.5
    retry_max_delay: float = 20.0
    io_timeout: float = 60.0  # S3 connect/read timeout in seconds: a stalled connection becomes an error
    # bytes per ranged S3 read (one read ahead; local shards are memory-mapped). Two per worker are in memory.
    # Fewer, larger ranges spend less CPU per byte on both ends (request signing and parsing; moto's server
    # even reads the whole object per range): 16 MiB vs 8 MiB halved the bench's server CPU.
    read_block_bytes: int = 16 << 20
    prefetch_factor: int = 2  # batches prefetched per worker
    kind: str = "images"  # "images": image shards; "tokens": `hart-data encode` token shards (resolution unused)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ReaderConfig.kind must be one of {KINDS}, got {self.kind!r}")
        # An empty list is a valid default (a config file fills it in); StreamingReader refuses it.
        if not isinstance(self.urls, list) or not all(isinstance(u, str) and u for u in self.urls):
            raise ValueError(f"ReaderConfig.urls must be a list of dataset URLs, got {self.urls!r}")
        positive = ("resolution", "batch_size", "shuffle_window", "retry_attempts", "read_block_bytes",
                    "prefetch_factor", "io_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"ReaderConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("num_workers", "seed", "min_samples_for_bad_check", "retry_base_delay", "retry_max_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"ReaderConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"ReaderConfig.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction!r}")

    def retry_policy(self) -> s3io.RetryPolicy:
        return s3io.RetryPolicy(self.retry_attempts, self.retry_base_delay, self.retry_max_delay)


@dataclass(frozen=True)
class ShardRef:
    url: str
    num_samples: int
    num_bytes: int
    bucket: bucketing.Bucket | None = None  # the size of all its images, in a bucketed dataset


def load_shards(urls: list[str], policy: s3io.RetryPolicy, io_timeout: float, kind: str = "images",
                resolution: int | None = None) -> list[ShardRef]:
    """The shards of all datasets in `urls`, in order; a dataset without a manifest, or of another
    `kind` than asked for (manifest options.format), or bucketed for another `resolution` than
    given, is refused."""
    if not urls:
        raise ValueError("ReaderConfig.urls is empty: name at least one dataset directory")
    shards = []
    for url in urls:
        manifest_url = storage.join(url, schema.MANIFEST_NAME)
        fs, path = s3io.read_filesystem(manifest_url, io_timeout)
        if not s3io.call_with_retries(lambda: fs.exists(path), manifest_url, policy):
            raise FileNotFoundError(
                f"{storage.redact(url)}: no {schema.MANIFEST_NAME}; not a complete hart-data dataset "
                "(the shard writer writes the manifest last; run `hart-data shard` to completion)"
            )
        text = s3io.read_object(fs, path, policy).decode("utf-8")
        manifest = schema.Manifest.from_json(text, where=storage.redact(manifest_url))
        _check_kind(manifest.options, kind, url)
        if manifest.buckets is not None and resolution is not None and manifest.options.get("resolution") != resolution:
            raise ValueError(f"{storage.redact(url)} is bucketed for resolution {manifest.options.get('resolution')} "
                             f"({', '.join(manifest.buckets)}) but ReaderConfig.resolution is {resolution}")
        shards += [ShardRef(storage.join(url, s.name), s.num_samples, s.bytes,
                            None if s.bucket is None else bucketing.Bucket.parse(s.bucket)) for s in manifest.shards]
    if sum(s.num_samples for s in shards) == 0:
        raise ValueError(f"datasets {[storage.redact(u) for u in urls]} hold no samples")
    return shards


def bucket_plan(shards: list[ShardRef], counts: np.ndarray,
                resolution: int) -> tuple[planning.Buckets | None, list[tuple[int, int]]]:
    """The plan's view of the shards' buckets (None when no dataset is bucketed) and the (width, height)
    of each bucket index; the shards of an unbucketed dataset mixed in are the square bucket."""
    square = bucketing.Bucket(resolution, resolution)
    if all(s.bucket is None for s in shards):
        return None, [(square.width, square.height)]
    of = [s.bucket or square for s in shards]
    ordered = bucketing.ordered(set(of))
    index = {b: i for i, b in enumerate(ordered)}
    nearest = [bucketing.by_distance(b, ordered) for b in ordered]
    return planning.Buckets.from_shards(counts, [index[b] for b in of], nearest), [(b.width, b.height) for b in ordered]


def _check_kind(options: dict, kind: str, url: str) -> None:
    found = "tokens" if token_format.is_token_dataset(options) else "images"
    if found != kind:
        raise ValueError(f"{storage.redact(url)} holds {found} (manifest options.format {options.get('format')!r}) "
                         f"but ReaderConfig.kind is {kind!r}; set kind: {found} or name a dataset of {kind}")


class ShardSource:
    """Raw samples by global id, reading each needed shard front to back at most once."""

    def __init__(self, shards: list[ShardRef], config: ReaderConfig):
        self._shards = shards
        self._offsets = planning.shard_offsets(np.array([s.num_samples for s in shards], dtype=np.int64))
        self._config = config
        self._policy = config.retry_policy()
        self._filesystems: dict = {}  # one client per protocol per process: creating one costs ~0.1 s
        # the members a sample of this kind is made of (others are skipped unread)
        self._exts = frozenset(token_format.MEMBERS) if config.kind == "tokens" else tars.IMAGE_SAMPLE_EXTS

    def _open(self, url: str):
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol not in self._filesystems:
            self._filesystems[protocol] = s3io.read_filesystem(url, self._config.io_timeout)[0]
        fs = self._filesystems[protocol]
        return fs, fs._strip_protocol(url)

    def samples(self, ids: np.ndarray) -> Iterator[tuple[int, str | None, dict | None]]:
        """(id, key, members) for `ids` (in plan order: grouped by shard, ascending inside one);
        key and members are None for a sample missing from its shard. Each shard is opened one run
        ahead, so an S3 shard's first range is in flight while the previous shard is decoded."""
        if len(ids) == 0:
            return
        shard_of = np.searchsorted(self._offsets, ids, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        runs = [(int(shard_of[run[0]]), ids[run]) for run in np.split(np.arange(len(ids)), cuts)]
        ahead = self._open_shard(runs[0][0])
        try:
            for k, (shard, run_ids) in enumerate(runs):
                reader, ahead = ahead, self._open_shard(runs[k + 1][0]) if k + 1 < len(runs) else None
                with reader:
                    yield from self._read_run(reader, run_ids.tolist(), (run_ids - self._offsets[shard]).tolist())
        finally:
            if ahead is not None:
                ahead.close()

    def _open_shard(self, shard: int):
        ref = self._shards[shard]
        fs, path = self._open(ref.url)
        return s3io.open_shard(fs, path, ref.num_bytes, self._policy, self._config.read_block_bytes)

    def _read_run(self, reader, run_ids: list[int], indices: list[int]):
        stream = tars.iter_shard(reader, set(indices), max(indices), self._exts)
        for sample_id, index in zip(run_ids, indices):
            try:
                got = next(stream, None)
            except tars.TarFormatError:  # a truncated or corrupt tar: the rest of it is missing
                got = None
            if got is None:
                yield sample_id, None, None
            else:
                assert got[0] == index, (got[0], index)
                yield sample_id, got[1], got[2]


@dataclass
class BadCounter:
    """Per-worker bad-sample bookkeeping and the stop rule."""

    max_fraction: float
    min_seen: int
    dataset: str
    seen: int = 0
    bad: Counter = field(default_factory=Counter)

    def record(self, reason: str | None) -> None:
        self.seen += 1
        if reason is None:
            return
        self.bad[reason] += 1
        total = sum(self.bad.values())
        if self.seen >= self.min_seen and total > self.max_fraction * self.seen:
            raise TooManyBadSamplesError(
                f"{total} of {self.seen} samples read by one worker were bad ({dict(self.bad)}), more than "
                f"max_bad_fraction={self.max_fraction} of datasets {self.dataset}; fix or re-shard the data"
            )


def plan_windows(plan: planning.WorkerPlan, source: ShardSource) -> Iterator[tuple[np.ndarray, dict]]:
    """(ids in emission order, their raw samples by id) per shuffle window of the plan's not yet
    consumed samples."""
    window = plan.window
    consumed = int(plan.sizes[: plan.first_batch].sum())
    keep = np.ones(len(plan.ids), dtype=bool)
    keep[planning.emitted(plan, consumed)] = False
    stream = source.samples(plan.ids[keep])
    first_window = consumed // window
    for j in range(first_window, -(-len(plan.ids) // window)):
        order = planning.window_perm(plan, j) + j * window
        if j == first_window:
            order = order[consumed % window :]
        held = {sample_id: (key, members) for sample_id, key, members in itertools.islice(stream, len(order))}
        assert len(held) == len(order), (len(held), len(order))
        yield plan.ids[order], held


def plan_samples(plan: planning.WorkerPlan, source: ShardSource) -> Iterator[tuple]:
    """The plan's raw (key, members) samples still to come, in window-shuffled order."""
    for ids, held in plan_windows(plan, source):
        for sample_id in ids.tolist():
            yield held.pop(sample_id)


def worker_batches(plans: Iterator[tuple[int, list[planning.WorkerPlan]]], source: ShardSource, config: ReaderConfig,
                   sizes: list[tuple[int, int]], ring: SharedBatchRing | None = None) -> Iterator[dict]:
    """The batches of one worker's plans (per epoch, one per bucket group), in global-step order, each
    group's samples read from its own shard stream; bad samples judged per epoch. `sizes`: (width,
    height) per bucket index; an unbucketed plan (bucket -1) is square at the resolution."""
    tokens = config.kind == "tokens"
    for epoch, group_plans in plans:
        counter = BadCounter(config.max_bad_fraction, config.min_samples_for_bad_check,
                             str([storage.redact(u) for u in config.urls]))
        streams = [plan_samples(p, source) for p in group_plans]
        for k, size in planning.batch_order(group_plans):
            bucket = group_plans[k].bucket
            width, height = sizes[bucket] if bucket >= 0 else (config.resolution, config.resolution)
            batch = TokenBatch() if tokens else ImageBatch(size, width, height, ring)
            bad_here: dict[str, int] = {}
            for _ in range(size):
                raw = next(streams[k])
                reason, good = decode_token_sample(*raw) if tokens else decode_sample(*raw, width, height)
                counter.record(reason)
                if good:
                    batch.add(good)
                else:
                    bad_here[reason] = bad_here.get(reason, 0) + 1
            if not len(batch):
                raise TooManyBadSamplesError(
                    f"a whole batch of {size} samples was bad ({bad_here}) in datasets "
                    f"{counter.dataset}; fix or re-shard the data"
                )
            yield {**batch.finish(), **({} if tokens else {"bucket": (width, height)}), "epoch": epoch,
                   "_bad_delta": bad_here}


class RankDataset(IterableDataset):
    """One rank's batches from the reader's position on, epoch after epoch, in DataLoader workers."""

    def __init__(self, shards, config: ReaderConfig, counts: np.ndarray, epoch: int, segments: list[planning.Segment],
                 remaining: np.ndarray, layout: planning.Layout, rank: int, buckets: planning.Buckets | None,
                 sizes: list[tuple[int, int]]):
        super().__init__()
        self.shards, self.config, self.counts, self.rank = shards, config, counts, rank
        self.buckets, self.sizes = buckets, sizes
        # the current epoch: its segments (the last open, at its consumed steps), the open one's layout,
        # and the ids left to it
        self.epoch, self.segments, self.remaining, self.layout = epoch, segments, remaining, layout

    def __iter__(self):
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        assert num_workers == self.segments[-1].workers, (num_workers, self.segments[-1])
        ring = None
        if info is not None and self.config.kind == "images":
            width, height = max(self.sizes, key=lambda wh: wh[0] * wh[1])  # a slot holds the largest bucket
            ring = SharedBatchRing(loader_worker, (self.config.batch_size, height, width, 3))
        plans = self.worker_plans(loader_worker, num_workers)
        return worker_batches(plans, ShardSource(self.shards, self.config), self.config, self.sizes, ring)

    def worker_plans(self, loader_worker: int, num_workers: int) -> Iterator[tuple[int, list[planning.WorkerPlan]]]:
        """(epoch, group plans) of the planned worker this loader worker plays, epoch after epoch.

        The DataLoader's g-th batch comes from loader worker g % K. If `delivered` batches came before
        this epoch and its open segment had done `steps` already, batch g is the segment's step
        g - delivered + steps, which plan worker (step % K) owns: the roles rotate whenever an epoch's
        step count is not a multiple of K."""
        cfg = self.config
        epoch, segments, remaining, layout, delivered = self.epoch, self.segments, self.remaining, self.layout, 0
        while True:
            seg = segments[-1]
            worker = (loader_worker - delivered + seg.steps) % num_workers
            yield epoch, planning.worker_plans(remaining, layout, seg.steps, self.rank, worker, cfg.shuffle_window,
                                               self.buckets)
            delivered += layout.num_steps - seg.steps
            epoch, segments = epoch + 1, [planning.Segment(seg.ranks, seg.workers, seg.batch)]
            remaining = planning.remaining_ids(self.counts, cfg.seed, epoch, [], cfg.shuffle_window, self.buckets)
            layout = planning.segment_layouts(self.counts, segments, cfg.seed, epoch, self.buckets)[0]


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate step: workers make finished batches. (Its default, `default_convert`,
    walks every caption and key of every batch looking for numpy arrays: ~1% of a worker's time.)"""
    return batch


def _init_worker(worker_id: int) -> None:
    """Set up a DataLoader worker process.

    - Stop signals are left to the trainer: launchers and schedulers signal whole process trees
      (DeepSpeed's launcher, Slurm, Kubernetes), and a worker dying there would break the batch stream
      before the trainer's preemption checkpoint. Workers still exit with their parent, and are stopped
      when the interpreter exits with a reader's iterator still alive (`_close_live_readers`).
    - Everything inherited from the parent (a trainer's heap: torch, DeepSpeed, the model's Python
      objects, boto's service models) is moved out of the garbage collector's sight with `gc.freeze()`:
      the worker never frees it, and every full collection would otherwise walk it, touching (and so
      copying) the parent's pages."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    gc.freeze()


_LIVE_READERS: "weakref.WeakSet[StreamingReader]" = weakref.WeakSet()  # readers with running workers


def _close_live_readers() -> None:
    """At interpreter exit: stop the workers of readers whose iterator is still referenced (a module-level
    iterator, or one held by the traceback of an uncaught exception). Without this, multiprocessing's own
    exit handler SIGTERMs the workers, which ignore it (`_init_worker`), then joins them: forever."""
    for reader in list(_LIVE_READERS):
        reader.close()


# Registered after multiprocessing's exit handler (multiprocessing.util, imported above), so it runs first (LIFO).
atexit.register(_close_live_readers)


class StreamingReader:
    """Batches of one rank, infinite across epochs, with a small global resume state."""

    def __init__(self, config: ReaderConfig, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.shards = load_shards(config.urls, config.retry_policy(), config.io_timeout, config.kind,
                                  config.resolution if config.kind == "images" else None)
        self._counts = np.array([s.num_samples for s in self.shards], dtype=np.int64)
        self._num_samples = int(self._counts.sum())
        self._buckets, self._sizes = bucket_plan(self.shards, self._counts, config.resolution)
        self._epoch = 0
        self._segments: list[planning.Segment] = []
        self._bad: Counter = Counter()
        self._batches = None  # the live DataLoader iterator, for close()
        self._ring = RingReceiver()  # the live workers' shared batch slots, mapped here
        self._layout_cache: tuple | None = None  # see _layouts

    @property
    def num_samples(self) -> int:
        return self._num_samples

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        """(width, height) of each bucket of a bucketed read, None for an unbucketed one."""
        return None if self._buckets is None else list(self._sizes)

    def steps_left_in_epoch(self) -> int:
        """Batches this rank yields before the current epoch ends, with this reader's shape."""
        self._roll_epoch_if_done()
        segments = self._with_open_segment()
        return self._layouts(segments)[-1].num_steps - segments[-1].steps

    def _layouts(self, segments: list[planning.Segment]) -> list[planning.Layout]:
        """The layouts of `segments` (this epoch's, the last one open). Cached on what they depend on
        (the closed segments and the open one's shape): asked at every batch, and each closed segment
        costs a plan of its batch sizes."""
        key = (self._epoch, tuple(segments[:-1]), replace(segments[-1], steps=0))
        if self._layout_cache is None or self._layout_cache[0] != key:
            self._layout_cache = (key, planning.segment_layouts(self._counts, [*key[1], key[2]], self.config.seed,
                                                                self._epoch, self._buckets))
        return self._layout_cache[1]

    def _with_open_segment(self) -> list[planning.Segment]:
        """This epoch's segments with the open one of this reader's (ranks, workers, batch) last: the last
        one if it has that shape, else a new one (replacing a last one that took no step)."""
        shape = self._shape()
        segments = list(self._segments)
        if segments and (segments[-1].ranks, segments[-1].workers, segments[-1].batch) == shape:
            return segments
        if segments and segments[-1].steps == 0:
            segments.pop()
        return [*segments, planning.Segment(*shape)]

    def batch_slots(self) -> dict[int, int]:
        """Shared-memory batch slots per worker of the live iterator (each holds one batch)."""
        return self._ring.slots_per_worker()

    def _shape(self) -> tuple[int, int, int]:
        return self.world_size, max(1, self.config.num_workers), self.config.batch_size

    def _roll_epoch_if_done(self) -> None:
        if not self._segments:
            return
        if self._segments[-1].steps == self._layouts(self._segments)[-1].num_steps:
            self._epoch += 1
            self._segments = []

    def _bucket_names(self) -> list[str]:
        return [f"{w}x{h}" for w, h in self._sizes]

    def state_dict(self) -> dict:
        self._roll_epoch_if_done()
        layouts = self._layouts(self._segments) if self._segments else []
        state = {
            "seed": self.config.seed,
            "epoch": self._epoch,
            "samples_consumed": sum(layout.consumed(s.steps) for s, layout in zip(self._segments, layouts)),
            "segments": [s.to_dict() for s in self._segments],
            # not part of the order's state, but the order depends on them: checked on load
            "num_samples": self.num_samples,
            "shuffle_window": self.config.shuffle_window,
        }
        if self._buckets is not None:
            state["buckets"] = self._bucket_names()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore, then iterate anew (this stops the workers of any earlier iterator). Same (ranks,
        workers, batch) continues the segment bit-exactly, a different one starts a new segment over the
        remaining samples."""
        self.close()
        missing = {"seed", "epoch", "segments", "num_samples", "shuffle_window"} - set(state)
        if missing:
            raise ValueError(f"reader state lacks {sorted(missing)}")
        for name in ("seed", "shuffle_window"):
            if state[name] != getattr(self.config, name):
                raise ValueError(
                    f"reader state has {name} {state[name]} but ReaderConfig.{name} is {getattr(self.config, name)}; "
                    "resuming an epoch needs the same order parameters"
                )
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"reader state is for {state['num_samples']} samples but the datasets hold {self.num_samples}"
            )
        expected = self._bucket_names() if self._buckets is not None else None
        if state.get("buckets") != expected:
            raise ValueError(f"reader state is for buckets {state.get('buckets')} but the datasets' are {expected}")
        segments = [planning.Segment.from_dict(s) for s in state["segments"]]
        # validates every segment against its plan
        planning.segment_layouts(self._counts, segments, self.config.seed, int(state["epoch"]), self._buckets)
        self._epoch, self._segments = int(state["epoch"]), segments
        self._roll_epoch_if_done()

    def _open_segment(self) -> None:
        self._segments = self._with_open_segment()

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current state on, forever. Starts the workers (stopping any earlier ones)."""
        self.close()
        self._roll_epoch_if_done()
        self._open_segment()
        remaining = planning.remaining_ids(self._counts, self.config.seed, self._epoch, self._segments[:-1],
                                           self.config.shuffle_window, self._buckets)
        dataset = RankDataset(self.shards, self.config, self._counts, self._epoch, list(self._segments), remaining,
                              self._layouts(self._segments)[-1], self.rank, self._buckets, self._sizes)
        workers = self.config.num_workers
        loader = DataLoader(dataset, batch_size=None, collate_fn=_as_is, num_workers=workers,
                            worker_init_fn=_init_worker, prefetch_factor=self.config.prefetch_factor if workers else None)
        batches = self._batches = iter(loader)
        if workers:
            _LIVE_READERS.add(self)
        try:
            for batch in batches:
                batch = self._ring.take(batch)
                self._roll_epoch_if_done()  # the previous batch may have ended an epoch
                self._open_segment()
                assert batch["epoch"] == self._epoch, ("a worker is in another epoch", batch["epoch"], self._epoch)
                seg = self._segments[-1]
                layout = self._layouts(self._segments)[-1]
                planned = self._sizes[layout.groups[layout.group_at(seg.steps)]]
                assert batch.get("bucket", planned) == planned, ("a worker is at another step", batch["bucket"], planned)
                self._segments[-1] = replace(seg, steps=seg.steps + 1)
                self._bad.update(batch.pop("_bad_delta"))
                batch["bad_samples"] = dict(self._bad)
                batch["num_bad"] = sum(self._bad.values())
                yield batch
        finally:
            if self._batches is batches:  # not replaced by a newer iterator
                self.close()

    def close(self) -> None:
        """Stop the data workers now, on every exit path of the trainer. They ignore SIGTERM (see
        `_init_worker`), so the interpreter's exit-time terminate() could not end them. The
        DataLoader iterator's own shutdown asks them to stop and stops watching their pids; any worker
        still alive after it is killed. Workers hold no state worth keeping (it lives in this process)."""
        batches, self._batches = self._batches, None
        _LIVE_READERS.discard(self)
        self._ring.clear()
        workers = list(getattr(batches, "_workers", []))  # torch's multi-process iterator keeps them here
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
                w.join(timeout=10)
