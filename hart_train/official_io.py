"""Official HART weights in and out: `hart-train import` and `hart-train export`.

    official layout (hf mit-han-lab/hart-0.7b-1024px)   hart-train checkpoint directories
    llm/config.json        HARTForT2IConfig              llm/config.yaml        stage: t2i, t2i: {model, tokenizer_ckpt, ...}
    llm/model.safetensors  raw weights + buffers         llm/model.safetensors  raw weights (no regenerable buffers)
    llm/ema_model.bin      EMA weights + buffers         llm/ema.safetensors    EMA of the parameters (an overlay)
    tokenizer/config.json  HARTAutoEncoderConfig         tokenizer/config.yaml  stage: tokenizer-hybrid, tokenizer: {model}
    tokenizer/model.safetensors  vae.* + disc.*          tokenizer/model.safetensors  the same tensors
                                 (vae.* only when exported from a tokenizer whose discriminator is not
                                 the released ndf 64 / 3 layers, which the official class always builds)

`import_official` maps the first column to the second, `export_checkpoint` the second to the first; a round
trip in either direction gives bit-identical tensors and identical config values.

Decisions:
- Strict on every tensor. The models are built on the meta device (shapes only, nothing allocated) and the
  key sets and shapes of every file are compared with them; a missing, unexpected or misshapen tensor is one
  ValueError naming the keys. The regenerable buffers (`lvl_1L`, `attn_bias_for_masking`) are checked
  against the config's sequence layout, then dropped on import and regenerated on export; the raw
  weights may lack them (nothing is lost), `ema_model.bin` may not (the official code loads it strictly).
- Strict on the config. Official fields that select a variant we do not implement (gpt2 MLP/attention,
  cross attention, shared AdaLN, a non-iddpm sampler, dropout, a double decoder, ...) are a ValueError;
  a field we do not know at all is an error too, because we cannot tell whether it changes the
  architecture. Only kernel switches (`flash_if_available`, `fused_if_available`), the VAE path and
  transformers' bookkeeping are ignored. A field absent from config.json takes the official class default
  (which is what the official code would do), not ours.
- Our fields with no official counterpart (training knobs such as `diff_weight`, the released quirk
  switches, `skip_continuous_prob`) travel in a `hart_train` mapping inside config.json, which the
  official config classes ignore; without it they take our defaults. The transformer's `vocab_size` and
  `Cvae` come from the tokenizer, as in the official code. The discriminator shape (`disc_ndf`,
  `disc_n_layers`) is read from the weights: the official code always builds ndf=64, n_layers=3.
- Both official weight files carry the regenerable buffers: `ema_model.bin` is loaded with a strict
  `load_state_dict` by the official sample.py, and `from_pretrained` should not have to invent them.
  `ema_model.bin` is `torch.save` of a plain dict of tensors (loadable with weights_only=True); with
  `use_ema=False` it holds the raw weights, so the official sampler's EMA path samples those.
- Checkpoints are only read with safetensors or `torch.load(weights_only=True)`, never by unpickling
  arbitrary objects; anything but a flat {name: tensor} mapping is refused.
- Outputs are written into `<out>.partial` and renamed into place at the end, so a crash never leaves a
  directory that looks complete; an existing non-empty `<out>` is refused.
- A LoRA checkpoint (adapters only, hart_train.lora) is exported merged: its base (the run's init_from) with
  the raw adapters folded in is model.safetensors, with the EMA adapters folded in ema_model.bin, so the
  official code loads it like any other; the adapters themselves have no official layout.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from data_tools.encode import tokenizer_checkpoint_config
from hart_train import config as C
from hart_train import lora
from hart_train.models.hart_t2i import HARTConfig, HARTForT2I
from hart_train.models.official_layout import REGENERABLE_BUFFERS, _official_buffers
from tokenizer.autoencoder import HARTAutoEncoderWithDisc, TokenizerConfig

T2I_MODEL_TYPE = "hart_transformer_t2i"
TOKENIZER_MODEL_TYPES = ("hart_autoencoder_with_disc", "hart_autoencoder")
EXTRAS_KEY = "hart_train"

# HARTForT2IConfig fields that are also HARTConfig fields (same name, same meaning), with the official defaults.
_T2I_SHARED_DEFAULTS = dict(
    context_token=77, context_dim=768, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4.0, drop_path_rate=0.0,
    norm_eps=1e-6, cond_drop_rate=0.1, attn_l2_norm=False, patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
    sep_aln_pooling_mode="max", diff_width=1024, diff_depth=6, num_sampling_steps="8", diffusion_batch_mul=4,
    use_context_norm=False, context_norm_scale=1.0,
)
# official field -> (official default, the only value we implement)
_T2I_FIXED = dict(
    mlp_type=("gpt2", "llama"), attn_type=("gpt2", "llama"), use_timestep_embed=(False, True),
    use_cross_attn=(False, False), disable_aln=(False, False), shared_aln=(False, False), sampler=("iddpm", "iddpm"),
    diffusion_head_repeats=(1, 1), drop_rate=(0.0, 0.0), attn_drop_rate=(0.0, 0.0),
)
_T2I_IGNORED = dict(vae_path=None, flash_if_available=True, fused_if_available=True)
_T2I_FROM_TOKENIZER = ("vocab_size", "Cvae")

# HARTAutoEncoderConfig field -> TokenizerConfig field
_TOK_SHARED = dict(vocab_size="vocab_size", z_channels="z_channels", ch="ch", ch_mult="ch_mult", dropout="dropout",
                   beta="beta", using_znorm="using_znorm", quant_conv_ks="quant_conv_ks", quant_resi="quant_resi",
                   share_quant_resi="share_quant_resi", v_patch_nums="patch_nums")
_TOK_SHARED_DEFAULTS = dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=[1, 1, 2, 2, 4], dropout=0.0, beta=0.25,
                            using_znorm=False, quant_conv_ks=3, quant_resi=0.5, share_quant_resi=4,
                            v_patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
_TOK_FIXED = dict(default_qresi_counts=(0, 0), disable_quant_resi=(False, False), double_decoder=(False, False))
_TOK_QUANTIZERS = ("var", "var_hybrid")  # the same weights; the hybrid one is what HART's T2I uses
_TOK_IGNORED = dict(quantizer_type="var_hybrid", hybrid=True, test_mode=False, levels=[8, 8, 8, 6, 5],
                    freeze_codebook_for_hybrid=True)
_TOK_FROM_WEIGHTS = ("disc_ndf", "disc_n_layers")
# the discriminator the official HARTAutoEncoderWithDisc always builds (and from_pretrained loads into)
RELEASED_DISC = dict(disc_ndf=64, disc_n_layers=3)

# transformers' own keys in a config.json (PretrainedConfig base attributes, 4.x and 5.x)
_HF_KEYS = frozenset((
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures", "auto_map", "model_type",
    "transformers_version", "torch_dtype", "dtype", "return_dict", "output_hidden_states", "output_attentions",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
))


# ---------------------------------------------------------------------- reading and writing tensors
def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from .safetensors or a torch file read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: refused to load, it holds objects other than tensors "
                         f"(read with torch.load(weights_only=True): {first})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a flat mapping of names to tensors (a state dict), "
                         f"got {type(obj).__name__}")
    return obj


def _official_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a `from_pretrained` directory: model.safetensors (or its shards), else pytorch_model.bin."""
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_tensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_tensors(model_dir / shard).items()}
    if (model_dir / "pytorch_model.bin").is_file():
        return load_tensors(model_dir / "pytorch_model.bin")
    raise FileNotFoundError(f"{model_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def check_tensors(what: str, state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Strict key-set and shape check; one ValueError naming every offending key."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != expected {shapes[k]}"
                   for k in set(state) & set(shapes) if tuple(state[k].shape) != tuple(shapes[k]))
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))


