"""Speculative rollouts (`steps.SpecStep` with each drafter) on tiny random models: greedy
output equals plain decoding's token for token (with continuous batching, stops, limits,
padded steps and compressed caches), sampled tokens carry the policy's log-probs, and the
MTP drafter drafts what the MTP module's training forward predicts."""

import numpy as np
import pytest
import torch

from rlkit.config.schema import KVCompressionConfig, SpeculativeConfig
from rlkit.models import load_model
from rlkit.models.mtp import init_mtp
from rlkit.rollout import Engine, SamplingParams


@pytest.fixture
def make_spec(tiny_dirs):
    def make(
        arch="llama", drafter="sam+mtp", k=3, seed=0, mtp_vocab=0, max_batch=0, tail=(0, 0),
        mtp_draft="sample", **kwargs,
    ):  # fmt: skip
        model, tok = load_model(tiny_dirs[arch])
        spec = SpeculativeConfig(
            drafter=drafter, num_draft_tokens=k, sam_min_match=2, mtp_vocab=mtp_vocab,
            max_batch=max_batch, tail_rows=tail[0], tail_draft_tokens=tail[1],
            mtp_draft=mtp_draft,
        )  # fmt: skip
        mtp = init_mtp(model.args, seed=seed)
        return Engine(model, tok, dtype=torch.float32, speculative=spec, mtp=mtp, **kwargs)

    return make


def _assert_policy_logprobs(model, prompts, out, sp):
    """Each emitted token's log-prob is the policy's under the sampling distribution."""
    from rlkit.rollout import sampling_logprobs

    for c in out:
        prompt = prompts[c.prompt_index]
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([prompt + c.token_ids])))[0]
        logp = sampling_logprobs(logits[len(prompt) - 1 : -1], sp)
        want = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.isfinite(want).all(), "a token outside the top-k / top-p set was emitted"
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)


def _same(out, ref, atol=1e-5):
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    assert [c.finish_reason for c in out] == [c.finish_reason for c in ref]
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "arch, drafter",
    [("llama", "mtp"), ("llama", "sam"), ("llama", "sam+mtp"), ("qwen3", "sam+mtp")],
)
def test_greedy_speculative_equals_plain_decoding(make_spec, prompts, drafter, arch):
    # 8 sequences through 3 slots (admission, compaction, refill), stop ids, mixed lengths.
    sp = SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=[17, 99])
    engine = make_spec(arch, drafter, max_batch_size=3, sync_every=2)
    ref = engine.generate(prompts, sp, n=2, drafter="none")
    out = engine.generate(prompts, sp, n=2)
    _same(out, ref)
    st = engine.stats
    assert st["spec/verify_steps"] > 0 and st["spec/accept_len_mean"] >= 1.0
    if drafter != "mtp" and arch == "llama":  # its greedy text loops: SAM's drafts pass
        assert st["spec/accept_len_mean"] > 1.3, st


