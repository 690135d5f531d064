"""Aspect-ratio buckets on the model side: the scale-schedule rule, the default bucket sets, the tokenizer
on a bucket's (h, w) grids, the transformer's training forward, 2D RoPE, block-causal attention, token
dropping, KV cache and sampler on them, and their FLOPs; the square default unchanged."""

from __future__ import annotations

import json
import math
import random
import re
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import test_hart_model as hart_model_tests
from hart_train.flops import expected_kept_last, sample_flops
from hart_train.models import HARTForT2I, TrainDraws, hart_t2i, kernels
from hart_train.models.buckets import (DEFAULT_BUCKETS, Bucket, as_schedule, bucket_for_aspect, bucket_schedule,
                                       check_buckets, default_buckets, nearest_bucket, num_tokens, parse_bucket,
                                       parse_buckets)
from hart_train.models.rope import image_positions
from tokenizer.autoencoder import PATCH_NUMS_BY_RESOLUTION, HARTAutoEncoder, tokenizer_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # tiny square schedule, 64 last-scale tokens
BUCKET = Bucket(6, 10)  # 60 tokens: (1,1) (2,3) (2,4) (3,5) (5,8) (6,10)
SCHEDULE = BUCKET.schedule(PATCH_NUMS)
DOWNSAMPLE = 4  # the tiny tokenizer's (ch_mult (1, 2, 2)); the released one's is 16


# ---------------------------------------------------------------------- the schedule rule
def rule_by_hand(patch_nums, H, W):
    """The documented rule with exact fractions: round half up of p*H/S and p*W/S, at least 1; (1, 1) for p = 1."""
    S = patch_nums[-1]
    side = lambda p, X: max(1, math.floor(Fraction(p * X, S) + Fraction(1, 2)))  # noqa: E731
    return tuple((1, 1) if p == 1 else (side(p, H), side(p, W)) for p in patch_nums)


def test_tiny_schedule_and_the_documented_1024_example():
    assert SCHEDULE == ((1, 1), (2, 3), (2, 4), (3, 5), (5, 8), (6, 10))
    assert bucket_schedule((1, 2, 4), 3, 5) == ((1, 1), (2, 3), (3, 5))  # 1.5 -> 2 and 2.5 -> 3: halves up
    assert Bucket(48, 84).schedule(PATCH_NUMS_BY_RESOLUTION[1024]) == (
        (1, 1), (2, 3), (2, 4), (3, 5), (4, 7), (5, 9), (7, 12), (9, 16), (12, 21), (16, 28), (20, 35), (27, 47),
        (36, 63), (48, 84))


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_default_buckets_follow_the_rule_and_keep_the_token_count(resolution):
    pn = PATCH_NUMS_BY_RESOLUTION[resolution]
    S, square = pn[-1], num_tokens(pn)
    buckets = default_buckets(resolution)
    assert buckets[0] == Bucket(S, S) and len(set(buckets)) == len(buckets) == 9
    assert set(buckets) == {b.transposed() for b in buckets}  # closed under transposition
    check_buckets(buckets, pn)
    for b in buckets:
        sched = b.schedule(pn)
        assert sched == rule_by_hand(pn, b.height, b.width)
        assert len(sched) == len(pn) and sched[0] == (1, 1) and sched[-1] == (b.height, b.width)
        assert all(h1 >= h0 and w1 >= w0 for (h0, w0), (h1, w1) in zip(sched, sched[1:]))  # never shrinks
        counts = [h * w for h, w in sched]
        assert all(b > a for a, b in zip(counts, counts[1:]))  # and always grows
        assert abs(b.height * b.width / S**2 - 1) <= 0.02  # last scale within 2% of the square's S^2
        assert abs(num_tokens(sched) / square - 1) <= 0.04  # the whole sequence within 4%
        assert b.transposed().schedule(pn) == tuple((w, h) for h, w in sched)
        assert b.image_size() == (16 * b.height, 16 * b.width)
    assert Bucket(S, S).schedule(pn) == tuple((p, p) for p in pn)  # the square bucket is the square schedule
    # progressive stages: the 512/1024 sets are the 256 set scaled, so every bucket keeps its aspect
    assert [b.aspect for b in buckets] == [b.aspect for b in DEFAULT_BUCKETS[256]]


