"""JudgeRLVR through `rlkit train` and Ray on a tiny random model: a judge stage, then a generate
stage from its weights, in one run; judge sets cached and rebuilt the same way on resume."""

import json
import os
import shutil

import pytest
import torch

import rlkit.trainer.rlvr as rlvr
from rlkit.cli import main
from rlkit.data import judge as judge_lib
from rlkit.models.loading import load_model, read_state_dict
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams

pytestmark = pytest.mark.slow

JUDGE = """judge:
  num_problems: 8
  candidates_per_problem: 4
  pairs_per_problem: 2
  min_pairs: 4
  candidate_max_new_tokens: 6
  max_new_tokens: 6
  refresh_every: 2
  extra_checkpoints: [{model}]
  num_eval_problems: 4
  num_eval_pairs: 4
stages:
  - type: judge
    overrides: {{train.steps: 4, train.save_every: 2, train.eval_every: 2, optim.lr: 1.0e-2}}
  - type: generate
"""


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fake_verdict(text):
    """A random model writes no verdicts: read one off the text's bytes so rewards are mixed
    (and some verdicts unparseable), giving the judge stage a real learning signal."""
    return {0: True, 1: False, 2: None}[sum(map(ord, text)) % 3]


def test_judge_then_generate_from_the_judge_weights_and_resume(
    tmp_path, tiny_model_dir, tiny_recipe, parity_verifier, monkeypatch
):
    monkeypatch.setattr(judge_lib, "parse_verdict", _fake_verdict)
    seen = {}
    original = rlvr.run_rlvr

    def spy(ctx, stage, start_step, source=None):
        if stage.type == "generate" and start_step == 0:
            seen["learner"] = ctx.learner.weights("float32")
            prompts = ctx.train_prompt_ids[:3]
            params = SamplingParams(temperature=0.0, max_new_tokens=6)
            seen["rollout"] = ctx.generate(prompts, params, 1)
            seen["prompts"] = prompts
        return original(ctx, stage, start_step, source)

    monkeypatch.setattr(rlvr, "run_rlvr", spy)
    run_root = str(tmp_path / "runs")
    recipe = tiny_recipe(
        str(tmp_path / "r.yaml"),
        tiny_model_dir,
        run_root,
        steps=2,
        extra=JUDGE.format(model=tiny_model_dir),
    )
    args = ["train", recipe, f"reward.verifier={parity_verifier}", "train.keep_checkpoints=5"]
    assert main(args) == 0
    run_dir = os.path.join(run_root, "e2e")
    rows = _rows(run_dir)

    judge_rows = [r for r in rows if r["stage"] == "judge" and "reward/mean" in r]
    gen_rows = [r for r in rows if r["stage"] == "generate" and "reward/mean" in r]
    assert [r["step"] for r in judge_rows] == [1, 2, 3, 4]
    assert [r["step"] for r in gen_rows] == [1, 2]
    assert all(r["stage_index"] == 0 for r in judge_rows)
    assert all(r["stage_index"] == 1 for r in gen_rows)
    for r in judge_rows:
        assert r["judge/num_pairs"] >= 4 and 0.0 < r["judge/pos_frac"] < 1.0
        assert 0.0 < r["judge/problems_mixed_frac"] <= 1.0
        assert 0.0 < r["judge/parse_fail_frac"] < 1.0
        assert r["judge/accuracy"] == pytest.approx(r["reward/mean"])
        assert 1 <= r["response/length_mean"] <= 6  # verdicts capped at judge.max_new_tokens
        assert r["actor/grad_norm"] > 0
    assert "timing/judge_data" in judge_rows[0] and "timing/judge_data" in judge_rows[2]
    assert all(not any(k.startswith("judge/") for k in r) for r in gen_rows)

    # Held-out judge accuracy: before training, mid-judge, end of the judge stage, at the end.
    evals = [(r["stage"], r["step"]) for r in rows if "eval/judge_accuracy" in r]
    assert evals == [("judge", 0), ("judge", 2), ("judge", 4), ("generate", 2)]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert "eval/judge_accuracy" in summary["eval_after"]
    assert "eval/judge_accuracy" in summary["eval_after_stage"]["judge"]
    assert 2 <= summary["judge_eval_set"]["num_pairs"] <= 4
    assert summary["judge_eval_set"]["pos_frac"] == 0.5

    # Judge sets: built after steps 0 and 2 (refresh_every 2), with the extra checkpoint's
    # candidates counted in; the held-out set once.
    judge_dir = os.path.join(run_dir, "judge")
    assert sorted(os.listdir(judge_dir)) == [
        "eval_pairs.jsonl",
        "eval_pairs.stats.json",
        "pairs_0_judge_0.jsonl",
        "pairs_0_judge_0.stats.json",
        "pairs_0_judge_2.jsonl",
        "pairs_0_judge_2.stats.json",
    ]
    stats = json.load(open(os.path.join(judge_dir, "pairs_0_judge_0.stats.json")))
    assert stats["num_candidates"] == 8 * 4 * 2  # policy + one extra checkpoint
    pairs = [json.loads(x) for x in open(os.path.join(judge_dir, "pairs_0_judge_0.jsonl"))]
    assert {"problem", "solution", "label", "source", "pass_rate"} <= set(pairs[0])

    # The generate stage started from the judge stage's final weights, in the learner and in
    # the rollout worker (so the extra checkpoint's weights were put back too).
    final = read_state_dict(os.path.join(run_dir, "checkpoints", "0_judge", "step_4", "model"))
    initial = read_state_dict(tiny_model_dir)
    for name, value in final.items():
        assert torch.equal(seen["learner"][name], value), name
    assert any(not torch.equal(final[k], initial[k]) for k in final)  # the judge stage learned
    net, tok = load_model(os.path.join(run_dir, "checkpoints", "0_judge", "step_4", "model"))
    local = Engine(net, tok, max_batch_size=8, dtype=torch.float32).generate(
        seen["prompts"], SamplingParams(temperature=0.0, max_new_tokens=6), n=1
    )
    for mine, theirs in zip(local, seen["rollout"], strict=True):
        assert list(mine.token_ids) == theirs["token_ids"]
        assert torch.allclose(
            torch.tensor(mine.logprobs), torch.tensor(theirs["logprobs"]), atol=1e-3
        )

    # Resume inside the judge stage: as if killed after step 2's checkpoint, before the set
    # due after step 2 was cached. The resumed run rebuilds it from the restored weights and
    # gets the same set and the same steps as the uninterrupted run.
    set2 = open(os.path.join(judge_dir, "pairs_0_judge_2.jsonl")).read()
    eval_mtime = os.path.getmtime(os.path.join(judge_dir, "eval_pairs.jsonl"))
    set0_mtime = os.path.getmtime(os.path.join(judge_dir, "pairs_0_judge_0.jsonl"))
    for name in ("pairs_0_judge_2.jsonl", "pairs_0_judge_2.stats.json"):
        os.remove(os.path.join(judge_dir, name))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "0_judge", "step_4"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "1_generate"))
    assert main([*args, "run.resume=true"]) == 0
    again = _rows(run_dir)
    steps = [(r["stage"], r["step"]) for r in again if "reward/mean" in r]
    assert steps == [("judge", s) for s in (1, 2, 3, 4)] + [("generate", 1), ("generate", 2)]
    assert open(os.path.join(judge_dir, "pairs_0_judge_2.jsonl")).read() == set2
    # Sets made before the checkpoint are reloaded, not rebuilt.
    assert os.path.getmtime(os.path.join(judge_dir, "eval_pairs.jsonl")) == eval_mtime
    assert os.path.getmtime(os.path.join(judge_dir, "pairs_0_judge_0.jsonl")) == set0_mtime
    resumed = [r for r in again if r["stage"] == "judge" and "reward/mean" in r]
    for before, after in zip(judge_rows[2:], resumed[2:], strict=True):
        for key in ("reward/mean", "judge/num_pairs", "judge/pos_frac", "judge/parse_fail_frac"):
            assert after[key] == pytest.approx(before[key]), key
