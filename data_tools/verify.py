"""`hart-data verify`: check a dataset against its manifest, decoding every sample.

Checks, per shard listed in the manifest: the tar is present, has the recorded size and sha256 and
the recorded number of samples; every sample has exactly one image, one `.txt` and one `.json`; the
json carries schema.SAMPLE_META_FIELDS; the image decodes fully and has the recorded width/height.
A directory without a manifest is reported incomplete (a crashed or still-running shard job).

Design decisions: shards are checked in parallel by a 'spawn' process pool, one shard per task, each
read whole into memory (shards are sized to be streamed anyway). Problems are collected, never
raised, so one run names every bad shard and key; the report is a plain dict so `--json` is trivial.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import sys
import tarfile
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

from PIL import Image
from tqdm import tqdm

from data_tools import buckets, schema, storage


def load_manifest(out: str) -> schema.Manifest:
    """The manifest of a complete dataset; FileNotFoundError names the dataset if there is none."""
    url = storage.join(out, schema.MANIFEST_NAME)
    if not storage.exists(url):
        raise FileNotFoundError(
            f"{out}: no {schema.MANIFEST_NAME}, so the dataset is incomplete "
            "(the shard job crashed or is still running; rerun it with --resume)"
        )
    return schema.Manifest.from_json(storage.read_text(url), where=url)


def verify_dataset(out: str, *, workers: int = 1, progress: bool = True) -> dict:
    """Report dict: ok, dataset, num_shards, num_samples, problems [{shard, key, problem}]."""
    report = {"ok": False, "dataset": out, "num_shards": 0, "num_samples": 0, "problems": []}
    try:
        manifest = load_manifest(out)
    except (FileNotFoundError, ValueError) as e:
        report["problems"].append({"shard": None, "key": None, "problem": str(e)})
        return report
    tasks = [(out, s.name, s.num_samples, s.bytes, s.sha256, s.bucket) for s in manifest.shards]
    bar = tqdm(total=len(tasks), unit="shard", desc="verify", disable=not progress, file=sys.stderr)
    results = []
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            results.append(verify_shard(*task))
            bar.update(1)
    else:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for result in pool.map(verify_shard, *zip(*tasks)):
                results.append(result)
                bar.update(1)
    bar.close()
    for num_samples, problems in results:
        report["num_samples"] += num_samples
        report["problems"].extend(problems)
    report["num_shards"] = len(tasks)
    report["ok"] = not report["problems"]
    return report


def verify_shard(out: str, name: str, num_samples: int, num_bytes: int, sha256: str,
                 bucket: str | None = None) -> tuple[int, list[dict]]:
    """(samples found, problems) for one shard (`bucket`: its "WxH" in a bucketed dataset)."""
    url = storage.join(out, name)

    def problem(text: str, key: str | None = None) -> dict:
        return {"shard": name, "key": key, "problem": text}

    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        return 0, [problem("shard is missing")]
    problems = []
    if len(data) != num_bytes:
        problems.append(problem(f"size {len(data)} != manifest {num_bytes}"))
    if hashlib.sha256(data).hexdigest() != sha256:
        problems.append(problem("sha256 does not match the manifest"))
    try:
        samples = _group_members(data)
    except (tarfile.TarError, OSError, EOFError) as e:
        return 0, problems + [problem(f"not a readable tar: {e}")]
    for key, members in samples.items():
        problems.extend(problem(p, key) for p in check_sample(members, bucket))
    if len(samples) != num_samples:
        problems.append(problem(f"{len(samples)} samples != manifest {num_samples}"))
    return len(samples), problems


def _group_members(data: bytes) -> dict[str, list[tuple[str, bytes]]]:
    samples: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                key, ext = schema.split_key(member.name)
                samples[key].append((ext, tar.extractfile(member).read()))
    return samples


def check_sample(members: list[tuple[str, bytes]], bucket: str | None = None) -> list[str]:
    """Problems with one sample's members (ext, bytes); empty when the sample is good. `bucket`: the
    "WxH" its shard holds (a bucketed dataset)."""
    exts = [ext for ext, _ in members]
    problems = []
    image_exts = [e for e in exts if e in schema.IMAGE_EXTS]
    for what, count in (("image", len(image_exts)), ("txt", exts.count("txt")), ("json", exts.count("json"))):
        if count != 1:
            problems.append(f"has {count} {what} members (expected 1)")
    unknown = sorted(set(exts) - set(schema.IMAGE_EXTS) - {"txt", "json"})
    if unknown:
        problems.append(f"unexpected members: {', '.join(unknown)}")
    if problems:
        return problems
    blobs = dict(members)
    try:
        meta = json.loads(blobs["json"])
        missing = [f for f in schema.SAMPLE_META_FIELDS if f not in meta]
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        return [f"json metadata unreadable: {e}"]
    if missing:
        problems.append(f"json metadata lacks {', '.join(missing)}")
    try:
        blobs["txt"].decode("utf-8")
    except UnicodeDecodeError:
        problems.append("caption is not UTF-8")
    try:
        img = Image.open(io.BytesIO(blobs[image_exts[0]]))
        img.load()
    except Exception as e:  # any decoder failure is a finding, not a crash
        return problems + [f"image does not decode: {type(e).__name__}: {e}"]
    if not missing and (img.width, img.height) != (meta["width"], meta["height"]):
        problems.append(f"image is {img.width}x{img.height}, json says {meta['width']}x{meta['height']}")
    if bucket is not None:
        size = buckets.Bucket.parse(bucket)
        if (img.width, img.height) != (size.width, size.height):
            problems.append(f"image is {img.width}x{img.height}, its shard's bucket is {bucket}")
        if meta.get(schema.BUCKET_FIELD) != bucket:
            problems.append(f"json bucket {meta.get(schema.BUCKET_FIELD)!r} is not its shard's bucket {bucket}")
    return problems


def format_report(report: dict) -> str:
    lines = [f"{report['dataset']}: {report['num_shards']} shards, {report['num_samples']} samples checked"]
    for p in report["problems"]:
        where = ":".join(x for x in (p["shard"], p["key"]) if x)
        lines.append(f"  {where + ': ' if where else ''}{p['problem']}")
    lines.append("OK" if report["ok"] else f"FAILED: {len(report['problems'])} problems")
    return "\n".join(lines)
