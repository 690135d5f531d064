"""`hart-data stats`: what is in a finished dataset, from its manifest and per-sample metadata.

Only the `.json` and `.txt` members are read (image members are streamed past, not decoded), so
stats of a large dataset cost one sequential pass over the tars and no image decoding.

Histograms use fixed bin edges rather than data-dependent ones, so the numbers of two datasets are
directly comparable and `--json` output is stable for tests and dashboards. A bucketed dataset's
bucket histogram (`buckets`, from the samples' metadata, every bucket of the set listed in canonical
order, empty for an unbucketed dataset) is what the reader's per-bucket batches will draw on.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter

from data_tools import schema, storage
from data_tools.verify import load_manifest

# aspect = width / height; bins are [edge_i, edge_{i+1})
ASPECT_EDGES = (0.0, 0.5, 0.67, 0.8, 0.95, 1.05, 1.25, 1.5, 2.0, float("inf"))
# shorter side of the stored image, pixels
SHORT_SIDE_EDGES = (0, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, float("inf"))
# caption length in words
CAPTION_WORD_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))
_TOP_RESOLUTIONS = 20


def dataset_stats(out: str) -> dict:
    """Counts, resolution/aspect histograms and caption length distribution of dataset `out`."""
    manifest = load_manifest(out)
    resolutions: Counter[str] = Counter()
    per_bucket: Counter[str] = Counter({name: 0 for name in manifest.buckets or []})
    widths, heights, caption_chars, caption_words = [], [], [], []
    for shard in manifest.shards:
        for meta, caption in _iter_meta(storage.join(out, shard.name)):
            resolutions[f"{meta['width']}x{meta['height']}"] += 1
            if manifest.buckets is not None:
                per_bucket[meta.get(schema.BUCKET_FIELD, "none")] += 1
            widths.append(meta["width"])
            heights.append(meta["height"])
            caption_chars.append(len(caption))
            caption_words.append(len(caption.split()))
    return {
        "dataset": out,
        "num_shards": len(manifest.shards),
        "num_samples": len(widths),
        "num_samples_manifest": manifest.num_samples,
        "num_bytes": manifest.num_bytes,
        "skipped": manifest.stats.get("skipped", {}),
        "resolutions": dict(resolutions.most_common(_TOP_RESOLUTIONS)),
        "buckets": dict(per_bucket),
        "short_side_hist": histogram([min(w, h) for w, h in zip(widths, heights)], SHORT_SIDE_EDGES),
        "aspect_hist": histogram([w / h for w, h in zip(widths, heights)], ASPECT_EDGES),
        "caption_words_hist": histogram(caption_words, CAPTION_WORD_EDGES),
        "caption_chars": distribution(caption_chars),
        "caption_words": distribution(caption_words),
    }


def _iter_meta(url: str):
    """(metadata dict, caption) per sample of one shard, in tar order."""
    pending: dict[str, dict] = {}
    with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            key, ext = schema.split_key(member.name)
            if ext not in ("json", "txt"):
                continue  # stream past image bytes
            pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
            if len(pending[key]) == 2:
                got = pending.pop(key)
                yield json.loads(got["json"]), got["txt"].decode("utf-8")


def histogram(values: list[float], edges: tuple[float, ...]) -> list[dict]:
    """[{lo, hi, count}] for bins [lo, hi); `hi` is null for the open last bin in JSON."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        for i in range(len(counts)):
            if edges[i] <= v < edges[i + 1]:
                counts[i] += 1
                break
    return [
        {"lo": edges[i], "hi": None if edges[i + 1] == float("inf") else edges[i + 1], "count": c}
        for i, c in enumerate(counts)
    ]


def distribution(values: list[int]) -> dict:
    if not values:
        return {"min": None, "max": None, "mean": None, "p50": None, "p90": None, "p99": None}
    s = sorted(values)

    def pct(p: float) -> int:
        return s[min(len(s) - 1, int(p * len(s)))]

    return {"min": s[0], "max": s[-1], "mean": sum(s) / len(s), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


def format_stats(st: dict) -> str:
    lines = [
        f"{st['dataset']}: {st['num_samples']} samples in {st['num_shards']} shards, {st['num_bytes'] / 1e6:.1f} MB",
        "skipped: " + (", ".join(f"{k}={v}" for k, v in st["skipped"].items()) or "none"),
        "resolutions (top): " + ", ".join(f"{k}: {v}" for k, v in st["resolutions"].items()),
        "shorter side:  " + _hist_line(st["short_side_hist"]),
        "aspect w/h:    " + _hist_line(st["aspect_hist"]),
        *(["buckets (WxH): " + ", ".join(f"{k}: {v}" for k, v in st["buckets"].items())] if st["buckets"] else []),
        "caption words: " + _hist_line(st["caption_words_hist"]),
    ]
    for name in ("caption_chars", "caption_words"):
        d = st[name]
        if d["mean"] is not None:
            lines.append(f"{name}: min {d['min']} p50 {d['p50']} p90 {d['p90']} max {d['max']} mean {d['mean']:.1f}")
    return "\n".join(lines)


def _hist_line(hist: list[dict]) -> str:
    return ", ".join(f"[{b['lo']:g},{'inf' if b['hi'] is None else format(b['hi'], 'g')}): {b['count']}" for b in hist if b["count"])


def plot_stats(st: dict, path: str) -> None:
    """Bar charts (shorter side, aspect, caption words, and buckets if any) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = [(st[key], title) for key, title in (("short_side_hist", "shorter side (px)"),
                                                  ("aspect_hist", "aspect ratio (w/h)"),
                                                  ("caption_words_hist", "caption length (words)"))]
    bars = [([f"{b['lo']:g}-{'' if b['hi'] is None else format(b['hi'], 'g')}" for b in hist],
             [b["count"] for b in hist], title) for hist, title in charts]
    if st["buckets"]:
        bars.append((list(st["buckets"]), list(st["buckets"].values()), "bucket (WxH)"))
    fig, axes = plt.subplots(1, len(bars), figsize=(5 * len(bars), 4))
    for ax, (labels, counts, title) in zip(axes, bars):
        ax.bar(range(len(counts)), counts)
        ax.set_xticks(range(len(counts)), labels, rotation=45, fontsize=7)
        ax.set_title(title)
    fig.suptitle(f"{st['dataset']}: {st['num_samples']} samples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
