"""`hart-eval`: generate evaluation images and score them, offline.

    hart-eval generate --model CKPT --prompts FILE --out DIR     # HART's protocol by default
    hart-eval fid --real DIR_OR_SHARDS --fake DIR [--inception-weights FILE]
    hart-eval clip --images DIR [--clip-model DIR]

Every subcommand lives in its own module, which provides `add_parser(subparsers)` (registering its
subcommand with `set_defaults(run=...)`) and the function it runs; `run(args)` returns the exit code.
User errors (a missing file, a bad option) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {"generate": "hart_train.evaluation.generate", "fid": "hart_train.evaluation.fid",
               "clip": "hart_train.evaluation.clip_score"}


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    """Only the named subcommand's module is imported (each pulls in heavy libraries: the model,
    torchmetrics, transformers' CLIP); all of them for `--help` or an unknown name."""
    p = argparse.ArgumentParser(prog="hart-eval", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    chosen = [SUBCOMMANDS[argv[0]]] if argv and argv[0] in SUBCOMMANDS else list(SUBCOMMANDS.values())
    for name in chosen:
        importlib.import_module(name).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(argv).parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"hart-eval {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
