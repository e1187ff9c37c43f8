"""Rollouts sized by KV memory (`Engine(kv_memory_gb=...)`, `rollout.kv_memory_gb`): the batch
is what the budget holds at the cache's bytes per sequence, so a compressed cache admits
proportionally more sequences, and the engine really decodes that many at once."""

from types import SimpleNamespace

import pytest
import torch

from rlkit.config.schema import KVCompressionConfig
from rlkit.rollout import SamplingParams
from rlkit.rollout.kv_cache import CompressedKVCache, KVCache, cache_fills

SNAPKV = KVCompressionConfig(policy="snapkv", budget=16, window=4, interval=8)
PROMPTS = [[5, 17, 99, 3], [42, 7, 7, 1], [60, 61, 62, 63], [7, 200, 31, 4], [9, 9, 8, 8]]
NEW = 120  # every sequence prompt 4 + 120 tokens (ignore_eos)


def _gb(n_bytes: int) -> float:
    return n_bytes / 2**30


@pytest.mark.parametrize(
    "cfg",
    [
        None,
        SNAPKV,
        KVCompressionConfig(policy="h2o", budget=16, window=4, interval=8),
        KVCompressionConfig(policy="snapkv", budget=16, window=4, interval=8, compaction="fill"),
        KVCompressionConfig(policy="streaming", budget=16, window=4, interval=8),
        KVCompressionConfig(policy="layer_hybrid", budget=16, window=4, interval=8, full_every=2),
    ],
    ids=["dense", "snapkv", "h2o", "snapkv-fill", "streaming", "layer_hybrid"],
)
@pytest.mark.parametrize("lookahead", [0, 3])
def test_slot_bytes_are_what_a_cache_allocates_per_slot(cfg, lookahead):
    dt = torch.bfloat16
    if cfg is None:
        cache = KVCache(3, 5, 50, 2, 16, dt, lookahead=lookahead)
        per = KVCache.slot_bytes(3, 50, 2, 16, dt, lookahead)
    else:
        args = (3, 5, 24, 50, 4, 2, 16, cfg, dt)
        cache = CompressedKVCache(*args, lookahead=lookahead)
        per = CompressedKVCache.compressed_slot_bytes(
            3, 24, 50, 4, 2, 16, cfg, dt, lookahead, fills=cache_fills(cfg, "cpu")
        )
    assert cache.held_bytes == 5 * per
    assert cache.held_bytes >= cache.allocated_bytes


def _run(make_engine, gb, compression, sequences=6, n=4, **kw):
    engine = make_engine(max_batch_size=64, kv_memory_gb=gb, kv_compression=compression, **kw)
    sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=0.0)
    out = engine.generate(PROMPTS[:sequences], sp, n=n)
    return engine, out


def test_memory_budget_sizes_the_batch_and_a_compressed_cache_admits_more(make_engine):
    probe = make_engine()
    dense_per = probe.slot_bytes(4 + NEW, None)
    sparse_per = probe.slot_bytes(4 + NEW, SNAPKV)
    assert sparse_per < dense_per / 4  # budget + interval = 24 entries of 124, plus the ring
    budget = 4 * dense_per  # four dense sequences' bytes
    dense, out_dense = _run(make_engine, _gb(budget), None, sequences=5)
    sparse, out_sparse = _run(make_engine, _gb(budget), SNAPKV, sequences=5)
    assert dense.stats["seqs_admitted_peak"] == 4 == dense.cache.num_slots
    assert dense.stats["concurrent_seqs_max"] == 4  # 20 sequences through 4 slots
    want = budget // sparse_per  # 17 here
    assert want >= 4 * (dense_per // sparse_per)  # proportional to the bytes per sequence
    assert sparse.stats["seqs_admitted_peak"] == want == sparse.cache.num_slots
    assert sparse.stats["concurrent_seqs_max"] == want  # decoded at once, not just reported
    for engine in (dense, sparse):
        assert engine.cache.held_bytes <= budget
    assert all(len(c.token_ids) == NEW for c in out_dense + out_sparse)
    # The memory-sized batch decodes as the same fixed batch does.
    fixed = make_engine(max_batch_size=4).generate(
        PROMPTS[:5], SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=0.0), n=4
    )
    assert [c.token_ids for c in fixed] == [c.token_ids for c in out_dense]


def test_max_batch_size_still_caps_and_small_calls_take_what_they_need(make_engine):
    probe = make_engine()
    budget = 10 * probe.slot_bytes(4 + NEW, None)
    engine = make_engine(max_batch_size=3, kv_memory_gb=_gb(budget))
    sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True, temperature=0.0)
    engine.generate(PROMPTS[:2], sp, n=4)
    assert engine.stats["seqs_admitted_peak"] == 3
    engine = make_engine(kv_memory_gb=_gb(budget))
    engine.generate(PROMPTS[:1], sp, n=2)
    assert engine.stats["seqs_admitted_peak"] == 2


def test_fraction_of_free_memory(make_engine, monkeypatch):
    import rlkit.rollout.engine as engine_mod

    probe = make_engine()
    per = probe.slot_bytes(4 + NEW, SNAPKV)
    engines = []

    def memory():  # 40 sequences' bytes, less the cache the engine holds
        held = engines[0].cache.held_bytes if engines and engines[0].cache is not None else 0
        return SimpleNamespace(available=40 * per - held)

    monkeypatch.setattr(engine_mod.psutil, "virtual_memory", memory)
    engine = make_engine(kv_memory_fraction=0.25, kv_compression=SNAPKV)
    engines.append(engine)
    engine.generate(PROMPTS[:6], SamplingParams(max_new_tokens=NEW, ignore_eos=True), n=4)
    assert engine.stats["seqs_admitted_peak"] == 10  # a quarter of 40 sequences' bytes
    # The engine's own cache counts as free: the next call sizes the same.
    engine.generate(PROMPTS[:6], SamplingParams(max_new_tokens=NEW, ignore_eos=True), n=4)
    assert engine.stats["seqs_admitted_peak"] == 10


def test_a_budget_below_one_sequence_and_bad_settings_are_refused(make_engine):
    engine = make_engine(kv_memory_gb=_gb(1000))
    with pytest.raises(ValueError, match=r"kv_memory_gb: 0\.0 MiB\) holds no sequence of 124"):
        engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=NEW))
    with pytest.raises(ValueError, match="not both"):
        make_engine(kv_memory_gb=1.0, kv_memory_fraction=0.5)
    with pytest.raises(ValueError, match=r"kv_memory_fraction must be in \(0, 1\]"):
        make_engine(kv_memory_fraction=1.5)
