"""Stages: which modules exist, which train, their data and their logging, on the shared runtime.

A stage is built by `make_stage(cfg, device)` with the rank's device (`distributed.rank_device`), where it
keeps everything it allocates: frozen models, generators, evaluation data and sums. It provides:
`build_model()` (a module whose forward(inputs) returns loss terms with the total under "loss"; DeepSpeed
moves it to the device), `load_init(module, path)`, `make_reader(rank, world_size)`, `prepare(batch, step)`
(a host batch -> the forward's inputs on the device), `batch_size(batch)`, `after_step(module, outputs, step)`, `log_values()`, `evaluate(module, ema,
step)`, `images(module, ema, step)`, `state_dict()` / `load_state_dict()` (tensors and plain values,
global across ranks) and a `generator` (torch.Generator, checkpointed with the run). Two attributes:
`partitioned_construction` (build_model may run under ZeRO-3's partitioned initialisation) and
`frozen_from_init` (the checkpoints hold the trainable parameters only, LoRA adapters: every start, a resume
included, loads the frozen ones from `run.init_from`). `checkpoint_meta()` gives plain values for the checkpoint's
meta.json (a LoRA run's base weights' sha256, which `validate_paths` checks on resume).
"""

from __future__ import annotations

import json
import os

import yaml

from data_tools import schema, storage
from data_tools.encode import tokenizer_checkpoint_config
from data_tools.text_encoder import model_directory, resolve_kind
from data_tools.token_format import file_sha256, is_token_dataset
from hart_train import checkpoint as ckpt
from hart_train import lora
from hart_train.config import ConfigError
from hart_train.models.buckets import Bucket, check_buckets, stage_buckets
from hart_train.stages.t2i_stage import T2IStage
from hart_train.stages.tokenizer_stage import TokenizerStage


def make_stage(cfg, device):
    if cfg.stage in ("tokenizer-vq", "tokenizer-hybrid"):
        return TokenizerStage(cfg, device)
    return T2IStage(cfg, device)


def _check_dataset(url: str, key: str) -> None:
    manifest = storage.join(url, schema.MANIFEST_NAME)
    try:
        found = storage.exists(manifest)
    except Exception as e:  # unreachable endpoint, bad credentials: say so with the key
        raise FileNotFoundError(f"{key}: cannot reach {url}: {storage.redact(str(e))}") from None
    if not found:
        raise FileNotFoundError(f"{key}: {url} has no {schema.MANIFEST_NAME} (not a complete hart-data dataset)")


def _manifest_options(url: str) -> dict:
    text = storage.read_text(storage.join(url, schema.MANIFEST_NAME))
    return schema.Manifest.from_json(text, where=storage.redact(url)).options


def validate_paths(cfg) -> None:
    """Every path the run needs exists, checked before anything is allocated; errors name the key.
    A dataset of the other kind than `data.kind`, and token shards that do not match the run (see
    `_check_tokens`), are refused here too."""
    for i, url in enumerate(cfg.data.urls):
        _check_dataset(url, f"data.urls[{i}]")
        found = "tokens" if is_token_dataset(_manifest_options(url)) else "images"
        if found != cfg.data.kind:
            raise ConfigError(f"data.kind: {cfg.data.kind!r}, but data.urls[{i}] ({storage.redact(url)}) holds {found}")
    if cfg.data.kind == "tokens" and cfg.stage != "t2i":
        raise ConfigError(f"data.kind: the {cfg.stage} stage trains on images; token shards feed only the t2i stage")
    if cfg.run.init_from and not os.path.exists(os.path.join(cfg.run.init_from, "model.safetensors")):
        raise FileNotFoundError(f"run.init_from: {cfg.run.init_from} has no model.safetensors (not a checkpoint directory)")
    if cfg.stage.startswith("tokenizer"):
        t = cfg.tokenizer
        if t.eval_url:
            _check_dataset(t.eval_url, "tokenizer.eval_url")
        path = t.loss.perceptual_weights_path
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer.loss.perceptual_weights_path: {path} does not exist")
        if cfg.data.resolution != t.model.image_size:
            raise ConfigError(f"data.resolution: {cfg.data.resolution} does not match the tokenizer's image size "
                              f"{t.model.image_size} (= 2**(len(ch_mult)-1) * patch_nums[-1])")
        for key, url in _image_urls(cfg, t.eval_url):
            _check_buckets(cfg, url, key, t.model.patch_nums, t.model.downsample, allowed=None)
        if cfg.stage == "tokenizer-hybrid" and not cfg.run.init_from:
            raise ConfigError("run.init_from: tokenizer-hybrid starts from a tokenizer-vq checkpoint; set its directory")
    if cfg.run.init_from and _is_lora_checkpoint(cfg.run.init_from):
        raise ConfigError(f"run.init_from: {cfg.run.init_from} is a LoRA checkpoint (adapters only, no base weights); "
                          "start from its merged weights: `hart-train export` it, then `hart-train import` the export")
    if cfg.stage == "t2i":
        _validate_t2i(cfg)


