"""Text encoders built here, with random weights and tokenizers trained on given texts (no hub, no network)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from data_tools.text_encoder import HART_LLM_SYSTEM_PROMPT

WORDS = ("red blue green yellow small big tiny huge cat dog fox owl horse whale tree rock car snow beach city "
         "night morning painting photo of a the on in with under").split()


def captions(n: int, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(3, 9))) for _ in range(n)]


def qwen_tokenizer(texts: list[str]):
    """A real `Qwen2Tokenizer` (byte-level BPE, `<|endoftext|>` as pad) with merges trained on `texts`."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    model = json.loads(bpe.to_str())["model"]
    return transformers.Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


def save_tiny_qwen(d: Path, hidden_size: int = 32) -> Path:
    """A 2-layer Qwen2 causal LM of width `hidden_size` in the layout of a real LLM checkpoint."""
    import transformers

    tokenizer = qwen_tokenizer(captions(300) + [HART_LLM_SYSTEM_PROMPT])
    tokenizer.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(d))
    return d
