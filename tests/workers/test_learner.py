"""The learner on a tiny model, without Ray: updates move log-probs the way advantages say."""

import json
import os

import pytest
import torch

from rlkit.algorithms import ADVANTAGES
from rlkit.config import load_recipe
from rlkit.data.batch import RolloutBatch
from rlkit.models.loading import load_model
from rlkit.models.tiny import save_tiny_model
from rlkit.workers.learner import Learner


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"))


def _batch():
    g = torch.Generator().manual_seed(0)
    # Two groups of two samples; a group's samples share their prompt.
    group_prompts = [torch.randint(0, 250, (5,), generator=g).tolist() for _ in range(2)]
    prompts = [group_prompts[i // 2] for i in range(4)]
    responses = [torch.randint(0, 250, (4,), generator=g).tolist() for _ in range(4)]
    b = RolloutBatch.from_sequences(
        prompts, responses, [[-5.0] * 4] * 4, [1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1]
    )
    b.advantages = ADVANTAGES.get("grpo")(b.rewards, b.group_ids, b.response_mask)
    return b


@pytest.mark.parametrize("compute", ["none", "bfloat16"])
def test_update_follows_the_advantage(model_dir, compute, tmp_path):
    cfg = load_recipe(
        None, [f"model.compute_dtype={compute}", "optim.lr=1e-2", "train.micro_batch_size=3"]
    )
    learner = Learner(model_dir, cfg, num_threads=1)
    batch = _batch()
    before, _ = learner.response_logprobs(learner.model, batch)
    metrics = learner.train_step(batch)
    after, _ = learner.response_logprobs(learner.model, batch)
    delta = ((after - before) * batch.response_mask).sum(1)  # [4]
    assert metrics["actor/grad_norm"] > 0
    # Rewarded samples (0 and 3) gain log-probability, the others lose it.
    assert delta[0] > 0 and delta[3] > 0 and delta[1] < 0 and delta[2] < 0
    # Checkpoints hold full-precision weights whatever the compute dtype.
    learner.save(str(tmp_path))
    with open(os.path.join(tmp_path, "model", "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "float32"
    saved, _ = load_model(os.path.join(tmp_path, "model"))
    if compute == "bfloat16":
        master = dict(zip(learner.master.names, learner.master.master))
        torch.testing.assert_close(
            saved.state_dict()["model.norm.weight"], master["model.norm.weight"].detach()
        )
    # A fresh learner loading the checkpoint continues from the same weights.
    other = Learner(model_dir, cfg, num_threads=1)
    other.load(str(tmp_path))
    again, _ = other.response_logprobs(other.model, batch)
    torch.testing.assert_close(again, after)


def test_zero_advantage_batch_leaves_weights_unchanged(model_dir):
    cfg = load_recipe(None, ["model.compute_dtype=none", "optim.lr=1e-2"])
    learner = Learner(model_dir, cfg, num_threads=1)
    batch = _batch()
    batch.rewards[:] = 1.0
    batch.advantages = ADVANTAGES.get("grpo")(batch.rewards, batch.group_ids, batch.response_mask)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    m = learner.train_step(batch)
    assert m["actor/skipped_frac"] == 1.0
    for k, v in learner.model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def _with_sampler_logp(learner, batch, veto_row):
    """Sampler log-probs equal to the learner's dense ones, except one sample's, which the
    compressed cache made far more likely than the dense policy finds them (rho ~ 0)."""
    dense, _ = learner.response_logprobs(learner.model, batch)
    sampler = dense.detach().clone()
    sampler[veto_row] += 12.0  # rho = exp(-12) < veto_threshold
    batch.sampler_logp = sampler * batch.response_mask
    return batch


@pytest.mark.parametrize("batch_level", [True, False])
def test_sparse_corrections_drop_the_vetoed_sample(model_dir, batch_level):
    sparse = ["rollout.kv_compression.policy=snapkv", "optim.lr=1e-2", "train.micro_batch_size=2"]
    if batch_level:
        sparse.append("algorithm.sparse.normalize_weights=true")
    a = Learner(model_dir, load_recipe(None, sparse), num_threads=1)
    batch = _with_sampler_logp(a, _batch(), veto_row=1)
    metrics = a.train_step(batch)
    assert metrics["sparse/vetoed_frac"] == pytest.approx(0.25)
    assert metrics["sparse/rho_min"] < 1e-4 and metrics["sparse/rho_max"] == pytest.approx(1.0)
    assert metrics["sparse/masked_token_frac"] == pytest.approx(0.25)
    assert "actor/tis_ratio_mean" not in metrics  # the corrections replace TIS

    # The same step without compression, on the batch with that sample masked out by hand.
    b = Learner(
        model_dir, load_recipe(None, [*sparse[1:], "algorithm.tis_cap=null"]), num_threads=1
    )
    ref = _batch()
    ref.response_mask[1] = 0
    if not batch_level:
        # The fused pass keeps the rollout's token count as the normaliser: scale to match.
        ref.advantages = ref.advantages * 12 / 16
    b.train_step(ref)
    # Adam's first step moves every weight by about lr (1e-2) times the sign of its gradient,
    # so a sample that counted would show as 1e-2; float32 summation-order noise (the vetoed
    # sample stays in its micro-batch's padded forward) moves a few tiny-gradient weights by
    # ~1e-5 (float32 compute, the "auto" choice on a CPU without native bf16).
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)


def test_shared_prefix_forward_only_where_it_removes_enough_tokens():
    from rlkit.workers.learner import _sharing_pays

    def batch(prompt_len, resp_len, n=8):
        return RolloutBatch.from_sequences(
            [[1] * prompt_len] * n, [[2] * resp_len] * n, [[0.0] * resp_len] * n,
            [0.0] * n, [0] * n,
        )  # fmt: skip

    assert _sharing_pays(batch(40, 20))  # the default recipe's shape: most tokens are prompt
    assert not _sharing_pays(batch(64, 1024))  # 5% of the tokens: plain causal attention
    assert not _sharing_pays(batch(40, 20, n=1))  # nothing repeated


@pytest.mark.parametrize("compute", ["none", "bfloat16"])
def test_warm_up_leaves_the_learner_as_it_was(model_dir, compute):
    """The set-up's warm-up (run on a GPU) changes nothing a step can see: the next step's
    metrics and weights equal a learner's that never warmed up, and it leaves no gradient,
    optimizer state or moved random stream behind."""
    cfg = load_recipe(
        None,
        [f"model.compute_dtype={compute}", "optim.lr=1e-2", "model.gradient_checkpointing=true"],
    )
    cold = Learner(model_dir, cfg, num_threads=1)
    cold_metrics = cold.train_step(_batch())
    torch.manual_seed(1234)
    warm = Learner(model_dir, cfg, num_threads=1)
    rng = torch.get_rng_state()
    warm.warm_up()
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in warm.model.parameters())
    assert not warm.opt.state
    assert warm.model.training
    warm_metrics = warm.train_step(_batch())
    timing = "throughput/learner_tokens_per_s"
    assert warm_metrics.pop(timing) > 0 and cold_metrics.pop(timing) > 0
    assert warm_metrics == cold_metrics
    cold_state, warm_state = cold.model.state_dict(), warm.model.state_dict()
    for k, v in warm_state.items():
        assert torch.equal(v, cold_state[k]), k