@pytest.mark.parametrize("drafter", ["mtp", "sam+mtp"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_max_batch_decodes_plain_steps_until_the_batch_shrinks(
    make_spec, reference, prompts, drafter, temperature
):
    """speculative.max_batch = 2 with 3 slots: plain steps while 3 sequences run, drafts once
    2 or fewer are left (the tail); greedy output stays the plain decoding's, sampled tokens
    carry the policy's log-probs, and the drafter kept up through the plain steps."""

    sp = SamplingParams(max_new_tokens=20, temperature=temperature, seed=4, stop_token_ids=[17, 99])
    engine = make_spec("llama", drafter, max_batch=2, max_batch_size=3, sync_every=2)
    out = engine.generate(prompts, sp, n=2)
    st = engine.stats
    assert st["spec/plain_steps"] > 0 and st["spec/verify_steps"] > 0, st
    if temperature == 0.0:
        _same(out, engine.generate(prompts, sp, n=2, drafter="none"))
        always = make_spec("llama", drafter, max_batch_size=3, sync_every=2)
        _same(out, always.generate(prompts, sp, n=2))
        assert always.stats["spec/verify_steps"] > st["spec/verify_steps"]
    else:
        _assert_policy_logprobs(reference("llama"), prompts, out, sp)
    with pytest.raises(ValueError, match="max_batch must be >= 0"):
        make_spec("llama", drafter, max_batch=-1)


def test_limits_stop_strings_and_capacity(make_spec, prompts):
    engine = make_spec("llama", "sam", k=4, max_seq_len=40)
    tok = engine.tokenizer
    for sp in (
        SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
        SamplingParams(max_new_tokens=7, temperature=0.0, ignore_eos=True),
        SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True),  # capped by 40
    ):
        _same(engine.generate(prompts, sp), engine.generate(prompts, sp, drafter="none"))
    free = engine.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    stop = tok.decode(free.token_ids[6:8])
    sp = SamplingParams(max_new_tokens=20, temperature=0.0, stop=[stop])
    _same(engine.generate(prompts[:1], sp), engine.generate(prompts[:1], sp, drafter="none"))


@pytest.mark.parametrize(
    "drafter, temperature, mtp_vocab, more",
    [
        ("sam", 0.0, 0, {}),
        ("sam+mtp", 0.0, 0, {}),
        ("sam+mtp", 1.0, 64, {}),
        ("mtp", 0.0, 64, {}),
        ("mtp", 1.0, 0, {}),
        ("mtp", 0.0, 0, {"tail": (3, 6)}),
        ("mtp", 1.0, 0, {"tail": (3, 6), "mtp_draft": "argmax"}),
        ("sam+mtp", 1.0, 64, {"mtp_draft": "argmax"}),
    ],
)
def test_padded_steps_draft_on_the_device(
    make_spec, reference, prompts, drafter, temperature, mtp_vocab, more
):
    """`cuda_graphs=True` on a CPU runs the padded steps a CUDA graph replays eagerly. Over a
    dense cache every drafter drafts on the device (`steps.SyncFreeSpecStep`: `DeviceSAM`,
    `DeviceMTP`, `DeviceSAMThenMTP`): greedy output is the host-drafted steps' and plain
    decoding's, with the same drafts (the same share accepted, where no early stop makes the
    two paths run rows past their end differently); sampled tokens carry the policy's
    log-probs and a seed reproduces them. With a tail setting the steps of the last rows
    draft longer (a step per (bucket, k)); with `mtp_draft: argmax` sampled runs' MTP drafts
    are deterministic (the drafter's key says temperature 0, no q)."""
    from rlkit.rollout import steps

    # The 30-token prompt's rows stop at 16 tokens, the others at 22: a tail comes.
    sp = SamplingParams(max_new_tokens=22, temperature=temperature, seed=5, stop_token_ids=[17, 99])
    # cpu_kernels=False: the fused C step would take precedence over padded steps on a CPU.
    kw = dict(
        max_batch_size=5, sync_every=2, cpu_kernels=False, mtp_vocab=mtp_vocab, max_seq_len=46,
        **more,
    )  # fmt: skip
    padded = make_spec("llama", drafter, cuda_graphs=True, **kw)
    eager = make_spec("llama", drafter, cuda_graphs=False, **kw)
    out = padded.generate(prompts, sp, n=2)
    graphs = padded._graphs
    assert graphs is not None and not graphs.capture
    (sync_free,) = graphs.extra.values()
    assert isinstance(sync_free, steps._SyncFreeGraphs) and len(sync_free.steps) > 1
    assert {k for _, k in sync_free.steps} == ({3, 6} if "tail" in more else {3})
    if "mtp" in drafter:  # DeviceMTP's key ends with its drafts' temperature
        argmax = more.get("mtp_draft") == "argmax"
        assert next(iter(graphs.extra))[-1] == (0.0 if argmax else temperature)
    assert not graphs.steps and padded.stats["spec/plain_steps"] == 0
    (key,) = graphs.extra
    assert key[5] == drafter  # the device drafter's key
    if temperature == 0.0:
        _same(out, eager.generate(prompts, sp, n=2))
        _same(out, eager.generate(prompts, sp, n=2, drafter="none"))
        fixed = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
        padded.generate(prompts, fixed, n=2)
        eager.generate(prompts, fixed, n=2)
        # The same drafts, the same verdicts. (Steps where no row drafts are plain steps on
        # the host path, verify steps on the device's: the per-step figures differ.)
        assert padded.stats["spec/accept_rate"] == pytest.approx(eager.stats["spec/accept_rate"])
        assert padded.stats["spec/drafted_per_step"] > 0
    else:
        _assert_policy_logprobs(reference("llama"), prompts, out, sp)
        again = make_spec("llama", drafter, cuda_graphs=True, **kw)
        _same(out, again.generate(prompts, sp, n=2))
        _assert_policy_logprobs(reference("llama"), prompts, eager.generate(prompts, sp, n=2), sp)


@pytest.mark.parametrize("drafter, temperature", [("sam+mtp", 1.0), ("mtp", 0.0), ("mtp", 1.0)])
def test_padded_host_drafted_steps_decode_like_eager_ones(
    make_spec, prompts, drafter, temperature, monkeypatch
):
    """Where the drafts cannot come from the device (a compressed cache's trigger is on the
    host) the padded steps are host-drafted `SpecStep`s: the verify step kept with the decode
    graphs and the MTP block's own padded steps (the catch-up over k + 1 pairs, then each
    further depth over one token); sampled, they draw the same uniforms as eager steps."""
    from rlkit.rollout import drafters

    made = []

    class Recorded(drafters.StepGraphs):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(drafters, "StepGraphs", Recorded)
    sp = SamplingParams(max_new_tokens=16, temperature=temperature, seed=5, stop_token_ids=[17, 99])
    cfg = KVCompressionConfig(policy="snapkv", budget=12, window=3, interval=6)
    kw = dict(max_batch_size=5, sync_every=2, cpu_kernels=False, kv_compression=cfg)
    padded = make_spec("llama", drafter, cuda_graphs=True, **kw)
    eager = make_spec("llama", drafter, cuda_graphs=False, **kw)
    out = padded.generate(prompts, sp, n=2)
    _same(out, eager.generate(prompts, sp, n=2))
    if temperature == 0.0:
        _same(out, eager.generate(prompts, sp, n=2, drafter="none"))
    graphs = padded._graphs
    assert graphs is not None and not graphs.capture
    (verify,) = graphs.extra.values()
    assert not verify.capture
    assert {T for _, T in verify.steps} == {4} and len(verify.steps) > 1
    assert {T for _, T in graphs.steps} <= {1}
    assert made and all(not g.capture for g in made)
    block_fed = {T for g in made for _, T in g.steps}
    assert block_fed == {1, 4}  # catch-ups of k + 1 pairs, then depths 2..k of one token


@pytest.mark.parametrize("policy", ["snapkv", "rkv", "streaming", "layer_hybrid"])
def test_compressed_speculative_rollouts_are_the_same_sparse_policy(make_spec, prompts, policy):
    """Checks fall on the same tokens (drafts stop at the next one), the query ring keeps the
    accepted queries: greedy output, log-probs and compressions equal plain sparse decoding."""
    cfg = KVCompressionConfig(policy=policy, budget=10, window=3, interval=5, full_every=2)
    engine = make_spec("llama", "sam+mtp", k=3, kv_compression=cfg, max_batch_size=3)
    sp = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    ref = engine.generate(prompts, sp, n=2, drafter="none")
    events = engine.stats["compression_events"]
    out = engine.generate(prompts, sp, n=2)
    _same(out, ref)
    assert engine.stats["compression_events"] == events > 0
    assert engine.stats["spec/accept_len_mean"] > 1.2


def test_h2o_is_refused(make_spec):
    h2o = KVCompressionConfig(policy="h2o", budget=10, window=3, interval=5)
    with pytest.raises(ValueError, match="h2o"):
        make_spec("llama", "sam", kv_compression=h2o)


@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)],
    ids=["t1", "t0.7-k5", "t1.3-p0.8"],
)
def test_sampled_tokens_carry_the_policys_logprobs(make_spec, reference, prompts, params):

    sp = SamplingParams(max_new_tokens=14, seed=3, ignore_eos=True, **params)
    engine = make_spec("qwen3", "sam+mtp")
    out = engine.generate(prompts, sp, n=3)
    _assert_policy_logprobs(reference("qwen3"), prompts, out, sp)


