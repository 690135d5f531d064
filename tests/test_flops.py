"""hart_train.flops against FLOPs counted on a real forward (torch's FlopCounterMode), and the expected
number of kept last-scale tokens against the model's own draws."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from hart_train.flops import expected_kept_last, sample_flops
from hart_train.models import HARTConfig, HARTForT2I
from hart_train.models.hart_t2i import TrainDraws

pytestmark = pytest.mark.usefixtures("one_torch_thread")
aten = torch.ops.aten


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # FlopCounterMode knows the CUDA SDPA kernels; the CPU one is the same computation
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def test_forward_flops_equal_the_counted_ones():
    cfg = HARTConfig(depth=2, embed_dim=64, num_heads=4, patch_nums=(1, 2, 4, 8), context_token=16, context_dim=32,
                     vocab_size=64, Cvae=8, diff_width=64, diff_depth=2, last_scale_min_keep=16)
    model = HARTForT2I(cfg)
    B, T, n, k = 2, 16, 64, 40
    L = sum(p * p for p in cfg.patch_nums)
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(B, n, generator=g).argsort(1)[:, :k].sort(1).values
    args = dict(context=torch.randn(B, T, 32), context_mask=torch.ones(B, T, dtype=torch.long),
                x_BLCv_wo_first_l=torch.randn(B, L - 1, 8), gt_idx=torch.randint(64, (B, L)),
                f_rest_last=torch.randn(B, n, 8), codebook=torch.randn(64, 8), generator=g,
                draws=TrainDraws(keep, torch.zeros(B, dtype=torch.bool)))
    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa})
    with counter:
        model(**args)
    counted = counter.get_total_flops()
    # the level embedding runs once per forward on S levels, whatever the batch: not a per-sample cost
    S, C = len(cfg.patch_nums), cfg.embed_dim
    counted -= 2 * S * (256 * C + C * C)
    assert counted == sample_flops(cfg, kept_last=k).forward * B


def test_expected_kept_last_matches_the_draws():
    cfg = HARTConfig(depth=1, embed_dim=64, num_heads=4, patch_nums=(1, 2, 4, 8), context_token=4, context_dim=8,
                     vocab_size=16, Cvae=4, diff_width=16, diff_depth=1)
    model = HARTForT2I(cfg)
    g = torch.Generator().manual_seed(0)
    kept = [model.draw_training_randomness(1, "cpu", g).keep_last_idx.shape[1] for _ in range(4000)]
    assert sum(kept) / len(kept) == pytest.approx(expected_kept_last(cfg), rel=0.01)
    assert expected_kept_last(HARTConfig(patch_nums=(1, 2, 4), last_scale_min_keep=32)) == 16  # n <= 32 drops none
