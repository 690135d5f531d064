"""The sample order: a pure function of (manifest counts, seed, epoch, segments). No I/O, no torch.

Every sample of the concatenated datasets has a *global id*: shards are numbered in the order the
datasets and their manifests list them, and a sample's id is its shard's offset plus its index
inside the shard. The order is computed on ids alone, so resuming never replays or reads data.

1. Epoch order ``Q``: the shard list permuted by a generator seeded with ``(seed, epoch)``, each
   shard's ids in stored order. Reading ``Q`` front to back reads every shard sequentially.
2. A *segment* is a stretch of training with fixed (ranks R, workers per rank K, micro-batch B).
   Over the ``N`` ids still unconsumed in this epoch (in ``Q`` order) it runs ``T = ceil(N / (R*B))``
   steps; the ``T*R`` batches have sizes ``floor`` or ``ceil`` of ``N / (T*R)``, the larger ones first
   in (step, rank) order, so every rank steps exactly ``T`` times (DeepSpeed ranks step together) and
   nothing is dropped. Rank r takes a contiguous range of the remaining ids; inside it, worker w owns
   the rank's steps ``t % K == w`` and a contiguous sub-range sized to exactly those batches.
3. Inside a worker, the sub-range is cut into windows of ``window`` ids, each permuted by a generator
   seeded with ``(seed, epoch, segment, rank, worker, window index)``; the permuted sequence, cut
   into the worker's batch sizes, is the worker's output.

A segment's consumed ids after ``steps`` steps are therefore known without data: each worker has
emitted a prefix of its permuted sequence. Changing (R, K, B) closes the segment and the next one
plans over what is left, so every id of an epoch is consumed exactly once whatever the rank history.
Memory is O(samples) int64 per process (as in mosaicml/streaming), fine up to ~10^8 samples.
A segment that cannot give every (step, rank) batch at least one sample (micro-batch 1 with N not a
multiple of R, or N < R) is refused with ValueError rather than dropping or repeating samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Domain tags keep the shard-order and window-permutation streams of one (seed, epoch) apart.
_SHARD_STREAM = 0
_WINDOW_STREAM = 1


@dataclass(frozen=True)
class Segment:
    ranks: int
    workers: int
    batch: int
    steps: int = 0

    def to_dict(self) -> dict:
        return {"ranks": self.ranks, "workers": self.workers, "batch": self.batch, "steps": self.steps}

    @classmethod
    def from_dict(cls, d: dict) -> "Segment":
        try:
            seg = cls(int(d["ranks"]), int(d["workers"]), int(d["batch"]), int(d["steps"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"reader state: malformed segment {d!r} ({e!r})") from None
        if min(seg.ranks, seg.workers, seg.batch) < 1 or seg.steps < 0:
            raise ValueError(f"reader state: segment {d!r} needs ranks, workers, batch >= 1 and steps >= 0")
        return seg


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker of one rank emits in one segment."""

    start: int  # offset of its sub-range in the remaining ids
    ids: np.ndarray  # its contiguous sub-range of the remaining ids, in Q order
    sizes: np.ndarray  # planned sizes of its batches (steps worker, worker+K, ...)
    first_batch: int  # how many of those batches were already consumed
    seed_key: tuple  # (seed, epoch, segment, rank, worker): prefix of the window seeds
    window: int


