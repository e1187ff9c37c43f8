"""One-step-off training through the CLI on a tiny model: the rollouts of step t+1 are
sampled by the weights after step t-1 (staleness 1), and the metrics say so."""

import json
import os

import pytest
import torch

from rlkit.cli import main
from rlkit.config import load_recipe
from rlkit.workers.learner import Learner
from rlkit.workers.learner_group import LearnerGroup

pytestmark = pytest.mark.slow


def _logp(learner: Learner, weights, batch) -> torch.Tensor:
    learner.model.load_state_dict(weights)
    with torch.no_grad():
        return learner.response_logprobs(learner.model, batch)[0] * batch.response_mask


def test_step_t_plus_1_is_sampled_by_the_weights_after_step_t_minus_1(
    tmp_path, tiny_model_dir, tiny_recipe, parity_verifier, monkeypatch
):
    # Each update's weights (before it) and its batch, seen by the driver.
    seen = []
    submit = LearnerGroup.submit_train_step

    def spy(self, batch):
        seen.append((self.weights("float32"), batch))
        return submit(self, batch)

    monkeypatch.setattr(LearnerGroup, "submit_train_step", spy)
    recipe = tiny_recipe(str(tmp_path / "r.yaml"), tiny_model_dir, str(tmp_path / "runs"), steps=3)
    overrides = [f"reward.verifier={parity_verifier}", "train.async_mode=one_step_off"]
    assert main(["train", recipe, *overrides]) == 0
    with open(tmp_path / "runs" / "e2e" / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "async/staleness" in r]
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["async/weight_version"] for r in rows] == [0.0, 0.0, 1.0]
    # Steps 2 and 3 were generated during the update before them.
    assert all(r["async/rollout_s"] > 0 for r in rows[1:]) and "async/rollout_s" not in rows[0]

    learner = Learner(tiny_model_dir, load_recipe(recipe, overrides), num_threads=1)
    before = [w for w, _ in seen]  # before[t - 1]: the weights after step t - 1
    assert len(seen) == 3
    for t, sampler_step in ((1, 0), (2, 0), (3, 1)):
        batch = seen[t - 1][1]
        sampler = batch.sampler_logp * batch.response_mask
        near = (_logp(learner, before[sampler_step], batch) - sampler).abs().max()
        # The learner's float32 forward and the engine's C kernels agree to ~1e-5.
        assert near < 1e-3, (t, float(near))
        if t > 1:
            # ... and the weights the learner trained it at (after step t - 1) are not those.
            far = (_logp(learner, before[t - 1], batch) - sampler).abs().max()
            assert far > 10 * near and far > 1e-3, (t, float(far), float(near))
    assert os.path.isdir(tmp_path / "runs" / "e2e" / "checkpoints" / "0_rlvr" / "step_3")
