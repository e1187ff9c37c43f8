import numpy as np
import pytest
import torch

from rlkit.rollout import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_uncached_forward(arch, make_engine, reference, prompts, greedy_reference):
    engine = make_engine(arch)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=12, **GREEDY))
    assert [c.prompt_index for c in out] == [0, 1, 2, 3]
    for c, p in zip(out, prompts, strict=True):
        assert c.token_ids == greedy_reference(reference(arch), p, 12)
        assert c.finish_reason == "length" and len(c.logprobs) == 12


def test_n_samples_share_prefill_and_match_n1(make_engine, prompts):
    engine = make_engine()
    params = SamplingParams(max_new_tokens=10, **GREEDY)
    single = engine.generate(prompts, params)
    multi = engine.generate(prompts, params, n=3)
    assert [c.prompt_index for c in multi] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for i, c in enumerate(multi):
        ref = single[i // 3]
        assert c.token_ids == ref.token_ids
        torch.testing.assert_close(c.logprobs, ref.logprobs, atol=1e-5, rtol=0)


def test_continuous_batching_matches_one_batch(make_engine, prompts):
    params = SamplingParams(max_new_tokens=9, stop_token_ids=[17, 99], **GREEDY)
    big = make_engine(max_batch_size=64).generate(prompts, params, n=2)
    # 8 sequences through 3 slots: admission, compaction and refill all happen.
    small = make_engine(max_batch_size=3, sync_every=2).generate(prompts, params, n=2)
    assert [c.token_ids for c in small] == [c.token_ids for c in big]
    assert [c.finish_reason for c in small] == [c.finish_reason for c in big]
    for a, b in zip(small, big, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_stop_token_ends_completion_and_is_kept(make_engine, prompts):
    engine = make_engine()
    free = engine.generate(prompts[:1], SamplingParams(max_new_tokens=16, **GREEDY))[0].token_ids
    stop = free[5]
    first = free.index(stop)
    out = engine.generate(
        prompts[:1], SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[stop])
    )[0]
    assert out.token_ids == free[: first + 1]
    assert out.finish_reason == "stop" and len(out.logprobs) == first + 1

    # The same token as the model's EOS; ignore_eos decodes through it.
    engine.eos_ids = {stop}
    eos = engine.generate(prompts[:1], SamplingParams(max_new_tokens=16, temperature=0.0))[0]
    assert eos.token_ids == out.token_ids and eos.finish_reason == "stop"
    through = engine.generate(
        prompts[:1], SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    )[0]
    assert through.token_ids == free and through.finish_reason == "length"


def test_stop_string_cuts_after_it(make_engine):
    engine = make_engine()
    tok = engine.tokenizer
    prompt = tok.encode("hello there")
    free = engine.generate([prompt], SamplingParams(max_new_tokens=40, **GREEDY))[0]
    pieces = [tok.decode([t]) for t in free.token_ids]
    # A stop string of two consecutive printable ASCII tokens somewhere after the start.
    j = next(
        i
        for i in range(3, len(pieces) - 1)
        if (pieces[i] + pieces[i + 1]).isascii()
        and (pieces[i] + pieces[i + 1]).isprintable()
        and pieces[i].strip()
        and pieces[i + 1].strip()
    )
    stop = pieces[j] + pieces[j + 1]
    out = engine.generate(
        [prompt], SamplingParams(max_new_tokens=40, stop=["@@never@@", stop], **GREEDY)
    )[0]
    assert out.finish_reason == "stop"
    assert out.text.endswith(stop) and out.text.count(stop) == 1
    assert len(out.token_ids) <= j + 2 and out.token_ids == free.token_ids[: len(out.token_ids)]
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1])


def test_max_new_tokens_and_max_seq_len(make_engine, prompts):
    out = make_engine().generate(prompts, SamplingParams(max_new_tokens=3, **GREEDY))
    assert all(len(c.token_ids) == 3 and c.finish_reason == "length" for c in out)
    capped = make_engine(max_seq_len=35).generate(
        prompts[2:3], SamplingParams(max_new_tokens=20, **GREEDY)
    )[0]
    assert len(prompts[2]) + len(capped.token_ids) == 35 and capped.finish_reason == "length"
    one = make_engine().generate(prompts, SamplingParams(max_new_tokens=1, **GREEDY))
    assert all(len(c.token_ids) == 1 for c in one)


