"""The CUDA compression path of `CompressedKVCache` (scores, selection and compaction through
`rlkit.kernels.kv_compress`'s Triton kernels) wired into whole rollouts: run here under
TRITON_INTERPRET=1 in a subprocess (this file as a script), with the dispatchers pointed at the
Triton kernels for CPU tensors, against the same rollouts on the references. Every policy,
with the batch shrinking and slots refilled, in plain and padded (CUDA-graph) steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

POLICIES = ["snapkv", "rkv", "h2o", "streaming", "layer_hybrid"]
# (policy, padded steps): every policy in plain steps, the two with statistics in padded ones.
CASES = [(p, False) for p in POLICIES] + [("snapkv", True), ("h2o", True)]


def run_all() -> dict[str, dict]:
    from rlkit.kernels import kv_compress as kc

    from rlkit.config.schema import KVCompressionConfig
    from rlkit.models import load_model
    from rlkit.models.tiny import save_tiny_model
    from rlkit.rollout import Engine, SamplingParams

    model_dir = save_tiny_model(tempfile.mkdtemp(), "qwen3", seed=2, tie_word_embeddings=False)
    prompts = [[5, 17, 99, 3], [42], list(range(60, 90)), [7, 7, 7, 7, 7, 200, 31, 4, 9]]
    sp = SamplingParams(max_new_tokens=24, stop_token_ids=[17, 99], temperature=0.0)

    def rollout(policy: str, graphs: bool):
        model, tok = load_model(model_dir)
        cfg = KVCompressionConfig(policy=policy, budget=10, window=3, interval=4, full_every=2)
        engine = Engine(
            model, tok, dtype=torch.float32, max_batch_size=5, sync_every=2,
            kv_compression=cfg, cpu_kernels=False, cuda_graphs=graphs,
        )  # fmt: skip
        out = engine.generate(prompts, sp, n=2)
        return [c.token_ids for c in out], [c.logprobs for c in out], engine.stats

    calls = {"window_scores": 0, "keep_top": 0, "compact_rows": 0}
    triton_fns = {
        "window_scores": kc.window_scores_triton,
        "keep_top": kc.keep_top_triton,
        "compact_rows": kc.compact_rows_triton,
    }
    refs = {f"{pol}-{'padded' if g else 'plain'}": (pol, g, rollout(pol, g)) for pol, g in CASES}
    for name, fn in triton_fns.items():

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        setattr(kc, name, counted)
    results = {}
    for name, (pol, g, (tokens, logps, stats)) in refs.items():
        got_tokens, got_logps, got_stats = rollout(pol, g)
        err = max(abs(a - b) for x, y in zip(got_logps, logps) for a, b in zip(x, y))
        results[name] = {
            "tokens_equal": got_tokens == tokens,
            "logp_err": err,
            "events": got_stats["compression_events"],
            "ref_events": stats["compression_events"],
        }
    results["calls"] = calls
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize(
    "policy, padded", CASES, ids=[f"{p}-{'padded' if g else 'plain'}" for p, g in CASES]
)
def test_triton_interpreted_compressions_decode_like_the_references(interpreted, policy, padded):
    res = interpreted[f"{policy}-{'padded' if padded else 'plain'}"]
    assert res["events"] == res["ref_events"] > 0
    assert res["tokens_equal"], res
    assert res["logp_err"] <= 1e-4, res


@pytest.mark.slow
def test_triton_interpreted_kernels_ran(interpreted):
    calls = interpreted["calls"]
    assert calls["keep_top"] > 0 and calls["compact_rows"] > 0 and calls["window_scores"] > 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_all()))
