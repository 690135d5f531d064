"""One sample's bytes to tensors, and samples to batches: the decoders of both dataset kinds, the
image batch builder with its shared-memory ring (DataLoader worker -> main process), and token
collation. `data_tools.reader` runs these inside its workers; nothing here knows about plans or shards.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from data_tools import schema, token_format
from data_tools.buckets import cover_box

def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images from the reader -> float in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def decode_image(data: bytes, width: int, height: int | None = None) -> np.ndarray:
    """Decode, cover-resize to width x height (default square) and center-crop: (height, width, 3) uint8."""
    height = width if height is None else height
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        # Let libjpeg decode at a reduced scale that still covers the target (much faster).
        scale = max(width / img.size[0], height / img.size[1])
        img.draft("RGB", (int(img.size[0] * scale + 0.999), int(img.size[1] * scale + 0.999)))
    rgb = _to_rgb(img)
    if rgb.size == (width, height):  # already sharded at this size: nothing to resample
        return np.asarray(rgb)
    box = cover_box(*rgb.size, width, height)  # for a square target the centred min(w, h) square
    out = rgb.resize((width, height), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
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


def decode_sample(key: str | None, members: dict | None, width: int,
                  height: int | None = None) -> tuple[str | None, tuple]:
    """(bad reason or None, (image, caption, key)) from a sample's image and caption members, the image
    at width x height (default square; the reader does not read the metadata JSON)."""
    if members is None:
        return "missing_sample", ()
    for image_ext in schema.IMAGE_EXTS:
        if image_ext in members:
            break
    else:
        return "missing_image", ()
    if schema.CAPTION_EXT not in members:
        return "missing_caption", ()
    try:
        caption = members[schema.CAPTION_EXT].decode("utf-8")
    except UnicodeDecodeError:
        return "bad_caption", ()
    try:
        image = decode_image(members[image_ext], width, height)
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


class ImageBatch:
    """One image batch under construction. Each decoded image is written into the batch buffer as soon
    as it is decoded, while it is still in cache (holding B arrays and stacking them at the end costs
    a cold copy), then dropped. Out comes {"image": uint8 (B, 3, H, W) channels_last, "caption", "key"};
    in a DataLoader worker the buffer is a slot of its shared-memory ring and the batch carries "_ring"
    (where the slot is) in place of "image" until `RingReceiver.take` turns it into a view of the slot."""

    def __init__(self, size: int, width: int, height: int, ring: "SharedBatchRing | None"):
        self._ring = ring
        shape = (size, height, width, 3)
        self._rows = ring.open_slot(shape) if ring is not None else np.empty(shape, np.uint8)
        self._captions: list[str] = []
        self._keys: list[str] = []

    def add(self, good: tuple) -> None:
        image, caption, key = good
        self._rows[len(self._keys)] = image
        self._captions.append(caption)
        self._keys.append(key)

    def __len__(self) -> int:
        return len(self._keys)

    def finish(self) -> dict:
        batch = {"caption": self._captions, "key": self._keys}
        if self._ring is not None:
            return {"_ring": self._ring.close_slot(len(self._keys)), **batch}
        # (B, 3, H, W) as a view of the (B, H, W, 3) buffer: channels_last layout, no transpose copy.
        return {"image": torch.from_numpy(self._rows[: len(self._keys)]).permute(0, 3, 1, 2), **batch}


class TokenBatch:
    """One token batch under construction (see `collate_tokens`)."""

    def __init__(self):
        self._goods: list[tuple] = []

    def add(self, good: tuple) -> None:
        self._goods.append(good)

    def __len__(self) -> int:
        return len(self._goods)

    def finish(self) -> dict:
        return collate_tokens(self._goods)


class SharedBatchRing:
    """A DataLoader worker's image batches, written into shared-memory slots that are reused once the
    main process has released them. The main process hands the images on *in place*: no copy.

    Why: a fresh shared buffer per batch (what torch's collate does) cost ~6 ms of page faults per
    32 x 256² batch, a third of its decode time, and sending it cost the main process a file-descriptor
    hand-over (a socket round trip with an authentication handshake) per batch. Copying each batch out
    in the main process (the previous design) cost that process ~30 us per 256² image, on the
    trainer's critical path. Here a slot's storage is sent once, with its first batch; later batches
    only name the slot.

    Ownership is the int64 state in front of each slot, in shared memory: WRITING (the worker fills
    it), a batch's sequence number (published, owned by the main process from then on) or FREE. The
    main process (`RingReceiver`) sets FREE only when nothing references the slot's storage any more
    (torch's storage use count is back to what the receiver's own mapping holds), and the worker only
    writes into a FREE slot or a new one: so no batch anyone can still see is ever overwritten. When no
    slot is free (the consumer holds on to batches, or prefetching is ahead) the worker adds a slot: a
    worker needs at most about `prefetch_factor + 3` while the consumer keeps only the batch it works on
    (4 per worker at prefetch_factor 2 in `bench/data_throughput.py`'s `batch_slots_per_worker`).
    A slot holds a batch of up to `max_shape`'s element count in any shape (the buckets of a bucketed
    dataset): its pixels are kept as a flat array and viewed in the batch's shape."""

    HEADER = 8  # bytes: the int64 state in front of each slot's pixels
    FREE, WRITING = -2, -1

    def __init__(self, worker: int, max_shape: tuple[int, ...]):
        self._worker, self._max_shape = worker, tuple(max_shape)
        self._capacity = int(np.prod(self._max_shape))
        # per slot: the uint8 storage (header + the largest batch) and numpy views of its state word and
        # flat pixels, made once (torch slicing per batch cost ~1.5% of a worker's time)
        self._slots: list[tuple[torch.Tensor, np.ndarray, np.ndarray]] = []
        self._seq = 0
        self._open: tuple[int, np.ndarray, bool, tuple] | None = None  # slot, its state word, newly made, shape

    def open_slot(self, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A free slot's pixels in `shape` (default max_shape: (max batch, H, W, 3)), marked as being written."""
        assert self._open is None, "close_slot the previous batch first"
        shape = self._max_shape if shape is None else tuple(shape)
        assert int(np.prod(shape)) <= self._capacity, (shape, self._max_shape)
        new = False
        for slot, (_, state, pixels) in enumerate(self._slots):
            if state[0] == self.FREE:
                break
        else:
            new, slot = True, len(self._slots)
            storage = torch.empty(0, dtype=torch.uint8).set_(
                torch.UntypedStorage._new_shared(self.HEADER + int(np.prod(self._max_shape))))
            header, pixels_t = self.views(storage, (self._capacity,))
            state, pixels = header.numpy(), pixels_t.numpy()
            self._slots.append((storage, state, pixels))
        state[0] = self.WRITING
        self._open = slot, state, new, shape
        return pixels[: int(np.prod(shape))].reshape(shape)

    def close_slot(self, count: int) -> dict:
        """Publish the open slot's first `count` rows as the next batch; returns what the main process
        needs to find it (and, on the slot's first use, its storage)."""
        slot, state, new, shape = self._open
        self._open = None
        seq, self._seq = self._seq, self._seq + 1
        state[0] = seq
        return {"worker": self._worker, "slot": slot, "seq": seq, "shape": (count, *shape[1:]),
                "storage": self._slots[slot][0] if new else None}

    @property
    def num_slots(self) -> int:
        return len(self._slots)

    @classmethod
    def views(cls, storage: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the int64 state, the (B, H, W, 3) pixels) of a slot."""
        return storage[: cls.HEADER].view(torch.int64), storage[cls.HEADER : cls.HEADER + int(np.prod(shape))].view(shape)


def _use_count(storage: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(storage.untyped_storage()._cdata)


class RingReceiver:
    """Main process: turns the workers' ring batches into ordinary ones whose images are views of the
    slots, and hands each slot back (FREE) once its batch is no longer referenced anywhere in this
    process (see `SharedBatchRing`). Released slots are found at every `take`."""

    def __init__(self):
        self._mapped: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}  # (worker, slot) -> storage, own refs
        self._lent: list[tuple[int, int]] = []

    def take(self, batch: dict) -> dict:
        self.release_unused()
        ring = batch.pop("_ring", None)
        if ring is None:
            return batch
        where = (ring["worker"], ring["slot"])
        if ring["storage"] is not None:
            self._mapped[where] = (ring["storage"], _use_count(ring["storage"]))
        storage, _ = self._mapped[where]
        header, pixels = SharedBatchRing.views(storage, ring["shape"])
        if int(header.item()) != ring["seq"]:  # cannot happen while the protocol holds: checked anyway
            raise RuntimeError(
                f"reader: worker {ring['worker']}'s shared slot of batch {ring['seq']} holds state "
                f"{int(header.item())}; the batch is dropped rather than passed on torn")
        self._lent.append(where)
        return {"image": pixels.permute(0, 3, 1, 2), **batch}  # channels_last, as ImageBatch makes it

    def release_unused(self) -> None:
        """Mark FREE every lent slot whose images nothing references any more."""
        still = []
        for where in self._lent:
            storage, own = self._mapped[where]
            if _use_count(storage) > own:
                still.append(where)
            else:
                SharedBatchRing.views(storage, (0,))[0].fill_(SharedBatchRing.FREE)
        self._lent = still

    def slots_per_worker(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for worker, _ in self._mapped:
            counts[worker] = counts.get(worker, 0) + 1
        return counts

    def clear(self) -> None:
        """Forget the slots (their workers are gone); batches still held keep their memory."""
        self._mapped.clear()
        self._lent = []


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
