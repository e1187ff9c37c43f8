"""Several draft chains a row verified in one step (`rollout.speculative.draft_chains`): the
step feeds each row's last token and C deterministic chains as a tree
(`KVCache.begin_decode_device` with chain k, the attention's tree mask), `verify_chains` keeps
one path and the cache keeps that path's entries (`KVCache.keep_path`). On a CPU
`cuda_graphs=True` runs the same padded steps eagerly. Greedy output equals plain decoding's
token for token; sampled tokens carry the policy's log-probs; the tail's chains get their
own graphs; settings the step cannot take are refused before any work."""

import pytest
import torch
from test_speculative import _assert_policy_logprobs, _same
from test_sync_free_spec import never_sync

from rlkit.config.schema import SpeculativeConfig
from rlkit.models import load_model
from rlkit.models.mtp import init_mtp
from rlkit.rollout import Engine, SamplingParams, steps
from rlkit.rollout.drafters import DeviceMTP, DeviceSAM


@pytest.fixture
def make(tiny_dirs):
    def make(arch="llama", drafter="sam", k=3, chains=2, tail=(0, 0, 0), kinds=None, **kwargs):
        model, tok = load_model(tiny_dirs[arch])
        spec = SpeculativeConfig(
            drafter=drafter, num_draft_tokens=k, sam_min_match=2, draft_chains=chains,
            tail_rows=tail[0], tail_draft_tokens=tail[1], tail_draft_chains=tail[2],
            mtp_draft="argmax", mtp_vocab=kwargs.pop("mtp_vocab", 0),
        )  # fmt: skip
        if kinds is not None:
            spec.chain_kinds = kinds
        kwargs.setdefault("cpu_kernels", False)  # the fused C step would take precedence
        kwargs.setdefault("cuda_graphs", True)
        mtp = init_mtp(model.args, seed=1) if "mtp" in drafter else None
        return Engine(model, tok, dtype=torch.float32, speculative=spec, mtp=mtp, **kwargs)

    return make


def _graphs(engine) -> steps._SyncFreeGraphs:
    (g,) = [g for g in engine._graphs.extra.values() if isinstance(g, steps._SyncFreeGraphs)]
    return g


@pytest.mark.parametrize(
    "arch, drafter, chains",
    [
        ("llama", "sam", 2),
        ("qwen3", "sam", 2),
        ("llama", "mtp", 2),
        ("llama", "sam+mtp", 2),
        ("llama", "sam+mtp", 3),
        ("qwen3", "sam+mtp", 4),
    ],
)
def test_greedy_output_equals_plain_decoding(make, prompts, arch, drafter, chains):
    # 8 sequences through 3 slots (admission, compaction, refill), stop ids, mixed lengths.
    sp = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=[17, 99])
    engine = make(arch, drafter, chains=chains, max_batch_size=3, sync_every=2)
    out = engine.generate(prompts, sp, n=2)
    st = engine.stats
    assert st["spec/verify_steps"] > 0 and st["spec/drafted_per_step"] > 0
    g = _graphs(engine)
    assert {key[2] for key in g.steps} == {chains}, g.steps  # (bucket, k, chains)
    _same(out, engine.generate(prompts, sp, n=2, drafter="none"))


