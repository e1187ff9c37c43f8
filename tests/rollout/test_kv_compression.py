import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rlkit.kernels import kv_compress

from rlkit.config.schema import KVCompressionConfig
from rlkit.models import load_model
from rlkit.models.tiny import save_tiny_model
from rlkit.rollout import Engine, SamplingParams
from rlkit.rollout.compression import POLICIES, CompressionInputs
from rlkit.rollout.kv_cache import CompressedKVCache, KVCache

GREEDY = dict(temperature=0.0, ignore_eos=True)
POLICY_NAMES = ["snapkv", "rkv", "h2o", "streaming", "layer_hybrid"]


def cfg(policy, **kw):
    base = dict(budget=12, window=3, interval=2, sink=2, full_every=2)
    base.update(kw)
    return KVCompressionConfig(policy=policy, **base)


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """4 layers, so layer_hybrid has two full (0, 2) and two compressed (1, 3) layers."""
    path = str(tmp_path_factory.mktemp("tiny4") / "qwen3")
    return save_tiny_model(path, "qwen3", seed=7, tie_word_embeddings=False, num_layers=4)


def engine(path, dtype=torch.float32, **kw):
    model, tok = load_model(path)
    return Engine(model, tok, dtype=dtype, **kw)


def long_prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 250, (n,), generator=g).tolist() for n in (5, 20, 1, 9, 14)]


# -- policies as pure functions --------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policy_keeps_budget_window_and_valid_entries(name):
    torch.manual_seed(0)
    B, H, KVH, L, D = 3, 4, 2, 30, 8
    c = cfg(name, budget=10, window=3, sink=2)
    lengths = torch.tensor([30, 17, 11])
    inputs = CompressionInputs(
        keys=torch.randn(B, KVH, L, D),
        lengths=lengths,
        queries=torch.randn(B, H, c.window, D),
        accumulated=torch.rand(B, KVH, L),
        oracle=torch.rand(B, L),
    )
    idx = POLICIES.get(name)(inputs, c)
    assert idx.shape[0] == B and idx.shape[1] in (1, KVH) and idx.shape[2] == c.budget
    for b in range(B):
        n = int(lengths[b])
        for row in idx[b]:
            kept = row.tolist()
            assert kept == sorted(set(kept)), "ascending, no repeats"
            assert max(kept) < n, "never a padding entry"
            assert set(range(n - c.window, n)) <= set(kept), "the window is kept"
            if name == "streaming":
                assert kept == list(range(c.sink)) + list(range(n - c.budget + c.sink, n))


def test_snapkv_picks_the_attended_entries():
    # Keys 4 and 9 are what the window's queries point at; pool_kernel 1: no neighbours.
    B, H, KVH, L, D = 1, 2, 1, 20, 8
    keys = torch.zeros(B, KVH, L, D)
    keys[0, 0, 4, 0] = keys[0, 0, 9, 1] = 1.0
    queries = torch.zeros(B, H, 2, D)
    queries[..., 0] = queries[..., 1] = 20.0
    c = cfg("snapkv", budget=4, window=2, pool_kernel=1)
    idx = POLICIES.get("snapkv")(CompressionInputs(keys, torch.tensor([L]), queries), c)
    assert idx[0, 0].tolist() == [4, 9, 18, 19]


def test_h2o_picks_heavy_hitters_and_rkv_drops_duplicates():
    B, KVH, L, D = 1, 1, 12, 4
    acc = torch.zeros(B, KVH, L)
    acc[0, 0, [2, 5]] = 1.0
    c = cfg("h2o", budget=4, window=2)
    idx = POLICIES.get("h2o")(
        CompressionInputs(torch.zeros(B, KVH, L, D), torch.tensor([L]), None, acc), c
    )
    assert idx[0, 0].tolist() == [2, 5, 10, 11]
    # R-KV: entries 0-6 share one direction (redundant), 7-9 are distinct; equal importance.
    keys = torch.zeros(B, KVH, L, D)
    keys[0, 0, :7, 0] = 1.0
    for j, d in zip((7, 8, 9), (1, 2, 3), strict=True):
        keys[0, 0, j, d] = 1.0
    keys[0, 0, 10:, 0] = -1.0
    q = torch.zeros(B, 2, 2, D)
    c = cfg("rkv", budget=5, window=2, pool_kernel=1)
    idx = POLICIES.get("rkv")(CompressionInputs(keys, torch.tensor([L]), q), c)
    assert idx[0, 0].tolist() == [7, 8, 9, 10, 11]