@pytest.mark.parametrize("kernels, sub_vocab", [(False, False), (True, False), (True, True)])
def test_mtp_drafts_are_the_training_forwards_predictions(tiny_dirs, request, kernels, sub_vocab):
    """The drafter's cached recursion (catch-up on verified pairs, then depths 2..k on its own
    drafts) computes what `MTPModule.forward_train` computes in one pass per depth when fed
    the same tokens: at row j, depth d sees the depth-1 states of rows <= j and its own row's
    deeper states only, so rows past j may hold anything. On PyTorch ops and on the CPU
    kernels (float32; the block packed in the trunk's layout); with a sub-vocabulary head,
    each depth's draft is the argmax over that sub-vocabulary and the next depth is fed its
    token id."""
    from rlkit.rollout.drafters import DraftSettings, MTPDrafter
    from rlkit.rollout.scheduler import Run
    from rlkit.rollout.steps import PlainStep

    if kernels:
        request.getfixturevalue("f32_kernels")  # skips where the machine lacks them
    model, tok = load_model(tiny_dirs["llama"])
    V = model.args.vocab_size
    mtp = init_mtp(model.args, seed=4)
    with torch.no_grad():  # sharper than a fresh init, so that argmax drafts are no ties
        for p in mtp.parameters():
            p.mul_(5.0 if p.dim() >= 2 else 1.0)
    engine = Engine(model, tok, dtype=torch.float32, mtp=mtp, cpu_kernels=kernels)
    assert engine.fused_decode == kernels
    prompt, k, steps = [5, 17, 99, 3, 8], 3, 6
    sp = SamplingParams(max_new_tokens=steps + k, temperature=0.0)
    tokens = engine.generate([prompt], sp)[0].token_ids
    start = torch.tensor([len(prompt) - 1])
    settings = DraftSettings(num_draft_tokens=k, mtp=engine.mtp)
    if sub_vocab:  # the odd ids have been seen most: the head covers them alone
        settings.mtp_vocab, settings.token_counts = V // 2, (torch.arange(V) % 2).float() * 100
    with torch.inference_mode():
        # Row j: the policy's state that predicts completion token j.
        hidden = engine.model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
        run = Run(engine, [prompt], sp, 1, None, k)
        drafter = MTPDrafter(run, settings)
        assert (drafter.fused is not None) == kernels
        allowed = torch.full((V,), float("-inf"))
        allowed[drafter.ids if sub_vocab else slice(None)] = 0.0
        if sub_vocab:
            assert drafter.ids is not None and bool((drafter.ids % 2 == 1).all())
        run._admit(PlainStep())
        drafter.admitted(run, 0, [0], hidden[0:1])
        for j in range(steps):
            drafts = drafter.propose(run, np.array([k])).tokens[0].tolist()
            fed = torch.tensor([tokens[: j + 1] + drafts[: k - 1]])
            states = engine.mtp.forward_train(engine.model, hidden[None, : j + k], fed, start, k)
            want = [int((engine.model.logits(s[0, j]) + allowed).argmax()) for s in states]
            assert drafts == want, j
            # One verified token: the state at token j's position and token j + 1.
            drafter.observed(
                run, hidden[None, j + 1 : j + 2], torch.tensor([[tokens[j + 1]]]), np.array([1])
            )


