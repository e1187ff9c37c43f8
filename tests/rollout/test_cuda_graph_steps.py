"""Padded decode steps (`rollout/cuda_graphs.py`): the steps a CUDA graph replays, run eagerly
here (`Engine(cuda_graphs=True)` on a CPU), must decode exactly as the plain steps do, with
the batch shrinking through the buckets, slots refilled, and compressed caches."""

import numpy as np
import pytest
import torch

from rlkit.config.schema import KVCompressionConfig
from rlkit.rollout import SamplingParams
from rlkit.rollout.cuda_graphs import buckets

GREEDY = dict(temperature=0.0)
POLICIES = [None, "snapkv", "rkv", "streaming", "layer_hybrid", "h2o"]


def compression(policy):
    if policy is None:
        return None
    return KVCompressionConfig(policy=policy, budget=10, window=3, interval=3, full_every=2)


def _same_tokens_and_logprobs(out, ref, atol):
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


def _glued_against_layers(make_engine, prompts, arch, monkeypatch, **engine_kw):
    """Completions of the GPU glue path (`Decoder._run_glued`, taken on any machine through
    its kernels' references and whatever the caller patched) and of the layers' own forward:
    (glued, layers)."""
    from rlkit.models.decoder import Decoder

    sp = SamplingParams(max_new_tokens=14, stop_token_ids=[17, 99], temperature=1.0, seed=3)
    kw = dict(max_batch_size=5, sync_every=2, cuda_graphs=True, cpu_kernels=False, **engine_kw)
    ref = make_engine(arch, **kw).generate(prompts, sp, n=2)
    monkeypatch.setattr(Decoder, "_glued", lambda self, x: not torch.is_grad_enabled())
    return make_engine(arch, **kw).generate(prompts, sp, n=2), ref


def test_buckets_cover_every_batch_up_to_the_slots():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]
    for b in range(1, 13):
        assert min(x for x in buckets(12) if x >= b) - b < b  # padding stays under half