@pytest.mark.parametrize("one_pass", [0, 10_000], ids=["by-depth", "one-pass"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_decoy_first_chain_keeps_the_second_chains_path(
    make, prompts, monkeypatch, arch, one_pass
):
    """Chain 0 a decoy (SAM's draft with its first token changed: it never passes), chain 1
    SAM's draft: every accepted draft comes from the second chain, whose entries the cache
    must move to the row's next places (`keep_path`), and whose tree positions must see only
    their own chain. Greedy output is still plain decoding's; the accepted length SAM's."""
    monkeypatch.setattr(steps, "CHAIN_ONE_PASS_ROWS", one_pass)
    real = DeviceSAM.propose_chains

    def decoy_first(self, rows, room, k, kinds):
        assert kinds == ("sam", "sam_other")
        t, n = real(self, rows, room, k, ("sam",))
        bad = t.clone()
        bad[:, 0, 0] = (t[:, 0, 0] + 1) % 256
        return torch.cat([bad, t], 1), torch.cat([n, n], 1)

    sp = SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=[17, 99])
    one = make(arch, "sam", chains=1, max_batch_size=3, sync_every=2)
    want = one.generate(prompts, sp, n=2)
    monkeypatch.setattr(DeviceSAM, "propose_chains", decoy_first)
    two = make(arch, "sam", chains=2, max_batch_size=3, sync_every=2)
    _same(two.generate(prompts, sp, n=2), want)
    st = two.stats
    assert st["spec/other_chain_rate"] > 0.1, st
    assert st["spec/accept_len_mean"] == pytest.approx(one.stats["spec/accept_len_mean"], abs=0.05)


def test_chain_kinds_pick_the_chains_and_their_order(make, prompts, monkeypatch):
    """chain_kinds: SAM's two occurrences and MTP's argmax chain, no runner-up (its extra MTP
    passes are not made); greedy output is still plain decoding's."""
    runner_ups = []
    real = DeviceMTP._draft

    def spy(self, rows, k, runner_up):
        runner_ups.append(runner_up)
        return real(self, rows, k, runner_up)

    monkeypatch.setattr(DeviceMTP, "_draft", spy)
    sp = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=[17, 99])
    engine = make("llama", "sam+mtp", chains=3, kinds=["sam_other", "mtp", "sam"])
    out = engine.generate(prompts, sp, n=2)
    assert runner_ups and not any(runner_ups)
    _same(out, engine.generate(prompts, sp, n=2, drafter="none"))
    assert engine.speculative.chain_order() == ["sam_other", "mtp", "sam"]


def test_more_chains_pass_more_tokens_a_step(make, prompts):
    """SAM's two occurrences against one: on the looping greedy text of the tiny llama the
    second chain passes where the first does not, at least sometimes; never fewer tokens."""
    sp = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    lens = {}
    for chains in (1, 2):
        engine = make("llama", "sam", chains=chains)
        engine.generate(prompts, sp, n=1)
        lens[chains] = engine.stats["spec/accept_len_mean"]
    assert lens[2] >= lens[1] > 1.0, lens


def test_the_tails_chains(make, prompts):
    """tail_draft_chains: one chain of 2 while more than 2 sequences run, 3 chains of 4 after;
    one graph per (bucket, k, chains); greedy output still plain decoding's."""
    sp = SamplingParams(max_new_tokens=30, temperature=0.0, stop_token_ids=[17, 99])
    engine = make("llama", "sam+mtp", k=2, chains=1, tail=(2, 4, 3), max_batch_size=4)
    out = engine.generate(prompts, sp, n=2)
    g = _graphs(engine)
    tail = {key for key in g.steps if len(key) == 3}
    assert tail and all(p <= 2 and key == (p, 4, 3) for key in tail for p in key[:1]), g.steps
    assert all(k == 2 and p > 2 for p, k in [key for key in g.steps if len(key) == 2]), g.steps
    _same(out, engine.generate(prompts, sp, n=2, drafter="none"))


@pytest.mark.parametrize("one_pass", [0, 10_000], ids=["by-depth", "one-pass"])
@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)],
    ids=["t1", "t0.7-k5", "t1.3-p0.8"],
)
def test_sampled_tokens_carry_the_policys_logprobs(
    make, reference, prompts, params, one_pass, monkeypatch
):
    # Both ways of computing the tree's distributions (`CHAIN_ONE_PASS_ROWS`).
    monkeypatch.setattr(steps, "CHAIN_ONE_PASS_ROWS", one_pass)
    sp = SamplingParams(max_new_tokens=14, seed=3, stop_token_ids=[17], **params)
    engine = make("qwen3", "sam+mtp", chains=4, max_batch_size=4, sync_every=3)
    out = engine.generate(prompts, sp, n=3)
    _assert_policy_logprobs(reference("qwen3"), prompts, out, sp)
    assert engine.stats["spec/verify_steps"] > 0
    # The same seed, the same draws.
    again = make("qwen3", "sam+mtp", chains=4, max_batch_size=4, sync_every=3)
    _same(out, again.generate(prompts, sp, n=3))


