"""The sample order: a pure function of (manifest counts, seed, epoch, segments), and of each shard's
bucket in a bucketed dataset. No I/O, no torch.

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

Buckets (`hart-data shard --buckets`: every shard holds one aspect-ratio bucket). Every micro-batch
is of one bucket, and at each step all ranks draw from the same bucket, so every rank of a step has
the same image size and token count and none waits for another. The plan above runs per bucket and
the buckets take turns along a seeded order of the segment's steps:

4. In a segment, the remaining ids are split by bucket (each part in Q order: its shards still read
   front to back). Bucket g's N_g ids get ``T_g = ceil(N_g / (R*B))`` steps with the (T_g, R) batch
   sizes of 2. The segment's ``T = sum T_g`` steps are a permutation of the multiset {g x T_g} drawn
   from a generator seeded with ``(seed, epoch, segment)``: global step t is the next local step of
   bucket ``seq[t]``, on every rank (they share the seed). Drawn rather than round-robin, so buckets
   come in random order and a small one is not served on a fixed period. A segment has fewer than
   (number of buckets) more steps than the unbucketed plan would.
5. Rank r takes its contiguous range of each bucket's ids as in 2. Worker w owns the global steps
   ``t % K == w`` (the DataLoader's round-robin), so in bucket g the local steps whose global step is
   congruent to w mod K; its sub-range of the rank's bucket-g range is sized to exactly those batches and
   window-shuffled as in 3 with g added to the seed. It emits its batches in global-step order, each
   from its bucket's sub-range.
6. A bucket with fewer remaining ids than ranks (0 < N_g < R) cannot give every rank a sample. For
   the rest of the epoch it joins the group of the bucket nearest in aspect ratio that has at least R
   (if none has, every bucket joins the largest); the reader crops its images to that bucket's size.
   That is fewer than R samples of a bucket, only when a bucket is tiny or a resume adds ranks; none is
   lost or repeated. Merges stick until the epoch ends, so each *group*'s remaining count after a
   segment follows from its batch sizes and ``seq`` alone: ``segment_layouts`` plans every segment
   of an epoch from counts, without ids.

The resume argument is unchanged: after ``steps`` global steps group g has done as many of its local
steps as ``seq[:steps]`` holds g, and each of its workers has emitted a prefix of its permuted
sequence, so the consumed ids follow from the state. Micro-batch 1 with several ranks is refused
whenever a group's N_g is not a multiple of R, as in 2. Per worker, raw bytes of one shuffle window
per bucket are in memory (the buckets are read interleaved). An unbucketed dataset is one group with
``seq = 0, 1, ..., T-1`` and no bucket in the seeds: exactly the plan of 1-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Domain tags keep the shard-order, window-permutation and bucket-interleaving streams of one (seed, epoch) apart.
_SHARD_STREAM = 0
_WINDOW_STREAM = 1
_BUCKET_STREAM = 2


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
class Buckets:
    """A bucketed dataset as the plan sees it: each id's bucket, and which buckets are nearest each other."""

    of_id: np.ndarray  # (num_samples,) bucket index of every global id
    nearest: tuple[tuple[int, ...], ...]  # per bucket: every bucket index, nearest aspect ratio first (itself)

    @classmethod
    def from_shards(cls, counts: np.ndarray, of_shard, nearest) -> "Buckets":
        assert len(nearest) < 1 << 15
        return cls(np.repeat(np.asarray(of_shard, dtype=np.int16), counts), tuple(tuple(n) for n in nearest))


