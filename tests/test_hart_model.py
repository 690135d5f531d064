"""HART transformer: weight layout, RoPE, block-sparse attention, KV cache, training forward, sampling."""

from __future__ import annotations

import io
import math

import pytest
import torch

from hart_train.models import HARTConfig, HARTForT2I, KVCache, hart_config, load_official_state_dict, official_state_dict
from hart_train.models import attention as attention_mod
from hart_train.models import kernels
from hart_train.models.hart_t2i import SampleDraws, TrainDraws
from hart_train.models.token_sampling import (filter_top_k_top_p, sample_top_k_top_p, top_k_candidates,
                                             truncnorm_sample)
from hart_train.models.rope import apply_rope, image_positions, rope_1d, rope_2d


# ---------------------------------------------------------------------- helpers
def tiny(**kw) -> HARTConfig:
    return hart_config("tiny", **kw)


def make_model(seed=0, **kw) -> HARTForT2I:
    torch.manual_seed(seed)
    m = HARTForT2I(tiny(**kw))
    with torch.no_grad():  # VAR's init makes gammas ~1e-5; make every path matter for the comparisons
        for b in m.blocks:
            b.ada_lin[-1].weight.normal_(std=0.05)
            b.ada_lin[-1].bias.normal_(std=0.3)
        m.head.weight.normal_(std=0.1)
    return m


