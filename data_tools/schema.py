"""The data contract between the shard writer and every reader. No torch here.

A dataset is a directory (local path or any fsspec URL such as ``s3://bucket/prefix``) holding

    shard-000000.tar ... shard-NNNNNN.tar     webdataset tars
    shard-000000.stats.json ...               per-shard done marker + stats (written after the tar)
    manifest.json                              written last and atomically

A sample inside a shard is the webdataset group of members sharing a key:

    <key>.jpg | <key>.png | <key>.webp         the image, already resized by `hart-data shard`
    <key>.txt                                   the cleaned caption (UTF-8)
    <key>.json                                  metadata, see SAMPLE_META_FIELDS

Only ``manifest.json`` makes a dataset complete: a reader refuses a directory without one, so a
crashed or still-running shard job is never read as a finished dataset.

A *bucketed* dataset (`hart-data shard --buckets`, see `data_tools.buckets`) stores each image at its
aspect-ratio bucket's size and every shard holds samples of one bucket, so a reader plans batches by
bucket from the manifest alone: ``options.buckets`` lists the dataset's bucket set (``"WxH"`` pixel
names, canonical order) and ``options.resolution`` the stage resolution it is for; each shard entry
carries its ``bucket``; each sample's metadata carries ``bucket`` too; ``stats.buckets`` counts
samples per bucket. An unbucketed dataset has none of these keys (its files are as before buckets).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXTS = ("jpg", "png", "webp")
CAPTION_EXT = "txt"
META_EXT = "json"
# Fields every sample's metadata JSON carries. `sha256` is the hash of the *source* bytes (the
# dedup key); `width`/`height` are of the stored image, `orig_*` of the source image.
SAMPLE_META_FIELDS = ("width", "height", "orig_width", "orig_height", "source", "sha256")
BUCKET_FIELD = "bucket"  # in a bucketed dataset's sample metadata, shard entries and options ("buckets")

_SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_stats_name(index: int) -> str:
    return f"shard-{index:06d}.stats.json"


def shard_index(name: str) -> int:
    m = _SHARD_RE.match(name)
    if not m:
        raise ValueError(f"not a shard name: {name!r}")
    return int(m.group(1))


def sample_key(shard: int, position: int) -> str:
    """Keys are unique across the dataset and sort in write order; no dots (webdataset splits on them)."""
    return f"{shard:06d}_{position:06d}"


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    bucket: str | None = None  # "WxH" in a bucketed dataset (every sample of the shard has that size)


@dataclass
class Manifest:
    schema_version: int
    shards: list[ShardInfo]
    options: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def buckets(self) -> list[str] | None:
        """The bucket set of a bucketed dataset ("WxH" names), None for an unbucketed one."""
        return self.options.get("buckets")

    def to_json(self) -> str:
        d = asdict(self)
        for shard in d["shards"]:
            if shard["bucket"] is None:  # unbucketed manifests stay byte-identical to before buckets
                del shard["bucket"]
        d["num_samples"] = self.num_samples
        d["num_bytes"] = self.num_bytes
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest.json") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or "schema_version" not in d or "shards" not in d:
            raise ValueError(f"{where}: not a hart-data manifest (needs schema_version and shards)")
        if d["schema_version"] != SCHEMA_VERSION:
            raise ValueError(
                f"{where}: schema_version {d['schema_version']} is not supported (this reader knows {SCHEMA_VERSION})"
            )
        shards = []
        for i, s in enumerate(d["shards"]):
            try:
                bucket = None if s.get("bucket") is None else str(s["bucket"])
                shards.append(ShardInfo(str(s["name"]), int(s["num_samples"]), int(s["bytes"]), str(s["sha256"]),
                                        bucket))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"{where}: shard entry {i} is malformed ({e!r})") from None
        manifest = cls(d["schema_version"], shards, d.get("options", {}), d.get("stats", {}))
        _check_buckets(manifest, where)
        return manifest


def _check_buckets(manifest: Manifest, where: str) -> None:
    """A bucketed manifest names its bucket set and every shard's bucket in it; an unbucketed one neither."""
    names = manifest.buckets
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"{where}: options.buckets must be a list of \"WxH\" names, got {names!r}")
    for shard in manifest.shards:
        if names is None and shard.bucket is not None:
            raise ValueError(f"{where}: shard {shard.name} has bucket {shard.bucket} but options.buckets is missing")
        if names is not None and shard.bucket not in names:
            raise ValueError(f"{where}: shard {shard.name} has bucket {shard.bucket!r}, "
                             f"not one of options.buckets {names}")


def split_key(member_name: str) -> tuple[str, str]:
    """`dir/000001_000002.jpg` -> (`dir/000001_000002`, `jpg`), webdataset's convention:
    the key is everything before the first dot of the basename, the extension the rest."""
    slash = member_name.rfind("/")
    dot = member_name.find(".", slash + 1)
    if dot < 0:
        return member_name, ""
    return member_name[:dot], member_name[dot + 1 :].lower()
