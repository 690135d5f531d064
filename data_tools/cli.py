"""`hart-data`: the dataset command line (shard, verify, stats).

Each subcommand is one `_add_<name>(subparsers)` function that declares its arguments and sets
`func` to a `_run_<name>(args) -> int`; a new subcommand (e.g. `encode`) is one more pair of
functions and one call in `build_parser`. `main(argv)` runs in-process so tests can call it.

User errors (ValueError, FileNotFoundError) print one line, `hart-data: error: ...`, to stderr and
return 2; no traceback. `verify` returns 1 when the dataset has problems.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from data_tools import images, shard, stats, storage, verify


def _add_shard(sub) -> None:
    p = sub.add_parser("shard", help="turn an image-caption source into webdataset shards")
    p.add_argument("source", help="folder:DIR | jsonl:FILE | csv:FILE | parquet:FILE | wds:URL | emoji")
    p.add_argument("out", help="output directory or URL (e.g. s3://bucket/prefix)")
    p.add_argument("--resolution", type=int, default=None, help="target size N (default: keep size)")
    p.add_argument("--resize", choices=images.RESIZE_MODES, default="center-crop")
    p.add_argument("--format", dest="fmt", choices=images.FORMATS, default="jpg")
    p.add_argument("--quality", type=int, default=95)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="worker processes")
    p.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    p.add_argument("--max-aspect", type=float, default=None, help="skip images with long/short side above this")
    p.add_argument("--max-pixels", type=int, default=images.DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    p.add_argument("--buckets", default=None, metavar="default|W:H,...",
                   help="aspect-ratio buckets: resize and crop each image to its nearest bucket (pixel sizes, "
                        "width first), one bucket per shard; 'default' is the set for --resolution")
    p.add_argument("--limit", type=int, default=None, help="take only the first N source items")
    p.add_argument("--path-column", default="path")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--resume", action="store_true", help="complete an interrupted job in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_shard)


def _run_shard(args) -> int:
    manifest = shard.shard_dataset(
        args.source,
        args.out,
        resolution=args.resolution,
        resize=args.resize,
        fmt=args.fmt,
        quality=args.quality,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        min_size=args.min_size,
        max_aspect=args.max_aspect,
        resume=args.resume,
        overwrite=args.overwrite,
        limit=args.limit,
        path_column=args.path_column,
        caption_column=args.caption_column,
        progress=not args.no_progress,
        max_pixels=args.max_pixels,
        buckets=args.buckets,
    )
    st = manifest.stats
    skipped = ", ".join(f"{k}={v}" for k, v in st["skipped"].items()) or "none"
    print(f"{args.out}: {manifest.num_samples} samples in {len(manifest.shards)} shards; skipped: {skipped}")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check every shard and sample of a dataset against its manifest")
    p.add_argument("out", help="dataset directory or URL")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_verify)


def _run_verify(args) -> int:
    report = verify.verify_dataset(args.out, workers=args.workers, progress=not args.no_progress)
    print(json.dumps(report, indent=1) if args.json else verify.format_report(report))
    return 0 if report["ok"] else 1


def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help="counts, resolution/aspect/bucket histograms, caption lengths")
    p.add_argument("out", help="dataset directory or URL")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="also draw the histograms into a PNG")
    p.set_defaults(func=_run_stats)


def _run_stats(args) -> int:
    st = stats.dataset_stats(args.out)
    print(json.dumps(st, indent=1) if args.json else stats.format_stats(st))
    if args.plot:
        stats.plot_stats(st, args.plot)
    return 0


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="pre-tokenize a dataset: token indices, last-scale residuals, text embeddings")
    p.add_argument("source", help="image dataset directory or URL (written by `hart-data shard`)")
    p.add_argument("out", help="output directory or URL for the token shards")
    p.add_argument("--tokenizer-ckpt", required=True,
                   help="hart-train checkpoint dir (model.safetensors + config.yaml)")
    p.add_argument("--text-encoder", required=True, metavar="KIND[:PATH]",
                   help="minilm (packaged) | qwen2:DIR | t5:DIR | auto:DIR (local directories only)")
    p.add_argument("--max-length", type=int, default=300, help="text tokens per caption (HART: 300)")
    p.add_argument("--system-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend HART's LLM system prompt (default: on for Qwen, off otherwise)")
    p.add_argument("--text-dtype", default="fp32", help="fp32 | bf16 | fp16: what the text encoder runs in")
    p.add_argument("--store-dtype", default="float16", help="float16 | float32: the stored residual and text context")
    p.add_argument("--resolution", type=int, default=None, help="must equal the tokenizer's image size (default: it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--resume", action="store_true", help="complete an interrupted job in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in OUT")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run_encode)


def _run_encode(args) -> int:
    # imported here, not at the top: it pulls in torch and the tokenizer, which shard/verify/stats never need
    from data_tools import encode

    text_cfg = encode.text_encoder_config(args.text_encoder, args.max_length, args.system_prompt, args.text_dtype)
    manifest = encode.encode_dataset(
        args.source,
        args.out,
        tokenizer_ckpt=args.tokenizer_ckpt,
        text_encoder=text_cfg,
        resolution=args.resolution,
        batch_size=args.batch_size,
        device=args.device,
        store_dtype=args.store_dtype,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(f"{args.out}: {manifest.num_samples} token samples in {len(manifest.shards)} shards; "
          f"skipped: {manifest.stats['num_skipped']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hart-data", description="hart-train dataset tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_shard(sub)
    _add_verify(sub)
    _add_stats(sub)
    _add_encode(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"hart-data: error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hart-data: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`hart-data stats X | head`): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