def _check_lora_base(cfg) -> None:
    """A LoRA run resuming: its adapters belong to the base they were trained on, whose sha256 the newest
    complete checkpoint records (`lora_base_sha256`); a base changed in place since is refused here."""
    resume = ckpt.latest_complete(os.path.join(cfg.run.out_dir, cfg.run.name, "ckpt"))
    if resume is None:
        return
    trained_on = ckpt.read_meta(resume).get("lora_base_sha256")
    if trained_on is not None:
        lora.check_base(trained_on, lora.base_sha256(cfg.run.init_from), cfg.run.init_from)


def _is_lora_checkpoint(path: str) -> bool:
    config = os.path.join(path, "config.yaml")
    if not os.path.exists(config):
        return False
    with open(config, encoding="utf-8") as f:
        run = yaml.safe_load(f)
    t2i = run.get("t2i") if isinstance(run, dict) else None
    return isinstance(t2i, dict) and t2i.get("lora") is not None


def _validate_t2i(cfg) -> None:
    t, m = cfg.t2i, cfg.t2i.model
    if t.lora is not None and not cfg.run.init_from:
        raise ConfigError("run.init_from: t2i.lora trains adapters on frozen base weights; set run.init_from to the "
                          "checkpoint they adapt (a t2i checkpoint, or `hart-train import`'s llm/ directory)")
    if t.lora is not None:
        _check_lora_base(cfg)
    if not t.tokenizer_ckpt:
        raise ConfigError("t2i.tokenizer_ckpt: required (a tokenizer checkpoint directory)")
    try:
        tok = tokenizer_checkpoint_config(t.tokenizer_ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"t2i.tokenizer_ckpt: {e}") from None
    # the tokenizer runs on the stage's schedule (one tokenizer serves every resolution)
    size = tok.downsample * m.patch_nums[-1]
    pairs = [("t2i.model.Cvae", m.Cvae, tok.z_channels), ("t2i.model.vocab_size", m.vocab_size, tok.vocab_size),
             ("data.resolution", cfg.data.resolution, size)]
    for key, ours, theirs in pairs:
        if _plain(ours) != _plain(theirs):
            raise ConfigError(f"{key}: {ours} does not match the tokenizer checkpoint ({theirs})")
    try:
        text_dir = model_directory(t.text_encoder)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"t2i.text_encoder.path: {e}") from None
    hidden = _hidden_size(os.path.join(text_dir, "config.json"))
    if hidden is not None and hidden != m.context_dim:
        raise ConfigError(f"t2i.model.context_dim: {m.context_dim} does not match the text encoder's hidden size {hidden}")
    allowed = stage_buckets(t.buckets, m.patch_nums)
    for key, url in _image_urls(cfg, t.eval_url):
        _check_buckets(cfg, url, key, m.patch_nums, tok.downsample, allowed)
    if cfg.data.kind == "tokens":
        ours = {"t2i.tokenizer_ckpt": file_sha256(os.path.join(t.tokenizer_ckpt, "model.safetensors")),
                "t2i.text_encoder.kind": resolve_kind(t.text_encoder.kind, text_dir)}
        for i, url in enumerate(cfg.data.urls):
            _check_tokens(cfg, _manifest_options(url), f"data.urls[{i}]", ours)


