"""`hart-data encode`: an image dataset -> pre-tokenized token shards for the AR/diffusion stages.

Every sample of the source dataset (schema.py layout) becomes, under the same key,

    <key>.idx.npy     (L,) the tokenizer's per-scale indices concatenated over patch_nums (L = sum pn^2);
                      int16 when vocab_size <= 32768, else int32
    <key>.frest.npy   (h*w, Cvae) the last-scale residual (`img_to_idxBl_and_frest`), the diffusion target
    <key>.ctx.npy     (max_length, D) the text encoder's last hidden state, *all* rows (HART attends to pads)
    <key>.mask.npy    (max_length,) uint8 token mask (position_ids = cumsum(mask) - 1, recomputed on read)
    <key>.txt         the caption
    <key>.json        patch_nums, vocab_size, shapes and dtypes of the arrays above

frest and ctx are stored as `store_dtype`: float16 by default (half the bytes; a 1024px sample is ~0.26 MB
of residual and ~0.9 MB of Qwen context in float16) or float32 for bit-exact values. A non-finite value
after the cast is an error, not a silent inf.

Design decisions:
- Token shard i holds source shard i's samples in stored order (the reader's `ShardSource` reads them, its
  `decode_sample` decodes and resizes them exactly as training does). Bad source samples are skipped and
  counted. The order is therefore a pure function of the source manifest.
- Memory is bounded by one batch: samples are streamed into the shard's tar as they are encoded.
- Like `hart-data shard`, and with its tar writer (`shard.open_shard_tar`): per-shard tar then
  `shard-NNNNNN.stats.json` (the done marker), manifest.json last and atomically; `--resume` skips
  shards whose marker matches the options, `--overwrite` replaces.
- The manifest's `options` record everything a trainer must match (tokenizer checkpoint and its weights'
  sha256, patch_nums, vocab, resolution, text encoder kind/path/max_length/system prompt/dtype, storage
  dtypes), under `format: "hart-tokens"`, so mismatching token shards can be refused.
- The format's constants, `read_token_sample` and the weights hash live in `data_tools.token_format`
  (no tokenizer import), which the streaming reader uses to read these shards (`ReaderConfig.kind`).
- All checks that can fail (tokenizer checkpoint, resolution, source manifest, text encoder directory,
  output) run before the first sample is encoded.
- A bucketed source (`hart-data shard --buckets`) is refused: this encoder runs the tokenizer on the
  square `patch_nums` schedule only, and the token format records one schedule per dataset. Bucketed
  data trains from its image shards, which the t2i stage tokenizes on the fly.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import yaml
from tqdm import tqdm

from data_tools import reader, schema, shard, storage
from data_tools.samples import decode_sample, to_unit_range
from data_tools.text_encoder import TextEncoder, TextEncoderConfig, model_directory, resolve_kind
from data_tools.token_format import (EXT_CTX, EXT_FREST, EXT_IDX, EXT_MASK, TOKEN_FORMAT, TOKEN_FORMAT_VERSION,
                                     file_sha256, is_token_dataset, read_token_sample)
from tokenizer.autoencoder import (HARTAutoEncoder, HARTAutoEncoderWithDisc, TokenizerConfig, config_to_dict,
                                   load_weights_file)

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}


# ----------------------------------------------------------------------------- tokenizer checkpoint


def tokenizer_checkpoint_config(ckpt_dir: str) -> TokenizerConfig:
    """The `tokenizer: model:` mapping of a hart-train checkpoint's config.yaml, as a TokenizerConfig."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer checkpoint directory not found: {path}")
    for name in ("model.safetensors", "config.yaml"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"tokenizer checkpoint {path} has no {name}")
    run_config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    section = run_config.get("tokenizer") if isinstance(run_config, dict) else None
    model = section.get("model") if isinstance(section, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f"{path / 'config.yaml'} has no `tokenizer: model:` mapping")
    try:
        return TokenizerConfig(**model)
    except TypeError as e:
        raise ValueError(f"{path / 'config.yaml'}: tokenizer.model is not a TokenizerConfig ({e})") from None