# ---------------------------------------------------------------------- model shapes (meta device)
def _t2i_meta(cfg: HARTConfig) -> HARTForT2I:
    with torch.device("meta"):
        return HARTForT2I(cfg)


def _t2i_official_shapes(model: HARTForT2I) -> dict[str, tuple[int, ...]]:
    n = model.config.context_token + model.L - 1
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update(lvl_1L=(1, n), attn_bias_for_masking=(1, 1, n, n))
    return shapes


def _check_regenerable(what: str, state: dict[str, torch.Tensor], model: HARTForT2I) -> None:
    for name, want in _official_buffers(model).items():
        if name in state and not torch.equal(state[name].to(want.dtype), want):
            raise ValueError(f"{what}: {name} does not match patch_nums={model.patch_nums}, "
                             f"context_token={model.config.context_token} (a different sequence layout)")


def _tokenizer_shapes(cfg: TokenizerConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = HARTAutoEncoderWithDisc(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _disc_shape(state: dict[str, torch.Tensor]) -> dict:
    """The discriminator shape of tokenizer weights; the released one where they hold none (an export of a
    tokenizer trained with another discriminator keeps only the VAE)."""
    if not any(k.startswith("disc.") for k in state):
        return dict(RELEASED_DISC)
    if "disc.main.0.weight" not in state:
        raise ValueError("the tokenizer weights do not match the model: missing: disc.main.0.weight")
    num_norms = sum(1 for k in state if k.startswith("disc.main.") and k.endswith(".running_mean"))
    return dict(disc_ndf=int(state["disc.main.0.weight"].shape[0]), disc_n_layers=num_norms)


# ---------------------------------------------------------------------- config mapping
def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"official config not found: {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _check_official_fields(what: str, official: dict, known: set[str], fixed: dict) -> dict:
    """Refuse unknown fields and unsupported variants; returns the `hart_train` extras mapping."""
    unknown = sorted(set(official) - known - _HF_KEYS - {EXTRAS_KEY})
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown}; cannot tell whether they change the architecture")
    for key, (default, supported) in fixed.items():
        if official.get(key, default) != supported:
            raise ValueError(f"{what}: {key}={official.get(key, default)!r} is not supported (only {supported!r})")
    extras = official.get(EXTRAS_KEY, {})
    if not isinstance(extras, dict):
        raise ValueError(f"{what}: {EXTRAS_KEY} must be a mapping, got {extras!r}")
    return extras


def t2i_config_from_official(official: dict, tok: TokenizerConfig, what: str = "llm/config.json") -> HARTConfig:
    """HARTConfig from an official HARTForT2IConfig dict; vocab_size and Cvae come from the tokenizer."""
    if official.get("model_type") != T2I_MODEL_TYPE:
        raise ValueError(f"{what}: model_type={official.get('model_type')!r}, expected {T2I_MODEL_TYPE!r}")
    known = set(_T2I_SHARED_DEFAULTS) | set(_T2I_FIXED) | set(_T2I_IGNORED)
    extras = _check_official_fields(what, official, known, _T2I_FIXED)
    ours = {f.name for f in fields(HARTConfig)} - set(_T2I_SHARED_DEFAULTS) - set(_T2I_FROM_TOKENIZER)
    if set(extras) - ours:
        raise ValueError(f"{what}: unknown {EXTRAS_KEY} fields {sorted(set(extras) - ours)}")
    model = {k: official.get(k, default) for k, default in _T2I_SHARED_DEFAULTS.items()}
    model["num_sampling_steps"] = str(model["num_sampling_steps"])
    model.update(extras, vocab_size=tok.vocab_size, Cvae=tok.z_channels)
    return C.build(HARTConfig, model, "t2i.model")


def t2i_config_to_official(cfg: HARTConfig) -> dict:
    values = asdict(cfg)
    out = {"model_type": T2I_MODEL_TYPE, "architectures": ["HARTForT2I"]}
    out.update({k: _plain(values[k]) for k in _T2I_SHARED_DEFAULTS})
    out.update({k: supported for k, (_, supported) in _T2I_FIXED.items()}, **_T2I_IGNORED)
    skip = set(_T2I_SHARED_DEFAULTS) | set(_T2I_FROM_TOKENIZER)
    out[EXTRAS_KEY] = {k: _plain(v) for k, v in values.items() if k not in skip}
    return out


def tokenizer_config_from_official(official: dict, disc: dict, what: str = "tokenizer/config.json") -> TokenizerConfig:
    """TokenizerConfig from an official HARTAutoEncoderConfig dict and the discriminator shape of its weights."""
    if official.get("model_type", TOKENIZER_MODEL_TYPES[0]) not in TOKENIZER_MODEL_TYPES:
        raise ValueError(f"{what}: model_type={official.get('model_type')!r}, expected one of {TOKENIZER_MODEL_TYPES}")
    known = set(_TOK_SHARED) | set(_TOK_FIXED) | set(_TOK_IGNORED)
    extras = _check_official_fields(what, official, known, _TOK_FIXED)
    if official.get("quantizer_type", "var") not in _TOK_QUANTIZERS:
        raise ValueError(f"{what}: quantizer_type={official['quantizer_type']!r} is not supported ({_TOK_QUANTIZERS})")
    ours = {f.name for f in fields(TokenizerConfig)} - set(_TOK_SHARED.values()) - set(_TOK_FROM_WEIGHTS)
    if set(extras) - ours:
        raise ValueError(f"{what}: unknown {EXTRAS_KEY} fields {sorted(set(extras) - ours)}")
    model = {_TOK_SHARED[k]: official.get(k, default) for k, default in _TOK_SHARED_DEFAULTS.items()}
    model.update(extras, **disc)
    return C.build(TokenizerConfig, model, "tokenizer.model")


def tokenizer_config_to_official(cfg: TokenizerConfig) -> dict:
    values = asdict(cfg)
    out = {"model_type": TOKENIZER_MODEL_TYPES[0], "architectures": ["HARTAutoEncoderWithDisc"]}
    out.update({theirs: _plain(values[ours]) for theirs, ours in _TOK_SHARED.items()})
    out.update({k: supported for k, (_, supported) in _TOK_FIXED.items()}, **_TOK_IGNORED)
    skip = set(_TOK_SHARED.values()) | set(_TOK_FROM_WEIGHTS)
    out[EXTRAS_KEY] = {k: _plain(v) for k, v in values.items() if k not in skip}
    return out


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------- output directories
def _start_output(out_dir: str | Path) -> tuple[Path, Path]:
    """(final, staging) directories; the staging one is renamed to the final one by `_finish_output`."""
    final = Path(out_dir)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"output directory {final} exists and is not empty")
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return final, staging


