"""Two learner ranks (gloo) and two rollout workers through the CLI on a tiny model, float32:
every step's loss, and the weights at the end, equal a one-learner run on the same batches
(the same two rollout workers: samples depend on the rollout worker count, not on the
learners'; docs/ARCHITECTURE.md, "Rollout group")."""

import json
import os

import pytest

from rlkit.cli import main
from rlkit.models.loading import read_state_dict

pytestmark = pytest.mark.slow


def _run(tmp_path, name, recipe, *overrides):
    assert main(["train", recipe, f"run.name={name}", *overrides]) == 0
    run_dir = tmp_path / "runs" / name
    with open(run_dir / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "actor/loss" in r]
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    weights = read_state_dict(str(run_dir / "checkpoints" / "0_rlvr" / "step_2" / "model"))
    return rows, summary, weights


def test_two_learners_and_two_rollout_workers_make_one_learners_steps(
    tmp_path, tiny_model_dir, tiny_recipe, parity_verifier
):
    recipe = tiny_recipe(str(tmp_path / "r.yaml"), tiny_model_dir, str(tmp_path / "runs"), steps=2)
    common = [f"reward.verifier={parity_verifier}", "rollout.num_workers=2", "optim.lr=1e-4"]
    # micro-batch 4 of 16 rollouts: each rank runs its share of the live micro-batches.
    common.append("train.micro_batch_size=4")
    one, _, w_one = _run(tmp_path, "one", recipe, *common)
    two, summary, w_two = _run(tmp_path, "two", recipe, *common, "train.num_learners=2")
    assert len(summary["actor_nodes"]["learner"]) == 2
    assert len(summary["actor_nodes"]["rollout"]) == 2
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        # The same batches (same samples, same rewards) ...
        assert (
            a["reward/mean"] == b["reward/mean"]
            and a["response/length_mean"] == b["response/length_mean"]
        )
        assert a["actor/grad_norm"] > 0 and a["actor/skipped_frac"] < 1
        # ... the same update.
        for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/tis_ratio_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for name, value in w_one.items():
        assert (w_two[name] - value).abs().max() <= 1e-5, name
    assert os.path.exists(tmp_path / "runs" / "two" / "checkpoints" / "0_rlvr" / "step_2")
