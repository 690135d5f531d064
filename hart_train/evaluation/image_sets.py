"""The image sets `hart-eval fid` and `hart-eval clip` read: a folder of images, or a dataset of the
project's shards (`hart-data shard` output, local or any fsspec URL such as s3://).

Design decisions:
- A folder is read recursively (MJHQ-30K unpacks into one folder per category; hidden files, such as
  a running `hart-eval generate`'s temp files, are not images of the set), in sorted order of relative
  path, so a set has one order on every machine. A directory holding `manifest.json`, and
  every remote URL, is a shard dataset, read in manifest order through `data_tools.reader`'s shard
  source (its retries, its tar parser); a sample it cannot read is skipped and counted.
- `digest()` identifies a set's content, for the reference-feature cache: a folder by the sha256 of
  every image file with its relative path (a changed, added or removed image changes it), a shard
  dataset by its manifest, which records each shard's sha256.
- A folder image's caption comes from a sidecar beside it: `<stem>.json` with a "prompt" field (what
  `hart-eval generate` writes), else `<stem>.txt`. A shard sample's caption is its `txt` member.
  The settings.json `hart-eval generate` leaves in its output folder goes into the reports.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_tools import images as data_images
from data_tools import reader, s3io, schema, storage

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# hart_train.evaluation.generate.SETTINGS_FILE, not imported from there: that module loads the model stack
GENERATE_SETTINGS = "settings.json"


@dataclass
class Sample:
    name: str  # relative path in a folder, sample key in shards
    data: bytes  # the encoded image
    caption: str | None


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded bytes -> 8-bit RGB (alpha composited onto white, as the shard writer does)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return data_images.to_rgb(img)


def sidecar_caption(path: Path) -> str | None:
    meta = path.with_suffix(".json")
    if meta.is_file():
        try:
            prompt = json.loads(meta.read_text(encoding="utf-8")).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            raise ValueError(f"{meta}: not a JSON object with a \"prompt\" field") from None
        if isinstance(prompt, str):
            return prompt
    txt = path.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text(encoding="utf-8").strip()
    return None


class FolderSet:
    kind = "folder"

    def __init__(self, root: Path):
        self.source = str(root)
        self.root = root
        self.paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                            key=lambda p: p.relative_to(root).as_posix())
        if not self.paths:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def digest(self, num_threads: int) -> str:
        with ThreadPoolExecutor(num_threads) as pool:  # hashlib releases the GIL: reads and hashes overlap
            hashes = pool.map(file_sha256, self.paths)
            h = hashlib.sha256()
            for path, file_hash in zip(self.paths, hashes):
                h.update(f"{self.name(path)}\0{file_hash}\n".encode())
        return "folder:" + h.hexdigest()

    def samples(self) -> Iterator[Sample]:
        for path in self.paths:
            yield Sample(self.name(path), path.read_bytes(), sidecar_caption(path))

    def skipped(self) -> int:
        return 0

    def generation_record(self) -> dict | None:
        """The settings.json `hart-eval generate` writes into its output folder, if this is one."""
        path = self.root / GENERATE_SETTINGS
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None


class ShardSet:
    kind = "shards"

    def __init__(self, url: str):
        self.source = storage.redact(url)
        self._config = reader.ReaderConfig(urls=[url], num_workers=0)
        policy = self._config.retry_policy()
        self._shards = reader.load_shards([url], policy, self._config.io_timeout)
        fs, path = s3io.read_filesystem(storage.join(url, schema.MANIFEST_NAME), self._config.io_timeout)
        self._manifest_sha256 = hashlib.sha256(s3io.read_object(fs, path, policy)).hexdigest()
        self._skipped = 0

    def __len__(self) -> int:
        return sum(s.num_samples for s in self._shards)

    def digest(self, num_threads: int) -> str:
        return "shards:" + self._manifest_sha256

    def samples(self) -> Iterator[Sample]:
        self._skipped = 0
        source = reader.ShardSource(self._shards, self._config)
        for _, key, members in source.samples(np.arange(len(self))):
            image_ext = next((e for e in schema.IMAGE_EXTS if members and e in members), None)
            if image_ext is None:
                self._skipped += 1
                continue
            caption = members.get(schema.CAPTION_EXT)
            yield Sample(key, members[image_ext], caption.decode("utf-8", "replace") if caption else None)

    def skipped(self) -> int:
        """Samples of the last `samples()` pass that were missing or had no image."""
        return self._skipped

    def generation_record(self) -> None:
        return None


def open_image_set(source: str) -> FolderSet | ShardSet:
    """A folder of images, or a shard dataset (a directory with manifest.json, or any URL)."""
    if not storage.is_local(source):
        return ShardSet(source)
    path = Path(source.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{source}: no such directory (expected a folder of images or a shard dataset)")
    if (path / schema.MANIFEST_NAME).is_file():
        return ShardSet(str(path))
    return FolderSet(path)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
