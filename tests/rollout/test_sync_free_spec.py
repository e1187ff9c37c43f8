"""Speculative rollouts whose verify steps never sync (`steps.SyncFreeSpecStep`): SAM drafts on
the device (`drafters.DeviceSAM`) and the cache's lengths advance on the device, the host
reading counts every `sync_every` steps. On a CPU `cuda_graphs=True` runs the same padded
steps eagerly. Greedy output equals plain decoding's and the host-drafted `SpecStep`'s token
for token (continuous batching, stops, limits, capacity, max_batch), sampled tokens carry
the policy's log-probs, the state kept with the graphs serves later calls, and the engine
keeps the host path where the device one does not apply."""

import pytest
import torch
from test_speculative import _assert_policy_logprobs, _same

from rlkit.config.schema import KVCompressionConfig, SpeculativeConfig
from rlkit.models import load_model
from rlkit.models.mtp import init_mtp
from rlkit.rollout import Engine, SamplingParams, steps
from rlkit.rollout.sam import corpus_automaton


@pytest.fixture
def make(tiny_dirs):
    def make(
        arch="llama", k=3, graphs=True, max_batch=0, tail=(0, 0), match="latest",
        adaptive=False, min_match=2, **kwargs,
    ):  # fmt: skip
        model, tok = load_model(tiny_dirs[arch])
        spec = SpeculativeConfig(
            drafter="sam", num_draft_tokens=k, sam_min_match=min_match, max_batch=max_batch,
            tail_rows=tail[0], tail_draft_tokens=tail[1], sam_match=match,
            adaptive_draft=adaptive,
        )  # fmt: skip
        # cpu_kernels=False: the fused C step would take precedence over padded steps.
        kwargs.setdefault("cpu_kernels", False)
        return Engine(
            model, tok, dtype=torch.float32, speculative=spec, cuda_graphs=graphs, **kwargs
        )

    return make


def never_sync(monkeypatch) -> None:
    """From here on each sync-free step runs under CUDA's sync debug mode "error": a host
    read inside it fails the test."""
    step = steps.SyncFreeSpecStep.step

    def checked(self, run):
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(self, run)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(steps.SyncFreeSpecStep, "step", checked)


def _sync_free(engine) -> list:
    return [g for g in engine._graphs.extra.values() if isinstance(g, steps._SyncFreeGraphs)]


@pytest.mark.parametrize("match", ["latest", "first"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_output_equals_plain_and_host_drafted_decoding(make, prompts, arch, match):
    # 8 sequences through 3 slots (admission, compaction, refill), stop ids, mixed lengths.
    sp = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=[17, 99])
    engine = make(arch, max_batch_size=3, sync_every=2, match=match)
    out = engine.generate(prompts, sp, n=2)
    st = engine.stats
    (g,) = _sync_free(engine)
    (key,) = [k for k in engine._graphs.extra if k[0] == "sync-free"]
    assert key[-1] == (match == "latest")  # DeviceSAM's key ends with its latest flag
    # The buckets as the batch drains, one draft length.
    assert {p for p, _ in g.steps} <= {1, 2, 3} and len(g.steps) > 1
    assert {k for _, k in g.steps} == {3}
    assert st["spec/verify_steps"] == sum(g.steps.values()) > 0 and st["spec/plain_steps"] == 0
    _same(out, engine.generate(prompts, sp, n=2, drafter="none"))
    host = make(arch, graphs=False, max_batch_size=3, sync_every=2, match=match)
    _same(out, host.generate(prompts, sp, n=2))
    # The same drafts, the same acceptance: only where drafting ran differs.
    if arch == "llama":  # its greedy text loops: SAM's drafts pass
        assert st["spec/accept_len_mean"] > 1.3, st
    assert st["spec/drafted_per_step"] > 0 and 0 < st["spec/accept_rate"] <= 1


def test_limits_stop_strings_and_capacity(make, prompts):
    engine = make(k=4, max_seq_len=40)
    tok = engine.tokenizer
    for sp in (
        SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_new_tokens=7, temperature=0.0, ignore_eos=True),
        SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True),  # capped by 40
    ):
        out = engine.generate(prompts, sp)
        _same(out, engine.generate(prompts, sp, drafter="none"))
        assert [len(c.token_ids) for c in out] == [
            min(sp.max_new_tokens, 40 - len(p)) for p in prompts
        ]
    free = engine.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    stop = tok.decode(free.token_ids[6:8])
    sp = SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop])
    _same(engine.generate(prompts[:1], sp), engine.generate(prompts[:1], sp, drafter="none"))
    assert _sync_free(engine)


