"""Image-caption sources for `hart-data shard`: one iterator of `SourceItem`s in a fixed order.

A source spec is `KIND:LOCATION`:

    folder:DIR        images with a same-stem .txt or .json caption (json key `caption` or `text`)
    jsonl:FILE        one JSON object per line with a path and a caption field
    csv:FILE          a header row with a path and a caption column
    parquet:FILE      a path and a caption column
    wds:URL           existing webdataset tars, in webdataset's URL syntax (`expand_wds_urls`): brace
                      patterns like s3://b/x/{00000..00009}.tar, several joined by `::`
    emoji             the offline demo set: Noto Color Emoji rendered with Pillow

Design decisions:

- The order is deterministic (sorted listings, file order, brace order), because shard plans are
  chunks of this order and `--resume` relies on a rerun making the same plan.
- Items carry their bytes: the parent hashes them for dedup before anything is sent to a worker.
  Path-based sources fetch bytes with a small thread pool, chunk by chunk, preserving order, so S3
  latency overlaps without unbounded read-ahead.
- A problem with one item (unreadable path, malformed record) is an item with `skip` set, counted by
  the writer; a problem with the source as a whole (missing file, missing column) is a ValueError or
  FileNotFoundError before anything is written.
- Captions are cleaned here (`clean_caption`), so an all-whitespace caption is "missing".
- `wds:` URLs are expanded by webdataset itself; the tars are read with `tarfile`, grouping consecutive
  members by key as webdataset does, but not with webdataset's grouper: it raises on a repeated member
  name, and one malformed sample of someone else's tars must not end the whole job.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import tarfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

from webdataset.shardlists import expand_urls

from data_tools import schema, storage

SOURCE_KINDS = ("folder", "jsonl", "csv", "parquet", "wds", "emoji")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_NAMES = "/usr/share/unicode/emoji/emoji-test.txt"
EMOJI_FONT_SIZE = 109  # the only size of the font's colour bitmaps
_READ_CHUNK = 64
_READ_THREADS = 16
_WS_RE = re.compile(r"\s+")


@dataclass
class SourceItem:
    source: str  # where it came from: a path/URL, or `tar_url#key` for webdataset input
    caption: str | None  # cleaned; None when missing or empty
    data: bytes | None = None  # the source image bytes
    skip: str | None = None  # a skip reason decided while reading (e.g. `unreadable`)
    detail: str = ""


@dataclass
class _Record:
    """An item before its bytes (and possibly its caption file) have been read."""

    source: str
    caption: str | None = None
    caption_url: str | None = None
    data: bytes | None = None
    skip: str | None = None
    detail: str = ""


def clean_caption(text: object) -> str | None:
    """Unicode NFC, control characters dropped (tabs/newlines become spaces), whitespace collapsed."""
    if not isinstance(text, str):
        return None
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) != "Cc")
    text = _WS_RE.sub(" ", text).strip()
    return text or None


def parse_spec(spec: str) -> tuple[str, str]:
    if spec == "emoji":
        return "emoji", ""
    kind, sep, location = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS or (kind != "emoji" and not location):
        raise ValueError(
            f"source {spec!r} is not KIND:LOCATION with KIND one of {', '.join(SOURCE_KINDS)} "
            "(e.g. folder:/data/imgs, jsonl:s3://b/list.jsonl, wds:s3://b/x/{00000..00009}.tar, emoji)"
        )
    return kind, location


def iter_items(
    spec: str, *, path_column: str = "path", caption_column: str = "caption", limit: int | None = None
) -> Iterator[SourceItem]:
    """The items of a source spec in deterministic order, with their bytes; the first `limit` only."""
    kind, location = parse_spec(spec)
    check_source(kind, location)
    _check_table_columns(kind, location, path_column, caption_column)
    if kind == "folder":
        records = _folder_records(location)
    elif kind == "jsonl":
        records = _jsonl_records(location, path_column, caption_column)
    elif kind == "csv":
        records = _csv_records(location, path_column, caption_column)
    elif kind == "parquet":
        records = _parquet_records(location, path_column, caption_column)
    elif kind == "wds":
        records = _wds_records(location)
    else:
        records = _emoji_records()
    if limit is not None:
        records = itertools.islice(records, limit)
    return _with_bytes(records)


def check_source(kind: str, location: str) -> None:
    """Fail now, not on first iteration, when the source as a whole is missing."""
    if kind == "folder":
        fs, root = storage.get_fs(location)
        if not fs.isdir(root):
            raise FileNotFoundError(f"source folder not found: {location}")
    elif kind == "wds":
        urls = expand_wds_urls(location)
        missing = [u for u in urls if not storage.exists(u)]
        if missing:
            raise FileNotFoundError(f"webdataset source: {len(missing)} of {len(urls)} tars not found, first {missing[0]}")
    elif kind == "emoji":
        missing = [p for p in (EMOJI_FONT, EMOJI_NAMES) if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(
                f"the emoji source needs {', '.join(missing)}: apt-get install fonts-noto-color-emoji unicode-data"
            )
    elif not storage.exists(location):
        raise FileNotFoundError(f"source not found: {location}")


def _check_table_columns(kind: str, location: str, path_column: str, caption_column: str) -> None:
    """csv/parquet: the two columns must exist (jsonl rows may differ; a bad row is a counted skip)."""
    if kind == "csv":
        with storage.open_read(location) as f:
            names = next(csv.reader(io.TextIOWrapper(f, encoding="utf-8", newline="")), [])
    elif kind == "parquet":
        import pyarrow.parquet as pq

        with storage.open_read(location) as f:
            names = pq.ParquetFile(f).schema_arrow.names
    else:
        return
    missing = [c for c in (path_column, caption_column) if c not in names]
    if missing:
        raise ValueError(
            f"{location}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)}); "
            "choose them with --path-column / --caption-column"
        )


def _with_bytes(records: Iterable[_Record]) -> Iterator[SourceItem]:
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        it = iter(records)
        while chunk := list(itertools.islice(it, _READ_CHUNK)):
            yield from pool.map(_fetch, chunk)


def _fetch(rec: _Record) -> SourceItem:
    caption = rec.caption
    if rec.caption_url is not None:
        caption = _read_caption_file(rec.caption_url)
    data, skip, detail = rec.data, rec.skip, rec.detail
    if data is None and skip is None:
        try:
            data = storage.read_bytes(rec.source)
        except Exception as e:  # any storage error for one path is a counted skip, not a crash
            skip, detail = "unreadable", f"{type(e).__name__}: {e}"
    return SourceItem(rec.source, caption, data, skip, detail)


def _read_caption_file(url: str) -> str | None:
    try:
        text = storage.read_text(url)
    except (OSError, UnicodeDecodeError):
        return None
    if not url.endswith(".json"):
        return clean_caption(text)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(meta, dict):
        return None
    return clean_caption(meta.get("caption", meta.get("text")))


def _resolve(base_dir: str, path: str) -> str:
    """Relative paths resolve against the list file's directory; URLs and absolute paths stay."""
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(base_dir, path)


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def _folder_records(location: str) -> Iterator[_Record]:
    fs, root = storage.get_fs(location)
    files = sorted(fs.find(root))
    present = set(files)
    proto = "" if storage.is_local(location) else location.split("://", 1)[0] + "://"
    for path in files:
        stem, _, suffix = path.rpartition(".")
        if not stem or suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_path = next((stem + ext for ext in (".txt", ".json") if stem + ext in present), None)
        rec = _Record(proto + path, caption_url=proto + caption_path if caption_path else None)
        yield rec