# -- the cache --------------------------------------------------------------------------------


def _feed(model, cache, prompt, tokens):
    """Prefill `prompt` into slot 0 and decode `tokens` one by one, compressing after each
    step; returns the lengths of the compressed layers after each compression check."""
    seen = []
    with torch.no_grad():
        cache.begin_prefill(torch.tensor([0]), torch.tensor([0]), [len(prompt)])
        model.forward_cached(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
        seen.append(int(cache.group_lengths[0, 0]))
        for i, t in enumerate(tokens):
            positions = cache.begin_decode(1)
            model.forward_cached(torch.tensor([[t]]), positions, cache)
            if (i + 1) % cache.cfg.interval == 0:
                cache.compress([0])
                seen.append(int(cache.group_lengths[0, 0]))
    return seen


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_cache_keeps_budget_and_the_newest_tokens(name, deep_dir):
    model = load_model(deep_dir)[0].eval()
    a = model.args
    c = cfg(name, budget=12, window=3, interval=2)
    cache = CompressedKVCache(
        a.num_layers, 2, c.budget + c.interval, 64, a.num_heads, a.num_kv_heads, a.head_dim, c,
        torch.float32,
    )  # fmt: skip
    dense = KVCache(a.num_layers, 1, 64, a.num_kv_heads, a.head_dim, torch.float32)
    prompt, tokens = list(range(30, 50)), list(range(60, 76))  # prompt 20 > budget 12
    seen = _feed(model, cache, prompt, tokens)
    with torch.no_grad():
        dense.begin_prefill(torch.tensor([0]), torch.tensor([0]), [len(prompt) + len(tokens)])
        model.forward_cached(torch.tensor([prompt + tokens]), torch.arange(36)[None], dense)
    # Prefill compresses the prompt; every check brings the row back to the budget.
    assert seen[0] == c.budget and all(s == c.budget for s in seen[1:])
    assert cache.max_len == c.budget + c.interval
    total = len(prompt) + len(tokens)
    assert cache.positions[0] == total
    lengths = cache.layer_lengths[:, 0]
    full = [i for i in range(a.num_layers) if name == "layer_hybrid" and i % c.full_every == 0]
    for layer in range(a.num_layers):
        assert lengths[layer] == (total if layer in full else c.budget)
    # Layer 0's keys depend only on the tokens and their true positions: each kept key is the
    # dense key of some position, in order, and the last `window` are the newest tokens.
    group, j = cache.where[0]
    store = cache.kf if group == 1 else cache.k
    kept = store[j, 0, :, : lengths[0]]  # [KVH, n, D]
    ref = dense.k[0, 0, :, :total]
    for h in range(a.num_kv_heads):
        match = torch.cdist(kept[h], ref[h]).argmin(dim=1)
        torch.testing.assert_close(kept[h], ref[h, match], atol=1e-5, rtol=0)
        pos = match.tolist()
        assert pos == sorted(pos) and pos[-c.window :] == list(range(total - c.window, total))
        if name == "streaming":
            assert pos == list(range(c.sink)) + list(range(total - c.budget + c.sink, total))
        if group == 1:
            assert pos == list(range(total))
    if name == "layer_hybrid":
        # The compressed layers' entries, by true position (the oracle's lookup).
        at = cache.entry_pos[0, 0, : c.budget].tolist()
        assert at == sorted(set(at)) and at[-c.window :] == list(range(total - c.window, total))


@pytest.mark.parametrize("name", ["snapkv", "rkv", "h2o"])
def test_fill_compaction_keeps_what_ordered_compaction_keeps(name, deep_dir):
    """compaction auto (the fill layout) against ordered, on the same tokens: after a squeezed
    prompt and eight compressions every layer and head holds the same tokens (each cached key
    matched to the dense key of its true position), the fill rows out of order (so the fill
    path ran), and `slot_order` lists each row's places by their tokens' positions."""
    model = load_model(deep_dir)[0].eval()
    a = model.args
    caches = {}
    for mode in ("fill", "ordered"):
        c = cfg(name, budget=12, window=3, interval=4, compaction=mode)
        caches[mode] = CompressedKVCache(
            a.num_layers, 2, c.budget + c.interval, 64, a.num_heads, a.num_kv_heads,
            a.head_dim, c, torch.float32,
        )  # fmt: skip
        prompt, tokens = list(range(30, 50)), list(range(60, 92))  # prompt 20 > budget 12
        _feed(model, caches[mode], prompt, tokens)
    fill, ordered = caches["fill"], caches["ordered"]
    assert fill.fill and not ordered.fill
    total = 20 + 32
    dense = KVCache(a.num_layers, 1, 64, a.num_kv_heads, a.head_dim, torch.float32)
    with torch.no_grad():
        dense.begin_prefill(torch.tensor([0]), torch.tensor([0]), [total])
        model.forward_cached(
            torch.tensor([list(range(30, 50)) + list(range(60, 92))]),
            torch.arange(total)[None],
            dense,
        )
    n = int(fill.group_lengths[0, 0])
    assert n == int(ordered.group_lengths[0, 0]) == 12
    scrambled = False
    for j, layer in enumerate(fill.comp_layers):
        order = fill.slot_order[j, 0].long()  # [KVH, n]: the row holds the head alone
        assert (order.sort(dim=-1).values == torch.arange(n)).all()  # a permutation
        scrambled |= bool((order != torch.arange(n)).any())
        if layer != 0:  # only layer 0's keys depend on nothing but token and position
            continue
        for h in range(a.num_kv_heads):
            got = torch.cdist(fill.k[j, 0, h, :n], dense.k[0, 0, h, :total]).argmin(1)
            want = torch.cdist(ordered.k[j, 0, h, :n], dense.k[0, 0, h, :total]).argmin(1)
            assert sorted(got.tolist()) == want.tolist()
            assert got[order[h]].tolist() == want.tolist()  # places in their tokens' order
    # H2O's old entries hold the most accumulated attention here: it evicts only entries
    # past the budget, so its fill moves nothing (which is the point of the layout).
    assert scrambled == (name != "h2o")


@pytest.mark.parametrize("name", ["snapkv", "rkv", "h2o"])
def test_fill_compaction_decodes_as_ordered_compaction(name, deep_dir):
    """The engine with the fill layout gives ordered compaction's tokens: ragged prompts (two
    longer than the budget), 10 sequences through 3 slots (moves, refill), greedy and sampled."""
    prompts = long_prompts()
    out = {}
    for mode in ("fill", "ordered"):
        c = cfg(name, budget=12, window=3, interval=4, compaction=mode)
        eng = engine(deep_dir, max_batch_size=3, sync_every=2, kv_compression=c)
        greedy = eng.generate(prompts, SamplingParams(max_new_tokens=24, **GREEDY), n=2)
        assert eng.stats["compression_events"] > 0
        sampled = eng.generate(
            prompts, SamplingParams(max_new_tokens=24, temperature=1.0, seed=5), n=2
        )
        out[mode] = greedy + sampled
    for f, o in zip(out["fill"], out["ordered"], strict=True):
        assert f.token_ids == o.token_ids
        torch.testing.assert_close(f.logprobs, o.logprobs, atol=1e-5, rtol=0)


def test_auto_compaction_fills_where_the_policy_allows_and_the_kernels_run():
    """compaction auto: fill where the policy and schedule allow it on a device that runs the
    fill's Triton kernels (CUDA), ordered elsewhere (the CPU, whose ordered C kernel is the
    faster); fill where it cannot apply is refused by name; the head's order is allocated, and
    counted in a slot's bytes, only where the cache fills."""

    def cache(c, slots, device="cpu"):
        return CompressedKVCache(
            2, slots, c.budget + c.interval, 64, 4, 2, 8, c, torch.float32, device
        )

    auto = cfg("snapkv", budget=12, window=3, interval=4)
    assert auto.fills(kernels=True) and not auto.fills(kernels=False)
    assert not cache(auto, 2).fill and not cache(auto, 512).fill  # the CPU: ordered
    if torch.cuda.is_available() and kv_compress.HAS_TRITON:
        assert cache(auto, 2, "cuda").fill
    assert not cfg("snapkv", window=3, interval=2).fills(True)  # window > interval
    assert not cfg("streaming", window=3, interval=4).fills(True)  # reads places
    assert not cfg("snapkv", window=3, interval=4, compaction="ordered").fills(True)
    assert cache(cfg("h2o", window=3, interval=4, compaction="fill"), 2).fill
    for bad in (cfg("streaming", compaction="fill"), cfg("snapkv", interval=2, compaction="fill")):
        with pytest.raises(ValueError, match="compaction fill needs"):
            cache(bad, 2)

    def slot(c, fills):
        return CompressedKVCache.compressed_slot_bytes(
            2, 16, 64, 4, 2, 8, c, torch.float32, fills=fills
        )

    # The head's order: int16 places, per compressed layer and kv head; none in an ordered cache.
    assert slot(auto, True) == slot(auto, False) + 2 * 2 * 12 * 2
    assert cache(auto, 3).slot_order.numel() == 0  # the CPU under auto: ordered
    filled = cache(cfg("snapkv", budget=12, window=3, interval=4, compaction="fill"), 3)
    assert filled.slot_order.shape == (2, 3, 2, 12) and filled.slot_order.dtype == torch.int16


# -- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_budget_over_total_length_equals_dense(name, deep_dir):
    prompts = long_prompts()
    params = SamplingParams(max_new_tokens=15, **GREEDY)
    dense = engine(deep_dir, max_batch_size=3).generate(prompts, params, n=2)
    sparse_engine = engine(deep_dir, max_batch_size=3, kv_compression=cfg(name, budget=64))
    sparse = sparse_engine.generate(prompts, params, n=2)
    assert sparse_engine.stats["compression_events"] == 0
    assert [c.token_ids for c in sparse] == [c.token_ids for c in dense]
    for s, d in zip(sparse, dense, strict=True):
        if name == "h2o":  # explicit attention (to read the probabilities), not SDPA
            torch.testing.assert_close(s.logprobs, d.logprobs, atol=1e-5, rtol=0)
        else:
            assert s.logprobs == d.logprobs


class _MaskedAttention:
    """A cache stand-in for a full forward: causal attention restricted by mask [T, T]."""

    def __init__(self, mask):
        self.mask = mask

    def attend(self, layer, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, enable_gqa=True)


def test_streaming_positions_stay_true(deep_dir):
    # StreamingLLM, checked every step: query t sees the sinks and the newest budget - sink
    # tokens (true RoPE positions, never re-rotated). Reference: one full forward of the whole
    # sequence under exactly that attention mask.
    c = cfg("streaming", budget=10, window=2, interval=1, sink=3)
    prompt = [5, 17, 99, 3, 8, 40]
    eng = engine(deep_dir, kv_compression=c)
    out = eng.generate([prompt], SamplingParams(max_new_tokens=20, **GREEDY))[0]
    seq = prompt + out.token_ids[:-1]
    T = len(seq)
    t = torch.arange(T)
    j = t[None, :]
    mask = (j <= t[:, None]) & ((j < c.sink) | (j >= t[:, None] - c.budget + c.sink))
    model = load_model(deep_dir)[0].eval()
    with torch.no_grad():
        hidden = model.forward_cached(torch.tensor([seq]), t[None], _MaskedAttention(mask))
        logp = model.logits(hidden[0, len(prompt) - 1 :]).log_softmax(-1)
    assert out.token_ids == logp.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(out.logprobs), logp.max(-1).values, atol=1e-5, rtol=0)
    # And compression did change the output: the unrestricted model sees more.
    with torch.no_grad():
        full = model.logits(model(torch.tensor([seq]))[0, len(prompt) - 1 :]).log_softmax(-1)
    assert not torch.allclose(full.max(-1).values, logp.max(-1).values, atol=1e-3)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_sequences_compress_independently_of_batching(name, deep_dir):
    # Ragged prompts (two longer than the budget), n=2, 10 sequences through 3 slots with
    # compaction and refill; each sequence must decode as it does alone.
    prompts = long_prompts()
    c = cfg(name, budget=12, window=3, interval=3)
    params = SamplingParams(max_new_tokens=14, stop_token_ids=[17], **GREEDY)
    batched = engine(deep_dir, max_batch_size=3, sync_every=2, kv_compression=c)
    out = batched.generate(prompts, params, n=2)
    assert batched.stats["compression_events"] > 0
    alone = engine(deep_dir, max_batch_size=1, kv_compression=c)
    for i, p in enumerate(prompts):
        ref = alone.generate([p], params)[0]
        for s in out[2 * i : 2 * i + 2]:
            assert s.token_ids == ref.token_ids and s.finish_reason == ref.finish_reason
            torch.testing.assert_close(s.logprobs, ref.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["snapkv", "layer_hybrid"])