def test_max_batch_drafts_only_in_the_tail(make, prompts):
    sp = SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=[17, 99])
    tail = make(max_batch=2, max_batch_size=3, sync_every=2)
    always = make(max_batch_size=3, sync_every=2)
    out = tail.generate(prompts, sp, n=2)
    drafted = tail.stats["spec/drafted_per_step"]
    _same(out, always.generate(prompts, sp, n=2))
    assert 0 < drafted < always.stats["spec/drafted_per_step"]
    _same(out, tail.generate(prompts, sp, n=2, drafter="none"))


def test_a_longer_draft_in_the_tail(make, prompts):
    """tail_rows / tail_draft_tokens: k = 2 while more than 2 sequences run, 6 after; one graph
    per (bucket, k); greedy output still plain decoding's and the host-drafted step's with the
    same setting."""
    sp = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[17, 99])
    tail = make(k=2, tail=(2, 6), max_batch_size=4, sync_every=2)
    out = tail.generate(prompts, sp, n=2)
    drafted = tail.stats["spec/drafted_per_step"]
    (g,) = _sync_free(tail)
    assert {(p, k) for p, k in g.steps if k == 6} and all(
        (k == 6) == (p <= 2) for p, k in g.steps
    ), g.steps
    _same(out, tail.generate(prompts, sp, n=2, drafter="none"))
    host = make(k=2, tail=(2, 6), graphs=False, max_batch_size=4, sync_every=2)
    _same(out, host.generate(prompts, sp, n=2))
    plain_k = make(k=2, max_batch_size=4, sync_every=2)
    plain_k.generate(prompts, sp, n=2)
    # The tail's rows draft further (the greedy text loops, so SAM's drafts run long).
    assert drafted > plain_k.stats["spec/drafted_per_step"]
    host_k = make(k=2, graphs=False, max_batch_size=4, sync_every=2)
    host_k.generate(prompts, sp, n=2)
    assert host.stats["spec/drafted_per_step"] > host_k.stats["spec/drafted_per_step"]


def test_the_draft_adapter_halves_doubles_and_stays_within_bounds():
    a = steps.DraftAdapter(True)
    assert a.k(6) == 6  # no round seen yet: the full length
    a.observe(12, 2)  # 17% passed: halve
    assert a.k(6) == 3
    a.observe(12 + 6, 2 + 1)  # 17% again: 1
    assert a.k(6) == 1
    a.observe(18 + 4, 3 + 2)  # 50%: stays at 1
    assert a.k(6) == 1
    a.observe(22 + 4, 5 + 3)  # 75%: double
    assert a.k(6) == 2
    a.observe(26 + 8, 8 + 4)  # 50%: stays
    assert a.k(6) == 2
    a.observe(34 + 8, 12 + 8)  # all passed: double
    assert a.k(6) == 4 and a.k(3) == 3  # never past the configured (or the tail's) length
    a.observe(42 + 4, 20 + 4)
    assert a.k(6) == 6
    a.observe(46, 24)  # a round that drafted nothing decides nothing
    assert a.k(6) == 6
    off = steps.DraftAdapter(False)
    off.observe(100, 0)
    assert off.k(5) == 5


