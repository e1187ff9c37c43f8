"""The rollout group's pure parts: how prompts are split, how shares are seeded, how the
engines' figures merge. (Under Ray, with workers killed: test_worker_restarts.py.)"""

import pytest

from rlkit.workers.rollout_group import merge_stats, share_seed, split


def test_shares_are_whole_contiguous_and_balanced():
    assert split(7, 2) == [(0, 4), (4, 7)]
    assert split(9, 4) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert split(2, 4) == [(0, 1), (1, 2)]  # idle workers get no share
    assert split(8, 1) == [(0, 8)]


def test_share_seeds():
    # The first share keeps the call's seed, so one worker is exactly the plain engine.
    assert share_seed(5, 0) == 5 and share_seed(None, 3) is None
    assert len({share_seed(5, s) for s in range(1000)}) == 1000
    assert share_seed(5, 3) != share_seed(6, 3)
    assert all(0 <= share_seed(2**62, s) < 2**63 for s in range(1, 50))


def test_stats_merge_like_one_engine():
    a = {
        "kv_bytes_peak": 100.0,
        "kv_bytes_retained_per_seq": 10.0,
        "kv_bytes_dense_per_seq": 40.0,
        "kv_retained_frac": 0.25,
        "kv_retained_frac_max": 0.5,
        "compression_events": 3.0,
    }
    b = {
        "kv_bytes_peak": 300.0,
        "kv_bytes_retained_per_seq": 30.0,
        "kv_bytes_dense_per_seq": 40.0,
        "kv_retained_frac": 0.75,
        "kv_retained_frac_max": 0.9,
        "compression_events": 5.0,
    }
    out = merge_stats([a, b], [8, 24])  # completions per worker
    assert out["kv_bytes_peak"] == 300.0
    assert out["kv_retained_frac_max"] == 0.9
    assert out["compression_events"] == 8.0
    assert out["kv_bytes_retained_per_seq"] == pytest.approx((10 * 8 + 30 * 24) / 32)
    assert out["kv_bytes_dense_per_seq"] == pytest.approx(40.0)
    # Not the mean of the two fractions: the ratio of the merged per-sequence means.
    assert out["kv_retained_frac"] == pytest.approx(25.0 / 40.0)
    assert merge_stats([a], [4]) == a
