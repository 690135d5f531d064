"""The README's main job: the whole system end to end on CPU, within 20 minutes on 2 cores.

    python -m hart_train.demo [--out demo_out] [--s3] [--resume]      (launch/demo.sh runs it after setup)

Steps, each the real CLI in a subprocess, timed: build the emoji dataset (`hart-data shard`, then split
into a training set, a held-out set and the t2i subset, `hart-data verify` each), train `tokenizer-vq` ->
`tokenizer-hybrid` -> `t2i` with 2 DeepSpeed ranks through `launch/train.sh` (configs/demo_*.yaml),
sample a grid (`hart-sample`), and write OUT/report.md and OUT/report.json. The labelled grid's path is
the last line of stdout.

Design decisions:
- Subprocesses, not in-process calls: the demo exercises exactly what a user runs (the DeepSpeed
  launcher, console entry points), and a crash in one stage leaves its full log in OUT/logs/.
- The held-out set is a real split: the emoji list is sharded once at 32px (emoji-all), then shard 3
  (people and activities) is held out, so the tokenizer's PSNR/SSIM are on images it never trained on.
  Every other shard is re-sharded into emoji-train with `hart-data shard wds:...`.
- The tokenizer stages train on all of emoji-train, t2i on a 64-caption subset of it (the sample prompts
  plus plain captions spread over the list, `folder:` source): a few hundred CPU steps see each of 3129
  captions about once, too few to tie a prompt to its image; on 64 each is seen ~75 times.
- `--s3` starts moto's S3 server in this process (the trainers reach it over HTTP) and hands endpoint
  and dummy credentials to every child through the environment only, as production does with AWS.
- A fresh OUT unless `--resume`: then finished dataset steps are skipped (a manifest exists) and each
  `hart-train run` resumes from its newest complete checkpoint or returns at once if already done.
- The report measures that samples differ: the mean absolute pixel difference between the rows
  (prompts) of the grid, beside the spread within a row (seeds), both in 0..255 units.
- The report shows the grid as a person can look at it (`labelled_grid`): each row beside its prompt, each
  32px sample upscaled to 128px without smoothing (nearest neighbour, so what is shown is what was
  sampled). The t2i stage evaluates the held-out split every `run.eval_every` steps (raw and EMA weights,
  configs/demo_t2i.yaml); the report plots those held-out losses beside the training ones (`heldout_plot`).
- Evaluation with the project's own commands (`evaluate_samples`): `hart-eval generate` draws one image
  for each of the t2i stage's 64 training captions (the evaluation protocol's settings, fp32 on this CPU);
  `hart-eval fid` compares them with the real emoji of those captions, `hart-eval clip` scores them
  against their captions, each when its network is on this machine (HART_INCEPTION_WEIGHTS,
  HART_CLIP_MODEL: nothing is downloaded); otherwise the report says what to set. FID on 64 images is
  biased and only comparable between runs of this demo. `add_evaluation(report, json_path)` puts a
  `hart-eval` result into the report as its own section.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

import fsspec
import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from hart_train.checkpoint import latest_complete
from hart_train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["red apple", "rocket", "blue heart", "grinning face", "palm tree", "pizza"]
IMAGES_PER_PROMPT = 4
HELDOUT_SHARD = 3          # of emoji-all at 512 per shard: people and activities
HELDOUT_SAMPLES = 128
T2I_CAPTIONS = 64          # the t2i stage's subset: PROMPTS plus plain captions spread over the list
S3_BUCKET = "demo-bucket"
STAGES = (  # (run name, config); each stage reads its predecessor's newest checkpoint
    ("demo-tokenizer-vq", "configs/demo_tokenizer_vq.yaml"),
    ("demo-tokenizer-hybrid", "configs/demo_tokenizer_hybrid.yaml"),
    ("demo-t2i", "configs/demo_t2i.yaml"),
)
LOSS_COLUMNS = ("loss", "recon", "vq", "gan_g", "gan_d", "ce", "acc", "diff_loss")  # the report's table
HELDOUT_COLUMNS = ("loss", "ce", "acc", "diff_loss")  # of the t2i stage's held-out evaluation (eval/, eval_ema/)
CELL_PX = 128              # a sample's size in the labelled grid (upscaled by an integer factor, nearest)
GAP_PX = 4
LABEL_FONT_PX = 18
SHOWN_PREFIXES = ("step ", "saved checkpoint", "parameters:", "resumed from", "Traceback")  # of training logs


@dataclass
class Timings:
    steps: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def measure(self, name: str):
        t0 = time.perf_counter()
        yield
        self.steps[name] = round(time.perf_counter() - t0, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server():
    """A local S3 server (moto) on a free port; yields the env vars that point clients at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per HTTP request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    finally:
        server.stop()


