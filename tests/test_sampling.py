"""`sample_images` with caller-supplied draws: the tiny model, tokenizer and the packaged MiniLM encoder."""

from __future__ import annotations

import torch

from data_tools.text_encoder import TextEncoder, TextEncoderConfig
from hart_train import distributed as D
from hart_train.models import HARTForT2I, hart_config
from hart_train.models.buckets import Bucket, training_schedule
from hart_train.sampling import sample_images
from tokenizer.autoencoder import HARTAutoEncoder, tokenizer_config


def test_sample_images_replays_supplied_draws():
    torch.manual_seed(0)
    model = HARTForT2I(hart_config("tiny", context_dim=384)).eval()
    with torch.no_grad():  # VAR's init gives near-uniform logits; sharpen them so the draws pick distinct tokens
        model.head.weight.normal_(std=0.5)
    tokenizer = HARTAutoEncoder(tokenizer_config("tiny")).eval()
    encoder = TextEncoder(TextEncoderConfig(kind="minilm", max_length=model.config.context_token))
    prompts = ["a red apple", "a rocket", "a red apple"]
    kw = dict(cfg_scale=2.0, top_k=20, more_smooth=True)
    seeded = sample_images(model, tokenizer, encoder, prompts, seed=3, **kw)
    assert seeded.shape == (3, 3, 16, 16)
    assert not torch.equal(sample_images(model, tokenizer, encoder, prompts, seed=9, **kw), seeded)
    draws = model.draw_sampling_randomness(3, "cpu", D.generator(torch.device("cpu")).manual_seed(3), more_smooth=True)
    # the seed's own draws give its images under any other seed
    assert torch.equal(sample_images(model, tokenizer, encoder, prompts, seed=9, draws=draws, **kw), seeded)
    # the same draws for every image of one prompt: the same image, whatever the seed
    draws.token_exp = [q[[0, 1, 0]] for q in draws.token_exp]
    draws.gumbel_exp = [q[[0, 1, 0]] for q in draws.gumbel_exp]
    n = model.patch_nums[-1] ** 2
    draws.diff_noise = draws.diff_noise.view(3, n, -1)[[0, 1, 0]].reshape(3 * n, -1)
    steps = draws.diff_step_noise.shape[0]
    draws.diff_step_noise = draws.diff_step_noise.view(steps, 2, 3, n, -1)[:, :, [0, 1, 0]].reshape(steps, 6 * n, -1)
    same = sample_images(model, tokenizer, encoder, prompts, seed=5, draws=draws, **kw)
    assert torch.equal(same[0], same[2]) and not torch.equal(same[0], same[1])


def test_sample_images_on_a_bucket_schedule():
    torch.manual_seed(0)
    model = HARTForT2I(hart_config("tiny", context_dim=384)).eval()
    with torch.no_grad():
        model.head.weight.normal_(std=0.5)
    tokenizer = HARTAutoEncoder(tokenizer_config("tiny")).eval()
    encoder = TextEncoder(TextEncoderConfig(kind="minilm", max_length=model.config.context_token))
    pn = model.patch_nums
    assert pn == (1, 2, 4) and tokenizer.cfg.downsample == 4
    prompts = ["a red apple", "a rocket"]
    kw = dict(cfg_scale=2.0, top_k=20, more_smooth=True, seed=3)
    square = sample_images(model, tokenizer, encoder, prompts, **kw)
    # the square bucket is the square path, bit for bit
    assert training_schedule(Bucket(4, 4), pn) is None
    assert torch.equal(sample_images(model, tokenizer, encoder, prompts, schedule=training_schedule(Bucket(4, 4), pn),
                                     **kw), square)
    landscape = Bucket(3, 5).schedule(pn)
    wide = sample_images(model, tokenizer, encoder, prompts, schedule=landscape, **kw)
    assert wide.shape == (2, 3, 12, 20) and torch.isfinite(wide).all()
    tall = sample_images(model, tokenizer, encoder, prompts, schedule=Bucket(5, 3).schedule(pn), **kw)
    assert tall.shape == (2, 3, 20, 12)
    # a bucket's seeded draws replay its images under another seed
    draws = model.draw_sampling_randomness(2, "cpu", D.generator(torch.device("cpu")).manual_seed(3), more_smooth=True,
                                           schedule=landscape)
    assert draws.token_exp[-1].shape[1] == 15
    replay = sample_images(model, tokenizer, encoder, prompts, schedule=landscape, draws=draws,
                           **{**kw, "seed": 9})
    assert torch.equal(replay, wide)
    assert not torch.equal(sample_images(model, tokenizer, encoder, prompts, schedule=landscape, **{**kw, "seed": 9}),
                           wide)