def make_batch(m: HARTForT2I, B=2, seed=1):
    c = m.config
    g = torch.Generator().manual_seed(seed)
    T, L, n_last = c.context_token, m.L, c.patch_nums[-1] ** 2
    context = torch.randn(B, T, c.context_dim, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T // 2:] = 0  # right padding on one sample
    return dict(
        context=context,
        context_mask=mask,
        x_BLCv_wo_first_l=torch.randn(B, L - 1, c.Cvae, generator=g),
        gt_idx=torch.randint(0, c.vocab_size, (B, L), generator=g),
        f_rest_last=0.3 * torch.randn(B, n_last, c.Cvae, generator=g),
        codebook=torch.randn(c.vocab_size, c.Cvae, generator=g),
    )


def expected_full_size_shapes(depth=16, C=1536, V=4096, Cv=32, W=1024, diff_depth=6, hidden=4096):
    """Anatomy 1.9, written out."""
    e = {
        "word_embed.weight": (C, Cv), "word_embed.bias": (C,),
        "context_embed.weight": (C, 1536), "context_embed.bias": (C,), "context_norm.weight": (1536,),
        "lvl_embed.mlp.0.weight": (C, 256), "lvl_embed.mlp.0.bias": (C,),
        "lvl_embed.mlp.2.weight": (C, C), "lvl_embed.mlp.2.bias": (C,),
        "head_nm.ln_wo_grad.weight": (C,), "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (V, C), "head.bias": (V,), "decoder_norm.weight": (C,),
        "diffloss.net.time_embed.mlp.0.weight": (W, 256), "diffloss.net.time_embed.mlp.0.bias": (W,),
        "diffloss.net.time_embed.mlp.2.weight": (W, W), "diffloss.net.time_embed.mlp.2.bias": (W,),
        "diffloss.net.cond_embed.weight": (W, C), "diffloss.net.cond_embed.bias": (W,),
        "diffloss.net.input_proj.weight": (W, Cv), "diffloss.net.input_proj.bias": (W,),
        "diffloss.net.final_layer.linear.weight": (2 * Cv, W), "diffloss.net.final_layer.linear.bias": (2 * Cv,),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2 * W, W),
        "diffloss.net.final_layer.adaLN_modulation.1.bias": (2 * W,),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        e.update({
            p + "attn.q_bias": (C,), p + "attn.v_bias": (C,), p + "attn.zero_k_bias": (C,),
            p + "attn.qkv_proj.weight": (3 * C, C), p + "attn.proj.weight": (C, C), p + "attn.proj.bias": (C,),
            p + "ffn.gate_proj.weight": (hidden, C), p + "ffn.up_proj.weight": (hidden, C),
            p + "ffn.down_proj.weight": (C, hidden), p + "ln_wo_grad.weight": (C,),
            p + "ada_lin.1.weight": (6 * C, C), p + "ada_lin.1.bias": (6 * C,),
        })
    for j in range(diff_depth):
        p = f"diffloss.net.res_blocks.{j}."
        e.update({
            p + "in_ln.weight": (W,), p + "in_ln.bias": (W,),
            p + "mlp.0.weight": (W, W), p + "mlp.0.bias": (W,), p + "mlp.2.weight": (W, W), p + "mlp.2.bias": (W,),
            p + "adaLN_modulation.1.weight": (3 * W, W), p + "adaLN_modulation.1.bias": (3 * W,),
        })
    return e


# ---------------------------------------------------------------------- layout and state dicts
def test_full_size_layout_on_meta():
    with torch.device("meta"):
        m = HARTForT2I(hart_config("hart-0.7b"))
        m_no_norm = HARTForT2I(hart_config("hart-0.7b", use_context_norm=False))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == expected_full_size_shapes()
    assert sum(p.numel() for p in m.parameters()) == 732_497_472
    assert sum(p.numel() for p in m_no_norm.parameters()) == 732_495_936
    assert "context_norm.weight" not in m_no_norm.state_dict()
    # buffers: only zero_k_bias is kept (persistent, as released); the mask and lvl_1L are regenerated
    assert {k for k, _ in m.named_buffers()} == {f"blocks.{i}.attn.zero_k_bias" for i in range(16)}


def test_l2_norm_variant_adds_per_head_scale():
    with torch.device("meta"):
        m = HARTForT2I(tiny(attn_l2_norm=True))
    assert tuple(m.state_dict()["blocks.0.attn.scale_mul_1H11"].shape) == (1, 4, 1, 1)


def test_tiny_weights_round_trip_exactly():
    m = make_model(seed=0)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = make_model(seed=123)
    m2.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    batch = make_batch(m)
    o1 = m(**batch, generator=torch.Generator().manual_seed(5))
    o2 = m2(**batch, generator=torch.Generator().manual_seed(5))
    for k in o1:
        assert torch.equal(o1[k], o2[k]), k


def test_official_state_dict_loads_with_regenerable_buffers():
    m = make_model(seed=0)
    sd = official_state_dict(m)
    T, L = m.config.context_token, m.L
    assert tuple(sd["attn_bias_for_masking"].shape) == (1, 1, T + L - 1, T + L - 1)
    assert sd["lvl_1L"][0, T - 1].item() == 0 and sd["lvl_1L"][0, T].item() == 1 and sd["lvl_1L"][0, -1].item() == 2
    assert "blocks.0.attn.zero_k_bias" in sd
    fresh = make_model(seed=7)
    with pytest.raises(RuntimeError):  # a plain strict load refuses the released extra buffers
        fresh.load_state_dict(sd, strict=True)
    load_official_state_dict(fresh, sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    bad = dict(sd, lvl_1L=torch.zeros_like(sd["lvl_1L"]))
    with pytest.raises(ValueError, match="lvl_1L"):
        load_official_state_dict(fresh, bad)


@pytest.mark.parametrize(
    "field, value",
    [("num_heads", 5), ("sep_aln_pooling_mode", "mean"), ("patch_nums", (2, 4)), ("cond_drop_rate", 1.5),
     ("num_sampling_steps", "2000"), ("depth", 0), ("drop_path_rate", 1.0)],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny(**{field: value})


# ---------------------------------------------------------------------- RoPE
def test_rope_2d_matches_an_independent_construction():
    d, theta = 16, 10000.0
    patch_nums = (1, 2, 3, 4)  # 3 does not divide 4: fractional coordinates
    last_ctx = torch.tensor([7, 3])
    pos = image_positions(patch_nums, [1, 2, 3], last_ctx)
    cos, sin = rope_2d(pos, d)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, pos.shape[1], d, generator=g, dtype=torch.float64)
    q_rot, _ = apply_rope(q.float(), q.float(), cos, sin)

    # by hand from the anatomy: token (r, c) of a scale with side pn sits at (r/pn*4 + off, c/pn*4 + off);
    # dim j < d/2 carries the row angle with frequency theta^(-4(j mod d/4)/d), dim j >= d/2 the column
    # angle; rotate_half pairs dim j with j + d/2.
    want = torch.empty_like(q)
    for b in range(2):
        tok = 0
        for pn in patch_nums[1:]:
            for r in range(pn):
                for c in range(pn):
                    rc = (r * 4 / pn + last_ctx[b].item(), c * 4 / pn + last_ctx[b].item())
                    ang = [rc[0 if j < d // 2 else 1] * theta ** (-4 * (j % (d // 4)) / d) for j in range(d)]
                    v = q[b, 0, tok]
                    for j in range(d):
                        partner = -v[j + d // 2] if j < d // 2 else v[j - d // 2]
                        want[b, 0, tok, j] = v[j] * math.cos(ang[j]) + partner * math.sin(ang[j])
                    tok += 1
    assert tok == 2 * 2 + 3 * 3 + 4 * 4
    assert torch.allclose(q_rot.double(), want, atol=2e-5)


def test_rope_1d_context_positions_follow_the_mask():
    d = 8
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    pos = mask.cumsum(1) - 1
    assert pos.tolist() == [[0, 1, 2, 2, 2]]  # right padding repeats the last valid index
    cos, sin = rope_1d(pos, d)
    inv = [10000 ** (-(2 * i) / d) for i in range(d // 2)]
    for t, p in enumerate(pos[0].tolist()):
        ang = torch.tensor([p * f for f in inv] * 2, dtype=torch.float64)
        assert torch.allclose(cos[0, t].double(), ang.cos(), atol=1e-6)
        assert torch.allclose(sin[0, t].double(), ang.sin(), atol=1e-6)


# ---------------------------------------------------------------------- attention
@pytest.mark.parametrize("seg_lens", [[5, 1, 4, 16], [5, 1, 4, 7]])  # full, and last scale with dropped tokens
def test_block_sparse_attention_equals_dense_masked(seg_lens):
    g = torch.Generator().manual_seed(0)
    L = sum(seg_lens)
    q, k, v = (torch.randn(2, 3, L, 8, generator=g, requires_grad=True) for _ in range(3))
    out = attention_mod.block_causal_attention(q, k, v, seg_lens, scale=0.3)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = attention_mod.dense_masked_attention(q, k, v, seg_lens, scale=0.3)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert torch.allclose(out, ref, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_model_with_dropped_tokens_equals_dense_reference(monkeypatch):
    m = make_model(patch_nums=(1, 2, 4, 8))  # 64 last-scale tokens: 32 are dropped
    batch = make_batch(m)
    draws = m.draw_training_randomness(2, "cpu", torch.Generator().manual_seed(0))
    assert draws.keep_last_idx.shape == (2, 32)
    args = (batch["context"], batch["context_mask"], batch["x_BLCv_wo_first_l"], None, draws.keep_last_idx)
    logits, h, _ = m.forward_logits(*args)
    h.sum().backward()
    g_sparse = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad()
    monkeypatch.setitem(kernels._active, "attention", "dense_mask")
    logits_ref, h_ref, _ = m.forward_logits(*args)
    h_ref.sum().backward()
    g_dense = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    assert logits.shape == (2, 1 + 4 + 16 + 32, m.config.vocab_size)
    assert torch.allclose(logits, logits_ref, atol=1e-5) and torch.allclose(h, h_ref, atol=1e-5)
    for a, b in zip(g_sparse, g_dense):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_top_k_candidate_sampling_draws_from_the_filtered_distribution():
    """The training forward draws over the top-k candidates only; that must be VAR's filtered
    distribution (top-k, then top-p) exactly, and step aside when ties at the k-th value would make the
    filter keep more than k tokens."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 50, generator=g) * 3
    probs, cand = top_k_candidates(logits, 7, 0.8)
    ref = filter_top_k_top_p(logits, 7, 0.8).softmax(-1).view(10, 50)
    assert torch.allclose(torch.zeros(10, 50).scatter_(1, cand, probs), ref, atol=1e-6)
    assert top_k_candidates(torch.zeros(1, 1, 50), 7, 0.8) is None  # all tied: the filter keeps all 50
    assert top_k_candidates(logits, 0, 0.8) is None and top_k_candidates(logits, 50, 0.8) is None
    draws = sample_top_k_top_p(logits[:1, :1].expand(1, 40000, 50).contiguous(), 7, 0.8, g)
    freq = torch.bincount(draws.flatten(), minlength=50).double() / draws.numel()
    assert torch.allclose(freq, ref[0].double(), atol=0.01)
    tied = sample_top_k_top_p(torch.zeros(1, 4000, 50), 7, 0.8, g)  # the fallback: 40 of 50 kept, not 7
    kept = filter_top_k_top_p(torch.zeros(1, 1, 50), 7, 0.8).isfinite().flatten().nonzero().flatten()
    assert len(kept) == 40 and tied.unique().tolist() == kept.tolist()
    # one tied row among free ones: only that row leaves the fast path; both rows keep their distribution
    mixed = torch.cat((logits[:1, :1].expand(1, 20000, 50), torch.zeros(1, 20000, 50)), dim=1)
    draws = sample_top_k_top_p(mixed, 7, 0.8, g)
    freq = torch.bincount(draws[0, :20000], minlength=50).double() / 20000
    assert torch.allclose(freq, ref[0].double(), atol=0.015)
    assert draws[0, 20000:].unique().tolist() == kept.tolist()


# ---------------------------------------------------------------------- KV cache
def test_kv_cache_per_scale_forward_equals_full_forward():
    m = make_model(patch_nums=(1, 2, 3, 4)).eval()
    batch = make_batch(m)
    with torch.no_grad():
        full, _, _ = m.forward_logits(batch["context"], batch["context_mask"], batch["x_BLCv_wo_first_l"])
        text = m.prepare_text(batch["context"], batch["context_mask"])
        cache, lvl, got = KVCache(m.config.depth), m.level_embeddings(), []
        x, start = m.embed_scale_input(0, text.cond_BTC, lvl), 0
        for si, pn in enumerate(m.patch_nums):
            h = m.forward_scale(si, x, text, cache)
            got.append(m.get_logits(h[:, -1:] if si == 0 else h, text.cond_BTC))
            if si + 1 < len(m.patch_nums):
                n = m.patch_nums[si + 1] ** 2
                x = m.embed_scale_input(si + 1, batch["x_BLCv_wo_first_l"][:, start:start + n], lvl)
                start += n
    assert cache.length == m.config.context_token + m.L - 1
    assert torch.allclose(torch.cat(got, dim=1), full, atol=1e-5)


# ---------------------------------------------------------------------- training forward
def test_training_forward_terms_and_reproducibility():
    m = make_model(patch_nums=(1, 2, 4, 8))
    batch = make_batch(m)
    out = m(**batch, generator=torch.Generator().manual_seed(3))
    again = m(**batch, generator=torch.Generator().manual_seed(3))
    for k in out:
        assert torch.equal(out[k], again[k]), k
    assert out["ce_per_scale"].shape == out["acc_per_scale"].shape == (4,)
    assert ((0 <= out["acc_per_scale"]) & (out["acc_per_scale"] <= 1)).all()
    assert out["num_kept_last"].item() == 32
    assert torch.allclose(out["loss"], out["ce"] + out["diff_loss"])
    assert torch.allclose(out["diff_loss"], out["diff_mse"] + out["diff_vb"])
    # per-scale CE weighted by token counts is the token-mean CE
    counts = torch.tensor([1.0, 4.0, 16.0, 32.0])
    assert torch.allclose((out["ce_per_scale"] * counts).sum() / counts.sum(), out["ce"], atol=1e-6)
    # list-of-scales ground truth is the same as the concatenated one
    per_scale = list(batch["gt_idx"].split([1, 4, 16, 64], dim=1))
    out_list = m(**dict(batch, gt_idx=per_scale), generator=torch.Generator().manual_seed(3))
    assert torch.equal(out_list["loss"], out["loss"])
    out["loss"].backward()
    assert m.diffloss.net.final_layer.linear.weight.grad.abs().sum() > 0
    assert m.head.weight.grad.abs().sum() > 0
    assert batch["context"].abs().sum() > 0  # the text drop does not touch the caller's tensor


def test_residual_target_is_relative_to_the_sampled_token():
    m = make_model(diff_weight=0.0)
    batch = make_batch(m)
    B, n = 2, 16
    keep = torch.arange(n).repeat(B, 1)
    idx = torch.randint(0, 64, (B, n))
    noise = torch.zeros(m.config.diffusion_batch_mul * B * n, m.config.Cvae)
    t = torch.zeros(noise.shape[0], dtype=torch.long)
    draws = TrainDraws(keep, torch.zeros(B, dtype=torch.bool), sampled_idx=idx, diff_t=t, diff_noise=noise)
    seen = {}
    m.diffloss.train_diffusion.q_sample = lambda x0, t, noise: seen.setdefault("x0", x0)
    m(**batch, draws=draws)
    want = (batch["f_rest_last"] - batch["codebook"][idx]).reshape(B * n, -1).repeat(4, 1) / 0.6
    assert torch.allclose(seen["x0"], want)



@pytest.mark.parametrize("finite", [True, False])
def test_sampled_token_falls_back_to_the_ground_truth_without_a_draw(finite):
    """The released fallback: when the last-scale logits are not all finite, the residual is relative to
    the ground-truth token and nothing is drawn (the generator is left as it was)."""
    m = make_model(diff_weight=0.0)
    batch = make_batch(m)
    B, n = 2, 16
    if not finite:
        with torch.no_grad():
            m.head.bias[3] = torch.inf
    mul_rows = m.config.diffusion_batch_mul * B * n
    draws = TrainDraws(torch.arange(n).repeat(B, 1), torch.zeros(B, dtype=torch.bool),
                       diff_t=torch.zeros(mul_rows, dtype=torch.long), diff_noise=torch.zeros(mul_rows, m.config.Cvae))
    seen = {}
    m.diffloss.train_diffusion.q_sample = lambda x0, t, noise: seen.setdefault("x0", x0)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    m(**batch, draws=draws, generator=g)
    gt_last = batch["gt_idx"][:, -n:]
    relative_to_gt = (batch["f_rest_last"] - batch["codebook"][gt_last]).reshape(B * n, -1).repeat(4, 1) / 0.6
    assert torch.equal(g.get_state(), state) != finite
    assert torch.allclose(seen["x0"], relative_to_gt) != finite


def test_text_drop_uses_randn_by_default():
    m = make_model()
    g = torch.Generator().manual_seed(0)
    drops = torch.stack([m.draw_training_randomness(64, "cpu", g).drop_text for _ in range(20)]).float().mean()
    assert 0.45 < drops.item() < 0.63  # P(randn < 0.1) = 0.54
    m2 = make_model(cond_drop_randn=False)
    drops2 = torch.stack([m2.draw_training_randomness(64, "cpu", g).drop_text for _ in range(20)]).float().mean()
    assert drops2.item() < 0.16


def test_truncnorm_mask_rate():
    g = torch.Generator().manual_seed(0)
    xs = torch.tensor([truncnorm_sample(0.5, 1.0, 1.0, 0.25, g) for _ in range(4000)])
    assert xs.min() >= 0.5 and xs.max() <= 1.0
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = 1.0 + 0.25 * (phi(-2.0) - phi(0.0)) / (0.5 - 0.5 * math.erfc(2 / math.sqrt(2)))
    assert abs(xs.mean().item() - mean) < 0.01


def test_total_loss_falls_on_a_fixed_batch():
    m = make_model(patch_nums=(1, 2, 4), cond_drop_rate=0.0)
    m.train()
    batch = make_batch(m, B=4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(24):
        out = m(**batch, generator=torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses


def test_grad_checkpointing_gives_the_same_gradients():
    m = make_model(drop_path_rate=0.3).train()
    batch = make_batch(m)
    grads = []
    for ckpt in (False, True):
        m.set_grad_checkpointing(ckpt)
        m.zero_grad()
        m(**batch, generator=torch.Generator().manual_seed(1))["loss"].backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------- sampling
def _next_input_fn(patch_nums):
    import torch.nn.functional as F

    def fn(si, f_hat, h_BChw):
        f_hat = f_hat + F.interpolate(h_BChw, size=(patch_nums[-1],) * 2, mode="bicubic")
        return f_hat, F.interpolate(f_hat, size=(patch_nums[si + 1],) * 2, mode="area")

    return fn


def test_sampling_is_seeded_and_uses_the_tokenizer_callables():
    m = make_model(patch_nums=(1, 2, 3, 4)).eval()
    batch = make_batch(m)
    fn = _next_input_fn(m.patch_nums)
    calls = []

    def next_fn(si, f_hat, h):
        calls.append((si, tuple(h.shape)))
        return fn(si, f_hat, h)

    kw = dict(context=batch["context"], context_mask=batch["context_mask"], codebook=batch["codebook"])
    a = m.autoregressive_infer_cfg(**kw, next_input_fn=next_fn, generator=torch.Generator().manual_seed(0))
    b = m.autoregressive_infer_cfg(**kw, next_input_fn=fn, generator=torch.Generator().manual_seed(0))
    c = m.autoregressive_infer_cfg(**kw, next_input_fn=fn, generator=torch.Generator().manual_seed(1), more_smooth=True)
    assert a.shape == (2, m.config.Cvae, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)
    assert calls == [(0, (2, 8, 1, 1)), (1, (2, 8, 2, 2)), (2, (2, 8, 3, 3))]
    img = m.autoregressive_infer_cfg(**kw, next_input_fn=fn, fhat_to_img=lambda f: f.tanh(), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(img, a.tanh().add(1).mul(0.5))
    no_diff = m.autoregressive_infer_cfg(**kw, next_input_fn=fn, generator=torch.Generator().manual_seed(0), use_diffusion=False)
    assert no_diff.shape == a.shape


def _sampler_kw(m: HARTForT2I) -> dict:
    batch = make_batch(m)
    # top-k below V at every scale, so the filtered (zero-probability) tokens are part of every draw
    return dict(context=batch["context"], context_mask=batch["context_mask"], codebook=batch["codebook"],
                next_input_fn=_next_input_fn(m.patch_nums), top_k=20, top_k_late=10, top_k_late_from=2)


@pytest.mark.parametrize("more_smooth, top_p", [(False, 0.0), (False, 0.8), (True, 0.0)])
def test_supplied_draws_replace_every_generator_draw(more_smooth, top_p):
    m = make_model(patch_nums=(1, 2, 3, 4)).eval()
    with torch.no_grad():  # off MAR's zero init, so the residual depends on the sampled last-scale token too
        for p in m.diffloss.parameters():
            p.normal_(std=0.2)
    kw = dict(_sampler_kw(m), more_smooth=more_smooth, top_p=top_p)
    default = m.autoregressive_infer_cfg(**kw, generator=torch.Generator().manual_seed(5))
    draws = m.draw_sampling_randomness(2, "cpu", torch.Generator().manual_seed(5), more_smooth)
    assert [tuple(q.shape) for q in draws.token_exp] == [(2, 1, 64), (2, 4, 64), (2, 9, 64), (2, 16, 64)]
    assert (draws.gumbel_exp is not None) == more_smooth
    assert tuple(draws.diff_noise.shape) == (2 * 16, 8) and tuple(draws.diff_step_noise.shape) == (8, 4 * 16, 8)
    # the draws the seed gives reproduce its sample exactly, whatever the generator, which is not touched
    outs = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        state = g.get_state()
        outs.append(m.autoregressive_infer_cfg(**kw, generator=g, draws=draws))
        assert torch.equal(g.get_state(), state)
    assert torch.equal(outs[0], default) and torch.equal(outs[1], default)
    rng = torch.random.get_rng_state()  # without a generator: the global RNG is not touched either
    assert torch.equal(m.autoregressive_infer_cfg(**kw, draws=draws), default)
    assert torch.equal(torch.random.get_rng_state(), rng)
    other = m.draw_sampling_randomness(2, "cpu", torch.Generator().manual_seed(6), more_smooth)
    assert not torch.equal(m.autoregressive_infer_cfg(**kw, draws=other), default)


def test_token_draws_are_the_exp_draws_of_multinomial():
    """The form of the token draws: for the Exp(1) draws q behind `torch.multinomial(probs, 1)`, the token
    is argmax(probs / q); a replay of the VAR sampler's own calls on one generator matches it."""
    m = make_model(patch_nums=(1, 2, 3, 4)).eval()
    kw = _sampler_kw(m)
    draws = m.draw_sampling_randomness(2, "cpu", torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for pn, q in zip(m.patch_nums, draws.token_exp):
        probs = torch.randn(2 * pn * pn, 64, generator=torch.Generator().manual_seed(pn)).mul(3).softmax(-1)
        assert torch.equal(torch.multinomial(probs, 1, replacement=True, generator=g)[:, 0],
                           (probs / q.reshape(-1, 64)).argmax(-1))
    # only the diffusion noise given: the tokens still come from the generator, in the default order
    diff_only = SampleDraws(diff_noise=draws.diff_noise, diff_step_noise=draws.diff_step_noise)
    assert torch.equal(m.autoregressive_infer_cfg(**kw, generator=torch.Generator().manual_seed(0), draws=diff_only),
                       m.autoregressive_infer_cfg(**kw, generator=torch.Generator().manual_seed(0)))
    # only the token draws given, no diffusion: the generator is not needed
    tokens_only = SampleDraws(token_exp=draws.token_exp)
    a, b = (m.autoregressive_infer_cfg(**kw, generator=torch.Generator().manual_seed(s), draws=tokens_only,
                                       use_diffusion=False) for s in (1, 2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("change, message, use_diffusion", [
    (lambda d: SampleDraws(token_exp=d.token_exp[:3]), r"token_exp holds 3 tensors, expected one per scale \(4\)", True),
    (lambda d: SampleDraws(token_exp=[*d.token_exp[:2], d.token_exp[2][:, :4], d.token_exp[3]]),
     r"token_exp\[2\] has shape \(2, 4, 64\), expected \(B, pn\^2, V\) = \(2, 9, 64\)", True),
    (lambda d: SampleDraws(token_exp=[q[:1] for q in d.token_exp]), r"token_exp\[0\] has shape \(1, 1, 64\)", True),
    (lambda d: SampleDraws(gumbel_exp=d.token_exp), "gumbel_exp is given but unused", True),
    (lambda d: SampleDraws(diff_noise=d.diff_step_noise[0]), r"diff_noise has shape \(64, 8\), expected .* = \(32, 8\)", True),
    (lambda d: SampleDraws(diff_step_noise=d.diff_step_noise[1:]), r"diff_step_noise has shape \(7, 64, 8\)", True),
    (lambda d: d, r"diff_noise / diff_step_noise are given but unused: use_diffusion=False", False),
])
def test_misshapen_or_unused_draws_are_refused_before_sampling(change, message, use_diffusion):
    m = make_model(patch_nums=(1, 2, 3, 4)).eval()
    draws = m.draw_sampling_randomness(2, "cpu", torch.Generator().manual_seed(0))
    calls = []
    with pytest.raises(ValueError, match=message):
        m.autoregressive_infer_cfg(**dict(_sampler_kw(m), next_input_fn=lambda *a: calls.append(a)), draws=change(draws),
                                   use_diffusion=use_diffusion)
    assert calls == []  # refused before the first scale