@contextlib.contextmanager
def patched_environ(extra: dict[str, str]):
    """os.environ with `extra` set, restored afterwards (this process reads S3 through fsspec too)."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_logged(cmd: list[str], log_path: str, env: dict[str, str], echo_all: bool = False) -> None:
    """Run `cmd`, its output into `log_path`; progress lines (or all) echoed. Raises with the log's tail
    on failure."""
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if echo_all or line.lstrip().startswith(SHOWN_PREFIXES):
                print("    " + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = "".join(f.readlines()[-30:])
        raise RuntimeError(f"{cmd[0]} ... exited with {code}; last lines of {log_path}:\n{tail}")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, **extra)
    bin_dir = os.path.dirname(sys.executable)  # the venv's console scripts first
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(HART_PYTHON=sys.executable, HART_DEVICE="cpu", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return env


def dataset_exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path.rstrip("/") + "/manifest.json")


def dataset_commands(data_root: str) -> list[tuple[str, list[str]]]:
    """(output URL, hart-data command) for the full set, the training split and the held-out split."""
    all_url, train_url, heldout_url = (f"{data_root}/emoji-{s}" for s in ("all", "train", "heldout"))
    h = f"{HELDOUT_SHARD:06d}"
    train_shards = f"{{{{000000..{HELDOUT_SHARD - 1:06d}}},{{{HELDOUT_SHARD + 1:06d}..000007}}}}"
    common = ["--format", "png", "--samples-per-shard", "512", "--workers", "2", "--no-progress", "--overwrite"]
    return [
        (all_url, ["hart-data", "shard", "emoji", all_url, "--resolution", "32", *common]),
        (train_url, ["hart-data", "shard", f"wds:{all_url}/shard-{train_shards}.tar", train_url, *common]),
        (heldout_url, ["hart-data", "shard", f"wds:{all_url}/shard-{h}.tar", heldout_url,
                       "--limit", str(HELDOUT_SAMPLES), *common]),
    ]


def read_captioned_images(url: str) -> dict[str, bytes]:
    """caption -> PNG bytes of every sample in a dataset (local or s3), first occurrence kept."""
    fs, root = fsspec.core.url_to_fs(url)
    samples: dict[str, bytes] = {}
    for shard in sorted(fs.glob(root.rstrip("/") + "/shard-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with fs.open(shard, "rb") as f, tarfile.open(fileobj=f) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            samples.setdefault(parts["txt"].decode("utf-8"), parts["png"])
    return samples


def write_t2i_subset(train_url: str, folder: str) -> list[str]:
    """PROMPTS plus evenly spaced plain captions (no ': skin tone' style variants) as a folder: source."""
    samples = read_captioned_images(train_url)
    missing = [p for p in PROMPTS if p not in samples]
    assert not missing, f"prompts without an emoji in the training set: {missing}"
    plain = [c for c in samples if ":" not in c and c not in PROMPTS]
    stride = len(plain) / (T2I_CAPTIONS - len(PROMPTS))
    chosen = PROMPTS + [plain[int(i * stride)] for i in range(T2I_CAPTIONS - len(PROMPTS))]
    os.makedirs(folder, exist_ok=True)
    for i, caption in enumerate(chosen):
        with open(os.path.join(folder, f"{i:03d}.png"), "wb") as f:
            f.write(samples[caption])
        with open(os.path.join(folder, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(caption)
    return chosen


def build_dataset(data_root: str, logs: str, env: dict[str, str]) -> tuple[str, str, str]:
    """Shard, split and verify the emoji set; returns (training URL, held-out URL, t2i subset URL)."""
    urls = []
    for url, cmd in dataset_commands(data_root):
        urls.append(url)
        if dataset_exists(url):
            print(f"demo: {url} exists, kept (--resume)", flush=True)
            continue
        run_logged(cmd, os.path.join(logs, f"shard-{os.path.basename(url)}.log"), env, echo_all=True)
    t2i_url = f"{data_root}/emoji-t2i"
    if not dataset_exists(t2i_url):
        folder = os.path.join(os.path.dirname(logs), "t2i-subset")
        write_t2i_subset(urls[1], folder)
        run_logged(["hart-data", "shard", f"folder:{folder}", t2i_url, "--format", "png", "--samples-per-shard",
                    "16", "--no-progress", "--overwrite"], os.path.join(logs, "shard-emoji-t2i.log"), env, echo_all=True)
    for url in [*urls[1:], t2i_url]:
        run_logged(["hart-data", "verify", url, "--workers", "2", "--no-progress"],
                   os.path.join(logs, f"verify-{os.path.basename(url)}.log"), env, echo_all=True)
    return urls[1], urls[2], t2i_url


def stage_command(config: str, runs_dir: str, overrides: list[str]) -> list[str]:
    sets = [f"run.out_dir={runs_dir}", *overrides]
    return ["bash", "launch/train.sh", "--num_gpus", "2", "--master_port", str(free_port()),
            "--config", config, *[a for s in sets for a in ("--set", s)]]


def train_stages(runs_dir: str, urls: tuple[str, str, str], logs: str, env, timings) -> dict[str, str]:
    """tokenizer-vq -> tokenizer-hybrid -> t2i; returns run name -> newest complete checkpoint dir."""
    train_url, heldout_url, t2i_url = urls
    ckpts: dict[str, str] = {}
    previous = None
    for name, config in STAGES:
        overrides = [f"data.urls=[{t2i_url if name == 'demo-t2i' else train_url}]"]
        if name != "demo-t2i":
            overrides.append(f"tokenizer.eval_url={heldout_url}")
        if name == "demo-tokenizer-hybrid":
            overrides.append(f"run.init_from={previous}")
        if name == "demo-t2i":
            overrides += [f"t2i.tokenizer_ckpt={previous}", f"t2i.eval_url={heldout_url}"]
        with timings.measure(name):
            run_logged(stage_command(config, runs_dir, overrides), os.path.join(logs, f"{name}.log"), env)
        previous = latest_complete(os.path.join(runs_dir, name, "ckpt"))
        assert previous is not None, f"{name} finished without a complete checkpoint"
        ckpts[name] = previous
    return ckpts


def evaluate_samples(t2i_ckpt: str, t2i_folder: str, out: str, logs: str, env, timings) -> dict:
    """hart-eval generate for the t2i captions, then fid / clip where their networks are present. Returns
    {"generated": DIR, "results": [JSON paths], "skipped": [reasons]}."""
    captions = [open(os.path.join(t2i_folder, n), encoding="utf-8").read() for n in sorted(os.listdir(t2i_folder))
                if n.endswith(".txt")]
    prompts = os.path.join(out, "eval_prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines(c + "\n" for c in captions)
    generated, results, skipped = os.path.join(out, "eval_generated"), [], []
    with timings.measure("hart-eval generate"):
        run_logged(["hart-eval", "generate", "--model", t2i_ckpt, "--prompts", prompts, "--out", generated,
                    "--device", "cpu", "--precision", "fp32", "--batch-size", "16"],
                   os.path.join(logs, "hart-eval-generate.log"), env)
    metrics = (("fid", "HART_INCEPTION_WEIGHTS", ["--real", t2i_folder, "--fake", generated]),
               ("clip", "HART_CLIP_MODEL", ["--images", generated]))
    for name, variable, args in metrics:
        if not env.get(variable):
            skipped.append(f"{name}: set {variable} to its network's local file or directory (README, Evaluation)")
            continue
        with timings.measure(f"hart-eval {name}"):
            run_logged(["hart-eval", name, *args, "--out", os.path.join(out, "eval")],
                       os.path.join(logs, f"hart-eval-{name}.log"), env)
        results.append(os.path.join(out, "eval", f"{name}.json"))
    return {"generated": generated, "num_images": len(captions), "results": results, "skipped": skipped}


def sample_grid(t2i_ckpt: str, grid_path: str, logs: str, env, timings) -> None:
    cmd = ["hart-sample", "--model", t2i_ckpt, "--batch", str(IMAGES_PER_PROMPT), "--seed", "0",
           "--cfg", "3.0", "--out", grid_path]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    with timings.measure("hart-sample"):
        run_logged(cmd, os.path.join(logs, "hart-sample.log"), env)


# ------------------------------------------------------------------------------------------ the report


def loss_table(records: list[dict], num_rows: int = 11) -> list[dict]:
    """About every 10% of the logged training steps: the step and the loss terms the stage logs."""
    train = [r for r in records if "loss" in r]
    if not train:
        return []
    picks = sorted({round(i * (len(train) - 1) / (num_rows - 1)) for i in range(num_rows)})
    columns = ["step"] + [k for k in LOSS_COLUMNS if any(k in r for r in train)]
    return [{k: train[i].get(k, "") for k in columns} for i in picks]


def last_eval(records: list[dict]) -> dict:
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    return {k: v for k, v in evals[-1].items() if k.startswith(("eval/", "eval_ema/")) or k == "step"} if evals else {}


def heldout_plot(records: list[dict], path: str) -> bool:
    """The t2i held-out CE and diffusion loss over the steps, raw and EMA weights, beside the training
    ones (logged per window of steps, on the training batches); False (no file) without held-out lines."""
    evals = [r for r in records if "eval/ce" in r]
    if not evals:
        return False
    train = [r for r in records if "ce" in r]
    fig = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    for ax, key, title in zip(fig.subplots(1, 2), ("ce", "diff_loss"), ("cross-entropy", "diffusion loss")):
        ax.plot([r["step"] for r in train], [r[key] for r in train], color="0.7", label="training batches")
        for prefix, style in (("eval", "o-"), ("eval_ema", "s--")):
            shown = [r for r in evals if f"{prefix}/{key}" in r]
            ax.plot([r["step"] for r in shown], [r[f"{prefix}/{key}"] for r in shown], style, ms=4,
                    label=f"held-out, {'EMA' if prefix == 'eval_ema' else 'raw'} weights")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return True


def labelled_grid(grid_path: str, prompts: list[str], out_path: str, cell_px: int = CELL_PX) -> None:
    """The grid (one row of square samples per prompt) with each row's prompt on its left and every sample
    upscaled by an integer factor to about `cell_px` with nearest-neighbour resampling (no smoothing),
    `GAP_PX` of white between samples."""
    grid = Image.open(grid_path).convert("RGB")
    h = grid.height // len(prompts)
    cols, scale = grid.width // h, max(1, cell_px // h)
    cell = h * scale
    font = ImageFont.load_default(size=LABEL_FONT_PX)
    label_w = 16 + max(int(font.getlength(p)) for p in prompts)
    out = Image.new("RGB", (label_w + cols * (cell + GAP_PX), len(prompts) * (cell + GAP_PX)), "white")
    draw = ImageDraw.Draw(out)
    for r, prompt in enumerate(prompts):
        y = r * (cell + GAP_PX)
        draw.text((8, y + cell / 2), prompt, fill="black", font=font, anchor="lm")
        for c in range(cols):
            sample = grid.crop((c * h, r * h, (c + 1) * h, (r + 1) * h))
            out.paste(sample.resize((cell, cell), Image.Resampling.NEAREST), (label_w + c * (cell + GAP_PX), y))
    out.save(out_path)


def add_evaluation(report: dict, json_path: str) -> None:
    """Add a `hart-eval` result (a JSON object: its metrics and settings) to `report["evaluation"]`, where
    `report_markdown` shows each as part of its Evaluation section; rewrite the report with `write_report`."""
    with open(json_path, encoding="utf-8") as f:
        report.setdefault("evaluation", []).append({"source": os.path.abspath(json_path), "results": json.load(f)})


def _evaluation_markdown(report: dict) -> list[str]:
    lines = ["", "## Evaluation", ""]
    e = report.get("eval_run")
    if e:
        lines += [f"`hart-eval generate` drew one image for each of the t2i stage's {e['num_images']} captions "
                  f"(the evaluation protocol's settings, fp32): `{e['generated']}`.", ""]
        lines += [f"- skipped {reason}" for reason in e["skipped"]] + ([""] if e["skipped"] else [])
    for evaluation in report.get("evaluation", []):
        results = evaluation["results"]
        numbers = results.get("numbers", results)
        rows = [{"name": k, "value": v} for k, v in numbers.items() if not isinstance(v, (dict, list))]
        lines += [f"From `{evaluation['source']}`:", ""] + _markdown_table(rows) + [""]
    return lines


def row_differences(grid_path: str, rows: int) -> dict:
    """Mean |pixel difference| (0..255) between prompts (rows) and between seeds within a row."""
    img = np.asarray(Image.open(grid_path).convert("RGB"), dtype=np.float64)
    h = img.shape[0] // rows
    cols = img.shape[1] // h
    cells = img[: rows * h, : cols * h].reshape(rows, h, cols, h, 3).transpose(0, 2, 1, 3, 4)
    row_means = cells.mean(axis=1)  # (rows, h, w, 3): each prompt's average image
    between = [np.abs(row_means[i] - row_means[j]).mean() for i in range(rows) for j in range(i + 1, rows)]
    within = [np.abs(cells[r, i] - cells[r, j]).mean()
              for r in range(rows) for i in range(cols) for j in range(i + 1, cols)]
    return {"between_prompts_mean": float(np.mean(between)), "between_prompts_min": float(np.min(between)),
            "within_prompt_mean": float(np.mean(within)) if within else 0.0}


def wandb_dirs(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "wandb")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("offline-run-"))


def _files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)) if os.path.isdir(directory) else []


def collect_report(out: str, runs_dir: str, ckpts: dict, grid: str, timings: Timings, mode: str) -> dict:
    """report.json's content; writes the labelled grid and the held-out plot beside it into `out`."""
    out = os.path.abspath(out)
    stages = {}
    for name, _ in STAGES:
        records = read_jsonl(os.path.join(runs_dir, name, "metrics.jsonl"))
        table = loss_table(records)
        plot = os.path.join(out, f"heldout_{name}.png")
        stages[name] = {"wall_s": timings.steps.get(name), "checkpoint": ckpts.get(name),
                        "losses": table, "eval": last_eval(records),
                        "heldout_plot": plot if heldout_plot(records, plot) else None,
                        "images": _files(os.path.join(runs_dir, name, "images")),
                        "wandb": wandb_dirs(os.path.join(runs_dir, name))}
    labelled = os.path.join(out, "samples_labelled.png")
    labelled_grid(grid, PROMPTS, labelled)
    return {"out": out, "logs": os.path.join(out, "logs"), "data": mode, "prompts": PROMPTS, "grid": os.path.abspath(grid),
            "grid_labelled": labelled, "grid_differences": row_differences(grid, len(PROMPTS)),
            "timings_s": timings.steps, "total_s": round(sum(timings.steps.values()), 1), "stages": stages}