def _finish_output(final: Path, staging: Path) -> Path:
    if final.exists():
        final.rmdir()  # empty, checked by _start_output
    os.replace(staging, final)
    return final


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(C.to_dict(data), sort_keys=False, default_flow_style=None), encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- import
def _import_tokenizer(hart_dir: Path, out: Path) -> TokenizerConfig:
    src = hart_dir / "tokenizer"
    official = _read_json(src / "config.json")
    state = _official_weights(src)
    cfg = tokenizer_config_from_official(official, _disc_shape(state), f"{src / 'config.json'}")
    shapes = _tokenizer_shapes(cfg)
    if not any(k.startswith("disc.") for k in state):  # a VAE-only export: the VAE is checked strictly
        shapes = {k: v for k, v in shapes.items() if k.startswith("vae.")}
    check_tensors(f"{src} weights", state, shapes)
    out.mkdir()
    _save_safetensors(state, out / "model.safetensors")
    _write_yaml(out / "config.yaml", {"stage": "tokenizer-hybrid", "tokenizer": {"model": cfg}})
    return cfg


def _import_llm(hart_dir: Path, out: Path, tok: TokenizerConfig, tokenizer_ckpt: Path, text_encoder_path: str) -> None:
    src = hart_dir / "llm"
    cfg = t2i_config_from_official(_read_json(src / "config.json"), tok, f"{src / 'config.json'}")
    model = _t2i_meta(cfg)
    shapes = _t2i_official_shapes(model)
    raw = _official_weights(src)
    # the regenerable buffers may be absent from the raw weights (nothing is lost); everything else is strict
    check_tensors(f"{src} weights", raw, {k: v for k, v in shapes.items() if k in raw or k not in REGENERABLE_BUFFERS})
    _check_regenerable(f"{src} weights", raw, model)
    raw = {k: v for k, v in raw.items() if k not in REGENERABLE_BUFFERS}
    out.mkdir()
    _save_safetensors(raw, out / "model.safetensors")
    if (src / "ema_model.bin").is_file():
        ema = load_tensors(src / "ema_model.bin")
        check_tensors(f"{src / 'ema_model.bin'}", ema, shapes)
        _check_regenerable(f"{src / 'ema_model.bin'}", ema, model)
        params = {name for name, _ in model.named_parameters()}
        # buffers (zero_k_bias) are not averaged: the EMA file must agree with the raw weights on them
        differ = sorted(k for k in raw if k not in params and not torch.equal(raw[k], ema[k]))
        if differ:
            raise ValueError(f"{src / 'ema_model.bin'}: buffers {differ} differ from the raw weights")
        _save_safetensors({k: ema[k] for k in sorted(params)}, out / "ema.safetensors")
    text_encoder = dict(kind="qwen2", path=text_encoder_path, max_length=cfg.context_token,
                        use_system_prompt=True, dtype="fp32")
    t2i = dict(model=cfg, tokenizer_ckpt=str(tokenizer_ckpt), text_encoder=text_encoder)
    _write_yaml(out / "config.yaml", {"stage": "t2i", "t2i": t2i})