@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)],
    ids=["t1", "t0.7-k5", "t1.3-p0.8"],
)
def test_sampled_logprobs_match_recomputation(params, make_engine, reference, prompts):
    from rlkit.rollout import sampling_logprobs

    sp = SamplingParams(max_new_tokens=12, seed=3, ignore_eos=True, **params)
    out = make_engine().generate(prompts, sp, n=2)
    model = reference()
    for c in out:
        prompt = prompts[c.prompt_index]
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model.logits(model(ids))[0, len(prompt) - 1 : -1]  # [T, V]
        logp = sampling_logprobs(logits, sp)
        expected = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.isfinite(expected).all(), "a token outside the top-k / top-p set was sampled"
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
        if "top_k" not in params and "top_p" not in params:
            plain = torch.log_softmax(logits / sp.temperature, -1)
            torch.testing.assert_close(
                torch.tensor(c.logprobs),
                plain.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0],
                atol=1e-4,
                rtol=0,
            )


def test_top_k_1_equals_greedy(make_engine, prompts):
    engine = make_engine()
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=8, **GREEDY))
    top1 = engine.generate(
        prompts, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, seed=5, ignore_eos=True)
    )
    assert [c.token_ids for c in top1] == [c.token_ids for c in greedy]
    assert all(abs(lp) < 1e-6 for c in top1 for lp in c.logprobs)


def test_seed_reproduces_and_varies(make_engine, prompts):
    engine = make_engine()
    params = dict(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    a = engine.generate(prompts, SamplingParams(seed=1, **params), n=2)
    b = engine.generate(prompts, SamplingParams(seed=1, **params), n=2)
    c = engine.generate(prompts, SamplingParams(seed=2, **params), n=2)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # Samples of one prompt differ from each other (each slot draws its own noise).
    assert a[0].token_ids != a[1].token_ids


def test_load_state_dict_updates_weights(make_engine, reference, prompts):
    engine = make_engine(dtype=torch.bfloat16)
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    before = [c.token_ids for c in engine.generate(prompts, params)]
    state = {k: v.clone() for k, v in reference().state_dict().items()}
    state["model.norm.weight"] = -state["model.norm.weight"]  # flips every logit
    engine.load_state_dict(state)
    assert engine.model.model.norm.weight.dtype == torch.bfloat16
    after = [c.token_ids for c in engine.generate(prompts, params)]
    assert after != before
    engine.load_state_dict(reference().state_dict())
    assert [c.token_ids for c in engine.generate(prompts, params)] == before


def test_bfloat16_engine_runs_close_to_float32(make_engine, prompts):
    params = SamplingParams(max_new_tokens=6, **GREEDY)
    f32 = make_engine().generate(prompts, params)
    bf16 = make_engine(dtype=torch.bfloat16).generate(prompts, params)
    for a, b in zip(f32, bf16, strict=True):
        assert all(lp <= 0 for lp in b.logprobs)
        assert a.token_ids[0] == b.token_ids[0]
        assert abs(a.logprobs[0] - b.logprobs[0]) < 0.1


def test_rejects_bad_prompts(make_engine):
    engine = make_engine(max_seq_len=8)
    with pytest.raises(ValueError):
        engine.generate([], SamplingParams())
    with pytest.raises(ValueError):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate([list(range(8))], SamplingParams())


def test_rollout_worker_frees_the_cache_and_generates_the_same_after(tiny_dirs, prompts):
    """The RL loop's worker drops the KV cache after each rollout (it would sit idle through
    the learner's step); the next rollout allocates a fresh one and is unchanged."""
    from rlkit.config.schema import RolloutConfig
    from rlkit.workers.rollout_worker import RolloutWorker

    worker = RolloutWorker(tiny_dirs["qwen3"], RolloutConfig(dtype="float32"))
    params = SamplingParams(max_new_tokens=8, **GREEDY)
    first = worker.generate(prompts, params, n=2)
    assert worker.engine.cache is None
    again = worker.generate(prompts, params, n=2)
    assert [c["token_ids"] for c in again] == [c["token_ids"] for c in first]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_prepacked_weights_give_identical_outputs_and_reload(
    arch, dtype, make_engine, reference, prompts
):
    from rlkit.models.decoder import can_prepack

    if not can_prepack(torch.device("cpu"), dtype):
        # oneDNN's bf16 GEMMs need AVX-512 BF16 (or AMX); float32 ones run on any x86 CPU.
        pytest.skip(f"this CPU's oneDNN has no {dtype} GEMMs to prepack for")
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    packed = make_engine(arch, dtype=dtype, prepack="onednn")
    plain = make_engine(arch, dtype=dtype, prepack=False)
    assert packed.model.pack_layout == "onednn" and not plain.model.prepacked
    # The layers' plain weights are released: no second copy of the model.
    assert packed.model.model.layers[0].mlp.down_proj.weight.numel() == 0

    def outputs(engine):
        return [(c.token_ids, c.logprobs) for c in engine.generate(prompts, params, n=2)]

    assert outputs(packed) == outputs(plain)
    # New weights in every packed linear (and the biases) reload into the packed layout.
    g = torch.Generator().manual_seed(0)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dim() else v
        for k, v in reference(arch).state_dict().items()
    }
    packed.load_state_dict(state)
    plain.load_state_dict(state)
    assert outputs(packed) == outputs(plain)
    fresh = make_engine(arch, dtype=dtype, prepack=False)
    assert outputs(fresh) != outputs(plain)
    bad = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        packed.load_state_dict(bad)
    assert outputs(packed) == outputs(plain)  # a rejected state dict loads nothing
    # A second engine on the packed model keeps its layout (it used to fail repacking the
    # released weights); another layout is refused by name.
    from rlkit.rollout.engine import Engine

    again = Engine(packed.model, packed.tokenizer, dtype=dtype, prepack="onednn")
    assert outputs(again) == outputs(plain)
    with pytest.raises(ValueError, match="packed in the 'onednn' layout already"):
        packed.model.prepack_weights(8, "avx2")


