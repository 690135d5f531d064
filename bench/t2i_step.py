"""HART transformer benchmarks: 1024px training step (block-sparse vs dense-mask attention), ZeRO-3
per-rank memory, and sampling latency with and without the KV cache. Prints one JSON object.

    python bench/t2i_step.py [--repeats 5] [--warmup 1] [--skip step,micro,zero,sample] [--depth 16]
                             [--host-malloc keep|default]

1. `train_step`: forward + backward + AdamW step of `HARTForT2I` at small width and the released depth
   (16 blocks or `--depth`, C 128, 4 heads, V 4096, Cv 32, 300 x 64 text) on the full 1024px schedule,
   batch 1, with the model's block-sparse attention and with a dense additive fp32 mask, both with the
   released last-scale token dropping and
   with it disabled (`last_scale_min_keep = 4096`, the whole 9750-token sequence). The two kernels run
   interleaved on identically initialised models and identical random draws (one generator seed per
   step), so the sequence length is the same for both. The model routes all training attention through
   `models/kernels.block_causal`; each variant is registered there and selected for the duration of
   its step. The dense mask is built once per
   layout and reused, like the released code's persistent `attn_bias_for_masking` buffer (the repo's
   `attention.dense_masked_attention` rebuilds it at every call, ~1 s more per call at L = 9750 here).
   Tokens/s counts the transformer sequence (text + image inputs after dropping) per step. The mask only
   touches the blocks' attention: the head (V 4096 over every image position), the loss and the last-scale
   sampling run once per step whatever the depth, so the speedup grows with `--depth` toward the
   per-block one (`--depth 2`, this bench's default until session 4 and 8x faster to run, weighs the
   once-per-step work 8x more than the released model does).
   The process keeps freed host memory (`hart_train.host_memory`, as the trainer does by default;
   `--host-malloc default` for glibc's own behaviour), so steps do not page-fault their buffers in anew;
   each kernel reports its median minor page faults and system CPU per step, and `peak_rss_mb` the
   process's peak resident memory.
   A profiled step of each kernel breaks the time down by operator group.
2. `attention_micro`: forward + backward of one attention call at L = 9750, 4 heads x 64, block-sparse
   against SDPA with the prebuilt dense mask, and the fraction of (query, key) pairs the block-causal
   mask allows, which bounds the FLOP saving.
3. `zero3_memory`: `deepspeed.initialize` with ZeRO-3 (every parameter sharded, fp32, torch AdamW) in 1
   and 2 spawned gloo ranks, one training step, then per rank the bytes actually held by parameter
   partitions (`ds_tensor`), the fp32 master partitions and the Adam moments.
4. `sampling`: `autoregressive_infer_cfg` (KV cache) against the same sampler whose transformer pass
   recomputes the whole prefix at every scale (`PrefixRecomputeHART.forward_scale` below: no cache,
   block-causal over text + all scales so far, the last scale's hidden states returned). Everything
   else (CFG, top-k, next-scale input from the tokenizer's quantizer, the diffusion head) is the
   model's own code, so the difference is the cache alone; the outputs are compared.
Timings are wall-clock medians of interleaved rounds. The machine is shared, so the minimum wall time
(the round least disturbed by other users) and the median process CPU time are reported next to them,
with a speedup from each.
Targets (issue): step >= 1.5x faster than the dense mask at 1024px; ZeRO-3 per-rank bytes within 5% of 1/N.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, free_port, load_average, log, summarize, time_interleaved  # noqa: E402

from hart_train import host_memory  # noqa: E402
from hart_train.models import HARTForT2I, hart_config  # noqa: E402
from hart_train.models import kernels  # noqa: E402
from hart_train.models.attention import block_causal_attention, block_causal_mask  # noqa: E402
from hart_train.models.hart_t2i import PATCH_NUMS_1024  # noqa: E402
from hart_train.models.rope import image_positions, rope_1d, rope_2d  # noqa: E402
from tokenizer.autoencoder import PATCH_NUMS_BY_RESOLUTION, HARTAutoEncoder, tokenizer_config  # noqa: E402

STEP_MODEL = dict(depth=16, embed_dim=128, num_heads=4, patch_nums=PATCH_NUMS_1024, context_token=300, context_dim=64,
                  vocab_size=4096, Cvae=32, diff_width=128, diff_depth=2)
ZERO_MODEL = dict(depth=4, embed_dim=256, num_heads=4, patch_nums=(1, 2, 3, 4), context_token=16, context_dim=64,
                  vocab_size=4096, Cvae=32, diff_width=256, diff_depth=2)
SAMPLE_MODEL = dict(patch_nums=PATCH_NUMS_BY_RESOLUTION[256], context_token=300)  # on top of the "tiny" preset


# ---------------------------------------------------------------------- attention kernels
_MASK_CACHE: dict[tuple, torch.Tensor] = {}


def dense_attention_persistent_mask(q_BHLd, k_BHLd, v_BHLd, seg_lens, scale):
    """SDPA with the dense additive fp32 (L, L) mask, built once per layout and kept (the released
    code's persistent buffer); same signature as `block_causal_attention`."""
    key = (tuple(seg_lens), q_BHLd.device, q_BHLd.dtype)
    if key not in _MASK_CACHE:
        _MASK_CACHE.clear()
        _MASK_CACHE[key] = block_causal_mask(seg_lens, q_BHLd.device, q_BHLd.dtype)
    return F.scaled_dot_product_attention(q_BHLd, k_BHLd, v_BHLd, attn_mask=_MASK_CACHE[key], scale=scale)


KERNELS = {"block_sparse": block_causal_attention, "dense_mask": dense_attention_persistent_mask}


@contextlib.contextmanager
def attention_kernel(name: str):
    """Route the model's training attention through `KERNELS[name]` (registered with models/kernels.py,
    the one function blocks.py calls)."""
    saved = kernels.active_attention()
    kernels.ATTENTION[f"bench_{name}"] = KERNELS[name]
    kernels.set_attention(f"bench_{name}")
    try:
        yield
    finally:
        kernels.set_attention(saved)


def allowed_fraction(seg_lens) -> float:
    """Fraction of the L x L (query, key) pairs the block-causal mask keeps."""
    allowed, prefix = 0, 0
    for n in seg_lens:
        prefix += n
        allowed += n * prefix
    return allowed / sum(seg_lens) ** 2


# ---------------------------------------------------------------------- 1. training step
def make_batch(model: HARTForT2I, B: int = 1, seed: int = 0) -> dict:
    cfg, g = model.config, torch.Generator().manual_seed(seed)
    n_last = cfg.patch_nums[-1] ** 2
    return {
        "context": torch.randn(B, cfg.context_token, cfg.context_dim, generator=g),
        "context_mask": torch.ones(B, cfg.context_token, dtype=torch.long),
        "x_BLCv_wo_first_l": torch.randn(B, model.L - 1, cfg.Cvae, generator=g),
        "gt_idx": torch.randint(cfg.vocab_size, (B, model.L), generator=g),
        "f_rest_last": torch.randn(B, n_last, cfg.Cvae, generator=g),
        "codebook": torch.randn(cfg.vocab_size, cfg.Cvae, generator=g),
    }


def expected_kept_last(cfg) -> int:
    """Mean number of kept last-scale tokens: n * (1 - E[rate]), rate ~ N(1, 0.25) truncated to [min, 1]."""
    n, sd = cfg.patch_nums[-1] ** 2, 0.25
    a = (cfg.mask_ratio_min - 1.0) / sd
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    mean_rate = 1.0 + sd * (phi(a) - phi(0.0)) / (Phi(0.0) - Phi(a))  # truncated-normal mean on [a, 0]
    return max(cfg.last_scale_min_keep, round(n * (1 - mean_rate)))


def typical_draw_seed(model: HARTForT2I, tolerance: float = 0.03) -> int:
    """The first generator seed whose last-scale keep count is within `tolerance` of the mean, so the
    timed sequence is a typical one (every step reuses it, for both kernels)."""
    want = expected_kept_last(model.config)
    for seed in range(10_000):
        k = model.draw_training_randomness(1, "cpu", torch.Generator().manual_seed(seed)).keep_last_idx.shape[1]
        if abs(k - want) <= tolerance * want:
            return seed
    raise AssertionError(f"no draw within {tolerance:.0%} of {want} kept tokens")


class Trainer:
    """One model + AdamW + fixed batch; `step()` is one timed unit (zero_grad, fwd, bwd, optimizer step)."""

    def __init__(self, kernel: str, drop: bool):
        overrides = {} if drop else {"last_scale_min_keep": PATCH_NUMS_1024[-1] ** 2}
        torch.manual_seed(0)
        self.model = HARTForT2I(hart_config("tiny", **STEP_MODEL, **overrides)).train()
        draw_seed = typical_draw_seed(self.model) if drop else 0
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        self.batch, self.kernel, self.draw_seed = make_batch(self.model), kernel, draw_seed
        self.losses: list[float] = []
        self.faults_and_system_s: list[tuple[int, float]] = []  # per step: minor page faults, system CPU s
        self.num_kept_last = -1

    def step(self):
        before = resource.getrusage(resource.RUSAGE_SELF)
        self.opt.zero_grad(set_to_none=True)
        with attention_kernel(self.kernel):
            out = self.model(**self.batch, generator=torch.Generator().manual_seed(self.draw_seed))
            out["loss"].backward()
        self.opt.step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.faults_and_system_s.append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
        self.losses.append(out["loss"].item())
        self.num_kept_last = int(out["num_kept_last"])

    def seq_len(self) -> int:
        cfg = self.model.config
        return cfg.context_token + self.model.L - 1 - cfg.patch_nums[-1] ** 2 + self.num_kept_last


_OP_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    # gradient buffers: zero-fills, copies, concatenations and accumulations
    "fill_copy_cat_add": ("aten::fill_", "aten::zero_", "aten::copy_", "aten::cat", "aten::add_"),
    # the training forward samples every kept last-scale token (top-k 600, top-p 0.96 over V=4096)
    "last_scale_sampling": ("aten::sort", "aten::topk", "aten::exponential_", "aten::multinomial", "aten::cumsum",
                            "aten::masked_fill_", "aten::_softmax", "aten::scatter"),
}