def load_tokenizer(ckpt_dir: str, patch_nums: tuple[int, ...] | None = None, with_discriminator: bool = False):
    """HARTAutoEncoder from a checkpoint dir (the `vae.*` weights of model.safetensors, strict); eval, frozen.
    `with_discriminator=True` gives the HARTAutoEncoderWithDisc instead (`vae` + `disc`, strict, in train
    mode and trainable) for tokenizer fine-tuning; a VAE-only checkpoint (an official export that left a
    non-released discriminator out) is refused for it.

    `patch_nums` runs the same weights on another scale schedule (the tokenizer is convolutional; only
    the Phi assignment and the usage buffer depend on the number of scales), so one tokenizer serves
    the 256, 512 and 1024px stages."""
    cfg = tokenizer_checkpoint_config(ckpt_dir)
    if patch_nums is not None:
        cfg = dataclasses.replace(cfg, patch_nums=tuple(patch_nums))
    state = load_weights_file(Path(ckpt_dir) / "model.safetensors")
    if with_discriminator:
        if not any(k.startswith("disc.") for k in state):
            raise ValueError(f"{ckpt_dir}/model.safetensors has no `disc.*` weights (a VAE-only tokenizer)")
        return _load_strict(HARTAutoEncoderWithDisc(cfg), state, ckpt_dir)
    vae_state = {k[len("vae.") :]: v for k, v in state.items() if k.startswith("vae.")}
    if not vae_state:
        raise ValueError(f"{ckpt_dir}/model.safetensors has no `vae.*` weights (not a tokenizer checkpoint)")
    model = _load_strict(HARTAutoEncoder(cfg), vae_state, ckpt_dir)
    return model.eval().requires_grad_(False)


def _load_strict(model: torch.nn.Module, state: dict, ckpt_dir: str) -> torch.nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt_dir}: weights do not match its config.yaml tokenizer.model: {e}") from None
    return model


# ----------------------------------------------------------------------------- arguments


def text_encoder_config(spec: str, max_length: int, system_prompt: bool | None, dtype: str) -> TextEncoderConfig:
    """TextEncoderConfig from "KIND[:PATH]" (e.g. "minilm", "qwen2:/models/Qwen2-VL-1.5B-Instruct").
    system_prompt None means HART's default: on for Qwen models (use_llm_system_prompt=True), off otherwise."""
    kind, _, path = spec.partition(":")
    if not kind:
        raise ValueError(f"--text-encoder {spec!r}: expected KIND[:PATH], e.g. minilm or qwen2:/models/qwen2")
    if system_prompt is None:
        cfg = TextEncoderConfig(kind, path, max_length, False, dtype)
        system_prompt = resolve_kind(kind, model_directory(cfg)) == "qwen2"
    return TextEncoderConfig(kind, path, max_length, system_prompt, dtype)


def check_resolution(tok_cfg: TokenizerConfig, resolution: int | None, source_options: dict) -> int:
    """The encode resolution: the tokenizer's image size. Any other request, or a source stored smaller
    (it would be upsampled), is an error. A larger source is resized as the training reader does."""
    size = tok_cfg.image_size
    if resolution is not None and resolution != size:
        raise ValueError(
            f"--resolution {resolution} does not match the tokenizer: patch_nums {list(tok_cfg.patch_nums)} "
            f"x downsample {tok_cfg.downsample} need {size}px images"
        )
    stored = source_options.get("resolution")
    if stored is not None and int(stored) < size:
        raise ValueError(f"source images were sharded at {stored}px, smaller than the tokenizer's {size}px")
    return size


def _read_manifest(src: str) -> schema.Manifest:
    url = storage.join(src, schema.MANIFEST_NAME)
    if not storage.exists(url):
        raise FileNotFoundError(f"{storage.redact(src)}: no {schema.MANIFEST_NAME}; not a complete hart-data dataset")
    return schema.Manifest.from_json(storage.read_text(url), where=storage.redact(url))


# ----------------------------------------------------------------------------- encoding