def import_official(hart_dir: str | Path, out_dir: str | Path, *, text_encoder_path: str | None = None) -> Path:
    """Turn an official HART directory (`llm/`, `tokenizer/`) into hart-train checkpoint directories
    `out_dir/llm` (start a t2i stage from it with run.init_from; its config.yaml names the tokenizer) and
    `out_dir/tokenizer`. Returns `out_dir`. Every tensor is checked; nothing is written unless all match."""
    hart_dir = Path(hart_dir)
    if not hart_dir.is_dir():
        raise FileNotFoundError(f"official HART directory not found: {hart_dir}")
    final, staging = _start_output(out_dir)
    try:
        tok = _import_tokenizer(hart_dir, staging / "tokenizer")
        _import_llm(hart_dir, staging / "llm", tok, final.resolve() / "tokenizer", text_encoder_path or "")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish_output(final, staging)


# ---------------------------------------------------------------------- export
def _read_t2i_checkpoint(ckpt_dir: Path) -> tuple[HARTConfig, Path]:
    path = ckpt_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no config.yaml (not a hart-train checkpoint directory)")
    run = yaml.safe_load(path.read_text(encoding="utf-8"))
    stage = run.get("stage") if isinstance(run, dict) else None
    if stage != "t2i" or not isinstance(run.get("t2i"), dict):
        raise ValueError(f"{path}: not a t2i checkpoint (stage={stage!r}); export writes the official "
                         "text-to-image layout")
    cfg = C.build(HARTConfig, run["t2i"].get("model") or {}, "t2i.model")
    tokenizer_ckpt = run["t2i"].get("tokenizer_ckpt") or ""
    if not tokenizer_ckpt:
        raise ValueError(f"{path}: t2i.tokenizer_ckpt is empty; export needs the tokenizer checkpoint")
    return cfg, Path(tokenizer_ckpt)