@pytest.mark.parametrize("sub_vocab, argmax", [(False, False), (True, False), (False, True)])
def test_device_mtp_drafts_are_the_training_forwards_predictions(tiny_dirs, sub_vocab, argmax):
    """`DeviceMTP` (the step's k depths, k varying from step to step up to the drafter's K,
    its cache's lengths on the device) drafts what the training forward predicts, as the host
    drafter does (the test above): greedy, or sampling with `mtp_draft: argmax` (the argmax,
    no q)."""
    from rlkit.rollout.drafters import DraftSettings, MTPDrafter
    from rlkit.rollout.scheduler import Run
    from rlkit.rollout.steps import PlainStep

    model, tok = load_model(tiny_dirs["llama"])
    V = model.args.vocab_size
    mtp = init_mtp(model.args, seed=4)
    with torch.no_grad():
        for p in mtp.parameters():
            p.mul_(5.0 if p.dim() >= 2 else 1.0)
    engine = Engine(model, tok, dtype=torch.float32, mtp=mtp, cpu_kernels=False)
    prompt, K, steps = [5, 17, 99, 3, 8], 4, 8
    sp = SamplingParams(max_new_tokens=steps + K, temperature=0.0)
    tokens = engine.generate([prompt], sp)[0].token_ids
    start = torch.tensor([len(prompt) - 1])
    settings = DraftSettings(num_draft_tokens=K, mtp=engine.mtp, mtp_argmax=argmax)
    if sub_vocab:
        settings.mtp_vocab, settings.token_counts = V // 2, (torch.arange(V) % 2).float() * 100
    run_params = SamplingParams(max_new_tokens=steps + K, temperature=1.0) if argmax else sp
    with torch.inference_mode():
        hidden = engine.model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
        run = Run(engine, [prompt], run_params, 1, None, K)
        dev = MTPDrafter(run, settings).on_device()
        state: dict = {}
        dev.bind(state, run.cache.num_slots, run.cache.max_len, run.device)
        allowed = torch.full((V,), float("-inf"))
        allowed[dev.ids if sub_vocab else slice(None)] = 0.0
        run._admit(PlainStep())
        run.last[0] = tokens[0]  # a sampling run's first token may be another
        dev.admitted(run, 0, [0], hidden[0:1])
        j = 0
        while j < steps:
            k = 2 + j % 3  # 2, 3 or 4 depths
            dev.before_step(run, 1, k)
            drafts, num, q = dev.propose(1, torch.tensor([K]), k)
            assert q is None and num.tolist() == [k] and drafts.shape == (1, k)
            drafts = drafts[0].tolist()
            fed = torch.tensor([tokens[: j + 1] + drafts[: k - 1]])
            states = engine.mtp.forward_train(engine.model, hidden[None, : j + k], fed, start, k)
            want = [int((engine.model.logits(s[0, j]) + allowed).argmax()) for s in states]
            assert drafts == want, j
            # One or two verified tokens (a catch-up over several pairs), padded to K + 1.
            m = 1 + j % 2
            fed_tokens = torch.zeros(1, K + 1, dtype=torch.long)
            fed_tokens[0, :m] = torch.tensor(tokens[j + 1 : j + 1 + m])
            fed_hidden = torch.zeros(1, K + 1, hidden.shape[-1])
            fed_hidden[0, :m] = hidden[j + 1 : j + 1 + m]
            dev.extend(1, fed_tokens, torch.tensor([m]), fed_hidden)
            j += m