def test_the_draft_adapter_stops_drafting_and_probes_with_a_growing_wait():
    """Halved from 1 the length is 0; after PROBE_WAIT rounds without drafts one round drafts
    a token; a probe that fails doubles the wait (up to PROBE_WAIT_MAX), one that passes
    grows the length and resets it."""
    a = steps.DraftAdapter(True)
    d = acc = 0

    def round_(drafted: int, accepted: int, full: int = 4) -> int:
        nonlocal d, acc
        k = a.k(full)
        d, acc = d + drafted * (k > 0), acc + accepted * (k > 0)
        a.observe(d, acc)
        return k

    assert [round_(4, 0) for _ in range(3)] == [4, 2, 1]  # nothing passes: 4, 2, 1, then 0
    waits = []
    for _ in range(6):  # six probes fail
        lengths = []
        while not lengths or lengths[-1] == 0:
            lengths.append(round_(4, 0))
        assert lengths[-1] == 1  # the probe drafts one token
        waits.append(len(lengths) - 1)
    assert waits == [2, 4, 8, 16, 16, 16]
    assert round_(4, 0) == 0
    while (k := round_(4, 4)) == 0:  # the text turns guessable: the next probe passes
        pass
    assert k == 1 and a.k(4) == 2
    assert [round_(4, 4) for _ in range(2)] == [2, 4]
    assert [round_(4, 0) for _ in range(3)] == [4, 2, 1]  # the wait starts over
    assert [round_(4, 0) for _ in range(3)] == [0, 0, 1]
    off = steps.DraftAdapter(False)
    off.observe(100, 0)
    assert off.k(5) == 5


@pytest.mark.parametrize("graphs", [True, False])
def test_adaptive_draft_shortens_drafts_that_fail_and_stays_lossless(
    make, reference, prompts, graphs
):
    """adaptive_draft: sampled text of a random model defeats SAM (minimum match 1, k = 4), so
    the rounds' drafts rarely pass and the draft length falls below k, down to 0 (steps
    without drafts, then a one-token probe); the device step then runs graphs of shorter
    drafts. The sampled tokens carry the policy's log-probs, and greedy output is still plain
    decoding's token for token."""
    sp = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3)
    fixed = make(k=4, graphs=graphs, min_match=1, max_batch_size=4, sync_every=2)
    fixed.generate(prompts, sp, n=2)
    adaptive = make(k=4, graphs=graphs, min_match=1, adaptive=True, max_batch_size=4, sync_every=2)
    out = adaptive.generate(prompts, sp, n=2)
    assert fixed.stats["spec/accept_rate"] < steps.DraftAdapter.LOW, fixed.stats
    assert adaptive.stats["spec/drafted_per_step"] < 0.75 * fixed.stats["spec/drafted_per_step"]
    # (The host-drafted step is plain wherever no row's SAM matched, adaptive or not.)
    assert adaptive.stats["spec/plain_steps"] > fixed.stats["spec/plain_steps"]
    _assert_policy_logprobs(reference("llama"), prompts, out, sp)
    if graphs:
        (g,) = _sync_free(adaptive)
        assert {k for _, k in g.steps} >= {4, 2, 1, 0}, g.steps
        (g,) = _sync_free(fixed)
        assert {k for _, k in g.steps} == {4}
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[17, 99])
    out = adaptive.generate(prompts, greedy, n=2)
    _same(out, adaptive.generate(prompts, greedy, n=2, drafter="none"))


