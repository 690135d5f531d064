"""`hart-eval generate`: the images of an evaluation prompt set, under HART's published protocol by default.

    hart-eval generate --model imported/llm --prompts MJHQ-30K/meta_data.json --out gen/mjhq
    torchrun --nproc_per_node 8 -m hart_train.evaluation.cli generate --model ... --prompts ... --out ...

Protocol. HART's paper (arXiv 2410.10812) reports MJHQ-30K FID 5.38 / CLIP 29.09 and GenEval 0.56 but,
in what could be read of it, not the sampling settings; the released code (mit-han-lab/hart at e28a41f,
sample.py unchanged since 453235f) is the source, and where it is silent this says so. Each is a flag.

    setting           default        where it comes from
    --cfg             4.5            sample.py:164-166 (`--cfg`), app.py:141-143; the ramp t = cfg*si/(S-1) and
                                     (1+t)cond - t*uncond are the sampler's (hart_transformer_t2i.py:400-401)
    --top-k           600            hart_transformer_t2i.py:409 and :486 hard-code 600 for scales 0-6 and 300
                                     after (its top_k argument is ignored); here scales >= 7 use
                                     min(top_k, 300), as hart_train.sampling.sample_images does
    --top-p           0.0 (off)      hart_transformer_t2i.py:309 default; sample.py passes none
    --more-smooth     off            hart_transformer_t2i.py:324 ("only used in visualization, not used in
                                     FID/IS benchmarking"), :413/:415 and :490/:492; mit-han-lab/hart#14.
                                     sample.py:167-172 defaults to True (`type=bool`: `--more_smooth False`
                                     still gives True), which is how hart#23 got FID 9.87 / CLIP 27.70
    --raw             off (EMA)      sample.py:57-61 and :161 (`--use_ema` True: ema_model.bin)
    --precision       fp16           sample.py:97-99: text encoder, transformer, diffusion head and VAE decode
                                     all run under torch.autocast(float16)
    --seed            1              sample.py:160 (one generator per call there). HART's evaluation seeds are
                                     not published; here image g of the file has seed SEED + g, where
                                     g = prompt_index * images_per_prompt + k
    --images-per-prompt              mjhq 1: one image per MJHQ-30K prompt, against its 30K reference images
                                     (HART does not say more). geneval 4: GenEval's README ("generate 4
                                     images per prompt"), generation/diffusers_generate.py --n_samples. text 1
    pixels            floor(255*x)   sample.py:36-41 (`mul_(255)`, then `astype(np.uint8)` truncates), as PNG
    resolution, text  the checkpoint 1024 px (the model's 14 scales); Qwen2-VL-1.5B-Instruct, 300 tokens, the
                                     LLM system prompt (sample.py:162-163): its config.yaml, as `hart-train
                                     import` writes it; not sampling flags
    --batch-size      8              not published (the paper times batch 8); see Reproducibility
    --aspect          square         HART evaluates square images; W:H (e.g. 16:9) samples the nearest of the
                                     checkpoint's buckets (`t2i.buckets`), recorded as `settings.bucket`

Reproducibility. Every image draws its randomness from its own generator (seed SEED + g, on the run's
device) through `HARTForT2I.draw_sampling_randomness`, stacked into the batch's `SampleDraws`, so no image
depends on its batch-mates' random numbers. Its arithmetic still depends on the batch's size (kernels
choose their blocking and reduction order by shape, so pixels can differ in the last bits), so batches
are fixed: unit u is images u*B .. u*B+B-1 of the whole file, whatever the selection, the number of
ranks or what a previous run finished. A unit that a `--start/--end` subset cuts is generated whole and
only the selected images are written. So 1 or N ranks, a resumed run and any subset write the same
bytes on the same hardware and software, and `--batch-size` is one of the settings a DIR is tied to.

Ranks (torchrun, or the RANK/WORLD_SIZE env of `launch/`): each rank loads the model itself; rank 0
checks DIR and lists the pending units, rank r takes every WORLD-th of them. No DeepSpeed engine.

Resume. An image is done when its PNG and its JSON sidecar exist; each is written to a hidden temp file
and renamed (PNG first), so a killed run leaves whole files only; its temp files are removed at the next
start and its unfinished units are regenerated. DIR/settings.json (written first) records the settings,
the model (sha256 of config.yaml and the weights read) and the prompts (sha256 of the records); a run
whose settings, model or prompts differ is refused, and so is a non-empty DIR without settings.json.
`--overwrite` deletes a DIR that holds a settings.json and starts again. The layouts are in `prompts.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import yaml
from PIL import Image
from tqdm import tqdm

from hart_train import distributed as D
from hart_train.evaluation.prompts import FORMATS, PromptSet, folder_metadata, image_path, read_prompts, sidecar_path
from hart_train.models import HARTConfig, HARTForT2I, SampleDraws
from hart_train.models.buckets import Schedule, bucket_for_aspect, parse_bucket, stage_buckets, training_schedule
from hart_train.sampling import Pipeline, load_pipeline, sample_images

TOOL = "hart-eval generate"
SETTINGS_FILE = "settings.json"
IMAGES_PER_PROMPT = {"mjhq": 1, "geneval": 4, "text": 1}
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
# the parts of settings.json a resumed run must match (paths and the environment are recorded only)
COMPARED = ("settings", "model.weights", "model.sha256", "prompts.format", "prompts.num_prompts", "prompts.sha256")


@dataclass(frozen=True)
class Settings:
    """Everything that decides an image's pixels besides the model and the prompts."""

    cfg_scale: float
    top_k: int
    top_p: float
    more_smooth: bool
    use_ema: bool
    seed: int
    images_per_prompt: int
    precision: str
    batch_size: int
    # the aspect-ratio bucket sampled (last-scale token grid "HxW"), None for the square one (as runs before
    # --aspect recorded nothing, their settings.json still resumes)
    bucket: str | None = None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="images for an evaluation prompt set (HART's protocol by default)",
                              description=__doc__.split("\n\n")[0],
                              epilog="The defaults are HART's evaluation protocol; the docstring of "
                                     "hart_train/evaluation/generate.py gives the source of each.")
    p.add_argument("--model", required=True,
                   help="a t2i checkpoint directory (config.yaml, model.safetensors, ema.safetensors)")
    p.add_argument("--prompts", required=True,
                   help="MJHQ-30K meta_data.json, GenEval evaluation_metadata.jsonl, or one prompt per line")
    p.add_argument("--out", required=True, help="output directory (created; an earlier run into it is resumed)")
    p.add_argument("--format", choices=("auto", *FORMATS), default="auto", help="prompt file format (auto: detected)")
    p.add_argument("--images-per-prompt", type=int, default=None, help="default: 4 for GenEval, else 1")
    p.add_argument("--seed", type=int, default=1, help="base seed: image g of the file has seed SEED+g (%(default)s)")
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale, HART's ramp (%(default)s)")
    p.add_argument("--top-k", type=int, default=600,
                   help="top-k of scales 0-6 (%(default)s); later scales use min(top_k, 300)")
    p.add_argument("--top-p", type=float, default=0.0, help="top-p, 0 = off (%(default)s)")
    p.add_argument("--more-smooth", action=argparse.BooleanOptionalAction, default=False,
                   help="HART's gumbel smoothing: the demo's look, off for evaluation")
    p.add_argument("--raw", action="store_true", help="sample the raw weights instead of EMA")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="fp16", help="autocast dtype, fp32 = none (%(default)s)")
    p.add_argument("--aspect", default=None, metavar="W:H",
                   help="width:height, e.g. 16:9: the nearest of the checkpoint's buckets (default: square)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per forward (%(default)s); a DIR is tied to one: an image's bytes depend on it")
    p.add_argument("--start", type=int, default=0, help="first prompt index, 0-based (%(default)s)")
    p.add_argument("--end", type=int, default=None, help="prompt index to stop before (default: the end of the file)")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts from --start")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda if available; rank r of a launch uses cuda:LOCAL_RANK")
    p.add_argument("--overwrite", action="store_true", help="delete DIR's earlier output and start again")
    p.add_argument("--timeout-s", type=float, default=1800.0,
                   help="collective timeout of a multi-rank launch (%(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _check_model_dir(args.model)
    prompts = read_prompts(args.prompts, args.format)
    settings = settings_from_args(args, prompts.format, aspect_bucket(args.model, args.aspect))
    start, end = _selection(args, len(prompts.records))
    device = _init_distributed(args)
    try:
        return _generate(args, prompts, settings, start, end, device)
    finally:
        D.destroy()


def settings_from_args(args: argparse.Namespace, fmt: str, bucket: str | None = None) -> Settings:
    n = IMAGES_PER_PROMPT[fmt] if args.images_per_prompt is None else args.images_per_prompt
    for name, value in (("--images-per-prompt", n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if not 0.0 <= args.top_p < 1.0:
        raise ValueError(f"--top-p must be in [0, 1) (0 = off), got {args.top_p}")
    return Settings(cfg_scale=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
                    use_ema=not args.raw, seed=args.seed, images_per_prompt=n, precision=args.precision,
                    batch_size=args.batch_size, bucket=bucket)


def aspect_bucket(model_dir: str, aspect: str | None) -> str | None:
    """The name of the checkpoint's bucket nearest `aspect` ("W:H"; `Pipeline.schedule_for_aspect`'s choice,
    read from config.yaml alone), None for no aspect or the square bucket (the square path, bit for bit)."""
    if aspect is None:
        return None
    with open(os.path.join(model_dir, "config.yaml"), encoding="utf-8") as f:
        run_cfg = yaml.safe_load(f)
    section = run_cfg.get("t2i") if isinstance(run_cfg, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("model"), dict):
        raise ValueError(f"{model_dir}/config.yaml has no t2i.model section (not a t2i checkpoint)")
    patch_nums = HARTConfig(**section["model"]).patch_nums  # as load_pipeline builds it
    bucket = bucket_for_aspect(aspect, stage_buckets(section.get("buckets"), patch_nums))
    return None if training_schedule(bucket, patch_nums) is None else bucket.name


def settings_schedule(settings: Settings, patch_nums) -> Schedule | None:
    """The `schedule` argument of the sampler for `settings.bucket`."""
    return None if settings.bucket is None else parse_bucket(settings.bucket).schedule(patch_nums)


def _selection(args: argparse.Namespace, num_prompts: int) -> tuple[int, int]:
    """[start, end) in prompt indices."""
    if args.end is not None and args.limit is not None:
        raise ValueError("give --end or --limit, not both")
    if not 0 <= args.start < num_prompts:
        raise ValueError(f"--start {args.start} is outside the {num_prompts} prompts of {args.prompts}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    end = num_prompts if args.end is None else args.end
    end = min(args.start + args.limit, num_prompts) if args.limit is not None else end
    if not args.start < end <= num_prompts:
        raise ValueError(f"--end {end} must be in ({args.start}, {num_prompts}]: "
                         f"{args.prompts} has {num_prompts} prompts")
    return args.start, end


def _check_model_dir(model: str) -> None:
    if not os.path.isdir(model):
        raise FileNotFoundError(f"--model {model}: no such directory (a t2i checkpoint: config.yaml, "
                                "model.safetensors, ema.safetensors; `hart-train import` makes one)")
    for name in ("config.yaml", "model.safetensors"):
        if not os.path.isfile(os.path.join(model, name)):
            raise FileNotFoundError(f"--model {model} has no {name} (not a hart-train t2i checkpoint directory)")


def _init_distributed(args: argparse.Namespace) -> torch.device:
    """This rank's device. A world of one needs no process group: its collectives below are no-ops."""
    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return D.init(kind, args.timeout_s)
    return D.rank_device(kind)


def _generate(args, prompts: PromptSet, settings: Settings, start: int, end: int, device: torch.device) -> int:
    record = _on_rank0(lambda: run_record(args.model, prompts, settings, device))  # hashes the weights once
    state = _on_rank0(lambda: check_out_dir(args.out, record, args.overwrite))
    pipe = load_pipeline(args.model, use_ema=settings.use_ema, device=str(device))
    if args.aspect is not None and D.is_main():
        bucket, _ = pipe.schedule_for_aspect(args.aspect)
        h, w = bucket.image_size(pipe.tokenizer.cfg.downsample)
        print(f"{TOOL}: --aspect {args.aspect} -> bucket {bucket.name} ({h}x{w} px, height x width)", file=sys.stderr)
    pending = _on_rank0(lambda: _prepare_out_dir(args.out, record, state, prompts, settings, start, end))
    mine = [u for i, u in enumerate(sorted(pending)) if i % D.world_size() == D.rank()]
    bar = tqdm(total=sum(len(pending[u]) for u in mine), unit="img", disable=not D.is_main(), file=sys.stderr,
               desc=f"{TOOL} (rank 0 of {D.world_size()})")
    written = 0
    for u in mine:
        images = unit_images(u, settings, len(prompts.records))
        pixels = sample_unit(pipe, prompts, settings, images, device)
        for g in pending[u]:
            written += 1
            _write_image(args.out, prompts, settings, g, pixels[g - images.start], record["model"]["sha256"], written)
            bar.update(1)
    bar.close()
    total_written = sum(D.all_gather_object(written))  # also waits for every rank
    if D.is_main():
        missing = sum(len(v) for v in pending_units(args.out, prompts, settings, start, end).values())
        if missing:
            raise RuntimeError(f"{missing} images of prompts {start}..{end - 1} are missing from {args.out}")
        n = settings.images_per_prompt
        print(f"{TOOL}: {args.out}: prompts {start}..{end - 1} complete ({(end - start) * n} images, "
              f"{total_written} written now)")
    return 0


def _on_rank0(fn):
    """`fn()` on rank 0, its result on every rank; a user error there is raised on every rank."""
    result = error = None
    if D.is_main():
        try:
            result = fn()
        except (FileNotFoundError, ValueError) as e:
            error = (isinstance(e, FileNotFoundError), str(e))
    result, error = D.broadcast_object((result, error))
    if error is not None:
        raise (FileNotFoundError if error[0] else ValueError)(error[1])
    return result


# ---------------------------------------------------------------------- the output directory
def run_record(model_dir: str, prompts: PromptSet, settings: Settings, device: torch.device) -> dict:
    """The content of settings.json."""
    return {
        "tool": TOOL,
        "settings": dataclasses.asdict(settings),
        "model": {"path": os.path.realpath(model_dir), **_model_identity(model_dir, settings.use_ema)},
        "prompts": {"path": os.path.realpath(prompts.path), "format": prompts.format,
                    "num_prompts": len(prompts.records), "sha256": prompts.sha256()},
        "image_seed": "seed + prompt_index * images_per_prompt + k",
        "environment": {"torch": torch.__version__, "device_type": device.type},
    }


def _model_identity(model_dir: str, use_ema: bool) -> dict:
    """The weights `load_pipeline` reads (EMA where asked for and present) and their sha256."""
    names = ["config.yaml", "model.safetensors"]
    if use_ema and os.path.isfile(os.path.join(model_dir, "ema.safetensors")):
        names.append("ema.safetensors")
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        with open(os.path.join(model_dir, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return {"weights": "ema" if "ema.safetensors" in names else "raw", "sha256": digest.hexdigest()}


def check_out_dir(out: str, record: dict, overwrite: bool) -> str:
    """"fresh", "resume" or "overwrite"; a ValueError for a DIR this run must not write into."""
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); --overwrite deletes {out} and starts again") from None
        if not isinstance(old, dict) or old.get("tool") != TOOL:
            raise ValueError(f"{path} was not written by {TOOL}: choose another --out")
        if overwrite:
            return "overwrite"
        diffs = _differences(old, record)
        if diffs:
            raise ValueError(f"{out} holds images made with other settings ({'; '.join(diffs)}): use the same "
                             f"settings to resume, another --out, or --overwrite to delete {out} and start again")
        return "resume"
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is not empty and has no {SETTINGS_FILE} (not a {TOOL} output): "
                         "choose a new or empty --out")
    return "fresh"


def _differences(old: dict, new: dict) -> list[str]:
    flat_old, flat_new = _flatten(old), _flatten(json.loads(json.dumps(new)))
    keys = sorted(k for k in set(flat_old) | set(flat_new) if any(k == c or k.startswith(c + ".") for c in COMPARED))
    return [f"{k} is {flat_old.get(k)!r} there, {flat_new.get(k)!r} now"
            for k in keys if flat_old.get(k) != flat_new.get(k)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _prepare_out_dir(out: str, record: dict, state: str, prompts: PromptSet, settings: Settings,
                     start: int, end: int) -> dict[int, list[int]]:
    """Rank 0, before any rank writes: (re)create DIR, write settings.json, drop a killed run's temp files;
    returns the pending images by unit."""
    if state == "overwrite":
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    if state != "resume":
        text = json.dumps(record, indent=2, sort_keys=True) + "\n"
        _atomic_write(os.path.join(out, SETTINGS_FILE), text.encode("utf-8"))
    for top, _, files in os.walk(out):
        for name in files:
            if _is_temp_name(name):
                os.remove(os.path.join(top, name))
    return pending_units(out, prompts, settings, start, end)


def unit_images(u: int, settings: Settings, num_prompts: int) -> range:
    """Global image indices of unit u: batches are fixed chunks of the whole file (see the docstring)."""
    total = num_prompts * settings.images_per_prompt
    return range(u * settings.batch_size, min((u + 1) * settings.batch_size, total))


def pending_units(out: str, prompts: PromptSet, settings: Settings, start: int, end: int) -> dict[int, list[int]]:
    """{unit: its selected images that are not done}, for the units that have any."""
    n, bs = settings.images_per_prompt, settings.batch_size
    first, last = start * n, end * n  # the selection's images [first, last)
    pending = {}
    for u in range(first // bs, (last - 1) // bs + 1):
        todo = [g for g in unit_images(u, settings, len(prompts.records))
                if first <= g < last and not _is_done(out, prompts, settings, g)]
        if todo:
            pending[u] = todo
    return pending


def _is_done(out: str, prompts: PromptSet, settings: Settings, g: int) -> bool:
    n = settings.images_per_prompt
    rel = image_path(prompts, prompts.records[g // n], g % n, n)
    return os.path.isfile(os.path.join(out, rel)) and os.path.isfile(os.path.join(out, sidecar_path(rel)))


# ---------------------------------------------------------------------- sampling and writing
def sample_unit(pipe: Pipeline, prompts: PromptSet, settings: Settings, images: range, device: torch.device):
    """uint8 pixels (B, H, W, 3) of the unit's images."""
    n = settings.images_per_prompt
    texts = [prompts.records[g // n].prompt for g in images]
    schedule = settings_schedule(settings, pipe.model.patch_nums)
    draws = image_draws(pipe.model, [settings.seed + g for g in images], device, settings.more_smooth, schedule)
    dtype = PRECISIONS[settings.precision]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        x = sample_images(pipe.model, pipe.tokenizer, pipe.text_encoder, texts, cfg_scale=settings.cfg_scale,
                          top_k=settings.top_k, top_p=settings.top_p, more_smooth=settings.more_smooth,
                          device=device, draws=draws, schedule=schedule)
    # as sample.py:36-41: x*255 truncated to uint8
    return (x.float().clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_draws(model: HARTForT2I, seeds: list[int], device: torch.device, more_smooth: bool,
                schedule: Schedule | None = None) -> SampleDraws:
    """Each image's draws from its own generator, laid out as the sampler takes a batch's (SampleDraws):
    per-scale rows and diffusion start noise image by image; the diffusion step noise has the cond rows of
    all images first, then their uncond rows. `schedule`: a bucket's (None: the square one)."""
    per = [model.draw_sampling_randomness(1, device, D.generator(device).manual_seed(s), more_smooth, schedule=schedule)
           for s in seeds]
    h, w = model.scale_grids(schedule)[-1]
    n = h * w  # last-scale tokens of one image
    token = [torch.cat([d.token_exp[si] for d in per]) for si in range(model.num_scales)]
    gumbel = [torch.cat([d.gumbel_exp[si] for d in per]) for si in range(model.num_scales)] if more_smooth else None
    step = torch.cat([d.diff_step_noise[:, :n] for d in per] + [d.diff_step_noise[:, n:] for d in per], dim=1)
    return SampleDraws(token, gumbel, torch.cat([d.diff_noise for d in per]), step)


def _write_image(out: str, prompts: PromptSet, settings: Settings, g: int, pixels, model_sha256: str,
                 count: int) -> None:
    """The prompt's folder file (GenEval), the PNG, then the sidecar: a sidecar means the image is whole."""
    n = settings.images_per_prompt
    record, k = prompts.records[g // n], g % n
    meta = folder_metadata(prompts, record)
    if meta is not None and not os.path.isfile(os.path.join(out, meta[0])):
        _atomic_write(os.path.join(out, meta[0]), meta[1].encode("utf-8"))
    rel = image_path(prompts, record, k, n)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    _atomic_write(os.path.join(out, rel), png.getvalue())
    _fault_hold_after_png(count)
    sidecar = {"prompt": record.prompt, "seed": settings.seed + g, "prompt_index": record.index, "image_index": k,
               "key": record.key, "category": record.category, "metadata": record.source,
               "settings": dataclasses.asdict(settings), "model_sha256": model_sha256}
    text = json.dumps(sidecar, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    _atomic_write(os.path.join(out, sidecar_path(rel)), text.encode("utf-8"))


def _atomic_write(path: str, data: bytes) -> None:
    """Write to a hidden temp file beside `path` (no evaluator picks it up), fsync, rename."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{D.rank()}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _fault_hold_after_png(count: int) -> None:
    """Fault injection for tests: HART_FAULT_HOLD_IMAGE="N:SECONDS" holds this process for SECONDS after the
    PNG of its N-th image, before that image's sidecar, so a test can kill a run with an unfinished image."""
    spec = os.environ.get("HART_FAULT_HOLD_IMAGE")
    if spec:
        hold_count, seconds = spec.split(":")
        if int(hold_count) == count:
            time.sleep(float(seconds))