def _row_record(row: dict, base_dir: str, path_column: str, caption_column: str, where: str) -> _Record:
    path = row.get(path_column)
    if not isinstance(path, str) or not path.strip():
        return _Record(where, skip="bad_record", detail=f"no {path_column!r} value")
    return _Record(_resolve(base_dir, path.strip()), caption=clean_caption(row.get(caption_column)))


def _jsonl_records(location: str, path_column: str, caption_column: str) -> Iterator[_Record]:
    base = _parent(location)
    with storage.open_read(location) as f:
        for lineno, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
            if not raw.strip():
                continue
            where = f"{location}:{lineno}"
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                yield _Record(where, skip="bad_record", detail=f"not JSON: {e}")
                continue
            if not isinstance(row, dict):
                yield _Record(where, skip="bad_record", detail="not a JSON object")
                continue
            yield _row_record(row, base, path_column, caption_column, where)


def _csv_records(location: str, path_column: str, caption_column: str) -> Iterator[_Record]:
    base = _parent(location)
    with storage.open_read(location) as f:
        reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        for lineno, row in enumerate(reader, 2):
            yield _row_record(row, base, path_column, caption_column, f"{location}:{lineno}")


def _parquet_records(location: str, path_column: str, caption_column: str) -> Iterator[_Record]:
    import pyarrow.parquet as pq

    base = _parent(location)
    with storage.open_read(location) as f:
        pf = pq.ParquetFile(f)
        row_index = 0
        for batch in pf.iter_batches(batch_size=4096, columns=[path_column, caption_column]):
            for row in batch.to_pylist():
                yield _row_record(row, base, path_column, caption_column, f"{location}#row{row_index}")
                row_index += 1