def test_settings_the_step_cannot_take_are_refused(make):
    with pytest.raises(ValueError, match="needs the verify step that never syncs"):
        make(cuda_graphs=False)
    with pytest.raises(ValueError, match=r"draft_chains \(3\) is more than drafter 'sam'"):
        make(chains=3)
    spec = SpeculativeConfig(drafter="sam+mtp", draft_chains=2, mtp_draft="sample")
    assert spec.chains_problem() == (
        "draft_chains",
        "(2) needs deterministic drafts: mtp_draft argmax, got 'sample'",
    )
    spec = SpeculativeConfig(drafter="sam", tail_draft_chains=2)
    assert spec.chains_problem()[0] == "tail_draft_chains"
    for kinds in (["sam", "mtp_second"], ["sam", "sam"]):
        spec = SpeculativeConfig(drafter="sam", draft_chains=2, chain_kinds=kinds)
        assert spec.chains_problem()[0] == "chain_kinds"
    # sam makes two of the default kinds, in their order; mtp_runner_up is not SAM's.
    assert SpeculativeConfig(drafter="sam").chain_order() == ["sam", "sam_other"]
    spec = SpeculativeConfig(drafter="sam+mtp", draft_chains=3, chain_kinds=["sam", "mtp"])
    assert "more than drafter 'sam+mtp' makes of chain_kinds" in spec.chains_problem()[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cuda_graph_chain_steps_equal_plain_and_never_sync(
    tiny_dirs, prompts, monkeypatch, temperature
):
    """On a GPU: captured steps of 4 chains in the tail (the tree attention in the Triton
    kernel, the chains' rule, the cache's path kept) give plain decoding's greedy output, and
    once captured a step runs under CUDA's sync debug mode "error"."""

    def engine():
        model, tok = load_model(tiny_dirs["llama"])
        spec = SpeculativeConfig(
            drafter="sam+mtp", num_draft_tokens=3, sam_min_match=2, tail_rows=3,
            tail_draft_tokens=4, tail_draft_chains=4, mtp_vocab=64, mtp_draft="argmax",
        )  # fmt: skip
        return Engine(
            model.cuda(), tok, dtype=torch.float32, speculative=spec, cuda_graphs=True,
            max_batch_size=4, sync_every=3, mtp=init_mtp(model.args, seed=0), max_seq_len=64,
        )  # fmt: skip

    sp = SamplingParams(max_new_tokens=40, temperature=temperature, seed=3, stop_token_ids=[17])
    fast = engine()
    out = fast.generate(prompts, sp, n=2)
    g = _graphs(fast)
    assert g.capture and {key[1:] for key in g.graphs if len(key) == 3} == {(4, 4)}
    if temperature == 0.0:
        _same(out, fast.generate(prompts, sp, n=2, drafter="none"), atol=1e-4)
    never_sync(monkeypatch)
    again = fast.generate(prompts, sp, n=2)
    ref = engine()
    ref.generate(prompts, sp, n=2)
    _same(again, ref.generate(prompts, sp, n=2), atol=1e-4)


def test_the_lm_head_runs_on_the_paths_nodes_only(make, prompts, monkeypatch):
    """Past `CHAIN_ONE_PASS_ROWS` tree positions a step of C chains computes the sampling
    distribution at the k + 1 nodes its path reaches, a row each (the LM head over B rows a
    depth), not at all 1 + C * k positions."""
    monkeypatch.setattr(steps, "CHAIN_ONE_PASS_ROWS", 0)
    engine = make("llama", "sam", k=3, chains=2, max_batch_size=4)
    real, widths = engine.model.logits, []

    def logits(h):
        widths.append(h.shape[0])
        return real(h)

    monkeypatch.setattr(engine.model, "logits", logits)
    engine.generate(prompts, SamplingParams(max_new_tokens=12, seed=1, temperature=1.0))
    # Prefill's last positions, then steps of a padded bucket of <= 4 rows: 4 calls a step.
    assert widths and max(widths) <= 4, widths


def test_the_device_drafters_make_the_chains_the_config_names():
    from rlkit.config.schema import DRAFTER_CHAINS
    from rlkit.rollout.drafters import DeviceSAMThenMTP

    makes = {"sam": DeviceSAM, "mtp": DeviceMTP, "sam+mtp": DeviceSAMThenMTP}
    assert {name: cls.chain_kinds for name, cls in makes.items()} == DRAFTER_CHAINS
