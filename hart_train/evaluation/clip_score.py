"""`hart-eval clip --images DIR --out DIR`: CLIP score of images against their prompts.

    hart-eval clip --images gen/ --clip-model clip-vit-large-patch14/ --out results/

Writes DIR/clip.json (with every image's score), DIR/clip.md and DIR/clip_samples.png.

Design decisions:
- Definition: the mean over images of max(100 * cos(E_image, E_prompt), 0), with E the CLIP image and
  text embeddings after their projection heads (Hessel et al. 2021 with weight 100 instead of 2.5, as
  torchmetrics' CLIPScore and the t2i papers report it). Prompts longer than the text encoder's
  context (77 tokens for OpenAI CLIP) are truncated, as every CLIP-score implementation does; the
  output says how many were. Clipping at 0 changes nothing for a trained CLIP on real pairs.
- Model: HART's paper does not name its CLIP model and its repository has no evaluation code. SANA
  (same lab, shared authors, the same MJHQ-30K "FID / CLIP score" table) scores with OpenAI CLIP
  ViT-L/14 (tools/metrics/clip-score: `clip.load("ViT-L/14")`, logit_scale.exp() * cosine, which is
  100 * cosine for that model), so the protocol model is `openai/clip-vit-large-patch14`.
- transformers' CLIPModel, not open_clip: it is already a dependency, and it loads the OpenAI
  weights exactly (the same checkpoint open_clip would load as ViT-L-14/openai). The model, its
  tokenizer and its preprocessor config come from one local directory (`--clip-model` or
  $HART_CLIP_MODEL, e.g. a download of openai/clip-vit-large-patch14), loaded with
  `local_files_only`: nothing is fetched at run time. Images are preprocessed by the directory's
  preprocessor config with the PIL backend (bicubic resize of the short side to 224, centre crop,
  CLIP normalisation), which matches OpenAI's own preprocessing and needs no torchvision.
- Prompts, per image: from `--prompts` if given, a file in any format `hart-eval generate` reads
  (MJHQ-30K meta_data.json, GenEval .jsonl, one prompt per line; matched by key, see `PromptLookup`),
  else from the image's sidecar (`<stem>.json` "prompt", as `hart-eval generate` writes beside every
  image, or `<stem>.txt`), else a shard sample's caption. An image without a prompt is an error
  naming it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from hart_train.evaluation import image_sets, report
from hart_train.evaluation import prompts as prompt_files

MODEL_ENV = "HART_CLIP_MODEL"
PROTOCOL_MODEL = "openai/clip-vit-large-patch14"
DEFINITION = ("mean over images of max(100 * cos(E_image, E_prompt), 0); E = CLIP projected embeddings; "
              "prompts truncated to the text encoder's context")
_WHERE = (f"put a local copy of {PROTOCOL_MODEL} there (config.json, model.safetensors, tokenizer files, "
          f"preprocessor_config.json; e.g. `hf download {PROTOCOL_MODEL} --local-dir DIR` on a connected machine)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("clip", help="CLIP score of images against their prompts",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of images (prompts from sidecars or --prompts) "
                                                   "or shard dataset (prompts from captions)")
    p.add_argument("--prompts", help="prompts file in a format `hart-eval generate` reads (MJHQ-30K meta_data.json: by "
                                     "image stem; GenEval .jsonl; one prompt per line); default: the images' sidecars")
    p.add_argument("--clip-model",
                   help=f"local CLIP model directory (default: ${MODEL_ENV}); the protocol's: {PROTOCOL_MODEL}")
    p.add_argument("--out", required=True, help="directory for clip.json, clip.md and clip_samples.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=8, help="images shown in the report")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.batch_size < 1 or args.num_samples < 0:
        raise ValueError("--batch-size must be >= 1 and --num-samples >= 0")
    model_dir = model_path(args.clip_model)
    images = image_sets.open_image_set(args.images)
    out = Path(args.out)
    if images.kind == "folder" and out.resolve().is_relative_to(images.root.resolve()):
        raise ValueError(f"--out {out} is inside the image folder {images.root}: the report would join the set")
    lookup = PromptLookup(args.prompts, len(images)) if args.prompts else None
    clip = LocalCLIP(model_dir, torch.device(args.device))
    rep = score_set(clip, images, lookup, args.batch_size, args.num_samples)
    json_path, md_path = report.write_report(out, "clip", rep)
    print(f"CLIP score {rep.numbers['clip_score']:.4f} over {rep.numbers['num_images']} images -> "
          f"{json_path}, {md_path}", file=sys.stderr)
    return 0


def model_path(flag: str | None) -> Path:
    value = flag or os.environ.get(MODEL_ENV)
    if not value:
        raise ValueError(f"no CLIP model given: pass --clip-model DIR or set {MODEL_ENV}; {_WHERE}")
    path = Path(value).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"CLIP model directory {path} has no config.json: {_WHERE}")
    return path


class LocalCLIP:
    """A transformers CLIP model with the tokenizer and image preprocessor of its directory."""

    def __init__(self, model_dir: Path, device: torch.device):
        try:
            self.model = transformers.CLIPModel.from_pretrained(model_dir, local_files_only=True)
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(model_dir, local_files_only=True)
            self.processor = transformers.CLIPImageProcessorPil.from_pretrained(model_dir, local_files_only=True)
        except OSError as e:  # a file of the directory is missing
            raise FileNotFoundError(f"CLIP model directory {model_dir} is incomplete ({str(e).splitlines()[0]}); "
                                    f"{_WHERE}") from None
        self.model_dir = model_dir
        self.device = device
        self.model.to(device).eval().requires_grad_(False)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    def scores(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """max(100 * cos, 0) of each (image, prompt) pair, float64 on the CPU."""
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.model(input_ids=text["input_ids"].to(self.device),
                             attention_mask=text["attention_mask"].to(self.device),
                             pixel_values=pixels.to(self.device))
        # CLIPModel returns both embeddings L2-normalised: their dot product is the cosine
        cosine = (out.image_embeds.double() * out.text_embeds.double()).sum(dim=-1)
        return (100.0 * cosine).clamp(min=0.0).cpu()

    def num_truncated(self, prompts: list[str]) -> int:
        lengths = self.tokenizer(prompts, truncation=False)["input_ids"]
        return sum(len(ids) > self.max_tokens for ids in lengths)

    def describe(self) -> dict:
        cfg = self.model.config
        weights = next((self.model_dir / n for n in ("model.safetensors", "pytorch_model.bin")
                        if (self.model_dir / n).is_file()), None)
        return {"clip_model": str(self.model_dir),
                "clip_weights_sha256": image_sets.file_sha256(weights) if weights else "sharded checkpoint",
                "vision": f"ViT width {cfg.vision_config.hidden_size}, patch {cfg.vision_config.patch_size}, "
                          f"{cfg.vision_config.image_size}px",
                "text_context_tokens": self.max_tokens, "transformers": transformers.__version__}


class PromptLookup:
    """The prompt of each image from a prompts file in any format `hart-eval generate` reads
    (`hart_train.evaluation.prompts`). An image is matched to a record by key: its name, its stem,
    its stem without a `_NNNN` image-number suffix, or its first folder (the layouts `generate` writes;
    MJHQ-30K ids are the stems of its reference images). A plain text file whose keys match no image
    is matched by order instead: line i to the i-th image in sorted order, if the counts agree."""

    def __init__(self, path: str, num_images: int):
        self.prompt_set = prompt_files.read_prompts(path)
        self.by_key = {r.key: r.prompt for r in self.prompt_set.records}
        self.num_images = num_images

    def __call__(self, index: int, name: str) -> str:
        stem = Path(name).stem
        head, _, tail = stem.rpartition("_")
        candidates = [name, stem, head if tail.isdigit() and head else None, Path(name).parts[0]]
        for key in candidates:
            if key in self.by_key:
                return self.by_key[key]
        records = self.prompt_set.records
        if self.prompt_set.format == "text":
            if len(records) != self.num_images:
                raise ValueError(f"{self.prompt_set.path} has {len(records)} prompts for {self.num_images} images "
                                 "(a plain prompts file pairs line i with the i-th image in sorted order)")
            return records[index].prompt
        raise ValueError(f"image {name}: no entry of {self.prompt_set.path} matches it "
                         f"(looked up {', '.join(repr(k) for k in candidates if k)})")


def _prompt_for(index: int, sample: image_sets.Sample, lookup: PromptLookup | None) -> str:
    if lookup is not None:
        return lookup(index, sample.name)
    if sample.caption is None:
        raise ValueError(f"image {sample.name}: no prompt (no <stem>.json with \"prompt\", no <stem>.txt); "
                         "pass --prompts FILE")
    return sample.caption


def score_set(clip: LocalCLIP, images, lookup: PromptLookup | None, batch_size: int = 64,
              num_samples: int = 8) -> report.Report:
    """Every image of `images` scored against its prompt; the report of the whole set."""
    started = time.time()
    n = len(images)
    keep = set(np.linspace(0, n - 1, min(num_samples, n)).round().astype(int).tolist())
    names, texts, scores, kept = [], [], [], []
    batch: list[Image.Image] = []

    def flush() -> None:
        scores.append(clip.scores(batch, texts[len(texts) - len(batch):]))
        batch.clear()

    for sample in images.samples():
        try:
            img = image_sets.decode_rgb(sample.data)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise ValueError(f"{sample.name}: cannot decode image ({e})") from None
        if len(names) in keep:
            kept.append((report.fit_image(img), len(names)))
        texts.append(_prompt_for(len(names), sample, lookup))
        names.append(sample.name)
        batch.append(img)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not names:
        raise ValueError(f"{images.source}: no readable images")
    per_image = torch.cat(scores)
    mean = float(per_image.mean())
    numbers = {"clip_score": round(mean, 4), "num_images": len(names),
               "std": round(float(per_image.std()), 4) if len(names) > 1 else 0.0}
    prompts_source = (f"{lookup.prompt_set.path} ({lookup.prompt_set.format})" if lookup
                      else "image sidecars (<stem>.json \"prompt\" or <stem>.txt) / shard captions")
    settings = {"images": images.source, "prompts": prompts_source, "definition": DEFINITION,
                **clip.describe(), "prompts_truncated": clip.num_truncated(texts),
                "skipped_samples": images.skipped(), "device": str(clip.device), "torch": torch.__version__,
                "seconds": round(time.time() - started, 1)}
    generation = images.generation_record()
    if generation is not None:
        settings["generated_by"] = f"{images.source}/{image_sets.GENERATE_SETTINGS}"
    samples = [(img, f"{float(per_image[j]):.2f}: {texts[j]}") for img, j in kept]
    extra = {"generation": generation, "per_image": [{"image": name, "prompt": text, "score": float(s)}
                           for name, text, s in zip(names, texts, per_image.tolist())]}
    return report.Report(title="CLIP score", numbers=numbers, settings=settings, samples=samples,
                         samples_caption=f"images from {images.source}, each with its score and prompt", extra=extra)
