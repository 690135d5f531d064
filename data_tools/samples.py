"""One sample's bytes to tensors, and samples to batches: the decoders of both dataset kinds, the
image batch builder with its shared-memory ring (DataLoader worker -> main process), and token
collation. `data_tools.reader` runs these inside its workers; nothing here knows about plans or shards.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from data_tools import schema, token_format

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


class ImageBatch:
    """One image batch under construction. Each decoded image is written into the batch buffer as soon
    as it is decoded, while it is still in cache (holding B arrays and stacking them at the end costs
    a cold copy), then dropped. Out comes {"image": uint8 (B, 3, H, W) channels_last, "caption", "key"};
    in a DataLoader worker the buffer is a slot of its shared-memory ring and the batch carries "_ring"
    (where the slot is) in place of "image" until `take_ring_batch` copies it out."""

    def __init__(self, size: int, resolution: int, ring: "SharedBatchRing | None"):
        self._ring = ring
        self._rows = ring.open_slot() if ring is not None else np.empty((size, resolution, resolution, 3), np.uint8)
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

    def __init__(self, size: int, resolution: int, ring: None = None):
        self._goods: list[tuple] = []

    def add(self, good: tuple) -> None:
        self._goods.append(good)

    def __len__(self) -> int:
        return len(self._goods)

    def finish(self) -> dict:
        return collate_tokens(self._goods)


class SharedBatchRing:
    """A DataLoader worker's image batches, written in turn into a few shared-memory slots made once.

    Why: a fresh shared buffer per batch (what torch's collate does) cost ~6 ms of page faults per
    32 x 256² batch, a third of its decode time, and sending it cost the main process a file-descriptor
    hand-over (a socket round trip with an authentication handshake) per batch. Here a slot's storage
    is sent once, with its first batch; later batches name the slot, and the main process copies the
    pixels out of its mapping as they arrive (`take_ring_batch`).

    Reuse is safe because of that copy-on-arrival: the DataLoader keeps at most `prefetch_factor`
    batches of one worker queued beyond the one it is returning, so `prefetch_factor + 2` slots leave
    one spare. That argument rests on the DataLoader's scheduling, so it is checked, not trusted: each
    slot starts with a sequence number, -1 while the worker writes and the batch's number after, read
    by the main process before and after its copy. A batch overwritten before it was copied raises
    `RuntimeError`; it is never passed on torn."""

    HEADER = 8  # bytes: one int64 sequence number in front of each slot's pixels

    def __init__(self, worker: int, slots: int, max_shape: tuple[int, ...]):
        self._worker, self._slots, self._max_shape = worker, slots, tuple(max_shape)
        self._storages: list[torch.Tensor] = []  # per slot: uint8, header + the largest batch
        self._seq = 0
        self._open: tuple[torch.Tensor, np.ndarray] | None = None

    def open_slot(self) -> np.ndarray:
        """The next slot's pixels, (max batch, H, W, 3), marked as being written."""
        assert self._open is None, "close_slot the previous batch first"
        slot = self._seq % self._slots
        if slot == len(self._storages):
            size = self.HEADER + int(np.prod(self._max_shape))
            self._storages.append(torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size)))
        header, pixels = self.views(self._storages[slot], self._max_shape)
        header.fill_(-1)
        self._open = header, pixels.numpy()
        return self._open[1]

    def close_slot(self, count: int) -> dict:
        """Mark the open slot as holding a batch of its first `count` rows; returns what the main
        process needs to find it (and, on the slot's first use, its storage)."""
        header, _ = self._open
        self._open = None
        slot, seq = self._seq % self._slots, self._seq
        header.fill_(seq)
        self._seq += 1
        new_slot = seq < self._slots
        return {"worker": self._worker, "slot": slot, "seq": seq, "shape": (count, *self._max_shape[1:]),
                "storage": self._storages[slot] if new_slot else None}

    @classmethod
    def views(cls, storage: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the int64 sequence number, the (B, H, W, 3) pixels) of a slot."""
        return storage[: cls.HEADER].view(torch.int64), storage[cls.HEADER : cls.HEADER + int(np.prod(shape))].view(shape)


def take_ring_batch(batch: dict, mapped: dict) -> dict:
    """Main process: turn a worker's ring batch into an ordinary one by copying its images out of the
    slot (proving the slot was not refilled meanwhile; see `SharedBatchRing`). `mapped` holds the slots
    of the live workers, by (worker, slot); a batch that brings a slot's storage adds it."""
    ring = batch.pop("_ring", None)
    if ring is None:
        return batch
    where = (ring["worker"], ring["slot"])
    if ring["storage"] is not None:
        mapped[where] = ring["storage"]
    header, pixels = SharedBatchRing.views(mapped[where], ring["shape"])

    def check(when: str) -> None:
        if int(header.item()) != ring["seq"]:
            raise RuntimeError(
                f"reader: worker {ring['worker']} refilled the shared slot of its batch {ring['seq']} {when} it was "
                f"copied (the slot holds {int(header.item())}); the batch is dropped rather than passed on torn")

    check("before")
    # numpy's copy, single-threaded: torch's clone() would wake its intra-op thread pool, whose spinning
    # threads take CPU from the workers (~10 ms of this process's CPU per 6 MB batch, measured).
    hwc = torch.from_numpy(pixels.numpy().copy())
    check("while")
    return {"image": hwc.permute(0, 3, 1, 2), **batch}  # channels_last, as ImageBatch makes it


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