def _step_graphs_case(device: str, capture: bool):
    """A StepGraphs over a KV cache of 6 slots whose step function reads two inputs and the
    step's positions, writes into the cache (its write indices) and returns a tuple."""
    from rlkit.rollout.cuda_graphs import StepGraphs
    from rlkit.rollout.kv_cache import KVCache

    cache = KVCache(1, 6, 16, 1, 4, torch.float32, device, cpu_kernels=False)
    cache.reset_slots(range(6), np.array([3, 1, 4, 1, 5, 2]))

    def fn(h, tok, positions):
        return h * 2 + tok[..., None], positions + tok

    return StepGraphs(fn, cache, capture=capture), cache


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_step_graphs_feed_fixed_buffers_and_return_the_batch_rows(device):
    """Any step function over a cache: inputs [batch, T, ...] are copied into buffers of the
    cache's slots, the batch is padded to its bucket (begin_decode(pad_to=...)), the outputs
    (a tuple here) come back for the batch's rows, one graph (or eager padded step) per
    (bucket, T); on CUDA the replays give what the eager padded steps give."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    graphs, cache = _step_graphs_case(device, capture=device == "cuda")
    eager, eager_cache = _step_graphs_case(device, capture=False)
    g = torch.Generator().manual_seed(0)
    for batch, T in [(3, 4), (3, 4), (5, 1), (2, 4)]:
        h = torch.randn(batch, T, 4, generator=g).to(device)
        tok = torch.randint(0, 9, (batch, T), generator=g).to(device)
        start = cache.positions[:batch].copy()
        out, pos = graphs.step(batch, h, tok)
        ref, ref_pos = eager.step(batch, h, tok)
        assert out.shape == (batch, T, 4) and pos.shape == (batch, T)
        torch.testing.assert_close(out, h * 2 + tok[..., None])
        want = torch.as_tensor(start)[:, None] + torch.arange(T) + tok.cpu()
        assert torch.equal(pos.cpu(), want)
        torch.testing.assert_close(out, ref)
        assert torch.equal(pos, ref_pos)
    assert graphs.steps == {(4, 4): 2, (6, 1): 1, (2, 4): 1}  # buckets 1, 2, 4, 6
    assert set(graphs.inputs) == {1, 4} and graphs.inputs[4][0].shape == (6, 4, 4)
    if device == "cuda":
        assert set(graphs.graphs) == {(4, 4), (6, 1), (2, 4)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("params", [dict(**GREEDY), dict(temperature=1.0, seed=3)])
def test_padded_steps_decode_like_plain_steps(make_engine, prompts, policy, params):
    # 8 sequences through 5 slots with stops at different steps: the running batch goes
    # 5 -> 4 -> 3 ... (buckets 8 covering 5, 4, 2, 1) and freed slots are refilled.
    sp = SamplingParams(max_new_tokens=14, stop_token_ids=[17, 99], **params)
    kw = dict(max_batch_size=5, sync_every=2, kv_compression=compression(policy))
    plain = make_engine(cuda_graphs=False, **kw)
    padded = make_engine(cuda_graphs=True, **kw)
    ref = plain.generate(prompts, sp, n=2)
    out = padded.generate(prompts, sp, n=2)
    assert padded._graphs is not None and not padded._graphs.capture
    assert plain._graphs is None
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    assert [c.finish_reason for c in out] == [c.finish_reason for c in ref]
    assert len(padded._graphs.steps) > 1  # the batch went through several buckets
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    if policy is not None:
        assert padded.stats["compression_events"] == plain.stats["compression_events"] > 0


def test_a_new_cache_gets_new_steps_and_release_drops_them(make_engine, prompts):
    engine = make_engine(cuda_graphs=True)
    engine.generate(prompts, SamplingParams(max_new_tokens=4, **GREEDY))
    first = engine._graphs
    assert first is not None and first.cache is engine.cache
    engine.generate(prompts, SamplingParams(max_new_tokens=40, **GREEDY))  # a longer cache
    assert engine._graphs is not first and engine._graphs.cache is engine.cache
    engine.release_cache()
    assert engine._graphs is None and engine.cache is None


def test_padded_begin_decode_rejects_a_pad_outside_the_slots(make_engine, prompts):
    engine = make_engine(cuda_graphs=True, max_batch_size=4)
    engine.generate(prompts, SamplingParams(max_new_tokens=2, **GREEDY))
    with pytest.raises(ValueError, match=r"pad_to must be in \[3, 4\]"):
        engine.cache.begin_decode(3, pad_to=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_graph_steps_decode_like_eager_steps(tiny_dirs, prompts, policy):
    """On a GPU: replayed graphs against launched steps (the attention of a padded step spans
    each row's capacity, so its split into blocks and the float sums may differ slightly)."""
    from rlkit.models import load_model
    from rlkit.rollout import Engine

    def make(graphs):
        model, tok = load_model(tiny_dirs["qwen3"])
        return Engine(
            model.to("cuda"), tok, dtype=torch.float32, max_batch_size=5, sync_every=2,
            kv_compression=compression(policy), cuda_graphs=graphs,
        )  # fmt: skip

    sp = SamplingParams(max_new_tokens=14, stop_token_ids=[17, 99], **GREEDY)
    graphed, eager = make(True), make(False)
    out, ref = graphed.generate(prompts, sp, n=2), eager.generate(prompts, sp, n=2)
    assert graphed._graphs is not None and graphed._graphs.capture
    assert len(graphed._graphs.graphs) > 1  # several buckets captured
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    # H2O keeps the entries with the largest attention summed over every step so far; a padded
    # step's softmax runs over each row's whole capacity, so those sums differ in their last
    # bits and a near-tie (common in a random tiny model's near-uniform attention) can keep a
    # different entry: later log-probs then move while the tokens stay the same (3.3e-3 and
    # 2.0e-2 measured in two H200 runs; how far depends on which entry flips, so the bound
    # only catches a broken step, not the tie). The other policies select from one step's
    # scores and match to 1e-4.
    atol = 5e-2 if policy == "h2o" else 1e-4
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)
    # A weight sync copies in place: the captured graphs decode with the new weights.
    fresh, _ = load_model(tiny_dirs["qwen3"])
    state = {k: v * 0.5 for k, v in fresh.state_dict().items()}
    graphed.load_state_dict(state)
    eager.load_state_dict(state)
    out, ref = graphed.generate(prompts, sp, n=2), eager.generate(prompts, sp, n=2)
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", [None, "snapkv"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cuda_graph_verify_steps_decode_like_eager_ones(
    tiny_dirs, prompts, policy, temperature, monkeypatch
):
    """On a GPU: speculative verify steps (k + 1 tokens per row) replayed from CUDA graphs
    against launched ones, greedy and sampled (same seed: the same uniforms), with the Triton
    verification kernel, and after a weight sync. Greedy without compression the graphed
    engine drafts on the device (`steps.SyncFreeSpecStep`); sampled, whose device drafts
    take other uniforms than the host's, both draft on the host."""
    from rlkit.config.schema import SpeculativeConfig
    from rlkit.models import load_model
    from rlkit.models.mtp import init_mtp
    from rlkit.rollout import Engine, steps
    from rlkit.rollout.drafters import MTPDrafter, SAMThenMTP

    device = policy is None and temperature == 0.0
    if not device:
        for cls in (MTPDrafter, SAMThenMTP):
            monkeypatch.setattr(cls, "on_device", lambda self: None)

    def make(graphs):
        model, tok = load_model(tiny_dirs["qwen3"])
        spec = SpeculativeConfig(drafter="sam+mtp", num_draft_tokens=3, sam_min_match=2)
        return Engine(
            model.to("cuda"), tok, dtype=torch.float32, max_batch_size=5, sync_every=2,
            kv_compression=compression(policy), cuda_graphs=graphs, speculative=spec,
            mtp=init_mtp(model.args, seed=1),
        )  # fmt: skip

    sp = SamplingParams(max_new_tokens=14, stop_token_ids=[17, 99], temperature=temperature, seed=5)
    graphed, eager = make(True), make(False)
    out, ref = graphed.generate(prompts, sp, n=2), eager.generate(prompts, sp, n=2)
    assert graphed._graphs is not None and graphed._graphs.capture
    verify = list(graphed._graphs.extra.values())
    assert len(verify) == 1 and verify[0].capture
    if device:  # a graph per (bucket, k)
        assert isinstance(verify[0], steps._SyncFreeGraphs)
        assert {k for _, k in verify[0].graphs} == {3}
    else:  # the host drafts: k + 1 tokens a row in the verify graphs
        assert {T for _, T in verify[0].graphs} == {4}
    assert {T for _, T in graphed._graphs.graphs} <= {1}
    _same_tokens_and_logprobs(out, ref, atol=1e-4)
    if temperature == 0.0:  # lossless against plain decoding too
        plain = eager.generate(prompts, sp, n=2, drafter="none")
        assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    fresh, _ = load_model(tiny_dirs["qwen3"])
    state = {k: v * 0.5 for k, v in fresh.state_dict().items()}
    graphed.load_state_dict(state)
    eager.load_state_dict(state)
    out, ref = graphed.generate(prompts, sp, n=2), eager.generate(prompts, sp, n=2)
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", [None, "snapkv", "h2o"])
def test_cuda_graph_steps_and_compressions_never_sync_the_host(tiny_dirs, prompts, policy):
    """On a GPU: a replayed decode step (inputs moved pinned and asynchronously) and a
    compression (Triton scores, selection, compaction) run under CUDA's sync debug mode
    "error": any host synchronisation inside them raises."""
    from rlkit.models import load_model
    from rlkit.rollout import Engine
    from rlkit.rollout.cuda_graphs import DecodeGraphs
    from rlkit.rollout.kv_cache import CompressedKVCache

    model, tok = load_model(tiny_dirs["qwen3"])
    engine = Engine(
        model.to("cuda"), tok, dtype=torch.bfloat16, max_batch_size=8, sync_every=4,
        kv_compression=compression(policy),
    )  # fmt: skip
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True, temperature=1.0, seed=1)
    engine.generate(prompts, sp, n=2)  # captures the graphs, compiles the kernels
    checked = {"steps": 0, "compressions": 0}
    real_step, real_compress = DecodeGraphs.step, CompressedKVCache.compress

    def step(self, batch, fed):
        if (self.bucket(batch), fed.shape[1]) not in self.graphs:
            return real_step(self, batch, fed)
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = real_step(self, batch, fed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked["steps"] += 1
        return out

    def compress(self, slots):
        torch.cuda.set_sync_debug_mode("error")
        try:
            n = real_compress(self, slots)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked["compressions"] += n
        return n

    DecodeGraphs.step, CompressedKVCache.compress = step, compress
    try:
        engine.generate(prompts, sp, n=2)
    finally:
        DecodeGraphs.step, CompressedKVCache.compress = real_step, real_compress
    assert checked["steps"] > 0
    assert (checked["compressions"] > 0) == (policy is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("drafter, mtp_vocab", [("mtp", 0), ("mtp", 64), ("sam+mtp", 0)])
def test_speculative_steps_wait_for_the_gpu_once(
    tiny_dirs, prompts, drafter, mtp_vocab, monkeypatch
):
    """On a GPU: a speculative step (drafting, the graphed verify forward, verification,
    emission) waits for the device once, for the kept counts and emitted tokens it must read
    on the host; host arrays go in pinned and asynchronously, emission writes without boolean
    masks. Counted under CUDA's sync debug mode "warn", one warning per synchronisation. The
    host-drafted step is the one compressed caches take (elsewhere these drafters run on the
    device, `test_sync_free_spec.py`): the device forms are switched off here."""
    import warnings

    from rlkit.config.schema import SpeculativeConfig
    from rlkit.models import load_model
    from rlkit.models.mtp import init_mtp
    from rlkit.rollout import Engine
    from rlkit.rollout.drafters import MTPDrafter, SAMThenMTP
    from rlkit.rollout.steps import SpecStep

    for cls in (MTPDrafter, SAMThenMTP):
        monkeypatch.setattr(cls, "on_device", lambda self: None)
    model, tok = load_model(tiny_dirs["qwen3"])
    spec = SpeculativeConfig(
        drafter=drafter, num_draft_tokens=3, sam_min_match=2, mtp_vocab=mtp_vocab
    )
    engine = Engine(
        model.to("cuda"), tok, dtype=torch.float32, max_batch_size=5, speculative=spec,
        mtp=init_mtp(model.args, seed=1),
    )  # fmt: skip
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=1.0, seed=3)
    engine.generate(prompts, sp, n=2)  # captures the graphs, compiles the kernels
    syncs: list[int] = []
    real = SpecStep.step

    def step(self, run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                real(self, run)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message).lower() for w in caught))

    SpecStep.step = step
    try:
        engine.generate(prompts, sp, n=2)
    finally:
        SpecStep.step = real
    assert syncs and max(syncs) == 1, syncs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", [None, "snapkv", "layer_hybrid", "h2o"])
