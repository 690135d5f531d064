"""`hart-sample`: images from a trained t2i checkpoint.

    hart-sample --model runs/t2i-tiny/ckpt/step_00000030 --prompt "red apple" --prompt rocket --out grid.png

Each prompt gives `--batch` images (one row per prompt); the same `--seed` gives the same picture. EMA
weights are used unless `--raw`. A LoRA checkpoint samples its base (the run's init_from) with the adapters
as separate layers, or folded into the base weights with `--merge-lora` (the same images up to fp32
rounding). `--aspect W:H` (e.g. 16:9) samples the nearest of the checkpoint's aspect-ratio buckets
(`t2i.buckets`; the default set at 256/512/1024 px) instead of the square image. Everything is read from
local files.
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image

from hart_train.models.buckets import Bucket, bucket_for_aspect
from hart_train.sampling import load_pipeline, sample_images


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hart-sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a t2i checkpoint directory (config.yaml, model/ema safetensors)")
    p.add_argument("--prompt", action="append", required=True, help="a text prompt (repeatable)")
    p.add_argument("--out", required=True, help="output PNG (a grid: one row per prompt)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale (HART's ramp)")
    p.add_argument("--top-k", type=int, default=600)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--more-smooth", action="store_true", help="HART's gumbel smoothing (demo look; off for FID)")
    p.add_argument("--aspect", default=None, metavar="W:H",
                   help="width:height, e.g. 16:9: sample the nearest of the checkpoint's buckets (default: square)")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of EMA")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA checkpoint: merge the adapters into the base weights before sampling")
    p.add_argument("--device", default="cpu")
    return p


def grid_image(images: torch.Tensor, rows: int) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image with `rows` rows."""
    n, _, h, w = images.shape
    cols = n // rows
    grid = images.view(rows, cols, 3, h, w).permute(2, 0, 3, 1, 4).reshape(3, rows * h, cols * w)
    return Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch < 1:
        print("hart-sample: error: --batch must be >= 1", file=sys.stderr)
        return 2
    if args.aspect is not None:
        try:  # the syntax, before the slow load
            bucket_for_aspect(args.aspect, (Bucket(1, 1),))
        except ValueError as e:
            print(f"hart-sample: error: --aspect: {e}", file=sys.stderr)
            return 2
    try:
        pipe = load_pipeline(args.model, use_ema=not args.raw, device=args.device, merge_lora=args.merge_lora)
    except (FileNotFoundError, ValueError) as e:
        print(f"hart-sample: error: {e}", file=sys.stderr)
        return 2
    bucket, schedule = pipe.schedule_for_aspect(args.aspect)
    if args.aspect is not None:
        h, w = bucket.image_size(pipe.tokenizer.cfg.downsample)
        print(f"hart-sample: --aspect {args.aspect} -> bucket {bucket.name} ({h}x{w} px, height x width)",
              file=sys.stderr)
    prompts = [p for p in args.prompt for _ in range(args.batch)]
    images = sample_images(pipe.model, pipe.tokenizer, pipe.text_encoder, prompts, seed=args.seed,
                           cfg_scale=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
                           device=args.device, schedule=schedule)
    grid_image(images, rows=len(args.prompt)).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