def test_mtp_sub_vocabulary_drafts_seen_tokens_and_stays_lossless(
    make_spec, reference, prompts, monkeypatch
):
    """mtp_vocab: the draft head covers the most frequent tokens (prompts and outputs so far);
    greedy output still equals plain decoding's and sampled log-probs are the policy's."""
    from rlkit.rollout.drafters import MTPDrafter

    outside = []
    real = MTPDrafter.propose

    def propose(self, run, room):
        draft = real(self, run, room)
        for b, n in enumerate(draft.num):
            outside.extend(t for t in draft.tokens[b, :n].tolist() if t not in self.ids.tolist())
        if draft.probs is not None:  # q is zero off the sub-vocabulary
            off = torch.ones(draft.probs.shape[-1], dtype=torch.bool)
            off[self.ids] = False
            assert (draft.probs[:, :, off] == 0).all()
        return draft

    monkeypatch.setattr(MTPDrafter, "propose", propose)
    engine = make_spec("llama", "mtp", mtp_vocab=16)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    _same(engine.generate(prompts, greedy), engine.generate(prompts, greedy, drafter="none"))
    counts = engine.token_counts
    assert counts is not None and int(counts.sum()) > sum(len(p) for p in prompts)
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, seed=2, ignore_eos=True)
    out = engine.generate(prompts, sp, n=2)
    _assert_policy_logprobs(reference("llama"), prompts, out, sp)
    assert not outside


