"""`hart-eval fid --real A --fake B --out DIR`: Fréchet Inception Distance between two image sets.

    hart-eval fid --real mjhq30k_imgs/ --fake gen/mjhq/ --out results/ \
        --inception-weights weights-inception-2015-12-05-6726825d.pth

Either set is a folder of images or a shard dataset (`hart_train.evaluation.image_sets`). Writes
DIR/fid.json, DIR/fid.md and DIR/fid_samples.png (`hart_train.evaluation.report`).

Design decisions:
- Library: torchmetrics' `FrechetInceptionDistance`. Of the three well-kept implementations only
  torchmetrics runs here: torch-fidelity imports torchvision from its package `__init__` and clean-fid
  from its `utils`, so neither imports at all without torchvision (checked with `--no-deps` installs),
  and PyPI's torchvision is a CUDA build that cannot sit beside the CPU torch this project pins.
  torchmetrics depends only on torch, numpy, packaging and lightning-utilities, accepts any feature
  network, and keeps the statistics as float64 sums (sum of features, sum of outer products, count),
  which is what the reference cache stores. The network is `hart_train.evaluation.inception` (the
  TF-graph Inception-v3 that torch-fidelity ships, loading its weights file), because torchmetrics'
  own default network is torch-fidelity's.
- Preprocessing: clean-fid's "clean" mode (Parmar et al., "On Aliased Resizing and Surprising
  Subtleties in GAN Evaluation", CVPR 2022): each image as 8-bit RGB, each channel resized to 299x299
  as float32 with PIL's bicubic filter (anti-aliased), clipped to [0, 255], not re-quantised; the
  whole image is resized (no crop). Unlike the TF1 bilinear resize inside the original graph, it does
  not alias when 1024 px images go down to 299. `PREPROCESSING` records it in every output and in the
  cache key.
- HART's paper does not say which FID code it used, and its repository has no evaluation scripts;
  SANA (same lab, shared authors, same MJHQ-30K table) uses pytorch-fid, whose network and weights are
  the ones here but whose resize is torch's bilinear (no anti-aliasing). The resize moves FID (the
  clean-fid paper measures by how much): compare only numbers made with the same `preprocessing`.
- Reference features are cached: the `--real` set's statistics (the three sums, ~32 MiB whatever the
  set's size) are stored under `--cache-dir` (default $HART_EVAL_CACHE, else
  $XDG_CACHE_HOME/hart-train/fid, else ~/.cache/hart-train/fid) in `ref-<key>.npz`, the key being
  the sha256 of the set's content digest (`image_sets`), the weights file's sha256 and
  `PREPROCESSING`. A changed image, other weights or another resize miss the cache; a hit skips the
  set's Inception pass entirely. Files are written atomically, so concurrent runs are safe.
- Images are decoded and resized in a thread pool (PIL releases the GIL); the network runs in fp32
  (TF32 convolutions are disabled on GPU) on `--device`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from hart_train.evaluation import image_sets, inception, report

PREPROCESSING = ("clean-fid 'clean': 8-bit RGB; per channel float32 PIL bicubic resize of the whole image to "
                 "299x299, clipped to [0, 255], not re-quantised; network input (x - 128) / 128")
CACHE_ENV = "HART_EVAL_CACHE"
CACHE_FORMAT = 1  # bump when what a cache file holds changes


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hart-train" / "fid"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fid", help="FID between two image sets (folders or shard datasets)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--real", required=True, help="reference set: folder of images or shard dataset (local or URL); "
                                                 "its features are cached")
    p.add_argument("--fake", required=True, help="generated set: folder of images or shard dataset")
    p.add_argument("--out", required=True, help="directory for fid.json, fid.md and fid_samples.png")
    p.add_argument("--inception-weights", help=f"{inception.WEIGHTS_FILE} (default: ${inception.WEIGHTS_ENV})")
    p.add_argument("--cache-dir", help=f"reference statistics cache (default: ${CACHE_ENV}, else "
                                       "$XDG_CACHE_HOME/hart-train/fid, else ~/.cache/hart-train/fid)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads decoding and resizing images")
    p.add_argument("--num-samples", type=int, default=8, help="generated images shown in the report")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.batch_size < 1 or args.threads < 1 or args.num_samples < 0:
        raise ValueError("--batch-size and --threads must be >= 1, --num-samples >= 0")
    out = Path(args.out)
    weights = inception.weights_path(args.inception_weights)
    real, fake = image_sets.open_image_set(args.real), image_sets.open_image_set(args.fake)
    for s in (real, fake):
        if s.kind == "folder" and out.resolve().is_relative_to(s.root.resolve()):
            raise ValueError(f"--out {out} is inside the image folder {s.root}: the report would join the set")
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    result = compute_fid(real, fake, weights, cache_dir, torch.device(args.device), args.batch_size,
                         args.threads, args.num_samples)
    json_path, md_path = report.write_report(out, "fid", result.report)
    print(f"FID {result.fid:.4f}  ({result.num_real} real, {result.num_fake} generated images; "
          f"reference cache {result.cache_status})  -> {json_path}, {md_path}", file=sys.stderr)
    return 0


def clean_resize(img: Image.Image) -> np.ndarray:
    """8-bit RGB image -> (3, 299, 299) float32 in [0, 255] (see PREPROCESSING)."""
    rgb = np.asarray(img, dtype=np.float32)
    size = (inception.INPUT_SIZE, inception.INPUT_SIZE)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, c])).resize(size, Image.Resampling.BICUBIC))
                for c in range(3)]
    return np.clip(np.stack(channels), 0.0, 255.0)


@dataclass
class _Pass:
    """One image set through the network; keeps a few decoded images for the report."""

    num_images: int = 0
    keep: set[int] = field(default_factory=set)
    kept: list = field(default_factory=list)


def _prepare(sample: image_sets.Sample) -> tuple[np.ndarray, Image.Image]:
    try:
        img = image_sets.decode_rgb(sample.data)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{sample.name}: cannot decode image ({e})") from None
    return clean_resize(img), img


def _feed(image_set, metric: FrechetInceptionDistance, real: bool, device: torch.device, batch_size: int,
          threads: int, keep: set[int] = frozenset()) -> _Pass:
    """Every image of `image_set` through the metric's network into its real or fake statistics."""
    state = _Pass(keep=set(keep))
    samples = image_set.samples()
    with ThreadPoolExecutor(threads) as pool, torch.inference_mode(), \
            torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        while batch := [s for _, s in zip(range(batch_size), samples)]:
            prepared = list(pool.map(_prepare, batch))
            x_NCHW = torch.from_numpy(np.stack([p[0] for p in prepared])).to(device)
            metric.update(x_NCHW, real=real)
            for i, (sample, (_, img)) in enumerate(zip(batch, prepared), start=state.num_images):
                if i in state.keep:
                    state.kept.append((report.fit_image(img), sample.caption or sample.name))
            state.num_images += len(batch)
    return state