def test_stats_and_small_allocation(name, deep_dir):
    c = cfg(name, budget=12, window=3, interval=1)
    prompts = long_prompts()
    new = 16
    eng = engine(deep_dir, kv_compression=c)
    eng.generate(prompts, SamplingParams(max_new_tokens=new, **GREEDY))
    a = eng.model.args
    entry = 2 * a.num_kv_heads * a.head_dim * 4  # float32 K and V of one entry, one layer
    # Held at the finish: `new - 1` completion tokens were fed; interval 1 compresses every
    # row over the budget at every step.
    true = np.array([len(p) + new - 1 for p in prompts])
    n_full = 2 if name == "layer_hybrid" else 0
    held = (a.num_layers - n_full) * np.minimum(true, c.budget) + n_full * true
    s = eng.stats
    assert s["kv_bytes_retained_per_seq"] == pytest.approx(held.mean() * entry)
    assert s["kv_bytes_dense_per_seq"] == pytest.approx(true.mean() * a.num_layers * entry)
    assert s["kv_retained_frac"] == pytest.approx(held.mean() / (true.mean() * a.num_layers))
    assert s["kv_retained_frac_max"] == pytest.approx((held / (true * a.num_layers)).max())
    # The compressed layers' storage holds budget + interval entries, not prompt + new.
    dense_len = max(len(p) for p in prompts) + new
    slots = len(prompts)
    small = (a.num_layers - n_full) * (c.budget + c.interval) + n_full * dense_len
    assert s["kv_bytes_peak"] == slots * small * entry
    dense = engine(deep_dir)
    dense.generate(prompts, SamplingParams(max_new_tokens=new, **GREEDY))
    assert dense.stats["kv_bytes_peak"] == slots * a.num_layers * dense_len * entry
    assert dense.stats["kv_retained_frac"] == 1.0 and dense.stats["compression_events"] == 0
    assert dense.stats["kv_retained_frac_max"] == 1.0
    # Events: (sequence, layer) compressions, one per compressed layer and step over budget.
    # A prompt over the budget once at prefill, then every decode step k (1..new-1) after
    # which prompt + k entries exceed it.
    per_seq = [
        int(len(p) > c.budget) + sum(len(p) + k > c.budget for k in range(1, new)) for p in prompts
    ]
    events = (a.num_layers - n_full) * sum(per_seq)
    assert s["compression_events"] == events


