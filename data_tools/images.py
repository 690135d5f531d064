"""Per-image work of `hart-data shard`: decode, orient, convert to RGB, filter, resize, re-encode.

Design decisions:

- Every bad input is a `SkipImage` carrying a short reason string (`undecodable`, `truncated`,
  `decompression_bomb`, `too_small`, `bad_aspect`); the shard writer counts reasons and never stops.
- Decompression bombs: `Image.MAX_IMAGE_PIXELS` is set per call from the job's `max_pixels` and
  Pillow's `DecompressionBombWarning` is promoted to an error, so "more than max_pixels" is a skip,
  not just a warning. This runs in worker processes, where mutating the global is harmless.
- Orientation is applied first (EXIF tag 274), so `orig_width`/`orig_height` are the upright size.
- Conversion to RGB composites any alpha (RGBA, LA, PA, palette with transparency) onto white rather
  than dropping it (dropped alpha often reveals garbage in transparent pixels). 16-bit grayscale
  (`I;16*`, `I`) keeps its top 8 bits; Pillow's own `convert("L")` would clip instead of scale.
- Large JPEGs are decoded with `draft()` at the smallest DCT scale still >= 2x the target, and the
  resize uses LANCZOS with `reducing_gap`, which first shrinks by an integer factor; both are large
  speedups for 4k+ sources at no visible cost.
- center-crop resizes the shorter side to N and crops the centre NxN in one `resize(box=...)` call.
- With aspect-ratio buckets (`hart-data shard --buckets`), the shard writer picks each image's bucket
  in its parent process, from the header alone (`source_size`: size and EXIF orientation, no pixel
  decode), and the worker cover-resizes and centre-crops to that bucket (`buckets.cover_box`; for a
  square bucket exactly the center-crop above). A PNG's eXIf chunk after the pixel data is not read
  there (finding it decodes the whole image): such an image is bucketed by its stored orientation.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from data_tools.buckets import Bucket, cover_box

RESIZE_MODES = ("center-crop", "shorter-side", "none")
FORMATS = ("jpg", "png", "webp")
DEFAULT_MAX_PIXELS = 100_000_000
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_REDUCING_GAP = 3.0


class SkipImage(Exception):
    """An input image that is not stored; `reason` is the counted skip reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    resolution: int | None = None
    resize: str = "center-crop"
    fmt: str = "jpg"
    quality: int = 95
    min_size: int = 0
    max_aspect: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    buckets: tuple[Bucket, ...] | None = None  # resize each image to its nearest bucket instead

    def validate(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"--resolution must be a positive number of pixels, got {self.resolution}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        if self.min_size < 0:
            raise ValueError(f"--min-size must be >= 0, got {self.min_size}")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise ValueError(f"--max-aspect is long side / short side and must be >= 1, got {self.max_aspect}")
        if self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.buckets is not None and (self.resize != "center-crop" or self.resolution is None):
            raise ValueError("--buckets needs --resize center-crop and --resolution (the stage resolution "
                             f"the buckets are for); got --resize {self.resize} --resolution {self.resolution}")


@dataclass
class ProcessedImage:
    data: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int


def process_image(data: bytes, opts: ImageOptions, bucket: Bucket | None = None) -> ProcessedImage:
    """Source bytes -> stored image bytes, resized as `opts` say or, given a `bucket`, cover-resized and
    centre-cropped to it. Raises SkipImage for anything that should not be stored."""
    target = (bucket.width, bucket.height) if bucket is not None else None
    img, (orig_w, orig_h) = open_image(data, opts, target)
    short, long = min(orig_w, orig_h), max(orig_w, orig_h)
    if short < max(opts.min_size, 1):
        raise SkipImage("too_small", f"{orig_w}x{orig_h}, shorter side < {opts.min_size}")
    if opts.max_aspect is not None and long / short > opts.max_aspect:
        raise SkipImage("bad_aspect", f"{orig_w}x{orig_h}, aspect {long / short:.2f} > {opts.max_aspect}")
    img = to_rgb(img)
    img = resize(img, opts.resolution, opts.resize) if bucket is None else resize_to(img, *target)
    return ProcessedImage(encode(img, opts.fmt, opts.quality), img.width, img.height, orig_w, orig_h)


def _pil_error(e: Exception) -> str:
    """Pillow's message without the in-memory file's address ("cannot identify image file <_io.BytesIO object
    at 0x7f...>"), which would make the stats files of two identical runs differ."""
    return f"{type(e).__name__}: " + re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the image bytes", str(e))


def open_image(data: bytes, opts: ImageOptions,
               target: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode fully (so truncation shows here) and turn upright per EXIF. Returns the image and the
    upright size of the *source*: a JPEG may be decoded smaller via draft(), the metadata must not be.
    `target` (width, height) is the bucket it will be resized to, if any (for draft())."""
    Image.MAX_IMAGE_PIXELS = opts.max_pixels
    with warnings.catch_warnings():
        # per-image decoder warnings (corrupt EXIF, odd chunks) would flood the log of a big job
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            src_w, src_h = img.size
            _draft_jpeg(img, opts, target)
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise SkipImage("decompression_bomb", str(e)) from None
        except OSError as e:
            reason = "truncated" if "truncated" in str(e) else "undecodable"
            raise SkipImage(reason, _pil_error(e)) from None
        except Exception as e:  # Pillow raises many exception types for garbage input
            raise SkipImage("undecodable", _pil_error(e)) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            upright = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block is no reason to lose good pixels
        upright = img
    swapped = upright.size != img.size
    return upright, ((src_h, src_w) if swapped else (src_w, src_h))


def _draft_jpeg(img: Image.Image, opts: ImageOptions, target: tuple[int, int] | None) -> None:
    if img.format != "JPEG" or opts.resolution is None or opts.resize == "none":
        return
    w, h = img.size
    # a bucket is cut from the image after EXIF rotation: its longer side over the image's shorter side
    # is a scale that covers it in either orientation
    scale = (opts.resolution if target is None else max(target)) / min(w, h)
    if scale < 0.5:
        # draft picks the smallest DCT scale (1/2, 1/4, 1/8) keeping the image >= the requested size
        img.draft(img.mode, (math.ceil(w * scale * 2), math.ceil(h * scale * 2)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; alpha is composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    elif img.mode.startswith("I"):
        # 16-bit (or 32-bit int) grayscale: keep the top byte of the 16-bit range
        arr = np.asarray(img.convert("I"), dtype=np.int64)
        img = Image.fromarray(np.clip(arr >> 8, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, resolution: int | None, mode: str) -> Image.Image:
    """center-crop: shorter side -> N, centre NxN; shorter-side: shorter side -> N; none: as is."""
    if resolution is None or mode == "none":
        return img
    w, h = img.size
    scale = resolution / min(w, h)
    if mode == "shorter-side":
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        if size == img.size:
            return img
        return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
    assert mode == "center-crop", mode
    crop = min(w, h)  # the NxN window in source pixels (exact: resolution / scale can round past the edge)
    left, top = (w - crop) / 2, (h - crop) / 2
    box = (left, top, left + crop, top + crop)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)


def resize_to(img: Image.Image, width: int, height: int) -> Image.Image:
    """Cover-resize and centre-crop to exactly width x height (a bucket)."""
    box = cover_box(img.width, img.height, width, height)
    return img.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=_REDUCING_GAP)


def source_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """The upright (width, height) of a source image from its header, without decoding pixels; None
    when the header does not parse (the worker then skips the image with its reason)."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # as in open_image: a bomb's header is refused the same way
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if img.format == "PNG":  # its getexif() decodes the image to look for an eXIf chunk after the pixels
                exif = Image.Exif()
                if img.info.get("exif"):
                    exif.load(img.info["exif"])
            else:
                exif = img.getexif()
            orientation = exif.get(0x0112, 1)
    except Exception:  # Pillow raises many exception types for garbage input
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        img.save(buf, _PIL_FORMAT[fmt], quality=quality)
    return buf.getvalue()