@pytest.mark.parametrize(
    "graphs, device",
    [
        (True, "cpu"),
        (False, "cpu"),
        pytest.param(
            True, "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="the captured k = 0 graph needs a GPU"
            ),
        ),
    ],
)  # fmt: skip
def test_adaptive_mtp_drafts_catch_up_through_steps_without_drafts(
    tiny_dirs, reference, prompts, monkeypatch, graphs, device
):
    """A random MTP module's argmax drafts rarely pass sampled text of a random model (its
    near-uniform distribution): with adaptive_draft the length falls to 0, where each step
    feeds one token a row and the module only catches up on it (the device drafter's k = 0
    step, `SyncFreeSpecStep`, captured on a GPU; or the host drafter's plain step). Its
    block cache stays in step with the text: after every device step a row's next block
    position plus its pairs still to catch up on is the policy cache's next position.
    Greedy output is plain decoding's and sampled tokens carry the policy's log-probs."""
    seen = []
    step = steps.SyncFreeSpecStep.step

    def checked(self, run):
        step(self, run)
        B, mtp = len(run.seq), self.drafter
        # Next positions: the device lengths plus each cache's offset (the block's cache
        # starts at the last prompt position).
        trunk = run.cache.lengths_on_device(B) + run.cache._off_dev[:B]
        block = mtp.cache.lengths_on_device(B) + mtp.cache._off_dev[:B] + mtp.n[:B]
        assert torch.equal(block, trunk), (self.adapt.last_k, block, trunk)
        seen.append(self.adapt.last_k)

    monkeypatch.setattr(steps.SyncFreeSpecStep, "step", checked)

    def engine() -> Engine:
        model, tok = load_model(tiny_dirs["llama"])
        spec = SpeculativeConfig(
            drafter="mtp", num_draft_tokens=3, adaptive_draft=True, mtp_draft="argmax"
        )
        return Engine(
            model.to(device), tok, dtype=torch.float32, speculative=spec, cuda_graphs=graphs,
            max_batch_size=4, sync_every=2, mtp=init_mtp(model.args, seed=0), max_seq_len=96,
            cpu_kernels=False,
        )  # fmt: skip

    sp = SamplingParams(max_new_tokens=40, temperature=1.0, seed=3)
    adaptive = engine()
    out = adaptive.generate(prompts, sp, n=2)
    assert adaptive.stats["spec/plain_steps"] > 0, adaptive.stats
    assert adaptive.stats["spec/verify_steps"] > 0, adaptive.stats
    _assert_policy_logprobs(reference("llama"), prompts, out, sp)
    if graphs:
        (g,) = _sync_free(adaptive)
        assert 0 in {k for _, k in g.steps}, g.steps
        assert 0 in seen and 1 in seen[seen.index(0) :], seen  # checked at 0, then a probe
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[17, 99])
    got = adaptive.generate(prompts, greedy, n=2)
    atol = 1e-4 if device == "cuda" else 1e-5
    _same(got, adaptive.generate(prompts, greedy, n=2, drafter="none"), atol=atol)


def test_the_tail_setting_samples_the_policy(make, reference, prompts):
    sp = SamplingParams(max_new_tokens=16, seed=5, temperature=1.0, top_p=0.9)
    engine = make("qwen3", k=2, tail=(3, 5), max_batch_size=4, sync_every=3)
    out = engine.generate(prompts, sp, n=2)
    _assert_policy_logprobs(reference("qwen3"), prompts, out, sp)
    (g,) = _sync_free(engine)
    assert {k for _, k in g.steps} == {2, 5}
    _same(
        out,
        make("qwen3", k=2, tail=(3, 5), max_batch_size=4, sync_every=3).generate(prompts, sp, n=2),
    )


@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)],
    ids=["t1", "t0.7-k5", "t1.3-p0.8"],
)
def test_sampled_tokens_carry_the_policys_logprobs(make, reference, prompts, params):
    sp = SamplingParams(max_new_tokens=14, seed=3, stop_token_ids=[17], **params)
    engine = make("qwen3", max_batch_size=4, sync_every=3)
    out = engine.generate(prompts, sp, n=3)
    _assert_policy_logprobs(reference("qwen3"), prompts, out, sp)
    assert _sync_free(engine) and engine.stats["spec/verify_steps"] > 0
    # The same seed, the same draws: a second engine gives the same samples.
    _same(out, make("qwen3", max_batch_size=4, sync_every=3).generate(prompts, sp, n=3))