def test_sampled_logprobs_are_the_sparse_policys(deep_dir):
    # Temperature 1: the sampler's log-probs are those of the compressed-cache forward, which
    # the streaming mask reference reproduces (and the dense model does not).
    c = cfg("streaming", budget=8, window=2, interval=1, sink=2)
    prompt = [11, 12, 13, 14]
    eng = engine(deep_dir, kv_compression=c)
    out = eng.generate([prompt], SamplingParams(max_new_tokens=16, temperature=1.0, seed=5))[0]
    seq = prompt + out.token_ids[:-1]
    t = torch.arange(len(seq))
    j = t[None, :]
    mask = (j <= t[:, None]) & ((j < c.sink) | (j >= t[:, None] - c.budget + c.sink))
    model = load_model(deep_dir)[0].eval()
    with torch.no_grad():
        hidden = model.forward_cached(torch.tensor([seq]), t[None], _MaskedAttention(mask))
        logp = model.logits(hidden[0, len(prompt) - 1 :]).log_softmax(-1)
    want = logp.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-5, rtol=0)
    assert math.isfinite(sum(out.logprobs))


def test_bad_config_is_rejected(deep_dir):
    with pytest.raises(ValueError, match="window < budget"):
        engine(deep_dir, kv_compression=cfg("snapkv", budget=3, window=3))
    with pytest.raises(ValueError, match="unknown kv compression policy"):
        engine(deep_dir, kv_compression=KVCompressionConfig(policy="nope"))  # type: ignore[arg-type]
    assert engine(deep_dir, kv_compression=KVCompressionConfig()).compression is None