def _export_tokenizer(tokenizer_ckpt: Path, out: Path) -> TokenizerConfig:
    """The tokenizer in the official layout. A discriminator of another shape than the released one is left
    out (said on stderr): the official class always builds the released one, so `from_pretrained` would
    refuse the file for its size mismatch, and official inference uses only the VAE."""
    cfg = tokenizer_checkpoint_config(str(tokenizer_ckpt))
    state = load_tensors(tokenizer_ckpt / "model.safetensors")
    shapes = _tokenizer_shapes(cfg)
    if not any(k.startswith("disc.") for k in state):  # itself imported from a VAE-only export
        shapes = {k: v for k, v in shapes.items() if k.startswith("vae.")}
    check_tensors(f"{tokenizer_ckpt / 'model.safetensors'}", state, shapes)
    disc = {k: getattr(cfg, k) for k in RELEASED_DISC}
    if disc != RELEASED_DISC and any(k.startswith("disc.") for k in state):
        state = {k: v for k, v in state.items() if not k.startswith("disc.")}
        print(f"hart-train export: tokenizer/ holds the VAE only; its discriminator (ndf {cfg.disc_ndf}, "
              f"{cfg.disc_n_layers} layers) was left out: the official HARTAutoEncoderWithDisc builds ndf 64, "
              "3 layers, and official inference uses only the VAE", file=sys.stderr)
    out.mkdir()
    _write_json(out / "config.json", tokenizer_config_to_official(cfg))
    _save_safetensors(state, out / "model.safetensors")
    return cfg


