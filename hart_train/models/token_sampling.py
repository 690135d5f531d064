"""Token sampling primitives of the HART sampler: a truncated-normal draw, VAR's top-k / top-p filter, the
candidate form of it, multinomial sampling through Exp(1) draws (so the draws can be supplied), and
HART's gumbel smoothing. `hart_t2i` calls them; they hold no model state."""

from __future__ import annotations

import torch


def truncnorm_sample(lo: float, hi: float, loc: float, scale: float, generator=None, device=None) -> float:
    """One draw of N(loc, scale) truncated to [lo, hi], by inverting the CDF (no scipy)."""
    a = torch.tensor((lo - loc) / scale, dtype=torch.float64)
    b = torch.tensor((hi - loc) / scale, dtype=torch.float64)
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64).cpu()
    ca, cb = torch.special.ndtr(a), torch.special.ndtr(b)
    x = torch.special.ndtri(ca + u * (cb - ca)).clamp(a, b)
    return float(loc + scale * x)


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """A copy of the logits with everything outside top-k (clamped to V, 0 = off) and then outside the
    nucleus top-p (0 = off) set to -inf, as VAR's sampler does."""
    V = logits_BlV.shape[-1]
    logits = logits_BlV.clone()
    k = min(top_k, V)
    if 0 < k < V:
        kth = logits.topk(k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), -torch.inf)
    return logits


def _top_k_rows(flat_NV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values (N, k), vocabulary indices (N, k), tied (N,)) of each row's top k; a row is tied when
    more than k of its logits reach its k-th value (VAR's filter keeps all of those)."""
    vals, cand = flat_NV.topk(k, dim=-1, largest=True, sorted=False)
    tied = torch.count_nonzero(flat_NV >= vals.amin(dim=-1, keepdim=True), dim=-1) > k
    return vals, cand, tied


def _candidate_probs(vals_Nk: torch.Tensor, top_p: float) -> torch.Tensor:
    return filter_top_k_top_p(vals_Nk[:, None], 0, top_p).softmax(dim=-1)[:, 0]


def top_k_candidates(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(probabilities (N, k), vocabulary indices (N, k)) of the filtered distribution over its only
    possible tokens, the top k of each row (N = B * l); None where top-k is off or a row has ties at its
    k-th value (the filter keeps every tied token, so k candidates would not cover them: use the full
    filter). Equals `filter_top_k_top_p(...).softmax(-1)` restricted to the candidates, at k/V of its cost."""
    V = logits_BlV.shape[-1]
    k = min(top_k, V)
    if not 0 < k < V:
        return None
    vals, cand, tied = _top_k_rows(logits_BlV.reshape(-1, V), k)
    if bool(tied.any()):
        return None
    return _candidate_probs(vals, top_p), cand


def sample_top_k_top_p(logits_BlV: torch.Tensor, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    """(B, l) indices drawn from the filtered distribution with `generator`. With top-k on, each row is
    drawn over its k candidates only (`top_k_candidates`): the same distribution at k/V of the cost
    (sorting and exponential draws over the whole vocabulary). Rows tied at their k-th value, where the
    filter keeps more than k tokens, are drawn from the full filter; the others keep the fast path."""
    B, l, V = logits_BlV.shape
    flat = logits_BlV.reshape(-1, V)

    def draw(probs_NV: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs_NV, 1, replacement=True, generator=generator)[:, 0]

    k = min(top_k, V)
    if not 0 < k < V:
        return draw(filter_top_k_top_p(flat[:, None], top_k, top_p).softmax(dim=-1)[:, 0]).view(B, l)
    vals, cand, tied = _top_k_rows(flat, k)
    if not bool(tied.any()):
        return cand.gather(1, draw(_candidate_probs(vals, top_p))[:, None]).view(B, l)
    idx = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    free = ~tied
    if bool(free.any()):
        idx[free] = cand[free].gather(1, draw(_candidate_probs(vals[free], top_p))[:, None])[:, 0]
    idx[tied] = draw(filter_top_k_top_p(flat[tied][:, None], k, top_p).softmax(dim=-1)[:, 0])
    return idx.view(B, l)


def sample_filtered(logits_BlV: torch.Tensor, generator=None, exp_BlV: torch.Tensor | None = None) -> torch.Tensor:
    """(B, l) indices drawn from softmax(logits) (already filtered) with `torch.multinomial(probs, 1)`, or,
    with `exp_BlV` given, the same computation on those Exp(1) draws: argmax(probs / q), which is what
    multinomial computes for one sample with the q it draws from `generator`."""
    if exp_BlV is None:
        return sample_top_k_top_p(logits_BlV, 0, 0.0, generator)
    B, l, V = logits_BlV.shape
    probs = logits_BlV.reshape(-1, V).softmax(dim=-1)
    return (probs / exp_BlV.reshape(-1, V).to(probs)).argmax(dim=-1).view(B, l)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator=None, exp: torch.Tensor | None = None) -> torch.Tensor:
    """softmax((logits + g) / tau) with gumbel noise g = -log(q), q ~ Exp(1) from `generator` or `exp`."""
    q = torch.empty_like(logits).exponential_(generator=generator) if exp is None else exp.to(logits)
    return ((logits + -q.log()) / tau).softmax(dim=-1)
