"""Aspect-ratio buckets on the data side: pixel sizes, parsing, nearest bucket. No torch, no model code.

A bucket is a stored image size ``width x height`` in pixels, named ``"WxH"`` (as `hart-data stats`
names resolutions). `hart-data shard --buckets` resizes each image to its nearest bucket, and the
reader forms every micro-batch from one bucket (see `data_tools.plan`).

Design decisions:
- Distance between aspect ratios is the ratio of the larger to the smaller (``|log a - log b|``
  without the logarithm), compared exactly on integers (`fractions.Fraction`): every process and
  machine must pick the same bucket, so no float rounding may decide a near tie. An exact tie goes to
  the bucket that comes first in the set's canonical order.
- A bucket set is kept in one canonical order, by aspect ratio (narrowest first), whatever order the
  user listed it in: the manifest, shard numbering and tie-breaks do not depend on how it was typed.
  Two buckets of the same aspect ratio are refused (the second could never be chosen).
- The default set for a stage resolution R (a multiple of 256) is the model's default set
  (`hart_train.models.buckets.DEFAULT_BUCKETS`, token grids height x width of 16-pixel tokens) in
  pixels: R x R and the pairs 9:7, 20:13, 7:4, 23:11 with their transposes, each about R*R pixels
  (at 1024: 1152x896, 1280x832, 1344x768, 1472x704 and 896x1152, ...). A data bucket W x H is the
  model's bucket "(H/16)x(W/16)": note the model names height first, in tokens, and this module width
  first, in pixels (as PIL's `Image.size` and `hart-data stats` do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

DEFAULT = "default"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[:x]\s*(\d+)\s*$")
# The default set as (width, height) in 1/16ths of the resolution (= the model's 256px token grids, transposed).
_DEFAULT_SIXTEENTHS = ((16, 16), (18, 14), (14, 18), (20, 13), (13, 20), (21, 12), (12, 21), (23, 11), (11, 23))


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f"bucket {self.width}x{self.height}: width and height must be positive pixels")

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def aspect(self) -> Fraction:
        return Fraction(self.width, self.height)

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        """``"W:H"`` or ``"WxH"`` (width first, in pixels)."""
        m = _SIZE_RE.match(text)
        if not m:
            raise ValueError(f"bucket {text!r}: expected WIDTH:HEIGHT in pixels, e.g. 1152:896")
        return cls(int(m.group(1)), int(m.group(2)))


def ordered(buckets) -> tuple[Bucket, ...]:
    """The distinct buckets in canonical order: by aspect ratio (narrowest first), then width."""
    return tuple(sorted(set(buckets), key=lambda b: (b.aspect, b.width)))


def canonical(buckets) -> tuple[Bucket, ...]:
    """The set in canonical order; a duplicate or two buckets of one aspect ratio are refused."""
    buckets = list(buckets)
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"--buckets lists a bucket twice: {', '.join(b.name for b in buckets)}")
    ordered_set = ordered(buckets)
    if not ordered_set:
        raise ValueError("--buckets: name at least one bucket")
    for a, b in zip(ordered_set, ordered_set[1:]):
        if a.aspect == b.aspect:
            raise ValueError(f"--buckets {a.name} and {b.name} have the same aspect ratio; keep one of them")
    return ordered_set


def default_buckets(resolution: int) -> tuple[Bucket, ...]:
    if resolution < 256 or resolution % 256:
        raise ValueError(
            f"--buckets default is defined for resolutions that are multiples of 256 (got {resolution}); "
            "list the buckets instead, e.g. --buckets 256:256,288:224,224:288"
        )
    unit = resolution // 16
    return canonical(Bucket(w * unit, h * unit) for w, h in _DEFAULT_SIXTEENTHS)


def parse_buckets(spec: str, resolution: int | None) -> tuple[Bucket, ...]:
    """``"default"`` (the set for `resolution`) or a comma-separated list of ``W:H`` pixel sizes."""
    if spec.strip() == DEFAULT:
        if resolution is None:
            raise ValueError("--buckets default needs --resolution (the stage resolution the set is for)")
        return default_buckets(resolution)
    return canonical(Bucket.parse(part) for part in spec.split(","))


def from_names(names: list[str]) -> tuple[Bucket, ...]:
    """A manifest's ``options.buckets`` (``"WxH"`` names) back to buckets, in canonical order."""
    return canonical(Bucket.parse(n) for n in names)


def _distance(width: int, height: int, bucket: Bucket) -> Fraction:
    """Aspect distance (>= 1) of a width x height image to `bucket`: larger ratio over smaller."""
    ratio = Fraction(width * bucket.height, height * bucket.width)
    return ratio if ratio >= 1 else 1 / ratio


def nearest_bucket(width: int, height: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket whose aspect ratio is nearest to width/height's (ties: first in `buckets`)."""
    return min(buckets, key=lambda b: _distance(width, height, b))  # min keeps the first of equals


def by_distance(bucket: Bucket, buckets: tuple[Bucket, ...]) -> tuple[int, ...]:
    """Indices of `buckets` from nearest to farthest in aspect ratio from `bucket` (ties: lower index)."""
    return tuple(sorted(range(len(buckets)), key=lambda i: (_distance(bucket.width, bucket.height, buckets[i]), i)))


def cover_box(width: int, height: int, target_width: int, target_height: int) -> tuple[float, float, float, float]:
    """The centred window of a width x height image with the target's aspect ratio, as large as fits
    (cover-resize then centre crop). Whole source pixels on the side kept entirely; for a square target
    exactly the centred min(w, h) square."""
    if width * target_height <= height * target_width:  # source relatively taller: keep its full width
        crop_w, crop_h = width, width * target_height / target_width
    else:
        crop_w, crop_h = height * target_width / target_height, height
    return ((width - crop_w) / 2, (height - crop_h) / 2, (width + crop_w) / 2, (height + crop_h) / 2)