def _markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no training log lines)"]
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def _relative(report: dict, path: str) -> str:
    """`path` as report.md (in the report's directory) links it."""
    return os.path.relpath(path, report["out"])


def _heldout_markdown(e: dict) -> list[str]:
    """The t2i held-out numbers of the last evaluation, raw and EMA weights."""
    rows = [{"weights": weights, **{k: e[f"{prefix}/{k}"] for k in HELDOUT_COLUMNS if f"{prefix}/{k}" in e}}
            for weights, prefix in (("raw", "eval"), ("EMA", "eval_ema")) if f"{prefix}/loss" in e]
    return [f"Held-out losses at step {e['step']} (the held-out split, every last-scale token, fixed draws):",
            ""] + _markdown_table(rows) + [""]


def report_markdown(report: dict) -> str:
    d = report["grid_differences"]
    lines = ["# hart-train demo report", "",
             f"Data: {report['data']}. Total wall time: {report['total_s']:.0f} s. "
             f"Logs of every step: `{report['logs']}`.", "",
             f"Samples of the t2i model (`hart-sample`, EMA weights, {IMAGES_PER_PROMPT} seeds per prompt, "
             f"upscaled without smoothing):", "",
             f"![samples, one row per prompt]({_relative(report, report['grid_labelled'])})", "",
             f"The grid at its own resolution: `{report['grid']}`.", "",
             f"Mean |pixel difference| between prompts' average images: {d['between_prompts_mean']:.1f} "
             f"(smallest pair {d['between_prompts_min']:.1f}); between seeds of one prompt: "
             f"{d['within_prompt_mean']:.1f} (0..255 units).", "", "## Wall time per step", "",
             "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    for name, s in report["stages"].items():
        lines += ["", f"## {name}", "", f"Checkpoint: `{s['checkpoint']}`", ""]
        e = s["eval"]
        if "eval/psnr_discrete" in e:
            lines += [f"Held-out reconstruction at step {e['step']}: PSNR discrete-only "
                      f"{e['eval/psnr_discrete']:.2f} dB (SSIM {e['eval/ssim_discrete']:.3f}), continuous "
                      f"{e['eval/psnr_continuous']:.2f} dB (SSIM {e['eval/ssim_continuous']:.3f}).", ""]
        if "eval/ce" in e:
            lines += _heldout_markdown(e)
        if s.get("heldout_plot"):
            lines += [f"![held-out and training losses of {name}]({_relative(report, s['heldout_plot'])})", ""]
        if name == "demo-t2i" and "eval/ce" in e:
            lines += [f"The t2i stage trains on {T2I_CAPTIONS} captions, each seen about 75 times, so that it ties "
                      "the prompts to their images; the held-out emoji are others (people and activities). Once "
                      "it memorises its captions, its held-out cross-entropy rises again: the plot shows when.", ""]
        lines += _markdown_table(s["losses"])
        lines += ["", f"wandb offline runs: {', '.join(f'`{w}`' for w in s['wandb']) or 'none'}",
                  f"images: {', '.join(f'`{i}`' for i in s['images']) or 'none'}"]
    if report.get("evaluation") or report.get("eval_run"):
        lines += _evaluation_markdown(report)
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: str) -> str:
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(report_markdown(report))
    return path