def test_compress_false_decodes_dense_in_a_sparse_engine(deep_dir):
    """A Sparse-RL run evaluates the model as deployed: compress=False gives exactly the dense
    engine's output, and the next call compresses again."""
    c = cfg("snapkv", budget=6, window=2, interval=1)
    prompts = long_prompts()
    params = SamplingParams(max_new_tokens=10, **GREEDY)
    eng = engine(deep_dir, kv_compression=c)
    sparse = [o.token_ids for o in eng.generate(prompts, params)]
    dense_out = eng.generate(prompts, params, compress=False)
    assert eng.stats["compression_events"] == 0 and eng.stats["kv_retained_frac"] == 1.0
    want = [o.token_ids for o in engine(deep_dir).generate(prompts, params)]
    assert [o.token_ids for o in dense_out] == want
    assert sparse != want  # budget 6 really changes the outputs
    assert [o.token_ids for o in eng.generate(prompts, params)] == sparse
    assert eng.stats["compression_events"] > 0


@pytest.mark.parametrize("name", [*POLICY_NAMES, "layer_hybrid_local"])
@pytest.mark.parametrize(
    "rows", [[0, 1, 2, 3], [1, 2, 3, 4], [3, 0, 2]], ids=["consecutive", "offset", "scattered"]
)
def test_compress_on_the_cpu_kernels_equals_pytorch(name, rows, kernel_dtype):
    """A compression through the C kernels (scores, selection, compaction in place) leaves
    the cache exactly as the PyTorch path does, for rows read in place or gathered."""
    hybrid_local = name == "layer_hybrid_local"
    c = cfg("layer_hybrid" if hybrid_local else name, budget=24, window=4, interval=8,
            hybrid_local=hybrid_local)  # fmt: skip
    layers, S, H, KVH, D, full_len = 4, 5, 6, 2, 64, 64
    caches = [
        CompressedKVCache(
            layers, S, c.budget + c.interval, full_len, H, KVH, D, c, kernel_dtype, cpu_kernels=on
        )  # fmt: skip
        for on in (True, False)
    ]
    g = torch.Generator().manual_seed(5)
    lengths = np.array([32, 30, 25, 31, 20])  # slot 4 is under the budget: left alone
    for cache in caches:  # the same contents in both
        g.manual_seed(5)
        for t in (cache.k, cache.v, cache.kf, cache.vf, cache.queries):
            t.copy_(torch.randn(t.shape, generator=g))
        cache.accumulated.copy_(torch.rand(cache.accumulated.shape, generator=g))
        cache.group_lengths[0] = lengths
        cache.group_lengths[1] = lengths + 20
        cache.positions[:] = lengths + 20
        if cache.oracle:  # each compressed entry's true position, ascending, < full lengths
            pos = torch.sort(torch.randperm(50, generator=g)[: cache.max_len]).values
            cache.entry_pos[:] = pos
    assert caches[0]._kernels() and not caches[1]._kernels()
    events = [cache.compress(rows) for cache in caches]
    assert (
        events[0]
        == events[1]
        == len([r for r in rows if lengths[r] > c.budget]) * len(caches[0].comp_layers)
    )
    fast, ref = caches
    assert (fast.group_lengths == ref.group_lengths).all()
    for attr in ("k", "v", "kf", "vf", "queries", "accumulated", "entry_pos"):
        assert torch.equal(getattr(fast, attr), getattr(ref, attr)), attr
    assert (fast.group_lengths[0, rows] == np.minimum(lengths[rows], c.budget)).all()