def _merged_lora(ckpt_dir: Path, cfg: HARTConfig, run: dict, use_ema: bool) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's weights with its adapters (EMA or raw) merged into its base, by official name."""
    model = lora.load_checkpoint_model(HARTForT2I(cfg), str(ckpt_dir), run, use_ema=use_ema, merged=True)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _export_llm(ckpt_dir: Path, cfg: HARTConfig, out: Path, use_ema: bool) -> None:
    model = _t2i_meta(cfg)
    ours = {k: v for k, v in _t2i_official_shapes(model).items() if k not in REGENERABLE_BUFFERS}
    run = yaml.safe_load((ckpt_dir / "config.yaml").read_text(encoding="utf-8"))
    if lora.lora_of(run) is not None:  # adapters only: merged into the base (run.init_from), raw and EMA
        if use_ema and not (ckpt_dir / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{ckpt_dir} has no ema.safetensors; export with use_ema=False for the raw weights")
        raw = _merged_lora(ckpt_dir, cfg, run, use_ema=False)
        check_tensors(f"{ckpt_dir} merged into its base", raw, ours)
        weights = _merged_lora(ckpt_dir, cfg, run, use_ema=True) if use_ema else dict(raw)
        _write_llm(out, cfg, model, raw, weights)
        return
    raw = load_tensors(ckpt_dir / "model.safetensors")
    check_tensors(f"{ckpt_dir / 'model.safetensors'}", raw, ours)
    weights = dict(raw)
    if use_ema:
        if not (ckpt_dir / "ema.safetensors").is_file():
            raise FileNotFoundError(f"{ckpt_dir} has no ema.safetensors; export with use_ema=False for the raw weights")
        ema = load_tensors(ckpt_dir / "ema.safetensors")
        params = {name: tuple(p.shape) for name, p in model.named_parameters()}
        # the EMA covers the trainable parameters, a subset when some were frozen (head_only)
        check_tensors(f"{ckpt_dir / 'ema.safetensors'}", ema, {k: params[k] for k in ema if k in params})
        weights.update(ema)
    _write_llm(out, cfg, model, raw, weights)


def _write_llm(out: Path, cfg: HARTConfig, model: HARTForT2I, raw: dict, weights: dict) -> None:
    """llm/: config.json, model.safetensors (`raw`) and ema_model.bin (`weights`), both with the buffers."""
    buffers = _official_buffers(model)
    out.mkdir()
    _write_json(out / "config.json", t2i_config_to_official(cfg))
    _save_safetensors({**raw, **buffers}, out / "model.safetensors")
    torch.save({k: v.contiguous() for k, v in {**weights, **buffers}.items()}, out / "ema_model.bin")


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, *, use_ema: bool = True) -> Path:
    """Write a t2i checkpoint directory (and the tokenizer checkpoint its config names) in the official
    layout `out_dir/llm/{config.json, model.safetensors, ema_model.bin}`, `out_dir/tokenizer/{config.json,
    model.safetensors}`. `ema_model.bin` holds the EMA weights (the raw ones with use_ema=False). Returns out_dir."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{ckpt_dir} has no model.safetensors (not a hart-train checkpoint directory)")
    cfg, tokenizer_ckpt = _read_t2i_checkpoint(ckpt_dir)
    final, staging = _start_output(out_dir)
    try:
        tok = _export_tokenizer(tokenizer_ckpt, staging / "tokenizer")
        if (tok.vocab_size, tok.z_channels) != (cfg.vocab_size, cfg.Cvae):
            raise ValueError(f"{ckpt_dir}: t2i.model (vocab_size={cfg.vocab_size}, Cvae={cfg.Cvae}) does not "
                             f"match its tokenizer {tokenizer_ckpt} (vocab_size={tok.vocab_size}, "
                             f"z_channels={tok.z_channels})")
        _export_llm(ckpt_dir, cfg, staging / "llm", use_ema)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _finish_output(final, staging)
