"""The token shard format that `hart-data encode` writes and the streaming reader reads.

Members of one sample (see `data_tools.encode` for how they are computed): `<key>.idx.npy` (per-scale
tokenizer indices concatenated over patch_nums), `.frest.npy` (last-scale residual), `.ctx.npy` (text
encoder hidden states, all max_length rows), `.mask.npy` (token mask), `.txt` (caption), `.json`
(patch_nums, shapes, dtypes). The manifest's `options` say `format: "hart-tokens"` and record the
tokenizer weights' sha256 (`file_sha256`), so a trainer can refuse tokens from another tokenizer.

Design decision: this module is numpy + torch only. The reader decodes token samples with it and
must not import the `tokenizer` package (DESIGN.md: only `data_tools/encode.py` may), so the format
lives here rather than in encode.py, which imports it.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from data_tools import schema

TOKEN_FORMAT = "hart-tokens"
TOKEN_FORMAT_VERSION = 1
EXT_IDX, EXT_FREST, EXT_CTX, EXT_MASK = "idx.npy", "frest.npy", "ctx.npy", "mask.npy"
MEMBERS = (EXT_IDX, EXT_FREST, EXT_CTX, EXT_MASK, schema.CAPTION_EXT, schema.META_EXT)


def is_token_dataset(options: dict) -> bool:
    """Whether a manifest's `options` describe a token dataset (image datasets store their image format)."""
    return options.get("format") == TOKEN_FORMAT


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 8 MiB blocks: the identity of a tokenizer checkpoint's weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_token_sample(members: dict) -> dict:
    """One sample's members ({ext: bytes}, ext as `idx.npy`) -> tensors.

    Returns idx_Bl (list of (pn*pn,) long per scale), frest (h*w, Cvae) float32, context (max_length, D)
    float32, mask and position_ids (max_length,) long, caption (str), meta (dict).
    Raises ValueError for missing members and for undecodable or mis-shaped ones.
    """
    missing = [e for e in MEMBERS if e not in members]
    if missing:
        raise ValueError(f"token sample lacks members {missing} (has {sorted(members)})")
    meta = json.loads(members[schema.META_EXT])
    arrays = {e: np.load(io.BytesIO(members[e]), allow_pickle=False) for e in (EXT_IDX, EXT_FREST, EXT_CTX, EXT_MASK)}
    patch_nums = meta["patch_nums"]
    idx = torch.from_numpy(arrays[EXT_IDX].astype(np.int64))
    num_tokens = sum(pn * pn for pn in patch_nums)
    if idx.shape != (num_tokens,):
        raise ValueError(f"token sample idx has shape {tuple(idx.shape)}; patch_nums {patch_nums} need ({num_tokens},)")
    mask = torch.from_numpy(arrays[EXT_MASK].astype(np.int64))
    return {
        "idx_Bl": list(idx.split([pn * pn for pn in patch_nums])),
        "frest": torch.from_numpy(arrays[EXT_FREST].astype(np.float32)),
        "context": torch.from_numpy(arrays[EXT_CTX].astype(np.float32)),
        "mask": mask,
        "position_ids": (mask.cumsum(0) - 1).clamp_(min=0),
        "caption": members[schema.CAPTION_EXT].decode("utf-8"),
        "meta": meta,
    }