def test_later_calls_reuse_the_graphs_state(make, prompts):
    """Calls of other sizes on one engine (the state kept with its graphs: last tokens,
    counts, lengths, SAM's texts) give what fresh engines give."""
    engine = make(max_batch_size=4, sync_every=2)
    calls = [
        (prompts, SamplingParams(max_new_tokens=18, temperature=0.0), 2),
        # 3 sequences on the 4-slot cache: the 3 rows pad to the bucket of 4, past the run's
        # own slots.
        (prompts[1:], SamplingParams(max_new_tokens=14, temperature=0.0, ignore_eos=True), 1),
        (prompts[2:], SamplingParams(max_new_tokens=9, temperature=0.0, ignore_eos=True), 1),
        (prompts[:3], SamplingParams(max_new_tokens=18, temperature=0.0, stop_token_ids=[17]), 3),
    ]
    for p, sp, n in calls:
        _same(
            engine.generate(p, sp, n=n), make(max_batch_size=4, sync_every=2).generate(p, sp, n=n)
        )
    assert len(_sync_free(engine)) == 1


def test_host_drafting_where_the_device_form_does_not_apply(make, prompts):
    sp = SamplingParams(max_new_tokens=12, temperature=0.0)
    # A static automaton has no device form.
    static = make()
    static.static_corpus = corpus_automaton([[5, 17, 99, 3, 8, 8]], separator=0)
    static.generate(prompts, sp)
    assert not _sync_free(static) and static._graphs.extra
    # A compressed cache's trigger is on the host.
    cfg = KVCompressionConfig(policy="snapkv", budget=10, window=3, interval=5)
    sparse = make(kv_compression=cfg)
    out = sparse.generate(prompts, sp)
    assert not _sync_free(sparse)
    _same(out, sparse.generate(prompts, sp, drafter="none"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "drafter, temperature", [("sam", 0.0), ("sam+mtp", 0.0), ("mtp", 0.0), ("sam+mtp", 1.0)]
)
def test_cuda_graph_steps_equal_host_drafting_and_never_sync(
    tiny_dirs, prompts, monkeypatch, drafter, temperature
):
    """On a GPU: captured sync-free steps give the host-drafted `SpecStep`'s greedy output,
    and once captured a step runs under CUDA's sync debug mode "error" (no host read); the
    MTP drafters' block, heads and draws inside the step too. The cache's 64 positions cap
    the 30-token prompt's rows at 34 tokens, the others' at 40: a tail of at most 3 rows
    comes whatever the stops."""

    def engine(graphs):
        model, tok = load_model(tiny_dirs["llama"])
        spec = SpeculativeConfig(
            drafter=drafter, num_draft_tokens=3, sam_min_match=2, tail_rows=3,
            tail_draft_tokens=6, mtp_vocab=64,
        )  # fmt: skip
        return Engine(
            model.cuda(), tok, dtype=torch.float32, speculative=spec, cuda_graphs=graphs,
            max_batch_size=4, sync_every=3, mtp=init_mtp(model.args, seed=0), max_seq_len=64,
        )  # fmt: skip

    sp = SamplingParams(max_new_tokens=40, temperature=temperature, seed=3, stop_token_ids=[17])
    fast = engine(True)
    out = fast.generate(prompts, sp, n=2)
    (g,) = _sync_free(fast)
    assert g.capture and {k for _, k in g.graphs} == {3, 6}  # a longer draft in the tail
    if temperature == 0.0:
        _same(out, engine(False).generate(prompts, sp, n=2), atol=1e-4)
    never_sync(monkeypatch)
    again = fast.generate(prompts, sp, n=2)
    # The second call of an engine: `mtp_vocab`'s token counts have grown (another draft
    # head), which changes sampled drafts and so the coupled output; greedy output is the
    # policy's either way.
    ref = engine(True)
    ref.generate(prompts, sp, n=2)
    _same(again, ref.generate(prompts, sp, n=2), atol=1e-4)
