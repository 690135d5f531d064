"""Aspect-ratio buckets: the (h, w) token grid of every scale for images that are not square.

A bucket is named by its last-scale token grid, **height first**: "56x72" is 56 rows by 72 columns of
latent tokens, an image 16*56 = 896 px high and 16*72 = 1152 px wide (landscape), as torch orders
(B, C, H, W). Its scale schedule is derived from the stage's square schedule `patch_nums` (last side S):

    scale k: (h_k, w_k) = (max(1, rnd(p_k * H / S)), max(1, rnd(p_k * W / S))),   rnd = round half up,
    and a one-token scale (p_k = 1) stays (1, 1).

so at 1024px (S = 64) the bucket 48x84 runs (1,1) (2,3) (2,4) (3,5) (4,7) (5,9) (7,12) (9,16) (12,21)
(16,28) (20,35) (27,47) (36,63) (48,84). Why this rule:
- Each scale keeps about the square scale's area (h_k w_k ~ p_k^2 HW / S^2 with HW ~ S^2), so scale k of
  a bucket has about the token count the model saw at scale k, and the sequence length is about the
  square's (within the few % of the default buckets below).
- The last scale is exactly (H, W) (p = S), and the grids never shrink on either axis (p_k increases,
  rounding is monotone). Where max(H, W) >= S (every default bucket) the token count strictly grows.
- The rule treats the axes alike, so the transposed bucket gets the transposed schedule; the square
  bucket SxS gets exactly the square schedule.
- The first scale has no input token: HART predicts it from the last text token, so it must stay one
  token. Infinity's per-aspect schedules also all start at (1, 1).
- The number of scales is the stage's: the transformer's level embedding, its CFG ramp and the
  tokenizer's Phi choice (`phi_index(si, S)`) are per scale index, unchanged for a bucket.
- Integer arithmetic, (2 p X + S) // (2 S): no float ties, no banker's rounding (Python's round(2.5) = 2).

Compared with FoundationVision/Infinity (`infinity/utils/dynamic_resolution.py`, `ratio2hws`), which
hand-writes one 13-scale table per aspect ratio with the grid's aspect exact at most scales and the
first two scales square, this rule derives every bucket from HART's own schedule, so any resolution's
`patch_nums` and any bucket get one without a table, and the square case is HART unchanged.

Nearest bucket: by |log(image aspect) - log(bucket aspect)|, compared exactly in fractions, ties to the
earlier bucket in the list. Infinity takes the nearest h/w template by |h/w - t|
(`get_h_div_w_template2indices`); the log distance treats a portrait image and its landscape transpose
alike.

Default buckets (token grids h x w; pixels = 16x; the 256px set scaled by 2 and 4, so an image keeps its
bucket's aspect across the progressive 256 -> 512 -> 1024 stages):

    aspect h:w      256px (S=16)   512px (S=32)   1024px (S=64)  1024px pixels (h x w)  tokens vs S^2
    1:1             16x16          32x32          64x64          1024x1024              0
    7:9   (~3:4)    14x18, 18x14   28x36, 36x28   56x72, 72x56   896x1152               -1.6%
    13:20 (~2:3)    13x20, 20x13   26x40, 40x26   52x80, 80x52   832x1280               +1.6%
    4:7   (~9:16)   12x21, 21x12   24x42, 42x24   48x84, 84x48   768x1344               -1.6%
    11:23 (~1:2)    11x23, 23x11   22x46, 46x22   44x92, 92x44   704x1472               -1.2%

The model's string form is the token grid, height first ("56x72"; `parse_bucket` reads it back, and
[56, 72] pairs in JSON). The data side (`data_tools.buckets`, which may not import this package) names a
bucket by its pixel size width first, as PIL and `hart-data stats` do ("1152x896");
`Bucket.from_image_size(1152, 896)` is the model's 56x72. The module itself uses no torch and no
DeepSpeed (its package, hart_train.models, imports torch).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence

Grid = tuple[int, int]
Schedule = tuple[Grid, ...]


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def as_schedule(schedule: Sequence[int] | Sequence[Sequence[int]]) -> Schedule:
    """(h, w) grids from a schedule given as square sides (1, 2, 4) or as grids ((1, 1), (2, 3), (3, 5));
    a ValueError unless the grids are positive and never shrink on either axis."""
    grids = []
    for si, p in enumerate(schedule):
        if isinstance(p, numbers.Integral):
            p = (p, p)
        if isinstance(p, str) or len(p) != 2:
            raise ValueError(f"scale {si} of the schedule must be a side or an (h, w) pair, got {p!r}")
        grids.append((_positive_int(p[0], f"scale {si} height"), _positive_int(p[1], f"scale {si} width")))
    if not grids:
        raise ValueError("a scale schedule needs at least one scale")
    for si, ((h0, w0), (h1, w1)) in enumerate(zip(grids, grids[1:])):
        if h1 < h0 or w1 < w0:
            raise ValueError(f"scale {si + 1} ({h1}x{w1}) is smaller than scale {si} ({h0}x{w0}) on an axis")
    return tuple(grids)


def num_tokens(schedule) -> int:
    """Tokens over all scales, sum of h * w."""
    return sum(h * w for h, w in as_schedule(schedule))


def bucket_schedule(patch_nums: Sequence[int], height: int, width: int) -> Schedule:
    """The (h, w) grid of every scale for the last grid height x width (see the module docstring)."""
    pn = tuple(_positive_int(p, "patch_nums entry") for p in patch_nums)
    if not pn:
        raise ValueError("patch_nums is empty")
    S = pn[-1]
    height, width = _positive_int(height, "bucket height"), _positive_int(width, "bucket width")

    def side(p: int, X: int) -> int:
        return max(1, (2 * p * X + S) // (2 * S))  # round(p * X / S), halves up

    return as_schedule(tuple((1, 1) if p == 1 else (side(p, height), side(p, width)) for p in pn))


@dataclass(frozen=True)
class Bucket:
    """A last-scale token grid, `height` rows by `width` columns."""

    height: int
    width: int

    def __post_init__(self):
        _positive_int(self.height, "bucket height")
        _positive_int(self.width, "bucket width")

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    def __str__(self) -> str:
        return self.name

    @property
    def aspect(self) -> float:
        """height / width."""
        return self.height / self.width

    def schedule(self, patch_nums: Sequence[int]) -> Schedule:
        return bucket_schedule(patch_nums, self.height, self.width)

    def image_size(self, downsample: int = 16) -> tuple[int, int]:
        """(height, width) in pixels of this bucket's images."""
        return self.height * downsample, self.width * downsample

    def transposed(self) -> Bucket:
        return Bucket(self.width, self.height)

    @classmethod
    def from_image_size(cls, width: int, height: int, downsample: int = 16) -> Bucket:
        """The bucket of images `width` x `height` px (PIL's order; the data side names it "WxH"), both
        multiples of `downsample`: 1152 x 896 px is the bucket "56x72"."""
        if width % downsample or height % downsample:
            raise ValueError(f"image size {width}x{height} (width x height) is not a multiple of {downsample} px")
        return cls(height // downsample, width // downsample)


_NAME = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_bucket(spec: str | Bucket | Sequence[int]) -> Bucket:
    """A Bucket from "56x72" (height x width in tokens), a [56, 72] pair (JSON) or a Bucket."""
    if isinstance(spec, Bucket):
        return spec
    if isinstance(spec, str):
        m = _NAME.match(spec)
        if not m:
            raise ValueError(f"bucket {spec!r}: expected '<height>x<width>' in tokens, e.g. '56x72'")
        return Bucket(int(m.group(1)), int(m.group(2)))
    if len(spec) != 2:
        raise ValueError(f"bucket {spec!r}: expected '<height>x<width>' or a [height, width] pair")
    return Bucket(*spec)


def parse_buckets(spec: str | Iterable) -> tuple[Bucket, ...]:
    """Buckets from "64x64,56x72,72x56" or a list of names / pairs; a ValueError for none or a repeat."""
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    buckets = tuple(parse_bucket(s) for s in items)
    if not buckets:
        raise ValueError("no buckets given")
    seen = set()
    for b in buckets:
        if b in seen:
            raise ValueError(f"bucket {b.name} is listed twice")
        seen.add(b)
    return buckets


def _scaled(base: Sequence[Grid], factor: int) -> tuple[Bucket, ...]:
    return tuple(Bucket(h * factor, w * factor) for h, w in base)


# the 256px grids (S = 16); 512px and 1024px scale them (module docstring)
_BASE_256: tuple[Grid, ...] = ((16, 16), (14, 18), (18, 14), (13, 20), (20, 13), (12, 21), (21, 12), (11, 23), (23, 11))
DEFAULT_BUCKETS: dict[int, tuple[Bucket, ...]] = {256: _scaled(_BASE_256, 1), 512: _scaled(_BASE_256, 2),
                                                  1024: _scaled(_BASE_256, 4)}


def default_buckets(resolution: int) -> tuple[Bucket, ...]:
    """The documented bucket set of a stage resolution (256, 512 or 1024); the square bucket first."""
    if resolution not in DEFAULT_BUCKETS:
        raise ValueError(f"no default buckets for resolution {resolution}; choose from {sorted(DEFAULT_BUCKETS)} "
                         "or list the buckets")
    return DEFAULT_BUCKETS[resolution]


def check_buckets(buckets: Iterable[Bucket], patch_nums: Sequence[int], max_token_deviation: float = 0.1) -> None:
    """A ValueError naming the first bucket whose last scale is not about the square's S^2 tokens
    (relative difference above `max_token_deviation`), e.g. a 1024px bucket listed for a 256px stage."""
    S = _positive_int(patch_nums[-1], "patch_nums[-1]")
    for b in buckets:
        dev = b.height * b.width / (S * S) - 1
        if abs(dev) > max_token_deviation:
            raise ValueError(f"bucket {b.name} has {b.height * b.width} last-scale tokens, {dev:+.0%} from the "
                             f"square's {S}x{S} = {S * S} (allowed: {max_token_deviation:.0%})")


def nearest_bucket(width: float, height: float, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect is nearest the image's, for an image `width` x `height` (PIL's
    `Image.size` order), ties to the earlier bucket. The distance |log(a / b)| is compared exactly, as
    the larger of a / b and b / a in fractions, so no float rounding decides a near tie (the data side's
    `data_tools.buckets.nearest_bucket` measures the same way)."""
    if not width > 0 or not height > 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    image = Fraction(height) / Fraction(width)  # exact for ints and floats alike

    def distance(b: Bucket) -> Fraction:
        r = image / Fraction(b.height, b.width)
        return r if r >= 1 else 1 / r

    return min(buckets, key=distance)  # min keeps the first of equals


def bucket_for_aspect(aspect: str, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest an aspect given as "width:height" (e.g. "16:9", landscape), as `--aspect` takes it."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$", aspect)
    if not m or Fraction(m.group(1)) <= 0 or Fraction(m.group(2)) <= 0:
        raise ValueError(f"aspect {aspect!r}: expected '<width>:<height>', e.g. '16:9'")
    return nearest_bucket(Fraction(m.group(1)), Fraction(m.group(2)), buckets)


def stage_buckets(configured: Iterable | str | None, patch_nums: Sequence[int]) -> tuple[Bucket, ...]:
    """The bucket set of a t2i stage (`t2i.buckets`): the configured list, else the documented default of the
    stage's resolution (16 * patch_nums[-1] px: 256, 512 or 1024), else, for a schedule without one (the tiny
    test configs), the square bucket alone. Every bucket is checked against `patch_nums` (`check_buckets`)."""
    S = _positive_int(patch_nums[-1], "patch_nums[-1]")
    if configured is None:
        buckets = DEFAULT_BUCKETS.get(16 * S, (Bucket(S, S),))
    else:
        buckets = parse_buckets(configured)
    check_buckets(buckets, patch_nums)
    return buckets


def largest_bucket(buckets: Iterable[Bucket], patch_nums: Sequence[int]) -> Bucket:
    """The bucket with the most tokens over all scales (the longest sequence: the most activation memory and
    attention), ties to the one with more last-scale tokens, then the earlier."""
    return max(buckets, key=lambda b: (num_tokens(b.schedule(patch_nums)), b.height * b.width))


def image_schedule(size: Sequence[int] | None, patch_nums: Sequence[int],
                   downsample: int = 16) -> tuple[Bucket | None, Schedule | None]:
    """The bucket of a batch of images `size` = (width, height) px (the reader's `batch["bucket"]`; None: no
    bucket, e.g. token batches) and its `training_schedule`."""
    if size is None:
        return None, None
    bucket = Bucket.from_image_size(*size, downsample=downsample)
    return bucket, training_schedule(bucket, patch_nums)


def training_schedule(bucket: Bucket | None, patch_nums: Sequence[int]) -> Schedule | None:
    """The `schedule` argument of the model and tokenizer for a batch of `bucket`: None (the square path,
    computed exactly as without buckets) for no bucket or the square S x S one, else the bucket's schedule."""
    S = patch_nums[-1]
    if bucket is None or (bucket.height, bucket.width) == (S, S):
        return None
    return bucket.schedule(patch_nums)