def expand_wds_urls(spec: str) -> list[str]:
    """The tar URLs of a `wds:` source, expanded as `webdataset.WebDataset` expands its URL string
    (patterns joined by `::`, `${NAME}` from the environment variable WDS_NAME, then braces), so a
    URL that works there works here."""
    try:
        return expand_urls(spec)
    except (AssertionError, KeyError) as e:  # webdataset asserts that WDS_NAME is set
        raise ValueError(f"webdataset source {spec!r}: each ${{NAME}} needs a WDS_NAME environment "
                         f"variable ({e})") from None


def _wds_records(pattern: str) -> Iterator[_Record]:
    for url in expand_wds_urls(pattern):
        yield from _tar_records(url)


def _tar_records(url: str) -> Iterator[_Record]:
    """Samples of one webdataset tar, read as a stream: members sharing a key are one sample."""
    key, members = None, {}
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            mkey, ext = schema.split_key(member.name)
            if mkey != key and key is not None:
                yield _tar_sample(url, key, members)
                members = {}
            key = mkey
            members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield _tar_sample(url, key, members)


def _tar_sample(url: str, key: str, members: dict[str, bytes]) -> _Record:
    source = f"{url}#{key}"
    image_ext = next((e for e in IMAGE_SUFFIXES if e in members), None)
    caption = None
    if "txt" in members:
        caption = clean_caption(members["txt"].decode("utf-8", "replace"))
    elif "json" in members:
        try:
            meta = json.loads(members["json"])
            if isinstance(meta, dict):
                caption = clean_caption(meta.get("caption", meta.get("text")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            caption = None
    if image_ext is None:
        return _Record(source, caption, skip="no_image", detail=f"members: {', '.join(sorted(members))}")
    return _Record(source, caption, data=members[image_ext])


def emoji_names(path: str = EMOJI_NAMES) -> list[tuple[str, str]]:
    """(emoji string, Unicode name) for every fully-qualified line of emoji-test.txt, in file order."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if "; fully-qualified" not in line:
                continue
            codes = line.split(";", 1)[0].split()
            # "# 😀 E1.0 grinning face": the name follows the emoji and its version token
            name = line.split("#", 1)[1].strip().split(" ", 2)[2]
            out.append(("".join(chr(int(c, 16)) for c in codes), name))
    return out


def _emoji_records() -> Iterator[_Record]:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(EMOJI_FONT, EMOJI_FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
    for i, (text, name) in enumerate(emoji_names()):
        left, top, right, bottom = font.getbbox(text)
        canvas = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((-left, -top), text, font=font, embedded_color=True)
        white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
        buf = io.BytesIO()
        Image.alpha_composite(white, canvas).convert("RGB").save(buf, "PNG")
        yield _Record(f"emoji:{i:04d}:{'-'.join(f'{ord(c):X}' for c in text)}", clean_caption(name), data=buf.getvalue())