@dataclass(frozen=True)
class Layout:
    """One segment planned on counts alone: its groups (bucket groups; one for an unbucketed dataset),
    each group's (T_g, R) batch sizes and the global step of each of its local steps."""

    ranks: int
    workers: int
    batch: int
    seed_key: tuple  # (seed, epoch, segment index)
    bucketed: bool
    root_of: np.ndarray  # bucket -> the bucket whose group it is in (merges of step 6)
    left: np.ndarray  # samples left per group (indexed by its root bucket) when the segment starts
    groups: tuple[int, ...]  # root bucket of each group with samples left, ascending
    sizes: tuple[np.ndarray, ...]  # per group: (T_g, R)
    positions: tuple[np.ndarray, ...]  # per group: (T_g,) global steps, ascending

    @property
    def num_steps(self) -> int:
        return sum(len(s) for s in self.sizes)

    def left_after(self, steps: int) -> np.ndarray:
        """Samples left per group after the segment's first `steps` global steps."""
        left = self.left.copy()
        for group, sizes, positions in zip(self.groups, self.sizes, self.positions):
            left[group] -= int(sizes[: np.searchsorted(positions, steps)].sum())
        return left

    def consumed(self, steps: int) -> int:
        return int(self.left.sum() - self.left_after(steps).sum())

    def group_at(self, step: int) -> int:
        """The group (index into `groups`) that global step `step` draws from."""
        for k, positions in enumerate(self.positions):
            i = int(np.searchsorted(positions, step))
            if i < len(positions) and positions[i] == step:
                return k
        raise AssertionError(f"step {step} is not in a segment of {self.num_steps} steps")


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker of one rank emits from one group (an unbucketed dataset: its only one) in one segment."""

    start: int  # offset of its sub-range in the group's remaining ids
    ids: np.ndarray  # its contiguous sub-range of the group's remaining ids, in Q order
    sizes: np.ndarray  # planned sizes of its batches (its local steps, ascending)
    first_batch: int  # how many of those batches were already consumed
    seed_key: tuple  # (seed, epoch, segment, rank, worker[, bucket]): prefix of the window seeds
    window: int
    bucket: int  # root bucket of the group, -1 for an unbucketed dataset
    positions: np.ndarray  # global step of each of its batches


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


def plan_segment(left: np.ndarray, root_of: np.ndarray, seg: Segment, seg_index: int, seed: int, epoch: int,
                 buckets: Buckets | None) -> Layout:
    """The layout of segment `seg` given the samples `left` per group and the groups `root_of` so far."""
    left, root_of = np.array(left, dtype=np.int64), np.array(root_of, dtype=np.int64)
    if buckets is not None:
        _merge_small_groups(left, root_of, seg.ranks, buckets.nearest)
    groups = tuple(int(g) for g in np.flatnonzero(left))
    sizes = tuple(batch_sizes(int(left[g]), seg.ranks, seg.batch) for g in groups)
    if len(groups) <= 1:
        positions = tuple(np.arange(len(s), dtype=np.int64) for s in sizes)
    else:
        turns = np.repeat(np.arange(len(groups)), [len(s) for s in sizes])
        seq = np.random.default_rng([seed, epoch, seg_index, _BUCKET_STREAM]).permutation(turns)
        positions = tuple(np.flatnonzero(seq == k) for k in range(len(groups)))
    return Layout(seg.ranks, seg.workers, seg.batch, (seed, epoch, seg_index), buckets is not None, root_of, left,
                  groups, sizes, positions)


def _merge_small_groups(left: np.ndarray, root_of: np.ndarray, ranks: int, nearest: tuple) -> None:
    """Step 6, in place: every group with 0 < left < ranks joins the nearest group with >= ranks."""
    live = [int(g) for g in np.flatnonzero(left)]
    big = {g for g in live if left[g] >= ranks}
    for g in live:
        if left[g] >= ranks:
            continue
        target = next(h for h in nearest[g] if h in big) if big else max(live, key=lambda h: (left[h], -h))
        if target != g:
            left[target] += left[g]
            left[g] = 0
            root_of[root_of == g] = target


def segment_layouts(counts: np.ndarray, segments: list[Segment], seed: int, epoch: int,
                    buckets: Buckets | None = None) -> list[Layout]:
    """The layout of each segment of an epoch, each planned over what the ones before it left."""
    if buckets is None:
        left, root_of = np.array([int(np.sum(counts))], dtype=np.int64), np.zeros(1, dtype=np.int64)
    else:
        left = np.bincount(buckets.of_id, minlength=len(buckets.nearest)).astype(np.int64)
        root_of = np.arange(len(buckets.nearest), dtype=np.int64)
    layouts = []
    for index, seg in enumerate(segments):
        layout = plan_segment(left, root_of, seg, index, seed, epoch, buckets)
        if seg.steps > layout.num_steps:
            raise ValueError(f"reader state: segment {seg.to_dict()} has more steps than its plan ({layout.num_steps})")
        layouts.append(layout)
        left, root_of = layout.left_after(seg.steps), layout.root_of
    return layouts


def split_groups(remaining: np.ndarray, layout: Layout, buckets: Buckets | None) -> list:
    """Per group of `layout`, where its ids are in `remaining` (in Q order): an index array, or a slice
    covering all of `remaining` for an unbucketed dataset (a view, no copy)."""
    if not layout.bucketed:
        return [slice(None)]
    slot = np.full(len(layout.root_of), -1, dtype=np.int64)
    slot[list(layout.groups)] = np.arange(len(layout.groups))
    group_of = slot[layout.root_of[buckets.of_id[remaining]]]
    parts = [np.flatnonzero(group_of == k) for k in range(len(layout.groups))]
    assert all(len(p) == layout.left[g] for p, g in zip(parts, layout.groups)), "the ids left do not match the plan"
    return parts


def group_worker_plan(ids: np.ndarray, layout: Layout, group: int, steps: int, rank: int, worker: int,
                      window: int) -> WorkerPlan:
    """The plan of (rank, worker) in group `group` (an index into layout.groups) over the group's `ids`,
    after the segment's first `steps` global steps."""
    assert 0 <= rank < layout.ranks and 0 <= worker < layout.workers
    sizes, positions = layout.sizes[group], layout.positions[group]
    col = sizes[:, rank]
    owner = positions % layout.workers
    mine = owner == worker
    start = int(sizes[:, :rank].sum()) + int(col[owner < worker].sum())
    count = int(col[mine].sum())
    done = int(np.count_nonzero(mine & (positions < steps)))
    bucket = layout.groups[group] if layout.bucketed else -1
    seed_key = (*layout.seed_key, rank, worker, *((bucket,) if layout.bucketed else ()))
    return WorkerPlan(start, ids[start : start + count], col[mine], done, seed_key, window, bucket, positions[mine])


