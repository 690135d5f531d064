"""The streaming reader used by every training stage.

Pipeline: manifests -> shard list -> seeded shard shuffle -> split by rank -> split by worker ->
tar -> samples -> window shuffle -> decode, resize, center crop -> batches. The order is planned on
sample *positions* by ``data_tools.plan`` (read its docstring), from the manifests' sample counts
alone, so the resume state is tiny and global: ``{seed, epoch, samples_consumed, segments}``.

Design decisions:
- Ranks and workers are split by the plan, not by webdataset's splitters (its default node splitter
  raises with WORLD_SIZE > 1, and it has no s3:// handler). Tars are parsed by ``s3io.iter_tar``
  over ``s3io.ChunkedReader`` (retrying ranged reads; local paths and s3:// alike).
- Rank and world size are constructor arguments (the trainer passes torch.distributed's); the
  reader never reads them from the environment. S3 endpoint and credentials come only from the
  environment / AWS config, never from ``ReaderConfig``.
- Workers yield whole batches; the DataLoader runs with ``batch_size=None`` and its in-order
  round-robin, so rank r's t-th batch is worker ``t % K``'s ``(t // K)``-th batch, deterministically.
  ``num_workers=0`` runs the single worker in the main process (same plan as one worker).
- Images come out as **uint8** ``(B, 3, H, W)`` tensors (4x less inter-process traffic than float)
  in channels_last memory layout (decoders produce HWC; no transpose copy); ``to_unit_range`` maps
  them to float in [-1, 1] (call ``.contiguous()`` if a consumer needs NCHW-contiguous memory).
- Per worker, a thread reads the next window of raw samples while the current one is decoded, so
  S3 latency overlaps decoding and at most two windows of raw bytes are in memory.
- A bad sample (undecodable image, missing image or caption, unreadable caption or JSON, or missing
  from its shard) still occupies its position: it counts as consumed and is skipped, so a batch can
  come out smaller. Each worker stops the run once its bad fraction exceeds ``max_bad_fraction``
  (judged after ``min_samples_for_bad_check`` samples).
- ``kind="tokens"`` reads `hart-data encode` output with the same plan, resume state, sharding and
  retries; only the per-sample decoder (``token_format.read_token_sample``) and the collation differ
  (``decode_token_sample``, ``collate_tokens``). A dataset of the other kind (manifest
  ``options.format``) is refused when the reader is built. Token batches are stacked with
  ``torch.stack``: they are small (no image), so the DataLoader's copy into shared memory is cheap.
- Iterating the reader is infinite across epochs; each batch says its ``epoch``. One epoch is one
  pass of a DataLoader (worker processes restart per epoch). ``state_dict()`` counts the batches
  handed to the caller, never prefetched ones, and must be called between batches.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
import signal
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from queue import Queue
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools import plan as planning
from data_tools import s3io, schema, storage, token_format

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
    read_block_bytes: int = 8 << 20  # bytes per ranged read (one read ahead)
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


def load_shards(urls: list[str], policy: s3io.RetryPolicy, io_timeout: float, kind: str = "images") -> list[ShardRef]:
    """The shards of all datasets in `urls`, in order; a dataset without a manifest, or of another
    `kind` than asked for (manifest options.format), is refused."""
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
        shards += [ShardRef(storage.join(url, s.name), s.num_samples, s.bytes) for s in manifest.shards]
    if sum(s.num_samples for s in shards) == 0:
        raise ValueError(f"datasets {[storage.redact(u) for u in urls]} hold no samples")
    return shards


def _check_kind(options: dict, kind: str, url: str) -> None:
    found = "tokens" if token_format.is_token_dataset(options) else "images"
    if found != kind:
        raise ValueError(f"{storage.redact(url)} holds {found} (manifest options.format {options.get('format')!r}) "
                         f"but ReaderConfig.kind is {kind!r}; set kind: {found} or name a dataset of {kind}")


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images from the reader -> float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Decode, resize the shorter side to `resolution` and center-crop: (resolution, resolution, 3) uint8."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        # Let libjpeg decode at a reduced scale that still covers the target (much faster).
        scale = resolution / min(img.size)
        img.draft("RGB", (int(img.size[0] * scale + 0.999), int(img.size[1] * scale + 0.999)))
    rgb = _to_rgb(img)
    w, h = rgb.size
    if w == h == resolution:  # already sharded at this resolution: nothing to resample
        return np.asarray(rgb)
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    out = rgb.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    return np.asarray(out)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()  # decode in place; convert() would copy
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class ShardSource:
    """Raw samples by global id, reading each needed shard front to back at most once."""

    def __init__(self, shards: list[ShardRef], config: ReaderConfig):
        self._shards = shards
        self._offsets = planning.shard_offsets(np.array([s.num_samples for s in shards], dtype=np.int64))
        self._config = config
        self._policy = config.retry_policy()
        self._filesystems: dict = {}  # one client per protocol per process: creating one costs ~0.1 s
        # the members a sample of this kind is made of (others are skipped unread)
        self._exts = frozenset(token_format.MEMBERS) if config.kind == "tokens" else s3io.IMAGE_SAMPLE_EXTS

    def _open(self, url: str):
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        if protocol not in self._filesystems:
            self._filesystems[protocol] = s3io.read_filesystem(url, self._config.io_timeout)[0]
        fs = self._filesystems[protocol]
        return fs, fs._strip_protocol(url)

    def samples(self, ids: np.ndarray) -> Iterator[tuple[int, str | None, dict | None]]:
        """(id, key, members) for `ids` (in plan order: grouped by shard, ascending inside one);
        key and members are None for a sample missing from its shard."""
        if len(ids) == 0:
            return
        shard_of = np.searchsorted(self._offsets, ids, side="right") - 1
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        for run in np.split(np.arange(len(ids)), cuts):
            shard = int(shard_of[run[0]])
            indices = (ids[run] - self._offsets[shard]).tolist()
            yield from self._read_run(shard, ids[run].tolist(), indices)

    def _read_run(self, shard: int, run_ids: list[int], indices: list[int]):
        ref = self._shards[shard]
        fs, path = self._open(ref.url)
        with s3io.ChunkedReader(fs, path, ref.num_bytes, self._policy, self._config.read_block_bytes) as reader:
            stream = s3io.iter_shard(reader, set(indices), max(indices), self._exts)
            for sample_id, index in zip(run_ids, indices):
                try:
                    got = next(stream, None)
                except s3io.TarFormatError:  # a truncated or corrupt tar: the rest of it is missing
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


def decode_sample(key: str | None, members: dict | None, resolution: int) -> tuple[str | None, tuple]:
    """(bad reason or None, (image, caption, key))."""
    if members is None:
        return "missing_sample", ()
    image_ext = next((e for e in schema.IMAGE_EXTS if e in members), None)
    if image_ext is None:
        return "missing_image", ()
    if schema.CAPTION_EXT not in members:
        return "missing_caption", ()
    try:
        caption = members[schema.CAPTION_EXT].decode("utf-8")
    except UnicodeDecodeError:
        return "bad_caption", ()
    if schema.META_EXT in members:
        try:
            json.loads(members[schema.META_EXT])
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "bad_json", ()
    try:
        image = decode_image(members[image_ext], resolution)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return "bad_image", ()
    return None, (image, caption, key)


def decode_token_sample(key: str | None, members: dict | None) -> tuple[str | None, tuple]:
    """(bad reason or None, (token sample dict, key)) for one sample of a token dataset."""
    if members is None:
        return "missing_sample", ()
    if any(ext not in members for ext in token_format.MEMBERS):
        return "missing_tokens", ()
    try:
        sample = token_format.read_token_sample(members)
    except (ValueError, OSError, EOFError, KeyError, TypeError):  # bad npy, json, caption or shape
        return "bad_tokens", ()
    return None, (sample, key)


def collate_images(goods: list[tuple]) -> dict:
    """(image, caption, key) samples -> {"image": uint8 (B, 3, H, W) channels_last, "caption", "key"}."""
    images = [g[0] for g in goods]
    # Filled straight into shared memory (a DataLoader worker would otherwise copy it there), and
    # (B, 3, H, W) as a view of the (B, H, W, 3) buffer: channels_last layout, no transpose copy.
    buffer = _batch_buffer((len(images), *images[0].shape), shared=get_worker_info() is not None)
    np.stack(images, out=buffer.numpy())
    return {"image": buffer.permute(0, 3, 1, 2), "caption": [g[1] for g in goods], "key": [g[2] for g in goods]}


def collate_tokens(goods: list[tuple]) -> dict:
    """(token sample, key) pairs -> the t2i stage's inputs: idx (B, L) long (scales concatenated),
    frest (B, l_last, Cvae), context (B, T, D) float32, context_mask / context_position_ids (B, T) long."""
    samples = [g[0] for g in goods]
    return {
        "idx": torch.stack([torch.cat(s["idx_Bl"]) for s in samples]),
        "frest": torch.stack([s["frest"] for s in samples]),
        "context": torch.stack([s["context"] for s in samples]),
        "context_mask": torch.stack([s["mask"] for s in samples]),
        "context_position_ids": torch.stack([s["position_ids"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [g[1] for g in goods],
    }


def read_ahead(items: Iterator) -> Iterator:
    """`items`, each produced by a background thread while the caller works on the previous one
    (network waits and libjpeg both release the GIL); at most two items exist at a time."""
    slot: Queue = Queue(maxsize=1)
    taken = threading.Semaphore(0)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                slot.put(item)  # the slot is empty: the previous item was taken
                while not taken.acquire(timeout=0.1):
                    if stop.is_set():
                        return
            slot.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            slot.put(e)

    threading.Thread(target=produce, name="shard-reader", daemon=True).start()
    try:
        while (item := slot.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            taken.release()
            yield item
    finally:
        stop.set()


def permuted_samples(plan: planning.WorkerPlan, source: ShardSource) -> Iterator[tuple]:
    """The worker's not yet consumed samples, raw, in window-shuffled order; the next window is
    read while this one is decoded."""
    window = plan.window
    consumed = int(plan.sizes[: plan.first_batch].sum())
    keep = np.ones(len(plan.ids), dtype=bool)
    keep[planning.emitted(plan, consumed)] = False
    stream = source.samples(plan.ids[keep])
    first_window = consumed // window

    def windows() -> Iterator[tuple[np.ndarray, dict]]:
        for j in range(first_window, -(-len(plan.ids) // window)):
            order = planning.window_perm(plan, j) + j * window
            if j == first_window:
                order = order[consumed % window :]
            held = {sample_id: (key, members) for sample_id, key, members in itertools.islice(stream, len(order))}
            assert len(held) == len(order), (len(held), len(order))
            yield plan.ids[order], held

    for ids, held in read_ahead(windows()):
        for sample_id in ids.tolist():
            yield held.pop(sample_id)


def _batch_buffer(shape: tuple[int, ...], shared: bool) -> torch.Tensor:
    """An uninitialised uint8 tensor, allocated in shared memory in a DataLoader worker (as torch's
    default_collate does): `Tensor.share_memory_()` would allocate twice and copy, and the page
    faults of that copy cost a worker ~25% of its CPU at 256px."""
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def worker_batches(plan: planning.WorkerPlan, source: ShardSource, config: ReaderConfig,
                   epoch: int) -> Iterator[dict]:
    counter = BadCounter(config.max_bad_fraction, config.min_samples_for_bad_check,
                         str([storage.redact(u) for u in config.urls]))
    samples = permuted_samples(plan, source)
    if config.kind == "tokens":
        decode, collate = decode_token_sample, collate_tokens
    else:
        decode, collate = functools.partial(decode_sample, resolution=config.resolution), collate_images
    for size in plan.sizes[plan.first_batch :].tolist():
        bad_before = Counter(counter.bad)
        goods = []
        for _ in range(size):
            reason, good = decode(*next(samples))
            counter.record(reason)
            if good:
                goods.append(good)
        if not goods:
            raise TooManyBadSamplesError(
                f"a whole batch of {size} samples was bad ({dict(counter.bad - bad_before)}) in datasets "
                f"{counter.dataset}; fix or re-shard the data"
            )
        yield {**collate(goods), "epoch": epoch, "_bad_delta": dict(counter.bad - bad_before)}


class EpochDataset(IterableDataset):
    """One rank's batches of one segment; each DataLoader worker plays its planned worker."""

    def __init__(self, shards, config: ReaderConfig, remaining: np.ndarray, seg: planning.Segment,
                 seg_index: int, epoch: int, rank: int):
        super().__init__()
        self.shards, self.config, self.remaining = shards, config, remaining
        self.seg, self.seg_index, self.epoch, self.rank = seg, seg_index, epoch, rank

    def __iter__(self):
        info = get_worker_info()
        loader_worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        assert num_workers == self.seg.workers, (num_workers, self.seg)
        # The DataLoader's round-robin starts at its worker 0, but the next step (seg.steps) belongs
        # to plan worker seg.steps % K: rotate the roles so loader batch j is step seg.steps + j.
        worker = (loader_worker + self.seg.steps) % num_workers
        plan = planning.worker_plan(self.remaining, self.seg, self.seg_index, self.config.seed, self.epoch,
                                    self.rank, worker, self.config.shuffle_window)
        return worker_batches(plan, ShardSource(self.shards, self.config), self.config, self.epoch)


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the trainer: launchers and schedulers signal whole process trees
    (DeepSpeed's launcher, Slurm, Kubernetes), and a worker dying there would break the batch stream
    before the trainer's preemption checkpoint. Workers still exit with their parent."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class StreamingReader:
    """Batches of one rank, infinite across epochs, with a small global resume state."""

    def __init__(self, config: ReaderConfig, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.shards = load_shards(config.urls, config.retry_policy(), config.io_timeout, config.kind)
        self._counts = np.array([s.num_samples for s in self.shards], dtype=np.int64)
        self._epoch = 0
        self._segments: list[planning.Segment] = []
        self._bad: Counter = Counter()
        self._batches = None  # the live DataLoader iterator, for close()

    @property
    def num_samples(self) -> int:
        return int(self._counts.sum())

    def steps_left_in_epoch(self) -> int:
        """Batches this rank yields before the current epoch ends, with this reader's shape."""
        self._roll_epoch_if_done()
        consumed = planning.samples_consumed(self._counts, self._segments)
        shape = self._shape()
        last = self._segments[-1] if self._segments else None
        if last is not None and (last.ranks, last.workers, last.batch) == shape:
            left_before = self.num_samples - planning.samples_consumed(self._counts, self._segments[:-1])
            return planning.num_steps(left_before, last.ranks, last.batch) - last.steps
        return planning.num_steps(self.num_samples - consumed, shape[0], shape[2])

    def _shape(self) -> tuple[int, int, int]:
        return self.world_size, max(1, self.config.num_workers), self.config.batch_size

    def _roll_epoch_if_done(self) -> None:
        if not self._segments:
            return
        left = self.num_samples - planning.samples_consumed(self._counts, self._segments[:-1])
        last = self._segments[-1]
        if last.steps == planning.num_steps(left, last.ranks, last.batch):
            self._epoch += 1
            self._segments = []

    def state_dict(self) -> dict:
        self._roll_epoch_if_done()
        return {
            "seed": self.config.seed,
            "epoch": self._epoch,
            "samples_consumed": planning.samples_consumed(self._counts, self._segments),
            "segments": [s.to_dict() for s in self._segments],
            # not part of the order's state, but the order depends on them: checked on load
            "num_samples": self.num_samples,
            "shuffle_window": self.config.shuffle_window,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore; call before iterating. Same (ranks, workers, batch) continues the segment
        bit-exactly, a different one starts a new segment over the remaining samples."""
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
        segments = [planning.Segment.from_dict(s) for s in state["segments"]]
        planning.samples_consumed(self._counts, segments)  # validates every segment against its plan
        self._epoch, self._segments = int(state["epoch"]), segments
        self._roll_epoch_if_done()

    def _open_segment(self) -> None:
        shape = self._shape()
        if self._segments and (self._segments[-1].ranks, self._segments[-1].workers, self._segments[-1].batch) == shape:
            return
        if self._segments and self._segments[-1].steps == 0:
            self._segments.pop()
        self._segments.append(planning.Segment(*shape))

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield from self._epoch_batches()

    def close(self) -> None:
        """Stop the data workers now, on every exit path of the trainer. They ignore SIGTERM (see
        `_ignore_stop_signals`), so the interpreter's exit-time terminate() could not end them. The
        DataLoader iterator's own shutdown asks them to stop and stops watching their pids; any worker
        still alive after it is killed. Workers hold no state worth keeping (it lives in this process)."""
        batches, self._batches = self._batches, None
        workers = list(getattr(batches, "_workers", []))  # torch's multi-process iterator keeps them here
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
                w.join(timeout=10)

    def _epoch_batches(self) -> Iterator[dict]:
        self._roll_epoch_if_done()
        self._open_segment()
        epoch, seg_index = self._epoch, len(self._segments) - 1
        remaining = planning.remaining_ids(self._counts, self.config.seed, epoch, self._segments[:-1],
                                           self.config.shuffle_window)
        dataset = EpochDataset(self.shards, self.config, remaining, self._segments[-1], seg_index, epoch, self.rank)
        workers = self.config.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_ignore_stop_signals,
                            prefetch_factor=self.config.prefetch_factor if workers else None)
        self._batches = iter(loader)
        for batch in self._batches:
            seg = self._segments[-1]
            self._segments[-1] = replace(seg, steps=seg.steps + 1)
            self._bad.update(batch.pop("_bad_delta"))
            batch["bad_samples"] = dict(self._bad)
            batch["num_bad"] = sum(self._bad.values())
            yield batch
        if self._epoch == epoch:
            self._roll_epoch_if_done()
        assert self._epoch == epoch + 1, "a worker yielded fewer batches than planned"