def _image_urls(cfg, eval_url: str | None) -> list[tuple[str, str]]:
    """(key, url) of every image dataset the run reads: data.urls (with data.kind: images) and the held-out set."""
    urls = [(f"data.urls[{i}]", u) for i, u in enumerate(cfg.data.urls)] if cfg.data.kind == "images" else []
    key = "t2i.eval_url" if cfg.stage == "t2i" else "tokenizer.eval_url"
    return urls + ([(key, eval_url)] if eval_url and cfg.data.kind == "images" else [])


def _check_buckets(cfg, url: str, key: str, patch_nums, downsample: int, allowed) -> None:
    """A bucketed image dataset (`hart-data shard --buckets`) must be for the run's resolution and its
    buckets whole token grids of about the square's token count (`check_buckets`); for t2i, each in
    `allowed` (t2i.buckets), the set the model trains and samples on."""
    options = _manifest_options(url)
    names = options.get("buckets")
    where = f"{key} ({storage.redact(url)})"
    if names is None:  # square images: the square bucket
        S = patch_nums[-1]
        if allowed is not None and Bucket(S, S) not in allowed:
            raise ConfigError(f"t2i.buckets: {where} holds square images (not bucketed), but the square bucket "
                              f"{S}x{S} is not in the model's buckets ({', '.join(b.name for b in allowed)}); add it")
        return
    if options.get("resolution") != cfg.data.resolution:
        raise ConfigError(f"data.resolution: {cfg.data.resolution}, but {where} is bucketed for resolution "
                          f"{options.get('resolution')}")
    for name in names:
        width, height = (int(v) for v in name.split("x"))
        try:
            bucket = Bucket.from_image_size(width, height, downsample)
            check_buckets([bucket], patch_nums)
        except ValueError as e:
            raise ConfigError(f"{where} holds bucket {name} px, which this run cannot train on: {e}") from None
        if allowed is not None and bucket not in allowed:
            raise ConfigError(f"t2i.buckets: {where} holds bucket {name} px ({bucket.name} tokens), which is not in "
                              f"the model's buckets ({', '.join(b.name for b in allowed)}); add it to t2i.buckets")


def _check_tokens(cfg, options: dict, where: str, ours: dict) -> None:
    """Token shards must come from this run's tokenizer weights (sha256 of its model.safetensors) and
    text encoder settings, and match the model's schedule and context width: tokens from another
    tokenizer, or embeddings of another length or width, would train silently on the wrong inputs."""
    t, text = cfg.t2i, options.get("text_encoder", {})
    pairs = [
        ("t2i.tokenizer_ckpt", "tokenizer weights sha256", ours["t2i.tokenizer_ckpt"], options.get("tokenizer_sha256")),
        ("t2i.model.patch_nums", "patch_nums", _plain(t.model.patch_nums), _plain(options.get("patch_nums"))),
        ("t2i.text_encoder.kind", "text encoder kind", ours["t2i.text_encoder.kind"], text.get("resolved_kind")),
        ("t2i.text_encoder.max_length", "text encoder max_length", t.text_encoder.max_length, text.get("max_length")),
        ("t2i.text_encoder.use_system_prompt", "text encoder system prompt", t.text_encoder.use_system_prompt,
         text.get("use_system_prompt")),
        ("t2i.model.context_dim", "text encoder hidden size", t.model.context_dim, text.get("hidden_size")),
    ]
    for key, what, run_value, stored in pairs:
        if run_value != stored:
            raise ConfigError(f"{key}: the token shards in {where} were encoded with {what} {stored!r}, "
                              f"this run has {run_value!r}; re-encode them with `hart-data encode` or fix {key}")


def _plain(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def _hidden_size(config_json: str) -> int | None:
    if not os.path.exists(config_json):
        return None
    with open(config_json, encoding="utf-8") as f:
        c = json.load(f)
    c = c.get("text_config", c)
    return c.get("hidden_size") or c.get("d_model")