def test_bucket_names_parse_and_round_trip_through_json():
    assert parse_bucket("56x72") == Bucket(56, 72) == parse_bucket(" 56 X 72 ") == parse_bucket([56, 72])
    assert Bucket(56, 72).name == str(Bucket(56, 72)) == "56x72" and Bucket(56, 72).aspect == 56 / 72
    assert Bucket.from_image_size(1152, 896) == Bucket(56, 72) and Bucket(56, 72).image_size() == (896, 1152)
    with pytest.raises(ValueError, match="not a multiple of 16 px"):
        Bucket.from_image_size(1150, 896)
    names = [b.name for b in default_buckets(1024)]
    assert parse_buckets(json.loads(json.dumps(names))) == default_buckets(1024)
    assert parse_buckets(",".join(names)) == default_buckets(1024)
    for bad, message in [("56*72", "expected '<height>x<width>'"), ("0x64", "bucket height must be a positive int"),
                         ("64x64,56x72,64x64", "listed twice"), ("", "no buckets")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_buckets(bad)


def test_schedules_and_bucket_sets_are_validated():
    assert as_schedule((1, 2, 4)) == ((1, 1), (2, 2), (4, 4)) == as_schedule([[1, 1], [2, 2], [4, 4]])
    with pytest.raises(ValueError, match=r"scale 2 \(3x5\) is smaller than scale 1 \(4x4\)"):
        as_schedule(((1, 1), (4, 4), (3, 5)))
    with pytest.raises(ValueError, match="scale 1 width must be a positive int"):
        as_schedule(((1, 1), (2, 0)))
    with pytest.raises(ValueError, match="bucket 56x72 has 4032 last-scale tokens, \\+1475% from the square's 16x16"):
        check_buckets(default_buckets(1024)[1:2], PATCH_NUMS_BY_RESOLUTION[256])  # a 1024 bucket on a 256 stage
    with pytest.raises(ValueError, match="no default buckets for resolution 768"):
        default_buckets(768)


def test_nearest_bucket_by_aspect():
    buckets = default_buckets(1024)
    assert nearest_bucket(1152, 896, buckets) == Bucket(56, 72)  # landscape: width 1152, height 896
    assert nearest_bucket(896, 1152, buckets) == Bucket(72, 56)
    assert nearest_bucket(500, 500, buckets) == Bucket(64, 64)
    assert nearest_bucket(1920, 1080, buckets) == Bucket(48, 84)  # 16:9
    assert nearest_bucket(3000, 1000, buckets) == Bucket(44, 92)  # beyond the widest: the widest
    assert bucket_for_aspect("16:9", buckets) == Bucket(48, 84) and bucket_for_aspect("9:16", buckets) == Bucket(84, 48)
    assert bucket_for_aspect("1:1", buckets) == Bucket(64, 64)
    # log distance: a transposed image gets the transposed bucket; exact ties go to the earlier bucket
    rng = random.Random(0)
    for _ in range(200):
        w, h = rng.uniform(100, 3000), rng.uniform(100, 3000)
        assert nearest_bucket(h, w, buckets) == nearest_bucket(w, h, buckets).transposed()
    assert nearest_bucket(10, 10, [Bucket(1, 2), Bucket(2, 1)]) == Bucket(1, 2)
    assert nearest_bucket(3, 1, [Bucket(1, 9), Bucket(1, 1)]) == Bucket(1, 9)  # log(3) both ways: an exact tie
    assert nearest_bucket(3, 1, [Bucket(1, 1), Bucket(1, 9)]) == Bucket(1, 1)
    assert bucket_for_aspect("2.35:1", buckets) == Bucket(44, 92)
    assert nearest_bucket(10, 10, [Bucket(2, 1), Bucket(1, 2)]) == Bucket(2, 1)
    with pytest.raises(ValueError, match="expected '<width>:<height>'"):
        bucket_for_aspect("16x9", buckets)


# ---------------------------------------------------------------------- tokenizer
def tiny_vae(patch_nums=PATCH_NUMS) -> HARTAutoEncoder:
    torch.manual_seed(0)
    vae = HARTAutoEncoder(tokenizer_config("tiny", patch_nums=patch_nums)).eval()
    with torch.no_grad():  # spread the codebook like trained latents so every scale picks varied codes
        vae.quantize.embedding.weight.normal_(0, 0.5)
    return vae


def images(B, height, width, seed=0):
    return torch.rand(B, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tokenizer_square_default_is_the_square_schedule_bit_for_bit():
    vae, q = tiny_vae(), tiny_vae().quantize
    img = images(2, 32, 32)
    square = as_schedule(PATCH_NUMS)
    with torch.no_grad():
        f = vae.img_to_latent(img)
        for pn in (square, PATCH_NUMS):
            idx, frest = vae.img_to_idxBl_and_frest(img, pn)
            idx0, frest0 = vae.img_to_idxBl_and_frest(img)
            assert all(torch.equal(a, b) for a, b in zip(idx, idx0)) and torch.equal(frest, frest0)
            assert torch.equal(vae.idxBl_to_var_input(idx, pn), vae.idxBl_to_var_input(idx))
            assert torch.equal(q.idxBl_to_fhat(idx, pn, phi_at_last=False), q.idxBl_to_fhat(idx, phi_at_last=False))
            assert torch.equal(q.f_to_idxBl_and_fhat(f, pn)[1], q.f_to_idxBl_and_fhat(f)[1])
            a = q(f, pn, skip_continuous_prob=0.5, generator=torch.Generator().manual_seed(1))
            b = q(f, skip_continuous_prob=0.5, generator=torch.Generator().manual_seed(1))
            assert torch.equal(a.f_hat, b.f_hat) and torch.equal(a.vq_loss, b.vq_loss)
            h = q.embedding(idx[2]).transpose(1, 2).reshape(2, 8, 3, 3)
            fa = vae.get_next_autoregressive_input(2, 6, torch.ones(2, 8, 8, 8), h, pn)
            fb = vae.get_next_autoregressive_input(2, 6, torch.ones(2, 8, 8, 8), h)
            assert torch.equal(fa[0], fb[0]) and torch.equal(fa[1], fb[1])


def test_tokenizer_encodes_and_decodes_a_bucket():
    vae = tiny_vae()
    q, B, C, S = vae.quantize, 3, vae.Cvae, len(SCHEDULE)
    H, W = SCHEDULE[-1]
    img = images(B, DOWNSAMPLE * H, DOWNSAMPLE * W)  # 24 x 40 px
    with torch.no_grad():
        f = vae.img_to_latent(img)
        assert f.shape == (B, C, H, W)
        idx = vae.img_to_idxBl(img, SCHEDULE)
        assert [tuple(i.shape) for i in idx] == [(B, h * w) for h, w in SCHEDULE]
        contributions = [q.scale_contribution(idx[si], si, SCHEDULE) for si in range(S)]
        f_hat = q.idxBl_to_fhat(idx, SCHEDULE)
        torch.testing.assert_close(sum(contributions), f_hat, rtol=0, atol=1e-6)
        out = q(f, SCHEDULE, skip_continuous_prob=1.0)
        assert all(torch.equal(a, b) for a, b in zip(out.idx_Bl, idx))
        torch.testing.assert_close(out.f_hat, f_hat, rtol=0, atol=1e-5)
        # the last-scale residual + f_hat of the first S-1 scales = the latent
        idx2, frest = vae.img_to_idxBl_and_frest(img, SCHEDULE)
        assert all(torch.equal(a, b) for a, b in zip(idx, idx2)) and frest.shape == (B, H * W, C)
        f_before_last = q.idxBl_to_fhat(idx2[:-1], SCHEDULE)
        torch.testing.assert_close(f_before_last + frest.transpose(1, 2).reshape(B, C, H, W), f, rtol=0, atol=1e-5)
        # teacher forcing: block si is the area-down of f_hat after si+1 scales, on scale si+1's grid
        var_in = vae.idxBl_to_var_input(idx, SCHEDULE)
        assert var_in.shape == (B, num_tokens(SCHEDULE) - 1, C)
        first = F.interpolate(contributions[0], size=SCHEDULE[1], mode="area").reshape(B, C, -1).transpose(1, 2)
        torch.testing.assert_close(var_in[:, :6], first, rtol=0, atol=1e-6)
        # AR stepping with the same tokens gives the same inputs and f_hat (no Phi at the last scale)
        f_ar, offset = torch.zeros(B, C, H, W), 0
        for si, (h, w) in enumerate(SCHEDULE):
            emb = q.embedding(idx[si]).transpose(1, 2).reshape(B, C, h, w)
            f_ar, nxt = vae.get_next_autoregressive_input(si, S, f_ar, emb, SCHEDULE)
            if si < S - 1:
                n = SCHEDULE[si + 1][0] * SCHEDULE[si + 1][1]
                assert nxt.shape == (B, C, *SCHEDULE[si + 1])
                torch.testing.assert_close(nxt.reshape(B, C, -1).transpose(1, 2), var_in[:, offset:offset + n],
                                           rtol=0, atol=1e-5)
                offset += n
        torch.testing.assert_close(f_ar, q.idxBl_to_fhat(idx, SCHEDULE, phi_at_last=False), rtol=0, atol=1e-5)
        dec = vae.fhat_to_img(f_ar)
        assert dec.shape == img.shape and dec.min() >= -1 and dec.max() <= 1
        assert vae.idxBl_to_img(idx, SCHEDULE).shape == img.shape
        assert vae.img_to_reconstructed_img(img, continuous=False, patch_nums=SCHEDULE).shape == img.shape
    # the training forward on the bucket: reconstruction of the image's shape, gradients to the encoder
    out = vae(img, skip_continuous_prob=0.5, patch_nums=SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert out["rec"].shape == img.shape and [tuple(i.shape) for i in out["idx_Bl"]] == [(B, h * w) for h, w in SCHEDULE]
    (F.mse_loss(out["rec"], img) + out["vq_loss"]).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.decoder.conv_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"latent is 8x8 but the last scale of patch_nums is 6x10"):
        vae.img_to_idxBl(images(1, 32, 32), SCHEDULE)


# ---------------------------------------------------------------------- transformer
def make_model(seed=0, **kw) -> HARTForT2I:
    """test_hart_model's tiny model with every path mattering, on this file's patch_nums; no text drop (rand,
    not the released randn, which drops half the samples at rate 0)."""
    return hart_model_tests.make_model(seed, patch_nums=PATCH_NUMS, last_scale_min_keep=4, cond_drop_rate=0.0,
                                       cond_drop_randn=False, **kw)


def make_batch(m: HARTForT2I, schedule, B=2, seed=1):
    c = m.config
    g = torch.Generator().manual_seed(seed)
    grids = m.scale_grids(schedule)  # None: the square patch_nums
    L, (H, W), T = num_tokens(grids), grids[-1], c.context_token
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T // 2:] = 0  # right padding on one sample
    return dict(context=torch.randn(B, T, c.context_dim, generator=g), context_mask=mask,
                x_BLCv_wo_first_l=torch.randn(B, L - 1, c.Cvae, generator=g),
                gt_idx=torch.randint(0, c.vocab_size, (B, L), generator=g),
                f_rest_last=0.3 * torch.randn(B, H * W, c.Cvae, generator=g),
                codebook=torch.randn(c.vocab_size, c.Cvae, generator=g))


def trained_params(m: HARTForT2I, schedule) -> set[str]:
    m.zero_grad()
    out = m(**make_batch(m, schedule), generator=torch.Generator().manual_seed(3), schedule=schedule)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    return {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_training_forward_on_a_bucket_reaches_every_parameter_the_square_path_reaches():
    m = make_model()
    square = trained_params(m, None)
    assert trained_params(m, SCHEDULE) == square and len(square) > 20
    assert trained_params(m, BUCKET.transposed().schedule(PATCH_NUMS)) == square


def test_token_dropping_keeps_its_share_of_the_bucket_last_scale():
    m, B, n = make_model(), 3, BUCKET.height * BUCKET.width
    for seed in range(5):
        draws = m.draw_training_randomness(B, "cpu", torch.Generator().manual_seed(seed), SCHEDULE)
        g = torch.Generator().manual_seed(seed)  # the same draws by hand: an order, then the mask rate
        torch.rand(B, n, generator=g)
        rate = hart_t2i.truncnorm_sample(0.5, 1.0, 1.0, 0.25, g)
        kept = n - min(math.ceil(n * rate), n - 4)
        assert draws.keep_last_idx.shape == (B, kept) and kept < n
        for row in draws.keep_last_idx:
            assert row.tolist() == sorted(set(row.tolist())) and 0 <= row.min() and row.max() < n
        batch = make_batch(m, SCHEDULE, B=B)
        out = m(**batch, draws=draws, schedule=SCHEDULE)
        assert out["num_kept_last"].item() == kept
        counts = torch.tensor([h * w for h, w in SCHEDULE[:-1]] + [kept], dtype=torch.float)
        torch.testing.assert_close((out["ce_per_scale"] * counts).sum() / counts.sum(), out["ce"])


def test_block_causal_kernels_agree_on_bucket_lengths(monkeypatch):
    m = make_model()
    batch = make_batch(m, SCHEDULE)
    draws = m.draw_training_randomness(2, "cpu", torch.Generator().manual_seed(0), SCHEDULE)
    k = draws.keep_last_idx.shape[1]
    args = (batch["context"], batch["context_mask"], batch["x_BLCv_wo_first_l"], None, draws.keep_last_idx, None, SCHEDULE)
    results = []
    for name in ("key_prefix", "dense_mask"):
        monkeypatch.setitem(kernels._active, "attention", name)
        m.zero_grad()
        logits, h, _ = m.forward_logits(*args)
        h.sum().backward()
        results.append((logits, h, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (logits, h, grads), (logits_ref, h_ref, grads_ref) = results
    assert logits.shape == (2, num_tokens(SCHEDULE) - 60 + k, m.config.vocab_size)
    assert h.shape == (2, m.config.context_token + num_tokens(SCHEDULE) - 60 + k - 1, m.config.embed_dim)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_schedule_that_does_not_fit_is_refused():
    m = make_model()
    with pytest.raises(ValueError, match="must have 6 scales"):
        m.scale_grids(SCHEDULE[1:])
    with pytest.raises(ValueError, match=r"start with \(1, 1\)"):
        m.scale_grids(((2, 2),) + SCHEDULE[1:])
    square = make_batch(m, PATCH_NUMS)
    # both schedules have 130 tokens in all (1+4+9+16+36+64 = 1+6+8+15+40+60); the last scale differs
    with pytest.raises(ValueError, match=r"gt_idx has 130 tokens and f_rest_last 64; the schedule .* needs 130 and 60"):
        m(**square, schedule=SCHEDULE)
    with pytest.raises(ValueError, match=r"x_BLCv_wo_first_l has 128 tokens; the schedule .* needs L - 1 = 129"):
        m.forward_logits(square["context"], square["context_mask"], square["x_BLCv_wo_first_l"][:, 1:], schedule=SCHEDULE)


# ---------------------------------------------------------------------- RoPE
def expected_positions(schedule, scales, offset):
    """(row, col) of every token of the listed scales in raster order: i/h*H and j/w*W, plus the offset."""
    H, W = schedule[-1]
    return torch.tensor([[i * H / h + offset, j * W / w + offset]
                         for si in scales for h, w in [schedule[si]] for i in range(h) for j in range(w)])


def test_rope_positions_on_a_bucket_and_its_transpose():
    off = torch.tensor([7, 3])
    pos = image_positions(SCHEDULE, range(1, 6), off)
    for b in range(2):
        torch.testing.assert_close(pos[b], expected_positions(SCHEDULE, range(1, 6), off[b].item()), rtol=0, atol=1e-5)
    assert pos[0, -60:].tolist()[:11] == [[7.0 + 0, 7.0 + j] for j in range(10)] + [[8.0, 7.0]]  # integer last scale
    # the transposed bucket puts token (j, i) where this one puts (i, j), axes swapped
    transposed = BUCKET.transposed().schedule(PATCH_NUMS)
    pos_t = image_positions(transposed, range(1, 6), off)
    start = 0
    for (h, w) in SCHEDULE[1:]:
        a = pos[:, start:start + h * w].reshape(2, h, w, 2)
        b = pos_t[:, start:start + h * w].reshape(2, w, h, 2)
        assert torch.equal(a, b.transpose(1, 2).flip(-1))
        start += h * w
    # the square case: sides or grids, both the released formula meshgrid(arange(pn))/pn*pn_max, bit for bit
    square = image_positions(PATCH_NUMS, range(1, 6), off)
    assert torch.equal(square, image_positions(as_schedule(PATCH_NUMS), range(1, 6), off))
    released = torch.cat([(torch.stack(torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij"), -1) / p * 8)
                          .reshape(-1, 2) for p in PATCH_NUMS[1:]])
    assert torch.equal(square, released[None] + off[:, None, None])


def test_the_training_forward_rotates_each_token_at_its_bucket_position(monkeypatch):
    m = make_model()
    batch = make_batch(m, SCHEDULE)
    draws = m.draw_training_randomness(2, "cpu", torch.Generator().manual_seed(0), SCHEDULE)
    seen = []
    real = hart_t2i.rope_2d
    monkeypatch.setattr(hart_t2i, "rope_2d", lambda pos, hd: seen.append(pos) or real(pos, hd))
    m(**batch, draws=draws, schedule=SCHEDULE)
    last_ctx = (batch["context_mask"].cumsum(1) - 1)[:, -1]
    for b in range(2):
        want = expected_positions(SCHEDULE, range(1, 6), last_ctx[b].item())
        want = torch.cat((want[:-60], want[-60:][draws.keep_last_idx[b]]))  # only the kept last-scale tokens
        torch.testing.assert_close(seen[0][b], want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- KV cache and sampler
def test_kv_cache_per_scale_forward_equals_the_full_forward_on_a_bucket():
    m = make_model().eval()
    for schedule in (SCHEDULE, BUCKET.transposed().schedule(PATCH_NUMS)):
        batch = make_batch(m, schedule)
        with torch.no_grad():
            full, _, _ = m.forward_logits(batch["context"], batch["context_mask"], batch["x_BLCv_wo_first_l"],
                                          schedule=schedule)
            text = m.prepare_text(batch["context"], batch["context_mask"])
            cache, lvl, got, start = hart_t2i.KVCache(m.config.depth), m.level_embeddings(), [], 0
            x = m.embed_scale_input(0, text.cond_BTC, lvl)
            for si in range(len(schedule)):
                h = m.forward_scale(si, x, text, cache, schedule)
                got.append(m.get_logits(h[:, -1:] if si == 0 else h, text.cond_BTC))
                if si + 1 < len(schedule):
                    n = schedule[si + 1][0] * schedule[si + 1][1]
                    x = m.embed_scale_input(si + 1, batch["x_BLCv_wo_first_l"][:, start:start + n], lvl)
                    start += n
        assert cache.length == m.config.context_token + num_tokens(schedule) - 1
        torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


def sampler_setup():
    m, vae = make_model().eval(), tiny_vae()
    with torch.no_grad():
        for p in m.diffloss.parameters():  # off MAR's zero init, so the diffusion residual matters
            p.normal_(std=0.05)
    batch = make_batch(m, SCHEDULE)
    S = len(SCHEDULE)
    kw = dict(context=batch["context"], context_mask=batch["context_mask"], codebook=vae.quantize.codebook(),
              next_input_fn=lambda si, f, h: vae.get_next_autoregressive_input(si, S, f, h, SCHEDULE),
              top_k=20, top_k_late=10, top_k_late_from=2, schedule=SCHEDULE)
    return m, vae, kw


def test_sampler_draws_an_image_of_the_bucket_size():
    m, vae, kw = sampler_setup()
    H, W = SCHEDULE[-1]
    calls = []
    step = kw["next_input_fn"]
    kw_spy = dict(kw, next_input_fn=lambda si, f, h: calls.append(tuple(h.shape[-2:])) or step(si, f, h))
    img = m.autoregressive_infer_cfg(**kw_spy, fhat_to_img=vae.fhat_to_img, generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, DOWNSAMPLE * H, DOWNSAMPLE * W) and img.min() >= 0 and img.max() <= 1
    assert calls == list(SCHEDULE[:-1])
    f_hat = m.autoregressive_infer_cfg(**kw, generator=torch.Generator().manual_seed(0))
    assert f_hat.shape == (2, 8, H, W) and torch.allclose(img, vae.fhat_to_img(f_hat).add(1).mul(0.5))
    smooth = m.autoregressive_infer_cfg(**kw, more_smooth=True, generator=torch.Generator().manual_seed(0))
    assert smooth.shape == f_hat.shape and not torch.equal(smooth, f_hat)
    # the draws of the bucket's shapes replay the seeded sample exactly
    draws = m.draw_sampling_randomness(2, "cpu", torch.Generator().manual_seed(0), schedule=SCHEDULE)
    assert [tuple(q.shape) for q in draws.token_exp] == [(2, h * w, 64) for h, w in SCHEDULE]
    assert tuple(draws.diff_noise.shape) == (2 * 60, 8) and tuple(draws.diff_step_noise.shape) == (8, 4 * 60, 8)
    assert torch.equal(m.autoregressive_infer_cfg(**kw, draws=draws), f_hat)
    square_draws = m.draw_sampling_randomness(2, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"token_exp\[1\] has shape \(2, 4, 64\), expected .* = \(2, 6, 64\)"):
        m.autoregressive_infer_cfg(**kw, draws=hart_t2i.SampleDraws(token_exp=square_draws.token_exp), use_diffusion=False)
    with pytest.raises(ValueError, match=r"diff_noise has shape \(128, 8\), expected .* = \(120, 8\)"):
        m.autoregressive_infer_cfg(**kw, draws=square_draws)


def test_sampler_with_kv_cache_equals_teacher_forcing_on_a_bucket(monkeypatch):
    """The sampler's cached per-scale passes give the logits the full block-causal forward gives for the
    tokens it drew (cfg 0, so the guided logits are the conditional ones)."""
    m, vae, kw = sampler_setup()
    logits_seen, tokens = [], []
    real_logits, real_sample = m.get_logits, hart_t2i.sample_filtered
    monkeypatch.setattr(m, "get_logits", lambda h, c: logits_seen.append(real_logits(h, c)[:2]) or logits_seen[-1].repeat(2, 1, 1))
    monkeypatch.setattr(hart_t2i, "sample_filtered", lambda *a: tokens.append(real_sample(*a)) or tokens[-1])
    m.autoregressive_infer_cfg(**kw, cfg=0.0, use_diffusion=False, generator=torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in tokens] == [(2, h * w) for h, w in SCHEDULE]
    monkeypatch.undo()
    with torch.no_grad():
        x = vae.idxBl_to_var_input(tokens, SCHEDULE)
        full, _, _ = m.forward_logits(kw["context"], kw["context_mask"], x, schedule=SCHEDULE)
    torch.testing.assert_close(torch.cat(logits_seen, dim=1), full, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- FLOPs
def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # the CPU kernel is the same computation


def test_flops_of_a_bucket_equal_the_counted_ones():
    m = make_model()
    B, k = 2, 20
    batch = make_batch(m, SCHEDULE)
    keep = torch.rand(B, 60, generator=torch.Generator().manual_seed(0)).argsort(1)[:, :k].sort(1).values
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa})
    with counter:
        m(**batch, draws=TrainDraws(keep, torch.zeros(B, dtype=torch.bool)), schedule=SCHEDULE)
    C, S = m.config.embed_dim, len(SCHEDULE)
    counted = counter.get_total_flops() - 2 * S * (256 * C + C * C)  # the level embedding: once per forward
    assert counted == sample_flops(m.config, kept_last=k, schedule=SCHEDULE).forward * B
    T = m.config.context_token  # the sequence: text, every scale but the first, k of the last scale's 60
    assert sample_flops(m.config, kept_last=k, schedule=SCHEDULE).tokens == T + num_tokens(SCHEDULE) - 1 - 60 + k
    g = torch.Generator().manual_seed(0)
    kept = [m.draw_training_randomness(1, "cpu", g, SCHEDULE).keep_last_idx.shape[1] for _ in range(10000)]
    # kept has a standard deviation of ~8 tokens here: 3% is ~4 standard errors of the mean
    assert sum(kept) / len(kept) == pytest.approx(expected_kept_last(m.config, schedule=SCHEDULE), rel=0.03)
    assert expected_kept_last(m.config, schedule=SCHEDULE) < expected_kept_last(m.config)  # 60 tokens, not 64