def test_rotating_and_storing_in_one_call_decodes_like_separate_ops(
    make_engine, prompts, arch, policy, monkeypatch
):
    """The GPU decode step's seam (`KVCache.attend_rope`, `rlkit.kernels.rope_append`), taken
    here through the kernel's reference: the same tokens and log-probs as rotating in the
    model and storing in `attend`, for every cache layout (dense, a query ring, full layers
    beside compressed ones, H2O's statistics) and with q/k norms (qwen3)."""
    from rlkit.kernels import rope_append as ra

    sp = SamplingParams(max_new_tokens=14, stop_token_ids=[17, 99], temperature=1.0, seed=3)
    kw = dict(
        max_batch_size=5, sync_every=2, kv_compression=compression(policy), cuda_graphs=True,
        cpu_kernels=False,
    )  # fmt: skip
    ref = make_engine(arch, **kw).generate(prompts, sp, n=2)
    calls = []

    def kernel(*args):
        calls.append(args[0].shape)
        return ra.rope_append_reference(*args)

    monkeypatch.setattr(ra, "applies", lambda q: True)
    monkeypatch.setattr(ra, "rope_append_triton", kernel)
    out = make_engine(arch, **kw).generate(prompts, sp, n=2)
    assert calls and all(shape[1] == 1 for shape in calls)  # decode steps only
    _same_tokens_and_logprobs(out, ref, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("policy", [None, "snapkv", "layer_hybrid", "h2o"])
def test_rope_append_and_attention_in_one_call_decode_like_separate_ops(
    make_engine, prompts, arch, policy, monkeypatch
):
    """The GPU decode step's one-launch attention (`sparse_decode_attention.rope_decode_attention`:
    RoPE, the append, the query ring and the attention), taken here through its reference:
    the same tokens and log-probs as rotating and storing, then attending, for every cache
    layout; H2O (its statistic needs the probabilities) keeps the separate path."""
    from rlkit.kernels import rope_append as ra
    from rlkit.kernels import sparse_decode_attention as sda

    sp = SamplingParams(max_new_tokens=14, stop_token_ids=[17, 99], temperature=1.0, seed=3)
    kw = dict(
        max_batch_size=5, sync_every=2, kv_compression=compression(policy), cuda_graphs=True,
        cpu_kernels=False,
    )  # fmt: skip
    ref = make_engine(arch, **kw).generate(prompts, sp, n=2)
    calls = []

    def fused(*args, **knobs):
        calls.append(args[0].shape)
        return sda.rope_decode_attention_reference(*args, cpu_kernel=False)

    monkeypatch.setattr(ra, "applies", lambda q: True)
    monkeypatch.setattr(ra, "rope_append_triton", ra.rope_append_reference)  # H2O's path
    monkeypatch.setattr(sda, "rope_decode_applies", lambda q, length=0, kv_heads=1: True)
    monkeypatch.setattr(sda, "rope_decode_attention_triton", fused)
    out = make_engine(arch, **kw).generate(prompts, sp, n=2)
    assert (not calls) if policy == "h2o" else (calls and all(s[1] == 1 for s in calls))
    _same_tokens_and_logprobs(out, ref, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_gpu_layer_glue_decodes_like_the_layers(make_engine, prompts, arch, monkeypatch):
    """`Decoder._run_glued` (the GPU inference forward: residual adds fused with the norms,
    SiLU * up in one call), taken here through its kernels' references, prefill and padded
    decode steps alike: the same tokens and log-probs as the layers' own forward."""
    from rlkit.models.decoder import Decoder

    calls = []
    real = Decoder._run_glued

    def glued(self, *args):
        calls.append(args[0].shape)
        return real(self, *args)

    monkeypatch.setattr(Decoder, "_run_glued", glued)
    out, ref = _glued_against_layers(make_engine, prompts, arch, monkeypatch)
    assert calls
    _same_tokens_and_logprobs(out, ref, atol=1e-6)


def test_the_gpu_glue_takes_the_gate_up_kernel_where_it_applies(make_engine, prompts, monkeypatch):
    """Where `decode_gemm.gate_up_applies` (a wide MLP at <= 64 rows on a GPU), the glued step
    runs the gate/up GEMM with SiLU * up in one call (here its reference, with the dispatcher's
    knobs): the same tokens and log-probs as the layers' own forward, and the call is taken by
    the decode steps and not by a wider prefill."""
    from rlkit.kernels import decode_gemm as dg
    from rlkit.kernels import fused_norm

    from rlkit.models.decoder import linear

    rows = []

    def kernel(x, gate_up, **knobs):
        assert knobs == dg.GATE_UP_KNOBS
        rows.append(x.shape[0])
        # (The CPU engine's weights may be oneDNN-prepacked: the model's `linear` takes them.)
        return fused_norm.silu_mul_reference(linear(x, gate_up, None))

    monkeypatch.setattr(dg, "gate_up_applies", lambda x, w, b: b is None and x.shape[0] <= 8)
    monkeypatch.setattr(dg, "decode_gate_up_silu_triton", kernel)
    out, ref = _glued_against_layers(make_engine, prompts, "qwen2", monkeypatch)
    assert rows and max(rows) <= 8
    _same_tokens_and_logprobs(out, ref, atol=1e-6)


@pytest.mark.parametrize("splits", [2, 4])
def test_the_gpu_glue_sums_split_k_partials(make_engine, prompts, splits, monkeypatch):
    """Where `decode_gemm.split_k` applies (forced here on the CPU's plain weights), the glued
    step's o and down projections are split-K partial sums that the residual add sums: the
    same tokens and log-probs (to float32 summation order) as the layers' own forward, with
    both projections of every layer split (plain weights: a GPU's, not oneDNN's)."""
    from rlkit.kernels import decode_gemm as dg

    widths = []

    def split_k(x, w, b):
        if not isinstance(w, torch.Tensor) or w.is_mkldnn or b is not None:
            return 0
        widths.append(w.shape[1])
        return splits

    monkeypatch.setattr(dg, "split_k", split_k)
    out, ref = _glued_against_layers(make_engine, prompts, "qwen2", monkeypatch, prepack=False)
    assert len(set(widths)) == 2  # o (hidden wide) and down (intermediate wide)
    _same_tokens_and_logprobs(out, ref, atol=1e-5)


def test_gate_up_applies_only_in_the_measured_regime():
    from rlkit.kernels import decode_gemm as dg

    w = torch.zeros(2 * 4096, 8, dtype=torch.bfloat16)
    x = torch.zeros(64, 8, dtype=torch.bfloat16)
    assert not dg.gate_up_applies(x, w, None)  # on the CPU never
    if torch.cuda.is_available() and dg.HAS_TRITON:
        wc, xc = w.cuda(), x.cuda()
        assert dg.gate_up_applies(xc, wc, None)
        assert not dg.gate_up_applies(torch.zeros(65, 8, dtype=torch.bfloat16).cuda(), wc, None)
        assert not dg.gate_up_applies(xc, wc[:4096], None)  # intermediate 2048
        assert not dg.gate_up_applies(xc.float(), wc.float(), None)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_sampler_emitting_itself_decodes_like_emit_one(
    make_engine, prompts, top_p, monkeypatch
):
    """`Run.sample_emit` with `fused_emit` (a GPU's path: the sampler's kernels write the
    tokens, log-probs, last token, stop flag and count), taken here through the dispatcher's
    reference: the same tokens and log-probs as sampling and then `emit_one`, with stop ids,
    continuous batching and compaction; top-p (not a plain draw) falls back to `emit_one`."""
    from rlkit.kernels import sample_rows as sr

    from rlkit.rollout import scheduler

    sp = SamplingParams(max_new_tokens=14, stop_token_ids=[17, 99], temperature=1.0, seed=3)
    sp.top_p = top_p
    kw = dict(max_batch_size=5, sync_every=2, cuda_graphs=True, cpu_kernels=False)
    ref = make_engine("llama", **kw).generate(prompts, sp, n=2)
    calls = []
    real_init, real_sample = scheduler.Run.__init__, sr.sample_rows

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.fused_emit = True

    def sample_rows(logits, temperature, u, emit=None):
        calls.append(emit is not None)
        return real_sample(logits, temperature, u, emit)

    monkeypatch.setattr(scheduler.Run, "__init__", init)
    monkeypatch.setattr(sr, "sample_rows", sample_rows)
    out = make_engine("llama", **kw).generate(prompts, sp, n=2)
    assert calls == [] if top_p < 1 else calls and all(calls)
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    assert any(c.finish_reason == "stop" for c in out)  # a stop id ended some through the flag
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-6, rtol=0)