def worker_plans(remaining: np.ndarray, layout: Layout, steps: int, rank: int, worker: int, window: int,
                 buckets: Buckets | None = None) -> list[WorkerPlan]:
    """The plans of (rank, worker) in every group of a segment over its `remaining` ids."""
    parts = split_groups(remaining, layout, buckets)
    return [group_worker_plan(remaining[part], layout, k, steps, rank, worker, window) for k, part in enumerate(parts)]


def worker_plan(remaining: np.ndarray, seg: Segment, seg_index: int, seed: int, epoch: int,
                rank: int, worker: int, window: int) -> WorkerPlan:
    """The plan of (rank, worker) in segment `seg` of an unbucketed dataset over the `remaining` ids."""
    layout = plan_segment(np.array([len(remaining)]), np.zeros(1), seg, seg_index, seed, epoch, None)
    return group_worker_plan(remaining, layout, 0, seg.steps, rank, worker, window)


def batch_order(plans: list[WorkerPlan]) -> list[tuple[int, int]]:
    """(index into `plans`, batch size) of a worker's batches still to come, in global-step order."""
    batches = [(int(pos), k, int(size)) for k, p in enumerate(plans)
               for pos, size in zip(p.positions[p.first_batch :], p.sizes[p.first_batch :])]
    return [(k, size) for _, k, size in sorted(batches)]


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


def consumed_mask(remaining: np.ndarray, seg: Segment, seg_index: int, seed: int, epoch: int, window: int,
                  layout: Layout | None = None, buckets: Buckets | None = None) -> np.ndarray:
    """Boolean mask over `remaining`: the ids segment `seg` consumed in its `seg.steps` steps. A bucketed
    dataset passes the segment's `layout` (from `segment_layouts`: it depends on the earlier segments)."""
    if layout is None:
        assert buckets is None, "a bucketed segment needs its layout"
        layout = plan_segment(np.array([len(remaining)]), np.zeros(1), seg, seg_index, seed, epoch, None)
    mask = np.zeros(len(remaining), dtype=bool)
    if seg.steps == 0:
        return mask
    if seg.steps > layout.num_steps:
        raise ValueError(f"reader state: segment {seg.to_dict()} has more steps than its plan ({layout.num_steps})")
    for k, part in enumerate(split_groups(remaining, layout, buckets)):
        ids = remaining[part]
        done = np.zeros(len(ids), dtype=bool)
        for rank in range(seg.ranks):
            for worker in range(seg.workers):
                plan = group_worker_plan(ids, layout, k, seg.steps, rank, worker, window)
                done[plan.start + emitted(plan, int(plan.sizes[: plan.first_batch].sum()))] = True
        mask[part] = done
    return mask


def remaining_ids(counts: np.ndarray, seed: int, epoch: int, closed: list[Segment], window: int,
                  buckets: Buckets | None = None) -> np.ndarray:
    """Ids of the epoch not consumed by the `closed` segments, in Q order."""
    remaining = epoch_order(counts, seed, epoch)
    layouts = segment_layouts(counts, closed, seed, epoch, buckets)
    for index, (seg, layout) in enumerate(zip(closed, layouts)):
        remaining = remaining[~consumed_mask(remaining, seg, index, seed, epoch, window, layout, buckets)]
    return remaining


def samples_consumed(counts: np.ndarray, segments: list[Segment], seed: int = 0, epoch: int = 0,
                     buckets: Buckets | None = None) -> int:
    """Samples (good or bad) consumed in this epoch over all ranks by `segments`. (`seed` and `epoch`
    matter only for a bucketed dataset: its groups' turns.)"""
    return sum(layout.consumed(seg.steps)
               for seg, layout in zip(segments, segment_layouts(counts, segments, seed, epoch, buckets)))
