"""Helpers for the data_tools tests: images in every awkward mode, broken files, small datasets."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from data_tools import schema


def image_bytes(img: Image.Image, fmt: str = "PNG", **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kw)
    return buf.getvalue()


def solid(w: int, h: int, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    return image_bytes(Image.new("RGB", (w, h), color), fmt)


def noise_jpeg(w: int, h: int, seed: int = 0) -> bytes:
    """A JPEG big enough in bytes that cutting it short really truncates image data."""
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return image_bytes(Image.fromarray(arr), "JPEG", quality=90)


def halves(w: int, h: int, left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    img = Image.new("RGB", (w, h), right)
    img.paste(left, (0, 0, w // 2, h))
    return img


def exif_rotated_jpeg(w: int, h: int, orientation: int = 6) -> bytes:
    """Stored w x h (left half red, right half blue) with EXIF orientation `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(halves(w, h), "JPEG", quality=95, exif=exif.tobytes())


def palette_png_transparent(w: int, h: int) -> bytes:
    img = Image.new("P", (w, h), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, w // 2, h))  # left half red, right half index 0 = transparent
    return image_bytes(img, "PNG", transparency=0)


def rgba_png(w: int, h: int) -> bytes:
    img = Image.new("RGBA", (w, h), (0, 0, 0, 0))  # fully transparent black: must become white
    img.paste((0, 255, 0, 255), (0, 0, w // 2, h))
    return image_bytes(img, "PNG")


def la_png(w: int, h: int) -> bytes:
    img = Image.new("LA", (w, h), (0, 0))
    img.paste((0, 255), (0, 0, w // 2, h))  # left opaque black, right transparent
    return image_bytes(img, "PNG")


def cmyk_jpeg(w: int, h: int) -> bytes:
    return image_bytes(Image.new("CMYK", (w, h), (0, 255, 255, 0)), "JPEG", quality=95)  # red in CMYK


def gray16_png(w: int, h: int) -> bytes:
    arr = np.zeros((h, w), dtype=np.uint16)
    arr[:, : w // 2] = 65535
    return image_bytes(Image.fromarray(arr), "PNG")


def write_folder(root, items: dict[str, tuple[bytes, str | None]], caption_ext: str = ".txt") -> str:
    """items: stem -> (image bytes with its suffix in the stem, e.g. 'a.png', caption or None)."""
    os.makedirs(root, exist_ok=True)
    for name, (data, caption) in items.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        if caption is not None:
            stem = name.rsplit(".", 1)[0]
            text = json.dumps({"caption": caption}) if caption_ext == ".json" else caption
            with open(os.path.join(root, stem + caption_ext), "w", encoding="utf-8") as f:
                f.write(text)
    return str(root)


def good_items(n: int, size=(48, 40)) -> dict[str, tuple[bytes, str]]:
    """n distinct images (distinct colours, so no duplicates) with captions 'item i'."""
    return {f"img{i:03d}.png": (solid(*size, color=(i * 7 % 256, 100, 255 - i)), f"item {i}") for i in range(n)}


def read_shard(path_or_bytes) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} for a local tar path or tar bytes."""
    if isinstance(path_or_bytes, bytes):
        tar = tarfile.open(fileobj=io.BytesIO(path_or_bytes))
    else:
        tar = tarfile.open(path_or_bytes)
    out: dict[str, dict[str, bytes]] = {}
    with tar:
        for m in tar:
            key, ext = schema.split_key(m.name)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def all_samples(out_dir: str) -> dict[str, dict[str, bytes]]:
    """Every sample of a local dataset, via its manifest."""
    manifest = schema.Manifest.from_json(open(os.path.join(out_dir, schema.MANIFEST_NAME)).read())
    samples = {}
    for s in manifest.shards:
        samples.update(read_shard(os.path.join(out_dir, s.name)))
    return samples


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img