def test_weight_sync_reaches_the_engines_mtp_module(make_spec):
    """`mtp.*` weights load into the engine's (fused) MTP block, alone or with the policy's."""
    from rlkit.models.mtp import mtp_state

    engine = make_spec("llama", "mtp")
    new = init_mtp(engine.model.args, seed=9)
    engine.load_state_dict(mtp_state(new))
    for k, v in new.state_dict().items():
        assert torch.equal(engine.mtp.state_dict()[k], v), k
    attn = engine.mtp.block.self_attn
    q, k, v = (new.block.self_attn.q_proj.weight, new.block.self_attn.k_proj.weight,
               new.block.self_attn.v_proj.weight)  # fmt: skip
    assert torch.equal(attn.qkv[0], torch.cat([q, k, v]))  # the fused GEMM sees the new weights
    with pytest.raises(ValueError, match="MTP weights do not match"):
        engine.load_state_dict({"mtp.proj.weight": new.proj.weight, "mtp.nope": q})


@pytest.mark.parametrize("drafter", ["sam", "sam+mtp"])
def test_sam_drafts_the_same_through_c_and_python_matchers(
    make_spec, prompts, drafter, monkeypatch
):
    """The SAM drafter takes the C matchers where they build (one call a step for the batch)
    and Python's elsewhere: a sampled rollout through slots being refilled makes the same
    drafts, so the same tokens, log-probs and acceptance either way."""
    from rlkit.kernels import sam_matchers

    from rlkit.rollout import drafters

    why = sam_matchers.missing_prerequisite()
    if why is not None:
        pytest.skip(f"the C matchers cannot be built here: {why}")
    assert sam_matchers.available(), sam_matchers.unavailable_reason()
    made: list = []
    real = drafters.SAMDrafter.__init__

    def spy(self, run, cfg):
        real(self, run, cfg)
        made.append(isinstance(self.matchers, sam_matchers.Matchers))

    monkeypatch.setattr(drafters.SAMDrafter, "__init__", spy)
    # Top-k 3: a tiny random model's text repeats itself enough for SAM to draft.
    sp = SamplingParams(
        max_new_tokens=32, temperature=1.0, top_k=3, seed=4, stop_token_ids=[17, 99]
    )
    engine = make_spec("llama", drafter, max_batch_size=3)
    with_c = engine.generate(prompts, sp, n=2)
    c_stats = dict(engine.stats)
    monkeypatch.setattr(sam_matchers, "available", lambda: False)
    with_py = engine.generate(prompts, sp, n=2)
    assert made == [True, False]
    _same(with_c, with_py)
    assert c_stats["spec/accept_len_mean"] == engine.stats["spec/accept_len_mean"]
    assert c_stats["spec/drafted_per_step"] == engine.stats["spec/drafted_per_step"] > 0


@pytest.mark.parametrize("match", ["latest", "first"])
def test_the_sam_drafter_takes_the_recipes_occurrence(tiny_dirs, prompts, match, monkeypatch):
    """`sam_match` reaches the host matchers (C or Python) and their device form."""
    from rlkit.rollout import drafters

    model, tok = load_model(tiny_dirs["llama"])
    spec = SpeculativeConfig(drafter="sam", num_draft_tokens=2, sam_match=match)
    engine = Engine(model, tok, dtype=torch.float32, speculative=spec, cuda_graphs=False)
    made = []
    real = drafters.SAMDrafter.__init__

    def spy(self, run, cfg):
        real(self, run, cfg)
        made.append(self)

    monkeypatch.setattr(drafters.SAMDrafter, "__init__", spy)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=6, temperature=0.0))
    (d,) = made
    assert d.matchers.latest == (match == "latest")
    assert d.on_device().latest == (match == "latest")
