"""Official HART weights in and out: import -> stage load, bit-exact round trips both ways, strict refusals.

The "official" directories are written here from tiny models in the official format (config.json with the
official field names and defaults, weights with the official buffers, ema_model.bin via torch.save), the
way the released hart-0.7b-1024px directory is laid out.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from data_tools.encode import load_tokenizer, tokenizer_checkpoint_config
from hart_train import config as C
from hart_train.models import HARTConfig, HARTForT2I, hart_config, load_official_state_dict, official_state_dict
from hart_train.official_io import export_checkpoint, import_official
from hart_train.run_config import RunConfig
from tokenizer.autoencoder import HARTAutoEncoderWithDisc, tokenizer_config

# written the way the official config classes serialise: official names, fields left out take their defaults
OFFICIAL_LLM = {
    "_name_or_path": "hart-tiny/llm", "architectures": ["HARTForT2I"], "model_type": "hart_transformer_t2i",
    "torch_dtype": "float32", "transformers_version": "4.42.2", "vae_path": None,
    "context_token": 8, "context_dim": 32, "depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 4.0,
    "patch_nums": [1, 2, 4], "mlp_type": "llama", "attn_type": "llama", "use_timestep_embed": True,
    "use_context_norm": True, "context_norm_scale": 1.0, "sep_aln_pooling_mode": "max", "attn_l2_norm": False,
    "diff_width": 64, "diff_depth": 2, "num_sampling_steps": "8", "diffusion_batch_mul": 4, "sampler": "iddpm",
    "drop_rate": 0.0, "attn_drop_rate": 0.0, "drop_path_rate": 0.0, "cond_drop_rate": 0.1, "norm_eps": 1e-6,
    "shared_aln": False, "disable_aln": False, "use_cross_attn": False, "flash_if_available": True,
    "fused_if_available": True,
}
OFFICIAL_TOKENIZER = {
    "architectures": ["HARTAutoEncoderWithDisc"], "model_type": "hart_autoencoder_with_disc",
    "vocab_size": 64, "z_channels": 8, "ch": 32, "ch_mult": [1, 2, 2], "v_patch_nums": [1, 2, 4],
    "quantizer_type": "var_hybrid", "hybrid": True, "test_mode": False, "levels": [8, 8, 8, 6, 5],
    "share_quant_resi": 4, "quant_resi": 0.5, "beta": 0.25, "dropout": 0.0, "using_znorm": False, "quant_conv_ks": 3,
}
DATA = {"data": {"urls": ["/data/emoji-16px"]}}  # a run needs a dataset; the checkpoint does not name one
HF_BOOKKEEPING = {"_name_or_path", "torch_dtype", "transformers_version"}


class NotATensor:
    """A custom object in a .bin file: weights_only=True must refuse it."""

    def __init__(self):
        self.payload = "anything"


def _official_states():
    """(raw, ema, tokenizer) state dicts in the official layout, every tensor distinct and non-trivial; fresh copies."""
    return tuple({k: v.clone() for k, v in state.items()} for state in _build_official_states())


@functools.lru_cache(maxsize=1)
def _build_official_states(seed: int = 0):
    torch.manual_seed(seed)
    model = HARTForT2I(hart_config("tiny"))
    raw = official_state_dict(model)
    params = {name for name, _ in model.named_parameters()}
    ema = {k: v + 0.01 * torch.randn_like(v) if k in params else v.clone() for k, v in raw.items()}
    tok = HARTAutoEncoderWithDisc(tokenizer_config("tiny")).state_dict()
    tok = {k: v.clone() for k, v in tok.items()}
    tok["vae.quantize.ema_vocab_hit_SV"].uniform_()
    tok["disc.main.3.running_mean"].normal_()
    return raw, ema, tok


def write_official(root: Path, raw, ema, tok, *, llm_cfg=None, tok_cfg=None, raw_format="safetensors") -> Path:
    (root / "llm").mkdir(parents=True)
    (root / "tokenizer").mkdir()
    (root / "llm" / "config.json").write_text(json.dumps(llm_cfg or OFFICIAL_LLM))
    (root / "tokenizer" / "config.json").write_text(json.dumps(tok_cfg or OFFICIAL_TOKENIZER))
    if raw_format == "safetensors":
        save_file({k: v.contiguous() for k, v in raw.items()}, str(root / "llm" / "model.safetensors"))
    else:
        torch.save(raw, root / "llm" / "pytorch_model.bin")
    torch.save(ema, root / "llm" / "ema_model.bin")
    save_file(tok, str(root / "tokenizer" / "model.safetensors"))
    return root


@pytest.fixture
def official(tmp_path):
    raw, ema, tok = _official_states()
    return write_official(tmp_path / "hart-tiny", raw, ema, tok), raw, ema, tok


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------- import
@pytest.mark.parametrize("raw_format", ["safetensors", "bin"])
def test_import_gives_a_checkpoint_a_stage_starts_from(tmp_path, raw_format):
    raw, ema, tok = _official_states()
    src = write_official(tmp_path / "hart", raw, ema, tok, raw_format=raw_format)
    out = import_official(src, tmp_path / "imported", text_encoder_path="/models/qwen2-vl-1.5b")

    run = read_yaml(out / "llm" / "config.yaml")
    assert run["stage"] == "t2i"
    cfg = HARTConfig(**run["t2i"]["model"])
    assert cfg == hart_config("tiny")
    assert run["t2i"]["tokenizer_ckpt"] == str((out / "tokenizer").resolve())
    assert run["t2i"]["text_encoder"] == dict(kind="qwen2", path="/models/qwen2-vl-1.5b", max_length=8,
                                              use_system_prompt=True, dtype="fp32")
    C.resolve(RunConfig, {**run, **DATA})  # the sections are valid run config as written

    model = HARTForT2I(cfg)  # what run.init_from does: a strict load of model.safetensors
    load_official_state_dict(model, load_file(str(out / "llm" / "model.safetensors")), strict=True)
    assert_same({k: v for k, v in official_state_dict(model).items()}, raw)
    ema_overlay = load_file(str(out / "llm" / "ema.safetensors"))
    assert sorted(ema_overlay) == sorted(n for n, _ in model.named_parameters())
    assert all(torch.equal(ema_overlay[k], ema[k]) for k in ema_overlay)

    assert tokenizer_checkpoint_config(str(out / "tokenizer")) == tokenizer_config("tiny")
    assert read_yaml(out / "tokenizer" / "config.yaml")["stage"] == "tokenizer-hybrid"
    C.resolve(RunConfig, {**read_yaml(out / "tokenizer" / "config.yaml"), **DATA})
    load_tokenizer(str(out / "tokenizer"))  # the t2i stage's strict tokenizer load
    assert_same(load_file(str(out / "tokenizer" / "model.safetensors")), tok)


def test_raw_weights_without_regenerable_buffers_import(tmp_path):
    raw, ema, tok = _official_states()
    raw = {k: v for k, v in raw.items() if k not in ("lvl_1L", "attn_bias_for_masking")}
    out = import_official(write_official(tmp_path / "hart", raw, ema, tok), tmp_path / "imported")
    assert_same(load_file(str(out / "llm" / "model.safetensors")), raw)
    assert read_yaml(out / "llm" / "config.yaml")["t2i"]["text_encoder"]["path"] == ""


def test_sharded_weights_without_ema_import(tmp_path):
    raw, ema, tok = _official_states()
    src = write_official(tmp_path / "hart", raw, ema, tok)
    (src / "llm" / "model.safetensors").unlink()
    (src / "llm" / "ema_model.bin").unlink()
    keys = sorted(raw)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_file({k: raw[k].contiguous() for k in shard_keys}, str(src / "llm" / name))
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (src / "llm" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = import_official(src, tmp_path / "imported")
    assert_same(load_file(str(out / "llm" / "model.safetensors")),
                {k: v for k, v in raw.items() if k not in ("lvl_1L", "attn_bias_for_masking")})
    assert not (out / "llm" / "ema.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="use_ema=False"):
        export_checkpoint(out / "llm", tmp_path / "exported")


# ---------------------------------------------------------------------- round trips
def test_import_export_round_trip_is_bit_exact(official, tmp_path):
    src, raw, ema, tok = official
    imported = import_official(src, tmp_path / "imported")
    exported = export_checkpoint(imported / "llm", tmp_path / "exported")

    assert_same(load_file(str(exported / "llm" / "model.safetensors")), raw)
    assert_same(torch.load(exported / "llm" / "ema_model.bin", weights_only=True), ema)
    # the tiny tokenizer's discriminator (ndf 8, 2 layers) is not the released one: the VAE only goes out
    assert_same(load_file(str(exported / "tokenizer" / "model.safetensors")), vae_only(tok))
    for name, original in (("llm", OFFICIAL_LLM), ("tokenizer", OFFICIAL_TOKENIZER)):
        written = json.loads((exported / name / "config.json").read_text())
        for key, value in original.items():
            if key not in HF_BOOKKEEPING:
                assert written[key] == value, (name, key)

    again = import_official(exported, tmp_path / "again")  # export -> import gives the same checkpoint
    for name in ("llm/model.safetensors", "llm/ema.safetensors"):
        assert_same(load_file(str(again / name)), load_file(str(imported / name)))
    assert_same(load_file(str(again / "tokenizer/model.safetensors")), vae_only(tok))
    first, second = read_yaml(imported / "llm" / "config.yaml"), read_yaml(again / "llm" / "config.yaml")
    assert first["t2i"]["model"] == second["t2i"]["model"]
    vae_fields = lambda d: {k: v for k, v in d["tokenizer"]["model"].items() if not k.startswith("disc_")}  # noqa: E731
    assert vae_fields(read_yaml(imported / "tokenizer" / "config.yaml")) == vae_fields(read_yaml(again / "tokenizer" / "config.yaml"))
    # and a VAE-only tokenizer exports again as it is
    third = export_checkpoint(again / "llm", tmp_path / "third")
    assert_same(load_file(str(third / "tokenizer" / "model.safetensors")), vae_only(tok))


def vae_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("vae.")}


@pytest.mark.parametrize("disc", [dict(disc_ndf=16, disc_n_layers=2), dict(disc_ndf=64, disc_n_layers=3)])
def test_export_gives_a_tokenizer_the_official_class_loads(disc, tmp_path):
    """The official HARTAutoEncoderWithDisc always builds the released discriminator (ndf 64, 3 layers):
    the demo's tokenizer (ndf 16, 2 layers) is exported as its VAE alone, exactly the official key set and
    shapes of that VAE, which the official class loads with only the discriminator missing (what
    from_pretrained tolerates); a tokenizer with the released discriminator keeps it."""
    tok_cfg = tokenizer_config("tiny", **disc)
    step, _ = _native_checkpoint(tmp_path, tok_cfg=tok_cfg)
    exported = load_file(str(export_checkpoint(step, tmp_path / "exported") / "tokenizer" / "model.safetensors"))
    with torch.device("meta"):
        official = HARTAutoEncoderWithDisc(tokenizer_config("tiny", disc_ndf=64, disc_n_layers=3))
    expected = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    released = disc["disc_ndf"] == 64
    if not released:
        expected = {k: v for k, v in expected.items() if k.startswith("vae.")}
    assert {k: tuple(v.shape) for k, v in exported.items()} == expected
    missing, unexpected = official.load_state_dict(exported, strict=False, assign=True)  # raises on a size mismatch
    # (BatchNorm fills in a missing num_batches_tracked itself, so it is never reported missing)
    official_disc = sorted(k for k in official.state_dict() if k.startswith("disc.") and "num_batches" not in k)
    assert not unexpected and sorted(missing) == ([] if released else official_disc)


def _native_checkpoint(root: Path, *, ema_keys_prefix: str | None = "diffloss.", tok_cfg=None) -> tuple[Path, HARTConfig]:
    """A t2i checkpoint as a run writes it, with non-default values in fields the official config lacks."""
    tok_cfg = tok_cfg or tokenizer_config("tiny", skip_continuous_prob=0.3)
    cfg = hart_config("tiny", diff_weight=0.5, cond_drop_randn=False, cfg_last_reuses_ratio=False, train_top_k=7,
                      use_context_norm=False, sep_aln_pooling_mode="avg", attn_l2_norm=True, num_heads=2)
    torch.manual_seed(3)
    (root / "tok").mkdir(parents=True)
    save_file(HARTAutoEncoderWithDisc(tok_cfg).state_dict(), str(root / "tok" / "model.safetensors"))
    (root / "tok" / "config.yaml").write_text(yaml.safe_dump(C.to_dict({"stage": "tokenizer-hybrid",
                                                                         "tokenizer": {"model": tok_cfg}})))
    step = root / "run" / "ckpt" / "step_00000010"
    step.mkdir(parents=True)
    model = HARTForT2I(cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(step / "model.safetensors"))
    if ema_keys_prefix is not None:  # head-only run: the EMA covers the trainable diffusion head only
        ema = {k: v + 1.0 for k, v in state.items() if k.startswith(ema_keys_prefix)}
        save_file(ema, str(step / "ema.safetensors"))
    t2i = {"model": cfg, "tokenizer_ckpt": str(root / "tok"), "head_only": True,
           "text_encoder": {"kind": "minilm", "path": "", "max_length": 8}}
    (step / "config.yaml").write_text(yaml.safe_dump(C.to_dict({"stage": "t2i", "t2i": t2i})))
    return step, cfg


def test_export_import_round_trip_from_a_run_checkpoint(tmp_path):
    step, cfg = _native_checkpoint(tmp_path)
    exported = export_checkpoint(step, tmp_path / "exported")
    model = HARTForT2I(cfg)
    official = official_state_dict(model)
    raw = load_file(str(exported / "llm" / "model.safetensors"))
    assert sorted(raw) == sorted(official)  # every key the official model has, buffers included
    assert torch.equal(raw["attn_bias_for_masking"], official["attn_bias_for_masking"])
    ema_bin = torch.load(exported / "llm" / "ema_model.bin", weights_only=True)
    ours, overlay = load_file(str(step / "model.safetensors")), load_file(str(step / "ema.safetensors"))
    for k, v in ours.items():
        assert torch.equal(ema_bin[k], overlay.get(k, v)), k

    back = import_official(exported, tmp_path / "back")
    assert_same(load_file(str(back / "llm" / "model.safetensors")), ours)
    back_ema = load_file(str(back / "llm" / "ema.safetensors"))
    assert all(torch.equal(back_ema[k], overlay.get(k, ours[k])) for k in back_ema)
    assert HARTConfig(**read_yaml(back / "llm" / "config.yaml")["t2i"]["model"]) == cfg
    # the VAE came back; the tiny discriminator (not the released shape) was left out of the export
    assert tokenizer_checkpoint_config(str(back / "tokenizer")) == tokenizer_config(
        "tiny", skip_continuous_prob=0.3, disc_ndf=64, disc_n_layers=3)
    assert_same(load_file(str(back / "tokenizer" / "model.safetensors")),
                vae_only(load_file(str(tmp_path / "tok" / "model.safetensors"))))


def test_export_raw_weights_and_missing_ema(tmp_path):
    step, _ = _native_checkpoint(tmp_path, ema_keys_prefix=None)
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        export_checkpoint(step, tmp_path / "exported")
    assert not (tmp_path / "exported").exists() and not (tmp_path / "exported.partial").exists()
    exported = export_checkpoint(step, tmp_path / "exported", use_ema=False)
    raw = load_file(str(exported / "llm" / "model.safetensors"))
    assert_same(torch.load(exported / "llm" / "ema_model.bin", weights_only=True), raw)


# ---------------------------------------------------------------------- strict refusals
def _drop(state, key):
    state.pop(key)


def _add(state, key):
    state[key] = torch.zeros(3)


def _reshape(state, key):
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)


@pytest.mark.parametrize("which", ["raw", "ema", "tok"])
@pytest.mark.parametrize("change, key, message", [
    (_drop, "head.bias", "missing: head.bias"),
    (_add, "blocks.0.attn.extra", "unexpected: blocks.0.attn.extra"),
    (_reshape, "word_embed.weight", "wrong shape: word_embed.weight"),
])
def test_a_missing_extra_or_misshapen_tensor_is_refused(tmp_path, which, change, key, message):
    raw, ema, tok = _official_states()
    if which == "tok":
        tok_keys = {"head.bias": "vae.decoder.conv_out.bias", "word_embed.weight": "vae.quant_conv.weight"}
        key = tok_keys.get(key, "vae." + key)
        message = message.split(":")[0] + ": " + key
    change({"raw": raw, "ema": ema, "tok": tok}[which], key)
    src = write_official(tmp_path / "hart", raw, ema, tok)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        import_official(src, tmp_path / "imported")
    assert not (tmp_path / "imported").exists() and not (tmp_path / "imported.partial").exists()


def test_a_wrong_sequence_layout_buffer_is_refused(tmp_path):
    raw, ema, tok = _official_states()
    ema["lvl_1L"] = ema["lvl_1L"].flip(-1)
    with pytest.raises(ValueError, match="lvl_1L does not match"):
        import_official(write_official(tmp_path / "hart", raw, ema, tok), tmp_path / "imported")


def test_a_pickled_object_is_refused(tmp_path):
    raw, ema, tok = _official_states()
    src = write_official(tmp_path / "hart", raw, ema, tok)
    torch.save({**ema, "evil": NotATensor()}, src / "llm" / "ema_model.bin")
    with pytest.raises(ValueError, match=r"ema_model\.bin: refused to load.*weights_only=True"):
        import_official(src, tmp_path / "imported")
    torch.save({"state_dict": ema}, src / "llm" / "ema_model.bin")  # loads with weights_only, but nested
    with pytest.raises(ValueError, match="flat mapping of names to tensors"):
        import_official(src, tmp_path / "imported")


@pytest.mark.parametrize("part, change, message", [
    ("llm", {"mlp_type": "gpt2"}, "mlp_type='gpt2' is not supported"),
    ("llm", {"use_cross_attn": True}, "use_cross_attn=True is not supported"),
    ("llm", {"mlp_type": None}, "mlp_type='gpt2' is not supported"),  # absent: the official default gpt2
    ("llm", {"model_type": "hart_transformer_c2i"}, "model_type='hart_transformer_c2i'"),
    ("llm", {"rope_theta": 10000}, r"unknown fields \['rope_theta'\]"),
    ("llm", {"sep_aln_pooling_mode": "mean"}, "sep_aln_pooling_mode"),
    ("tokenizer", {"double_decoder": True}, "double_decoder=True is not supported"),
    ("tokenizer", {"quantizer_type": "fsq"}, "quantizer_type='fsq' is not supported"),
])
def test_an_unsupported_official_config_is_refused(tmp_path, part, change, message):
    raw, ema, tok = _official_states()
    cfg = dict(OFFICIAL_LLM if part == "llm" else OFFICIAL_TOKENIZER)
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    kw = {"llm_cfg": cfg} if part == "llm" else {"tok_cfg": cfg}
    src = write_official(tmp_path / "hart", raw, ema, tok, **kw)
    with pytest.raises(ValueError, match=message):
        import_official(src, tmp_path / "imported")


def test_a_non_empty_output_directory_is_refused(official, tmp_path):
    src = official[0]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        import_official(src, tmp_path / "taken")
    with pytest.raises(ValueError, match="not a t2i checkpoint"):
        export_checkpoint(import_official(src, tmp_path / "imported") / "tokenizer", tmp_path / "exported")


def test_sampling_a_checkpoint_without_ema_says_so(tmp_path, capsys):
    from hart_train.sampling import load_pipeline

    step, _ = _native_checkpoint(tmp_path, ema_keys_prefix=None)
    pipe = load_pipeline(str(step))
    assert "has no ema.safetensors" in capsys.readouterr().err
    saved, loaded = load_file(str(step / "model.safetensors")), pipe.model.state_dict()
    assert saved and all(torch.equal(loaded[k], v) for k, v in saved.items())  # the raw weights


def test_an_imported_checkpoint_loads_without_a_text_encoder(official, tmp_path):
    """Imported without --text-encoder, the config names no text encoder directory: the model and the
    tokenizer load alone, with the official weights (EMA)."""
    from hart_train.sampling import load_pipeline

    src, raw, ema, tok = official
    imported = import_official(src, tmp_path / "imported")
    pipe = load_pipeline(str(imported / "llm"), text_encoder=False)
    assert pipe.text_encoder is None
    state = pipe.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ema.items() if k in state)
    assert torch.equal(pipe.tokenizer.quantize.embedding.weight, tok["vae.quantize.embedding.weight"])


def test_load_tokenizer_with_its_discriminator_for_fine_tuning(official, tmp_path):
    src, _, _, tok = official
    imported = import_official(src, tmp_path / "imported")
    full = load_tokenizer(str(imported / "tokenizer"), with_discriminator=True)
    assert isinstance(full, HARTAutoEncoderWithDisc) and full.training
    assert all(p.requires_grad for p in full.parameters())
    assert all(torch.equal(full.state_dict()[k], v) for k, v in tok.items())
    vae_only_export = export_checkpoint(imported / "llm", tmp_path / "exported")  # the tiny disc is left out
    again = import_official(vae_only_export, tmp_path / "again")
    with pytest.raises(ValueError, match="no `disc.\\*` weights"):
        load_tokenizer(str(again / "tokenizer"), with_discriminator=True)