def encode_dataset(
    src: str,
    out: str,
    *,
    tokenizer_ckpt: str,
    text_encoder: TextEncoderConfig,
    resolution: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    store_dtype: str = "float16",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> schema.Manifest:
    """Encode dataset `src` into token shards in `out`; returns the manifest written last."""
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {tuple(STORE_DTYPES)}, got {store_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    tok_cfg = tokenizer_checkpoint_config(tokenizer_ckpt)
    source = _read_manifest(src)
    if source.buckets is not None:
        raise ValueError(f"{storage.redact(src)} is bucketed ({', '.join(source.buckets)}): `hart-data encode` "
                         "pre-tokenizes square images only; train on the image shards instead")
    size = check_resolution(tok_cfg, resolution, source.options)
    model_directory(text_encoder)  # a missing directory fails here, before OUT is touched
    shard.prepare_output(out, resume=resume, overwrite=overwrite)
    text = TextEncoder(text_encoder, device)
    tok = load_tokenizer(tokenizer_ckpt).to(device)
    options = token_options(src, tokenizer_ckpt, tok_cfg, size, text, store_dtype)

    refs = [reader.ShardRef(storage.join(src, s.name), s.num_samples, s.bytes) for s in source.shards]
    samples = reader.ShardSource(refs, reader.ReaderConfig(urls=[src], resolution=size))
    encoder = _ShardEncoder(tok, text, device, store_dtype, size)
    results, offset = [], 0
    with tqdm(total=source.num_samples, unit="img", desc="encode", disable=not progress, file=sys.stderr) as bar:
        for info, ref in zip(source.shards, refs):
            index = schema.shard_index(info.name)  # token shard i <- source shard i, same name
            ids = np.arange(offset, offset + ref.num_samples)
            offset += ref.num_samples
            stats = shard.load_done_stats(out, index, options) if resume else None
            if stats is None:
                stats = _encode_shard(out, index, samples.samples(ids), encoder, batch_size, options, bar)
            else:
                bar.update(ref.num_samples)
            results.append(stats)
    manifest = _build_manifest(results, options)
    storage.atomic_write_text(storage.join(out, schema.MANIFEST_NAME), manifest.to_json())
    return manifest


def token_options(
    src: str, ckpt: str, tok_cfg: TokenizerConfig, size: int, text: TextEncoder, store_dtype: str
) -> dict:
    """What a trainer must match before it reads these shards (also the resume compatibility check)."""
    cfg = text.cfg
    return {
        "format": TOKEN_FORMAT,
        "format_version": TOKEN_FORMAT_VERSION,
        "source": storage.redact(src),
        "tokenizer_ckpt": str(Path(ckpt).resolve()),
        "tokenizer_sha256": file_sha256(Path(ckpt) / "model.safetensors"),
        "tokenizer": config_to_dict(tok_cfg),
        "patch_nums": list(tok_cfg.patch_nums),
        "vocab_size": tok_cfg.vocab_size,
        "resolution": size,
        "text_encoder": {**dataclasses.asdict(cfg), "resolved_kind": text.kind, "hidden_size": text.hidden_size},
        "idx_dtype": np.dtype(_idx_dtype(tok_cfg.vocab_size)).name,
        "store_dtype": store_dtype,
    }


def _idx_dtype(vocab_size: int):
    return np.int16 if vocab_size <= 1 << 15 else np.int32


class _ShardEncoder:
    """Images + captions of one batch -> token samples."""

    def __init__(self, tok: HARTAutoEncoder, text: TextEncoder, device: str, store_dtype: str, size: int):
        self.tok, self.text, self.device, self.size = tok, text, device, size
        self.store = STORE_DTYPES[store_dtype]
        self.idx_dtype = _idx_dtype(tok.cfg.vocab_size)

    @torch.no_grad()
    def members(self, images: list[np.ndarray], captions: list[str], keys: list[str]) -> list[dict]:
        """The members of one batch's token samples: a webdataset sample dict ({"__key__": key, ext:
        bytes}) per sample."""
        img_B3HW = to_unit_range(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous())
        idx_Bl, frest_BLC = self.tok.img_to_idxBl_and_frest(img_B3HW.to(self.device))
        idx_BL = torch.cat(idx_Bl, dim=1).cpu().numpy().astype(self.idx_dtype)
        frest = self._stored(frest_BLC, "frest")
        ctx, mask, _ = self.text.encode(captions)
        ctx = self._stored(ctx, "context")
        mask = mask.cpu().numpy().astype(np.uint8)
        out = []
        for b, key in enumerate(keys):
            meta = {
                "patch_nums": list(self.tok.cfg.patch_nums), "vocab_size": self.tok.cfg.vocab_size,
                "resolution": self.size, "idx_shape": list(idx_BL[b].shape), "idx_dtype": idx_BL.dtype.name,
                "frest_shape": list(frest[b].shape), "ctx_shape": list(ctx[b].shape), "store_dtype": frest.dtype.name,
            }  # fmt: skip
            out.append({
                "__key__": key, EXT_IDX: _npy(idx_BL[b]), EXT_FREST: _npy(frest[b]), EXT_CTX: _npy(ctx[b]),
                EXT_MASK: _npy(mask[b]), schema.CAPTION_EXT: captions[b].encode("utf-8"),
                schema.META_EXT: json.dumps(meta, sort_keys=True).encode("utf-8"),
            })  # fmt: skip
        return out

    def _stored(self, x: torch.Tensor, what: str) -> np.ndarray:
        arr = x.float().cpu().numpy().astype(self.store)
        if not np.isfinite(arr).all():
            dtype = np.dtype(self.store).name
            raise ValueError(f"{what} has values that are not finite in {dtype}; use --store-dtype float32")
        return arr


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _encode_shard(out: str, index: int, samples: Iterator, encoder: _ShardEncoder, batch_size: int,
                  options: dict, bar: tqdm) -> dict:
    """Encode one source shard's samples batch by batch, streaming them into the tar (atomic: a failure
    leaves no tar), then write its stats file, the done marker. A shard with no good sample gets no tar."""
    url = storage.join(out, schema.shard_name(index))
    skipped: dict[str, int] = {}
    num_samples = 0
    with shard.open_shard_tar(url) as (tar, sink):
        for batch in _good_batches(samples, encoder.size, batch_size, skipped, bar):
            for sample in encoder.members(*batch):
                tar.write(sample)
            num_samples += len(batch[0])
    if num_samples == 0:
        storage.remove(url)
    stats = {
        "index": index, "name": schema.shard_name(index), "num_samples": num_samples,
        "num_skipped": sum(skipped.values()), "skipped": skipped, "bytes": sink.count if num_samples else 0,
        "sha256": sink.hash.hexdigest() if num_samples else "", "options": options,
    }  # fmt: skip
    storage.atomic_write_text(storage.join(out, schema.shard_stats_name(index)), json.dumps(stats, indent=1))
    return stats


def _good_batches(samples: Iterator, size: int, batch_size: int, skipped: dict, bar: tqdm) -> Iterator[tuple]:
    """(images, captions, keys) batches of decoded samples; bad ones are counted into `skipped`."""
    batch: tuple[list, list, list] = ([], [], [])
    for _, key, raw in samples:
        reason, good = decode_sample(key, raw, size)
        bar.update(1)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        for part, value in zip(batch, good):
            part.append(value)
        if len(batch[0]) == batch_size:
            yield batch
            batch = ([], [], [])
    if batch[0]:
        yield batch


def _build_manifest(results: list[dict], options: dict) -> schema.Manifest:
    shards = [
        schema.ShardInfo(s["name"], s["num_samples"], s["bytes"], s["sha256"]) for s in results if s["num_samples"]
    ]
    skipped: dict[str, int] = {}
    for s in results:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    stats = {
        "num_samples": sum(s.num_samples for s in shards),
        "num_skipped": sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "num_shards": len(shards),
        "num_bytes": sum(s.bytes for s in shards),
    }
    return schema.Manifest(schema.SCHEMA_VERSION, shards, options, stats)


# ----------------------------------------------------------------------------- reading token shards


def iter_token_samples(url: str) -> Iterator[tuple[str, dict]]:
    """(key, read_token_sample(...)) for every sample of a token dataset, in manifest order."""
    manifest = _read_manifest(url)
    if not is_token_dataset(manifest.options):
        raise ValueError(f"{storage.redact(url)} is not a token dataset (manifest options.format != {TOKEN_FORMAT!r})")
    for info in manifest.shards:
        with storage.open_read(storage.join(url, info.name)) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            key, members = None, {}
            for member in tar:
                k, ext = schema.split_key(member.name)
                if k != key and key is not None:
                    yield key, read_token_sample(members)
                    members = {}
                key = k
                members[ext] = tar.extractfile(member).read()
            if key is not None:
                yield key, read_token_sample(members)
