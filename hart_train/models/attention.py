"""Block-causal attention over HART's scale segments without a dense mask.

Shape legend: B batch, H heads, L tokens, d head dim.

HART's training mask (T2I:245-262) gives every token a level: 0 for the text prefix, k for scale k. Token i
sees token j iff level(i) >= level(j). Because the sequence is sorted by level, the queries of one level
see exactly a contiguous prefix of the keys: the text and every scale up to their own. So attention is
computed per segment over its key prefix with plain SDPA and no mask. That never builds the L x L mask
(L = 9750 at 1024px, 380 MB in fp32), skips everything the mask would discard, and keeps a backward on CPU
(FlexAttention has none there). The segment lengths are the *actual* lengths, so the last scale's segment
is as short as the tokens kept by MAR-style dropping.

`dense_masked_attention` is the reference kernel (the released code's computation); tests and the
benchmark compare against it. It is the one alternative and lives behind its own function.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F


class _KeyPrefixes(torch.autograd.Function):
    """x[:, :, :end] for every `end` at once, with one backward for all of them.

    Sliced one at a time, each prefix's backward would build a full-size zero gradient, copy its part
    in and add the whole thing to the others (15 full-size buffers per tensor per layer at 1024px, ~7%
    of the step). Here the gradients of all prefixes are added, in place, into a single zeroed buffer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, ends: tuple[int, ...]):
        ctx.ends, ctx.shape = ends, x.shape
        return tuple(x[:, :, :end] for end in ends)

    @staticmethod
    def backward(ctx, *grads):
        out = None
        for end, grad in zip(ctx.ends, grads):
            if grad is None:
                continue
            if out is None:
                out = grad.new_zeros(ctx.shape)
            out[:, :, :end] += grad
        return out, None


def block_causal_attention(
    q_BHLd: torch.Tensor, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor, seg_lens: Sequence[int], scale: float
) -> torch.Tensor:
    """Attention where segment s attends to segments 0..s (bidirectionally within its own)."""
    assert sum(seg_lens) == q_BHLd.shape[2] == k_BHLd.shape[2], (seg_lens, q_BHLd.shape, k_BHLd.shape)
    seg_lens = [int(n) for n in seg_lens]
    ends = tuple(itertools.accumulate(seg_lens))
    queries = q_BHLd.split(seg_lens, dim=2)  # one backward node: a single concatenation of the gradients
    keys, values = _KeyPrefixes.apply(k_BHLd, ends), _KeyPrefixes.apply(v_BHLd, ends)
    outs = [F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale)
            for q, k, v in zip(queries, keys, values)]
    return torch.cat(outs, dim=2)


def block_causal_mask(seg_lens: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """The released code's additive mask (L, L): 0 where level(i) >= level(j), -inf elsewhere."""
    lvl = torch.cat([torch.full((n,), s, device=device) for s, n in enumerate(seg_lens)])
    return torch.where(lvl[:, None] >= lvl[None, :], 0.0, float("-inf")).to(dtype)


def dense_masked_attention(
    q_BHLd: torch.Tensor, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor, seg_lens: Sequence[int], scale: float
) -> torch.Tensor:
    """Reference: SDPA with the dense additive mask, as the released HART training forward runs it."""
    mask = block_causal_mask(seg_lens, q_BHLd.device, q_BHLd.dtype)
    return F.scaled_dot_product_attention(q_BHLd, k_BHLd, v_BHLd, attn_mask=mask, scale=scale)
