"""The pure sample-order plan: coverage, balance and determinism, without any I/O."""

from __future__ import annotations

import numpy as np
import pytest

from data_tools import plan

COUNTS = np.array([7, 12, 5, 9, 11, 3], dtype=np.int64)  # 47 samples, uneven shards
WINDOW = 6


def emitted_ids(remaining, seg, seg_index, seed, epoch, steps=None):
    """All ids each (rank, worker) emits in `steps` steps, as {(rank, step): ids}."""
    out = {}
    steps = seg.steps if steps is None else steps
    for rank in range(seg.ranks):
        for worker in range(seg.workers):
            p = plan.worker_plan(remaining, seg, seg_index, seed, epoch, rank, worker, WINDOW)
            order = p.ids[plan.permuted_order(p)]
            cuts = np.cumsum(p.sizes)[:-1]
            for b, ids in enumerate(np.split(order, cuts)):
                step = worker + b * seg.workers
                if step < steps:
                    out[(rank, step)] = ids
    return out


def test_epoch_order_is_a_shard_sequential_permutation():
    q = plan.epoch_order(COUNTS, seed=3, epoch=0)
    assert sorted(q.tolist()) == list(range(COUNTS.sum()))
    offsets = plan.shard_offsets(COUNTS)
    shard_of = np.searchsorted(offsets, q, side="right") - 1
    runs = shard_of[np.r_[True, np.diff(shard_of) != 0]]
    assert len(runs) == len(COUNTS)  # each shard read in one contiguous run
    assert not np.array_equal(q, plan.epoch_order(COUNTS, seed=3, epoch=1))
    np.testing.assert_array_equal(q, plan.epoch_order(COUNTS, seed=3, epoch=0))


@pytest.mark.parametrize("n,ranks,batch", [(47, 2, 4), (47, 3, 5), (8, 2, 4), (3, 2, 4), (100, 1, 7)])
def test_batch_sizes_balanced_and_complete(n, ranks, batch):
    sizes = plan.batch_sizes(n, ranks, batch)
    assert sizes.shape == (plan.num_steps(n, ranks, batch), ranks)  # every rank has the same step count
    assert sizes.sum() == n and sizes.max() <= batch and sizes.min() >= 1
    assert sizes.max() - sizes.min() <= 1
    flat = sizes.reshape(-1)
    assert np.all(np.diff(flat) <= 0)  # larger batches first


def test_empty_batch_is_refused():
    with pytest.raises(ValueError, match="empty batch"):
        plan.batch_sizes(5, 2, 1)


def test_one_segment_covers_every_sample_once():
    seg = plan.Segment(ranks=2, workers=2, batch=4)
    remaining = plan.epoch_order(COUNTS, 0, 0)
    steps = plan.num_steps(len(remaining), 2, 4)
    batches = emitted_ids(remaining, seg, 0, 0, 0, steps=steps)
    assert sorted(batches) == [(r, t) for r in range(2) for t in range(steps)]
    all_ids = np.concatenate(list(batches.values()))
    assert sorted(all_ids.tolist()) == list(range(COUNTS.sum()))


def test_segment_chain_covers_every_sample_once():
    """2 ranks x 2 workers for 3 steps, then 3 ranks x 1 worker for 2, then 1 rank to the end."""
    seed, epoch = 5, 2
    chain = [plan.Segment(2, 2, 4, steps=3), plan.Segment(3, 1, 3, steps=2)]
    remaining = plan.epoch_order(COUNTS, seed, epoch)
    seen = []
    for index, seg in enumerate(chain):
        seen += [ids for ids in emitted_ids(remaining, seg, index, seed, epoch).values()]
        mask = plan.consumed_mask(remaining, seg, index, seed, epoch, WINDOW)
        done = np.concatenate(list(emitted_ids(remaining, seg, index, seed, epoch).values()))
        assert sorted(remaining[mask].tolist()) == sorted(done.tolist())
        remaining = remaining[~mask]
    np.testing.assert_array_equal(remaining, plan.remaining_ids(COUNTS, seed, epoch, chain, WINDOW))
    assert plan.samples_consumed(COUNTS, chain) == COUNTS.sum() - len(remaining)
    last = plan.Segment(1, 2, 4)
    seen += list(emitted_ids(remaining, last, 2, seed, epoch, steps=10**6).values())
    all_ids = np.concatenate(seen)
    assert sorted(all_ids.tolist()) == list(range(COUNTS.sum()))


def test_window_shuffle_changes_order_and_is_seeded():
    remaining = plan.epoch_order(COUNTS, 0, 0)
    seg = plan.Segment(1, 1, 8)
    p = plan.worker_plan(remaining, seg, 0, 0, 0, 0, 0, WINDOW)
    order = plan.permuted_order(p)
    assert sorted(order.tolist()) == list(range(len(p.ids)))
    assert not np.array_equal(order, np.arange(len(p.ids)))
    for w in range(0, len(p.ids), WINDOW):  # a permutation inside each window only
        assert sorted(order[w : w + WINDOW].tolist()) == list(range(w, min(w + WINDOW, len(p.ids))))
    p2 = plan.worker_plan(remaining, seg, 0, 1, 0, 0, 0, WINDOW)
    assert not np.array_equal(plan.permuted_order(p2), order)


def test_state_validation():
    with pytest.raises(ValueError, match="more steps"):
        plan.samples_consumed(COUNTS, [plan.Segment(1, 1, 4, steps=100)])
    with pytest.raises(ValueError, match="malformed"):
        plan.Segment.from_dict({"ranks": 1})