def shard_offsets(counts: np.ndarray) -> np.ndarray:
    """Global id of each shard's first sample, plus the total at the end."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def epoch_order(counts: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """All global ids, shards shuffled by (seed, epoch), samples of a shard in stored order."""
    counts = np.asarray(counts, dtype=np.int64)
    offsets = shard_offsets(counts)
    perm = np.random.default_rng([seed, epoch, _SHARD_STREAM]).permutation(len(counts))
    counts_perm = counts[perm]
    starts_in_q = np.concatenate([[0], np.cumsum(counts_perm)[:-1]]).astype(np.int64)
    # id = shard offset + (position in Q - start of that shard in Q), vectorised with repeat.
    shift = np.repeat(offsets[perm] - starts_in_q, counts_perm)
    return shift + np.arange(int(counts.sum()), dtype=np.int64)


def num_steps(num_samples: int, ranks: int, batch: int) -> int:
    return -(-num_samples // (ranks * batch))


def batch_sizes(num_samples: int, ranks: int, batch: int) -> np.ndarray:
    """Sizes of the (step, rank) batches of a segment over `num_samples` ids, shape (T, R)."""
    steps = num_steps(num_samples, ranks, batch)
    total = steps * ranks
    if num_samples < total:
        # Only happens when B == 1 or fewer samples than ranks remain: some rank would get nothing.
        raise ValueError(
            f"cannot spread the {num_samples} remaining samples of the epoch over {steps} steps x {ranks} ranks "
            f"with micro-batch {batch} without an empty batch; use batch_size >= 2 and fewer ranks than samples"
        )
    base, extra = divmod(num_samples, total)
    flat = np.full(total, base, dtype=np.int64)
    flat[:extra] += 1
    return flat.reshape(steps, ranks)


def worker_plan(remaining: np.ndarray, seg: Segment, seg_index: int, seed: int, epoch: int,
                rank: int, worker: int, window: int) -> WorkerPlan:
    """The ids and batch sizes of (rank, worker) in segment `seg` over the `remaining` ids."""
    assert 0 <= rank < seg.ranks and 0 <= worker < seg.workers
    sizes = batch_sizes(len(remaining), seg.ranks, seg.batch)
    rank_start = int(sizes[:, :rank].sum())
    col = sizes[:, rank]
    steps = np.arange(len(col))
    before = int(col[steps % seg.workers < worker].sum())
    mine = col[steps % seg.workers == worker]
    start = rank_start + before
    ids = remaining[start : start + int(mine.sum())]
    done = int(np.count_nonzero((steps % seg.workers == worker) & (steps < seg.steps)))
    return WorkerPlan(start, ids, mine, done, (seed, epoch, seg_index, rank, worker), window)


def window_perm(plan: WorkerPlan, index: int) -> np.ndarray:
    """Permutation of window `index` of the worker's ids (indices relative to the window)."""
    length = min(plan.window, len(plan.ids) - index * plan.window)
    return np.random.default_rng([*plan.seed_key, _WINDOW_STREAM, index]).permutation(length)


def emitted(plan: WorkerPlan, count: int) -> np.ndarray:
    """The positions (into `plan.ids`) of the first `count` ids of the worker's permuted sequence,
    as a set: whole windows come back in stored order, only the partial window is permuted."""
    full, part = divmod(count, plan.window)
    head = np.arange(full * plan.window, dtype=np.int64)
    if part == 0:
        return head
    return np.concatenate([head, full * plan.window + window_perm(plan, full)[:part]])


def permuted_order(plan: WorkerPlan) -> np.ndarray:
    """The worker's whole emission order, as positions into `plan.ids`."""
    num_windows = -(-len(plan.ids) // plan.window)
    parts = [window_perm(plan, j) + j * plan.window for j in range(num_windows)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def consumed_mask(remaining: np.ndarray, seg: Segment, seg_index: int, seed: int, epoch: int,
                  window: int) -> np.ndarray:
    """Boolean mask over `remaining`: the ids segment `seg` consumed in its `seg.steps` steps."""
    mask = np.zeros(len(remaining), dtype=bool)
    if seg.steps == 0:
        return mask
    sizes = batch_sizes(len(remaining), seg.ranks, seg.batch)
    if seg.steps > len(sizes):
        raise ValueError(f"reader state: segment {seg.to_dict()} has more steps than its plan ({len(sizes)})")
    for rank in range(seg.ranks):
        for worker in range(seg.workers):
            plan = worker_plan(remaining, seg, seg_index, seed, epoch, rank, worker, window)
            count = int(plan.sizes[: plan.first_batch].sum())
            mask[plan.start + emitted(plan, count)] = True
    return mask


def remaining_ids(counts: np.ndarray, seed: int, epoch: int, closed: list[Segment], window: int) -> np.ndarray:
    """Ids of the epoch not consumed by the `closed` segments, in Q order."""
    remaining = epoch_order(counts, seed, epoch)
    for index, seg in enumerate(closed):
        remaining = remaining[~consumed_mask(remaining, seg, index, seed, epoch, window)]
    return remaining


def samples_consumed(counts: np.ndarray, segments: list[Segment]) -> int:
    """Samples (good or bad) consumed in this epoch over all ranks by `segments`."""
    left = int(np.sum(counts))
    consumed = 0
    for seg in segments:
        sizes = batch_sizes(left, seg.ranks, seg.batch)
        if seg.steps > len(sizes):
            raise ValueError(f"reader state: segment {seg.to_dict()} has more steps than its plan ({len(sizes)})")
        done = int(sizes[: seg.steps].sum())
        consumed += done
        left -= done
    return consumed