def _op_group(name: str) -> str:
    if name.startswith("aten::_scaled_dot_product_flash_attention_for_cpu"):
        return "sdpa_backward" if name.endswith("backward") else "sdpa_forward"
    return next((g for g, names in _OP_GROUPS.items() if name in names), "other")


def profile_step(trainer: Trainer) -> dict:
    """Self CPU time (s) of one step, grouped by operator kind."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step()
    out = dict.fromkeys(("sdpa_forward", "sdpa_backward", *_OP_GROUPS, "other"), 0.0)
    for ev in prof.key_averages():
        out[_op_group(ev.key)] += ev.self_cpu_time_total / 1e6
    total = sum(out.values())
    return {"total_s": round(total, 3), **{k: {"s": round(v, 3), "share": round(v / total, 3)} for k, v in out.items()}}


def bench_train_step(repeats: int, warmup: int, do_profile: bool) -> dict:
    results = {"config": {**{k: list(v) if isinstance(v, tuple) else v for k, v in STEP_MODEL.items()},
                          "batch": 1, "optimizer": "torch AdamW (fp32)", "dtype": "fp32",
                          "dense_mask": "additive fp32 (L, L), built once per layout (persistent, as released)",
                          "sequence_before_dropping": STEP_MODEL["context_token"] + sum(p * p for p in PATCH_NUMS_1024) - 1}}
    for drop in (True, False):
        label = "with_last_scale_dropping" if drop else "without_dropping"
        log(f"[train_step] {label}")
        trainers = {k: Trainer(k, drop) for k in KERNELS}
        load_before = load_average()
        times = time_interleaved({k: t.step for k, t in trainers.items()}, repeats, warmup)
        ref = trainers["block_sparse"]
        L = ref.seq_len()
        row = {"sequence_length": L, "num_kept_last_scale": ref.num_kept_last, "draw_seed": ref.draw_seed,
               "expected_kept_last_scale": expected_kept_last(ref.model.config) if drop else PATCH_NUMS_1024[-1] ** 2,
               "allowed_pair_fraction": round(allowed_fraction(
                   [STEP_MODEL["context_token"]] + [p * p for p in PATCH_NUMS_1024[1:-1]] + [ref.num_kept_last]), 4),
               "load_average_before_after": [load_before, load_average()]}
        for k, t in trainers.items():
            s = summarize(times[k]["wall"], times[k]["cpu"])
            s["tokens_per_s"] = round(L / s["median_s"], 1)
            timed = t.faults_and_system_s[-repeats:]  # the timed steps (warm-up ones came first)
            s["median_minor_page_faults_per_step"] = statistics.median(f for f, _ in timed)
            s["median_system_cpu_s_per_step"] = round(statistics.median(sys_s for _, sys_s in timed), 3)
            s["first_loss"] = round(t.losses[0], 6)
            row[k] = s
        row["speedup_dense_over_block_sparse"] = round(row["dense_mask"]["median_s"] / row["block_sparse"]["median_s"], 3)
        row["speedup_cpu_time"] = round(row["dense_mask"]["median_cpu_s"] / row["block_sparse"]["median_cpu_s"], 3)
        row["speedup_min_wall"] = round(row["dense_mask"]["min_s"] / row["block_sparse"]["min_s"], 3)
        row["speedup_per_round"] = [round(d / b, 3) for b, d in zip(times["block_sparse"]["wall"], times["dense_mask"]["wall"])]
        row["first_loss_equal"] = math.isclose(row["dense_mask"]["first_loss"], row["block_sparse"]["first_loss"], rel_tol=1e-4)
        if do_profile:
            log(f"[train_step] profiling one step per kernel ({label})")
            row["profile_self_cpu_s"] = {k: profile_step(t) for k, t in trainers.items()}
        results[label] = row
        del trainers
        _MASK_CACHE.clear()
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # the whole process
    results["target_1_5x_met"] = {label: results[label]["speedup_dense_over_block_sparse"] >= 1.5
                                  for label in ("without_dropping", "with_last_scale_dropping")}
    return results


# ---------------------------------------------------------------------- 2. attention microbenchmark
def bench_attention_micro(repeats: int, warmup: int, heads: int = 4, head_dim: int = 64) -> dict:
    seg = [STEP_MODEL["context_token"]] + [p * p for p in PATCH_NUMS_1024[1:]]
    L, g = sum(seg), torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, L, head_dim, generator=g, requires_grad=True) for _ in range(3))
    scale = 0.25 / math.sqrt(head_dim)
    kernels = {"block_sparse": block_causal_attention, "dense_mask_persistent": dense_attention_persistent_mask}

    def run(fn):
        def call():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v, seg, scale).sum().backward()
        return call

    log("[attention_micro] fwd+bwd, L=%d" % L)
    load_before = load_average()
    times = time_interleaved({n: run(f) for n, f in kernels.items()}, repeats, warmup)
    _MASK_CACHE.clear()
    out = {"config": {"B": 1, "heads": heads, "head_dim": head_dim, "L": L, "dtype": "fp32", "pass": "forward+backward"},
           "allowed_pair_fraction": round(allowed_fraction(seg), 4),
           "load_average_before_after": [load_before, load_average()]}
    out.update({n: summarize(t["wall"], t["cpu"]) for n, t in times.items()})
    bs = out["block_sparse"]["median_s"]
    out["speedup_vs_dense_persistent"] = round(out["dense_mask_persistent"]["median_s"] / bs, 3)
    out["speedup_min_wall_vs_dense_persistent"] = round(out["dense_mask_persistent"]["min_s"] / out["block_sparse"]["min_s"], 3)
    out["speedup_cpu_time_vs_dense_persistent"] = round(
        out["dense_mask_persistent"]["median_cpu_s"] / out["block_sparse"]["median_cpu_s"], 3)
    return out


# ---------------------------------------------------------------------- 3. ZeRO-3 memory
def zero3_bytes_held(engine, ds_opt) -> dict:
    """This rank's parameter partitions, fp32 master partitions and Adam moments, in bytes: by tensor size,
    and by distinct storage (a storage shared between categories is counted once)."""
    seen: set[int] = set()

    def distinct(tensors) -> int:
        total = 0
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total

    params = [p.ds_tensor for p in engine.module.parameters()]
    master = list(ds_opt.fp32_partitioned_groups_flat)
    moments = [s[key] for s in ds_opt.optimizer.state.values() for key in ("exp_avg", "exp_avg_sq") if key in s]
    sizes = {name: sum(t.numel() * t.element_size() for t in ts)
             for name, ts in (("param_partition_bytes", params), ("fp32_master_partition_bytes", master),
                              ("adam_state_bytes", moments))}
    held = {"params": distinct(params), "fp32_master": distinct(master), "adam": distinct(moments)}
    return {
        **sizes,
        "total_bytes": sum(sizes.values()),
        "distinct_storage_bytes": {**held, "total": sum(held.values())},
        "num_adam_state_tensors": len(moments),
        # ZeRO-3 leaves empty placeholders outside the forward: 0 means no full parameter is held
        "module_param_numel_outside_forward": sum(p.numel() for p in engine.module.parameters()),
    }


def _zero_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.dup2(2, 1)  # DeepSpeed prints to stdout; keep the parent's stdout for the one JSON object
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    from hart_train import distributed

    distributed.init("cpu", timeout_s=300)
    torch.manual_seed(0)
    model = HARTForT2I(hart_config("tiny", **ZERO_MODEL)).train()
    num_params = sum(p.numel() for p in model.parameters())
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 5e6,
                              "allgather_bucket_size": 5e6, "stage3_prefetch_bucket_size": 5e6,
                              "contiguous_gradients": True, "overlap_comm": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    batch = make_batch(model, B=1, seed=0)
    out = engine(**batch, generator=torch.Generator().manual_seed(0))
    engine.backward(out["loss"])
    engine.step()

    result = {"rank": rank, "world_size": world, "num_params": num_params, "loss": out["loss"].item(),
              **zero3_bytes_held(engine, ds_opt)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    distributed.barrier()
    distributed.destroy()


def bench_zero3() -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    per_world = {}
    for world in (1, 2):
        log(f"[zero3] {world} rank(s)")
        with tempfile.TemporaryDirectory() as d:
            start = time.perf_counter()
            mp.spawn(_zero_worker, args=(world, free_port(), d), nprocs=world, join=True)
            ranks = []
            for r in range(world):
                with open(os.path.join(d, f"rank{r}.json")) as f:
                    ranks.append(json.load(f))
        per_world[world] = {"seconds": round(time.perf_counter() - start, 1), "ranks": ranks}
    one = per_world[1]["ranks"][0]["total_bytes"]
    out = {"config": {**{k: list(v) if isinstance(v, tuple) else v for k, v in ZERO_MODEL.items()},
                      "zero_stage": 3, "stage3_param_persistence_threshold": 0, "bucket_sizes": 5e6, "dtype": "fp32",
                      "optimizer": "torch AdamW (client)", "backend": "gloo", "launcher": "torch.multiprocessing.spawn"},
           "world_1": per_world[1], "world_2": per_world[2]}
    ratios = [r["total_bytes"] / (one / 2) for r in per_world[2]["ranks"]]
    out["per_rank_total_over_ideal_1_over_N"] = [round(x, 4) for x in ratios]
    out["target_within_5pct_met"] = all(abs(x - 1) <= 0.05 for x in ratios)
    return out


# ---------------------------------------------------------------------- 4. sampling
class PrefixRecomputeHART(HARTForT2I):
    """The no-cache baseline: every scale reruns the transformer over text + all scale inputs so far
    (block-causal, teacher-forcing layout) and returns the newest scale's hidden states. The KV cache
    object the sampler passes in is ignored; the prefix is kept here for the duration of one sample."""

    def forward_scale(self, si, x_BlC, text, cache):
        self._prefix = [x_BlC] if si == 0 else self._prefix + [x_BlC]
        hd = self.config.embed_dim // self.config.num_heads
        cos, sin = rope_1d(text.position_ids_BT, hd)
        if si > 0:
            cos_i, sin_i = rope_2d(image_positions(self.patch_nums, range(1, si + 1), text.position_ids_BT[:, -1]), hd)
            cos, sin = torch.cat((cos, cos_i), dim=1), torch.cat((sin, sin_i), dim=1)
        seg_lens = [x.shape[1] for x in self._prefix]
        with torch.no_grad():
            h = self._run_blocks(torch.cat(self._prefix, dim=1), text.pooled_BC, cos, sin, seg_lens=seg_lens)
        return h[:, -x_BlC.shape[1]:]


def bench_sampling(repeats: int, warmup: int) -> dict:
    cfg = hart_config("tiny", **SAMPLE_MODEL)
    torch.manual_seed(0)
    cached = HARTForT2I(cfg).eval()
    recompute = PrefixRecomputeHART(cfg).eval()
    recompute.load_state_dict(cached.state_dict())
    tok_cfg = tokenizer_config("tiny", patch_nums=cfg.patch_nums, vocab_size=cfg.vocab_size, z_channels=cfg.Cvae)
    vae = HARTAutoEncoder(tok_cfg).eval()
    S = len(cfg.patch_nums)

    def next_input_fn(si, f_hat, h_BChw):
        return vae.get_next_autoregressive_input(si, S, f_hat, h_BChw)

    g = torch.Generator().manual_seed(0)
    B = 1
    context = torch.randn(B, cfg.context_token, cfg.context_dim, generator=g)
    mask = torch.ones(B, cfg.context_token, dtype=torch.long)
    codebook = vae.quantize.embedding.weight.detach()
    outputs = {}

    def run(name, model):
        def call():
            outputs[name] = model.autoregressive_infer_cfg(context, mask, codebook, next_input_fn,
                                                           generator=torch.Generator().manual_seed(0))
        return call

    log("[sampling] KV cache vs prefix recompute")
    load_before = load_average()
    times = time_interleaved({"kv_cache": run("kv_cache", cached), "no_cache_prefix_recompute": run("no_cache", recompute)},
                             repeats, warmup)
    out = {"config": {"preset": "tiny", **{k: list(v) if isinstance(v, tuple) else v for k, v in SAMPLE_MODEL.items()},
                      "depth": cfg.depth, "embed_dim": cfg.embed_dim, "num_heads": cfg.num_heads, "vocab_size": cfg.vocab_size,
                      "Cvae": cfg.Cvae, "batch": B, "cfg": 4.5, "diffusion_steps": cfg.num_sampling_steps,
                      "tokenizer": "tokenizer.autoencoder.HARTAutoEncoder(tokenizer_config('tiny', patch_nums=...))"},
           "load_average_before_after": [load_before, load_average()],
           "kv_cache": summarize(times["kv_cache"]["wall"], times["kv_cache"]["cpu"]),
           "no_cache_prefix_recompute": summarize(times["no_cache_prefix_recompute"]["wall"],
                                                  times["no_cache_prefix_recompute"]["cpu"])}
    out["config"]["includes"] = f"{S} transformer passes with CFG (batch 2B), sampling, next-scale input, diffusion head; no image decode"
    out["speedup_kv_cache"] = round(out["no_cache_prefix_recompute"]["median_s"] / out["kv_cache"]["median_s"], 3)
    out["speedup_kv_cache_min_wall"] = round(out["no_cache_prefix_recompute"]["min_s"] / out["kv_cache"]["min_s"], 3)
    out["speedup_kv_cache_cpu_time"] = round(
        out["no_cache_prefix_recompute"]["median_cpu_s"] / out["kv_cache"]["median_cpu_s"], 3)
    out["outputs_max_abs_diff"] = float((outputs["kv_cache"] - outputs["no_cache"]).abs().max())
    return out


# ---------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--micro-repeats", type=int, default=3)
    p.add_argument("--sample-repeats", type=int, default=5)
    p.add_argument("--skip", default="", help="comma-separated subset of: step,micro,zero,sample")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--depth", type=int, default=STEP_MODEL["depth"],
                   help="transformer blocks of the train_step model (the released 0.7B model has 16; attention "
                        "is per block, the head, loss and last-scale sampling once per step)")
    p.add_argument("--host-malloc", choices=("keep", "default"), default="keep",
                   help="keep: hart_train.host_memory.keep_freed_memory(), as the trainer; default: glibc's own")
    args = p.parse_args(argv)
    if args.depth < 1:
        raise ValueError(f"--depth must be >= 1, got {args.depth}")
    STEP_MODEL["depth"] = args.depth
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {"step", "micro", "zero", "sample"}
    if unknown:
        raise ValueError(f"--skip: unknown parts {sorted(unknown)}")
    start = time.perf_counter()
    result = {"environment": environment()}
    result["environment"]["host_malloc"] = args.host_malloc
    if args.host_malloc == "keep":
        result["environment"]["host_malloc_settings_accepted"] = host_memory.keep_freed_memory()
    if "step" not in skip:
        result["train_step"] = bench_train_step(args.repeats, args.warmup, not args.no_profile)
    if "micro" not in skip:
        result["attention_micro"] = bench_attention_micro(args.micro_repeats, args.warmup)
    if "zero" not in skip:
        result["zero3_memory"] = bench_zero3()
    if "sample" not in skip:
        result["sampling"] = bench_sampling(args.sample_repeats, args.warmup)
    result["environment"]["load_average_at_end"] = load_average()
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