def _cache_key(set_digest: str, weights_sha256: str) -> str:
    ident = json.dumps({"format": CACHE_FORMAT, "set": set_digest, "weights_sha256": weights_sha256,
                        "preprocessing": PREPROCESSING, "features": "pool3-2048"}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:40]


_STATE_NAMES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def _load_reference(path: Path, metric: FrechetInceptionDistance) -> bool:
    """Put the cached real-set statistics at `path` into `metric`; False if there is no usable file."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: torch.from_numpy(f[name]) for name in _STATE_NAMES}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):  # absent or unreadable: recomputed
        return False
    for name, value in arrays.items():
        setattr(metric, name, value.to(getattr(metric, name).device, getattr(metric, name).dtype))
    return True


def _save_reference(path: Path, metric: FrechetInceptionDistance, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(metric, name).cpu().numpy() for name in _STATE_NAMES}
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(f.name, path)


@dataclass
class FIDResult:
    fid: float
    num_real: int
    num_fake: int
    cache_status: str  # "hit" or "written"
    report: report.Report


def compute_fid(real, fake, weights: Path, cache_dir: Path, device: torch.device, batch_size: int = 50,
                threads: int = 4, num_samples: int = 8) -> FIDResult:
    """FID of image set `fake` against `real` (`image_sets` objects), `real`'s statistics cached."""
    started = time.time()
    weights_sha256 = image_sets.file_sha256(weights)
    net = inception.load_fid_inception(weights, device)
    metric = FrechetInceptionDistance(feature=net, reset_real_features=False, sync_on_compute=False)
    metric.to(device).eval()  # eval: the network's BatchNorm uses its stored statistics, never the batch's

    real_digest = real.digest(threads)
    cache_file = cache_dir / f"ref-{_cache_key(real_digest, weights_sha256)}.npz"
    if _load_reference(cache_file, metric):
        cache_status, real_encoded = "hit", 0
    else:
        real_encoded = _feed(real, metric, True, device, batch_size, threads).num_images
        _save_reference(cache_file, metric, {"source": real.source, "set_digest": real_digest,
                                             "weights_sha256": weights_sha256, "preprocessing": PREPROCESSING})
        cache_status = "written"
    num_real = int(metric.real_features_num_samples)

    keep = set(np.linspace(0, len(fake) - 1, min(num_samples, len(fake))).round().astype(int).tolist())
    fake_pass = _feed(fake, metric, False, device, batch_size, threads, keep)
    if min(num_real, fake_pass.num_images) < 2:
        raise ValueError(f"FID needs at least 2 images per set; got {num_real} real, {fake_pass.num_images} generated")
    fid = float(metric.compute())

    numbers = {"fid": round(fid, 4), "num_real": num_real, "num_fake": fake_pass.num_images}
    settings = {
        "real": real.source, "real_set_digest": real_digest, "fake": fake.source,
        "implementation": f"torchmetrics {version('torchmetrics')} FrechetInceptionDistance (float64 statistics)",
        "feature_network": "Inception-v3, TF graph inception-2015-12-05 (torch-fidelity layout), pool3, 2048-d",
        "inception_weights": str(weights), "inception_weights_sha256": weights_sha256,
        "inception_weights_published": weights_sha256 == inception.WEIGHTS_SHA256,
        "preprocessing": PREPROCESSING,
        "reference_cache": cache_status, "reference_cache_file": str(cache_file),
        "real_images_encoded": real_encoded,  # 0 when the cache supplied the reference statistics
        "skipped_samples": real.skipped() + fake.skipped(),  # unreadable shard samples
        "device": str(device), "batch_size": batch_size, "torch": torch.__version__,
        "seconds": round(time.time() - started, 1),
    }
    generation = fake.generation_record()
    if generation is not None:
        settings["fake_generated_by"] = f"{fake.source}/{image_sets.GENERATE_SETTINGS}"
    rep = report.Report(title="FID", numbers=numbers, settings=settings, samples=fake_pass.kept,
                        samples_caption=f"generated images from {fake.source}", extra={"fake_generation": generation})
    return FIDResult(fid, num_real, fake_pass.num_images, cache_status, rep)