# ------------------------------------------------------------------------------------------ main


def run_demo(out: str, use_s3: bool, timings: Timings) -> dict:
    out = os.path.abspath(out)
    logs, runs_dir = os.path.join(out, "logs"), os.path.join(out, "runs")
    os.makedirs(logs, exist_ok=True)
    with contextlib.ExitStack() as stack:
        extra = stack.enter_context(s3_server()) if use_s3 else {}
        env = child_env(extra)
        stack.enter_context(patched_environ(extra))
        if use_s3:
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir(S3_BUCKET)
        data_root = f"s3://{S3_BUCKET}" if use_s3 else os.path.join(out, "data")
        with timings.measure("dataset"):
            urls = build_dataset(data_root, logs, env)
        ckpts = train_stages(runs_dir, urls, logs, env, timings)
        grid = os.path.join(out, "samples.png")
        sample_grid(ckpts["demo-t2i"], grid, logs, env, timings)
        eval_run = evaluate_samples(ckpts["demo-t2i"], os.path.join(out, "t2i-subset"), out, logs, env, timings)
    mode = "moto S3 server (s3://demo-bucket)" if use_s3 else f"local directory {data_root}"
    report = collect_report(out, runs_dir, ckpts, grid, timings, mode)
    report["eval_run"] = eval_run
    for path in eval_run["results"]:
        add_evaluation(report, path)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hart_train.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="output directory (wiped first unless --resume)")
    p.add_argument("--s3", action="store_true", help="keep the dataset in a local S3 server (moto)")
    p.add_argument("--resume", action="store_true", help="keep OUT and finish what is missing")
    args = p.parse_args(argv)
    if not args.resume and os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    timings = Timings()
    report = run_demo(args.out, args.s3, timings)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    path = write_report(report, args.out)
    print(open(path, encoding="utf-8").read(), flush=True)
    print(report["grid_labelled"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