def _kernel_shaped_model(tmp_path, arch: str, seed: int, tied: bool = False) -> str:
    """A random checkpoint whose heads the CPU kernels take: head_dim 64, three query heads
    per kv head (SmolLM2's layout), untied embeddings unless `tied`."""
    from rlkit.models.tiny import save_tiny_model

    return save_tiny_model(
        str(tmp_path / arch), arch, seed=seed, hidden_size=192, head_dim=64, num_heads=3,
        num_kv_heads=1, tie_word_embeddings=tied,
    )  # fmt: skip


# qwen2: biases; n=1: each prompt's prefill runs fused (its rows go straight to their slots)
@pytest.mark.parametrize(
    "arch, tied, n", [("llama", True, 2), ("qwen2", False, 2), ("llama", True, 1)]
)
def test_avx2_packed_weights_sample_like_plain_weights_and_reload(
    tmp_path, monkeypatch, arch, tied, n, prompts, f32_kernels
):
    """A float32 engine whose weights are packed for the AVX2 GEMM (the default where the
    float32 C kernels run on an AVX2 CPU) samples the same tokens with the same log-probs, to
    float32 summation order, as one with plain weights (F.linear: MKL), its decode steps
    fused; and again after a weight reload, which repacks from the state dict (biases and
    the tied LM head included) or, given a bad one, loads nothing."""
    from rlkit.kernels import cpu as cpu_kernel

    from rlkit.models import load_model
    from rlkit.rollout import Engine

    path = _kernel_shaped_model(tmp_path, arch, seed=6, tied=tied)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    calls, step_calls = [], []
    real, real_step = cpu_kernel.linear, cpu_kernel.decode_layers
    monkeypatch.setattr(cpu_kernel, "linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(
        cpu_kernel, "decode_layers", lambda *a: step_calls.append(1) or real_step(*a)
    )

    def engine(prepack):
        model, tok = load_model(path)
        return Engine(model, tok, dtype=torch.float32, prepack=prepack)

    default = engine(None).model.pack_layout
    assert default == ("avx2" if cpu_kernel.isa() == "avx2" else "onednn")
    packed, plain = engine("avx2"), engine(False)
    assert packed.fused_decode and "weights packed for the AVX2 GEMM" in packed.describe()
    assert packed.model.model.layers[0].mlp.down_proj.weight.numel() == 0  # no second copy

    def same(a, b) -> None:
        before, steps_before = len(calls), len(step_calls)
        out_a = a.generate(prompts, params, n=n)
        # n=2: the prefill's linears (4 per layer) and LM head, then 11 decode steps: the
        # layers in one call (`decode_layers`, the same GEMM inside) and the LM head; n=1: the
        # prefill's layers in one call too
        assert len(calls) - before >= (4 * a.model.args.num_layers if n == 2 else 0) + 12
        assert len(step_calls) - steps_before >= 11 + (n == 1)
        out_b = b.generate(prompts, params, n=n)
        assert [c.token_ids for c in out_a] == [c.token_ids for c in out_b]
        for x, y in zip(out_a, out_b, strict=True):
            torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-4, rtol=0)

    same(packed, plain)
    g = torch.Generator().manual_seed(0)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.dim() else v
        for k, v in load_model(path)[0].state_dict().items()
    }
    packed.load_state_dict(state)
    plain.load_state_dict(state)
    same(packed, plain)
    stale = engine(False).generate(prompts, params)
    assert [c.token_ids for c in stale] != [c.token_ids for c in plain.generate(prompts, params)]
    bad = {k: v for k, v in state.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj\.weight"):
        packed.load_state_dict(bad)
    same(packed, plain)  # a rejected state dict loads nothing


def test_engine_rejects_a_packed_layout_that_cannot_run(make_engine):
    with pytest.raises(ValueError, match="prepack='avx2'"):
        make_engine("llama", dtype=torch.bfloat16, prepack="avx2")
    with pytest.raises(ValueError, match="prepack='blas'"):
        make_engine("llama", prepack="blas")


def test_cpu_kernels_sample_like_the_pytorch_step(tmp_path, monkeypatch, prompts, kernel_dtype):
    """With the C kernels (head_dim 64, three query heads per kv head, as SmolLM2) the
    engine's decode steps run fused (`forward_decode_fused`), the compressed cache's too, and
    its sampler log-probs are as close to a float32 recomputation as the PyTorch step's. (A
    float32 engine on an AVX2 CPU runs each step's layers in one call, `decode_layers`.)"""
    from rlkit.kernels import cpu as cpu_kernel

    from rlkit.config.schema import KVCompressionConfig
    from rlkit.models import load_model
    from rlkit.rollout import Engine, sampling_logprobs

    path = _kernel_shaped_model(tmp_path, "llama", seed=4)
    calls = []
    for name in ("rope_append_attend", "decode_layers"):
        real = getattr(cpu_kernel, name)
        monkeypatch.setattr(cpu_kernel, name, lambda *a, f=real: calls.append(1) or f(*a))
    reference = load_model(path)[0].eval()
    sp = SamplingParams(max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    sparse = KVCompressionConfig(policy="snapkv", budget=12, window=4, interval=4)

    def max_error(kernels: bool, compression) -> float:
        model, tok = load_model(path)
        engine = Engine(
            model, tok, dtype=kernel_dtype, cpu_kernels=kernels, kv_compression=compression
        )
        assert engine.fused_decode == kernels
        before = len(calls)
        out = engine.generate(prompts, sp, n=2)
        assert (len(calls) > before) == kernels
        if compression is not None:  # no dense recomputation of compressed sampling
            return 0.0
        worst = 0.0
        for c in out:
            ids = torch.tensor([prompts[c.prompt_index] + c.token_ids])
            with torch.no_grad():
                logits = reference.logits(reference(ids))[0, len(prompts[c.prompt_index]) - 1 : -1]
            want = sampling_logprobs(logits, sp).gather(-1, torch.tensor(c.token_ids)[:, None])
            worst = max(worst, (torch.tensor(c.logprobs) - want[:, 0]).abs().max().item())
        return worst

    fused, plain = max_error(True, None), max_error(False, None)
    assert fused <= max(1.5 * plain, 0.02 if kernel_dtype == torch.bfloat16 else 1e-4), (
        fused,
        plain,
    )
    max_error(True, sparse)
    max_error(False, sparse)


@pytest.mark.parametrize(
    "arch, policy, T",
    [
        ("llama", None, 1),
        ("qwen2", None, 1),
        ("llama", "snapkv", 1),
        ("llama", "h2o", 1),
        ("llama", None, 3),
        ("llama", "snapkv", 3),
        ("llama", "h2o", 3),
    ],
)
def test_fused_decode_step_matches_the_pytorch_step(tmp_path, arch, policy, T, kernel_dtype):
    """`Decoder.forward_decode_fused` against `forward_cached` from the same cache state: same
    hidden states and the same cache contents up to rounding (bf16 steps for a bf16 model,
    float32 summation order for a float32 one), for the dense cache, a
    compressed one that keeps a query ring (snapkv) and one whose layers fall back to
    `attend` (h2o); qwen2 has q/k/v biases. T = 3: a verify step's tokens per sequence, with
    rejected ones rewound after each step."""
    import copy

    from rlkit.config.schema import KVCompressionConfig
    from rlkit.models import load_model
    from rlkit.rollout import Engine
    from rlkit.rollout.kv_cache import CompressedKVCache, KVCache

    path = _kernel_shaped_model(tmp_path, arch, seed=5)
    dtype = kernel_dtype
    tol = 0.03 if dtype == torch.bfloat16 else 1e-5
    model, tok = load_model(path)
    engine = Engine(model, tok, dtype=dtype)
    assert engine.fused_decode, "the kernels are built: this model's layout must take them"
    m, a = engine.model, engine.model.args
    B, cap = 4, 48
    if policy is None:
        cache = KVCache(a.num_layers, B, cap, a.num_kv_heads, a.head_dim, dtype)
    else:
        cfg = KVCompressionConfig(policy=policy, budget=12, window=4, interval=4)
        cache = CompressedKVCache(
            a.num_layers, B, cap, cap, a.num_heads, a.num_kv_heads, a.head_dim, cfg, dtype,
            lookahead=T - 1,
        )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    lengths = [9, 5, 9, 3]
    tokens = torch.randint(0, 250, (B, 9), generator=g)
    with torch.inference_mode():
        cache.begin_prefill(torch.arange(B), torch.arange(B), lengths)
        m.forward_cached(tokens, torch.arange(9).expand(B, 9), cache)
        fused = copy.deepcopy(cache)
        if policy is not None:  # deepcopy does not keep `lengths` a view of `group_lengths`
            fused.lengths = fused.group_lengths[0]
        for _ in range(6):
            ids = torch.randint(0, 250, (B, T), generator=g)
            want = m.forward_cached(ids, cache.begin_decode(B, T), cache)
            got = m.forward_decode_fused(ids, fused.begin_decode(B, T), fused)
            assert got.shape == want.shape == (B, T, a.hidden_size)
            scale = want.float().abs().max()
            assert (got.float() - want.float()).abs().max() <= tol * scale
            if T > 1:
                rejected = np.array([0, 2, 1, 2])
                cache.rewind(rejected)
                fused.rewind(rejected)
    for name in ("k", "v", "queries", "accumulated"):
        if hasattr(cache, name) and getattr(cache, name).numel():
            ref, out = getattr(cache, name).float(), getattr(fused, name).float()
            assert (out - ref).abs().max() <= tol * ref.abs().max().clamp(min=1e-6), name
    assert np.array_equal(cache.lengths, fused.lengths)


def _count_retires(monkeypatch) -> list[int]:
    from rlkit.rollout.scheduler import Run

    retires: list[int] = []
    real = Run._retire

    def counting(self, step):
        retires.append(len(self.seq))
        return real(self, step)

    monkeypatch.setattr(Run, "_retire", counting)
    return retires


def test_retires_only_when_a_sequence_can_finish(make_engine, prompts, monkeypatch):
    retires = _count_retires(monkeypatch)
    engine = make_engine(sync_every=2)
    # No stop can be sampled (ignore_eos, no stop ids or strings): one retire, at the limit.
    out = engine.generate(prompts, SamplingParams(max_new_tokens=20, **GREEDY))
    assert retires == [len(prompts)]
    assert all(len(c.token_ids) == 20 for c in out)
    # Stop strings need the tokens on the host: a retire every sync_every steps.
    retires.clear()
    engine.generate(prompts, SamplingParams(max_new_tokens=20, stop=["\x00never"], **GREEDY))
    assert len(retires) == 10


def test_a_stopped_sequence_is_retired_after_sync_every_steps(make_engine, prompts, monkeypatch):
    engine = make_engine()
    free = engine.generate(prompts[:1], SamplingParams(max_new_tokens=16, **GREEDY))[0].token_ids
    stop = free[1]  # sampled as the second token
    retires = _count_retires(monkeypatch)
    engine.sync_every = 3
    params = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=[stop])
    out = engine.generate(prompts[:1], params)[0]
    assert out.token_ids == free[: free.index(stop) + 1] and out.finish_reason == "stop"
    # Stopped at decode step 1 (token 2): retired once sync_every steps have run.
    assert retires == [1]


def test_stats_split_the_call_s_wall_time(make_engine, prompts):
    engine = make_engine(sync_every=2)
    engine.generate(prompts, SamplingParams(max_new_tokens=20, stop=["\x00never"], **GREEDY))
    st = engine.stats
    parts = [st[f"time_{k}_s"] for k in ("admit", "decode", "retire")]
    assert all(p > 0 for p in parts)
    assert sum(parts) <= st["time_total_s"] <= sum(parts) + 0.5
    # One admission round, then a retire every sync_every = 2 of the 19 decode steps.
    assert st["decode_rounds"] == 10
