"""`hart-train`: run a stage from a YAML config (bare, under torchrun, or under the deepspeed launcher),
and move weights between hart-train checkpoints and the official HART layout.

    hart-train run --config configs/tokenizer_vq_tiny.yaml --set run.max_steps=20 --set optim.lr=3e-4
    hart-train import --hart hart-0.7b-1024px/ --out imported/        # official -> run.init_from dirs
    hart-train export --ckpt runs/x/ckpt/step_00001000 --out mine/    # -> official llm/ + tokenizer/
    hart-train plan --config configs/t2i_1024.yaml --gpus 8 --gpu-mem 80 --gpu H100   # memory per rank

The same command resumes: re-running it continues from the newest complete checkpoint of the run.
User errors (a bad config key or value, a missing path) print one line and exit 2 before any model or
process group is created.
"""

from __future__ import annotations

import argparse
import os
import sys

from hart_train import config as C
from hart_train.official_io import export_checkpoint, import_official
from hart_train.run_config import RunConfig
from hart_train.stages import make_stage, validate_paths
from hart_train.trainer import PreflightError, check_writable, train, run_dir_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hart-train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train (or resume) a stage from a YAML config")
    run.add_argument("--config", required=True, help="YAML run file (see configs/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override an existing config field, e.g. optim.lr=1e-4 (repeatable)")
    # the deepspeed launcher appends --local_rank=N; the env var LOCAL_RANK carries the same
    run.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    imp = sub.add_parser("import", help="official HART directory (llm/, tokenizer/) -> hart-train checkpoint directories")
    imp.add_argument("--hart", required=True, help="official HART directory holding llm/ and tokenizer/")
    imp.add_argument("--out", required=True, help="new or empty output directory: <out>/llm (run.init_from), <out>/tokenizer")
    imp.add_argument("--text-encoder", dest="text_encoder_path", default=None,
                     help="local Qwen2 text-encoder directory to record in <out>/llm/config.yaml")
    exp = sub.add_parser("export", help="hart-train t2i checkpoint -> official HART layout (safetensors)")
    exp.add_argument("--ckpt", required=True, help="a t2i checkpoint directory, e.g. runs/x/ckpt/step_00100000")
    exp.add_argument("--out", required=True, help="new or empty output directory: <out>/llm, <out>/tokenizer")
    exp.add_argument("--raw", dest="use_ema", action="store_false",
                     help="put the raw weights in ema_model.bin instead of the EMA")
    pl = sub.add_parser("plan", help="memory per rank and the largest micro-batch that fits, before renting GPUs")
    pl.add_argument("--config", required=True, help="YAML run file of a t2i stage")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable)")
    pl.add_argument("--gpus", type=int, default=8, help="data-parallel ranks (default 8)")
    pl.add_argument("--gpu-mem", type=float, default=None, metavar="GiB",
                    help="memory of one GPU: also search the largest micro-batch that fits")
    pl.add_argument("--gpu", default=None, help="GPU name for the step time (H100, H200, A100, L40S)")
    pl.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    pl.add_argument("--json", action="store_true", help="print JSON")
    return p


def _plan(args) -> int:
    from hart_train import memory_plan as P

    cfg = C.load(RunConfig, args.config, args.overrides)  # paths need not exist on the planning machine
    planner = P.Planner(cfg, args.gpus)
    gpu_mem = args.gpu_mem * P.GiB if args.gpu_mem is not None else None
    best = planner.largest_micro_batch(gpu_mem) if gpu_mem is not None else None
    plan = planner.plan(cfg.data.batch_size)
    if args.gpu and P.peak_tflops(args.gpu) is None:
        raise ValueError(f"--gpu {args.gpu!r}: unknown; known: {', '.join(P.GPU_PEAK_TFLOPS)}")
    if args.json:
        print(P.plan_json(plan, gpu_mem, best, args.gpu, args.mfu))
    else:
        print(P.format_plan(plan, gpu_mem, best, args.gpu, args.mfu, cfg.run.dtype))
    return 0


def load_run_config(path: str, overrides: list[str]) -> RunConfig:
    cfg = C.load(RunConfig, path, overrides)
    validate_paths(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        try:
            cfg = load_run_config(args.config, args.overrides)
            check_writable(run_dir_of(cfg))
        except (ValueError, FileNotFoundError, PreflightError) as e:
            print(f"hart-train: error: {e}", file=sys.stderr)
            return 2
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.run.device == "cuda" else "cpu")
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            train(cfg, make_stage)
        except PreflightError as e:
            print(f"hart-train: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "import":
            out = import_official(args.hart, args.out, text_encoder_path=args.text_encoder_path)
        else:
            out = export_checkpoint(args.ckpt, args.out, use_ema=args.use_ema)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"hart-train: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
