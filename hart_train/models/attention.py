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

from typing import Sequence

import torch
import torch.nn.functional as F


def block_causal_attention(
    q_BHLd: torch.Tensor, k_BHLd: torch.Tensor, v_BHLd: torch.Tensor, seg_lens: Sequence[int], scale: float
) -> torch.Tensor:
    """Attention where segment s attends to segments 0..s (bidirectionally within its own)."""
    assert sum(seg_lens) == q_BHLd.shape[2] == k_BHLd.shape[2], (seg_lens, q_BHLd.shape, k_BHLd.shape)
    outs, start = [], 0
    for n in seg_lens:
        end = start + n
        outs.append(
            F.scaled_dot_product_attention(
                q_BHLd[:, :, start:end], k_BHLd[:, :, :end], v_BHLd[:, :, :end], is_causal=False, scale=scale
            )
        )
        start = end
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
