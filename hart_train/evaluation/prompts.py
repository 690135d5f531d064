"""Evaluation prompt sets and where their images go: MJHQ-30K, GenEval, or one prompt per line.

A format is two things: how its file is read into `PromptRecord`s, and how the images of a record are
laid out on disk, so that each benchmark's own tools read the output as they read their own:

    mjhq     meta_data.json, {id: {"prompt": ..., "category": ...}} in file order
             -> <out>/<category>/<id>.png (one image per prompt; with more: <id>_<k:04d>.png), as the
                reference images lie in mjhq30k_imgs/<category>/<id>.jpg
    geneval  evaluation_metadata.jsonl, one JSON object per line with "prompt" (and tag, include, ...)
             -> <out>/<index:05d>/metadata.jsonl (that line's object) + samples/<k:04d>.png, the layout
                GenEval's README asks for and its evaluate_images.py reads (djghosh13/geneval)
    text     one prompt per non-empty line (surrounding whitespace stripped)
             -> <out>/<index:05d>_<k:04d>.png

Every image has a JSON sidecar beside it (same stem, `.json`; GenEval's evaluator only picks up
`\\d+\\.png`, so `0000.json` is invisible to it). `index` is the record's position in the file (blank
lines of a JSONL or text file are skipped and not counted), which is what image seeds derive from.

The format is detected from the name (`.json` -> mjhq, `.jsonl` -> geneval, `.txt` -> text) or, for
other names, from the content (JSON objects per line, or one with a "prompt" -> geneval; another JSON
object -> mjhq; else text).
A malformed file is one ValueError naming the file and the line or entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

FORMATS = ("mjhq", "geneval", "text")


@dataclass(frozen=True)
class PromptRecord:
    index: int  # position among the file's records
    key: str  # MJHQ image id; "%05d" % index for GenEval and text
    prompt: str
    category: str | None = None  # MJHQ only
    source: dict | None = None  # the record as the file gives it (MJHQ entry, GenEval line); None for text


@dataclass(frozen=True)
class PromptSet:
    path: str
    format: str
    records: tuple[PromptRecord, ...]

    def sha256(self) -> str:
        """Identity of the prompts (not of the file's bytes: a copied or re-indented file is the same set)."""
        rows = [[r.key, r.prompt, r.category, r.source] for r in self.records]
        blob = json.dumps([self.format, rows], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def detect_format(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix, fmt in ((".jsonl", "geneval"), (".json", "mjhq"), (".txt", "text")):
        if name.endswith(suffix):
            return fmt
    text = _read_text(path)
    if not text.lstrip().startswith("{"):
        return "text"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return "geneval"  # several JSON objects, one per line
    return "geneval" if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) else "mjhq"  # one GenEval line


def read_prompts(path: str, fmt: str = "auto") -> PromptSet:
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"prompt format must be one of auto, {', '.join(FORMATS)}; got {fmt!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    reader = {"mjhq": _read_mjhq, "geneval": _read_geneval, "text": _read_lines}[fmt]
    records = reader(path, _read_text(path))
    if not records:
        raise ValueError(f"{path}: no prompts (read as {fmt})")
    return PromptSet(path, fmt, tuple(records))


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first prompt
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _read_mjhq(path: str, text: str) -> list[PromptRecord]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (MJHQ-30K meta_data.json format): {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f'{path}: MJHQ-30K meta_data.json must be a JSON object {{id: {{"prompt": ..., '
                         f'"category": ...}}}}, got a {type(meta).__name__}')
    records = []
    for i, (key, entry) in enumerate(meta.items()):
        where = f"{path}: entry {key!r}"
        if not isinstance(entry, dict) or not _is_text(entry.get("prompt")):
            raise ValueError(f'{where} has no non-empty string "prompt"')
        if not _is_text(entry.get("category")):
            raise ValueError(f'{where} has no non-empty string "category"')
        _check_file_name(key, f"{where}: the id")
        _check_file_name(entry["category"], f"{where}: the category")
        records.append(PromptRecord(i, key, entry["prompt"], entry["category"], entry))
    return records


def _read_geneval(path: str, text: str) -> list[PromptRecord]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not JSON (GenEval evaluation_metadata.jsonl format): {e}") from None
        if not isinstance(obj, dict) or not _is_text(obj.get("prompt")):
            raise ValueError(f'{path}:{line_no}: a GenEval line must be a JSON object with a non-empty "prompt"')
        i = len(records)
        records.append(PromptRecord(i, f"{i:05d}", obj["prompt"], None, obj))
    return records


def _read_lines(path: str, text: str) -> list[PromptRecord]:
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    return [PromptRecord(i, f"{i:05d}", p) for i, p in enumerate(prompts)]


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_file_name(name: str, what: str) -> None:
    """Ids and categories become file names: no separators, no hidden or parent names."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{what} {name!r} cannot be a file name")


# ---------------------------------------------------------------------- output layout
def image_path(prompts: PromptSet, record: PromptRecord, k: int, images_per_prompt: int) -> str:
    """Image k of `record`, relative to the output directory."""
    if prompts.format == "geneval":
        return os.path.join(f"{record.index:05d}", "samples", f"{k:04d}.png")
    if prompts.format == "mjhq":
        stem = record.key if images_per_prompt == 1 else f"{record.key}_{k:04d}"
        return os.path.join(record.category, f"{stem}.png")
    return f"{record.index:05d}_{k:04d}.png"


def sidecar_path(image_rel: str) -> str:
    return os.path.splitext(image_rel)[0] + ".json"


def folder_metadata(prompts: PromptSet, record: PromptRecord) -> tuple[str, str] | None:
    """(relative path, text) of the per-prompt file a format's evaluator reads, or None: GenEval's
    metadata.jsonl holds the prompt's line of evaluation_metadata.jsonl (evaluate_images.py json.load()s it)."""
    if prompts.format != "geneval":
        return None
    return os.path.join(f"{record.index:05d}", "metadata.jsonl"), json.dumps(record.source, ensure_ascii=False) + "\n"
