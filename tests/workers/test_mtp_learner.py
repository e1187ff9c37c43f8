"""The learner's MTP drafter (MTP-RL) on a tiny model, without Ray: the warm-up trains the
drafter alone, the RL step trains it from the same forward without changing the policy's
update, the loss variants weight tokens as documented, and the module travels with the
weights and the checkpoint."""

import os

import pytest
import torch

from rlkit.algorithms import ADVANTAGES
from rlkit.algorithms.mtp import MTP_WEIGHTS, mtp_weights
from rlkit.config import load_recipe
from rlkit.data.batch import RolloutBatch
from rlkit.models.mtp import MTP_FILE, load_mtp
from rlkit.models.tiny import save_tiny_model
from rlkit.workers.learner import Learner

SPEC = ["rollout.speculative.drafter=mtp", "rollout.speculative.num_draft_tokens=2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"), tie_word_embeddings=False)


def _batch(rewards=(1.0, 0.0, 0.0, 1.0, 0.5, 0.5)):
    g = torch.Generator().manual_seed(0)
    n = len(rewards)
    prompts = [torch.randint(0, 250, (5,), generator=g).tolist() for _ in range(n // 2)]
    prompts = [p for p in prompts for _ in range(2)]
    # Repetitive responses: something a drafter can learn quickly.
    responses = [([7, 8, 9] * 4)[: 8 + i % 3] for i in range(n)]
    b = RolloutBatch.from_sequences(
        prompts, responses, [[-5.0] * len(r) for r in responses], list(rewards),
        [i // 2 for i in range(n)],
    )  # fmt: skip
    b.advantages = ADVANTAGES.get("grpo")(b.rewards, b.group_ids, b.response_mask)
    return b


def _learner(model_dir, *overrides):
    cfg = load_recipe(
        None, ["model.compute_dtype=none", "optim.lr=1e-2", "train.micro_batch_size=4", *overrides]
    )
    return Learner(model_dir, cfg, num_threads=1)


def _trunk(learner):
    return {k: v.clone() for k, v in learner.model.state_dict().items()}


def test_warmup_trains_the_drafter_alone(model_dir):
    learner = _learner(model_dir, *SPEC, "algorithm.mtp.lr=1e-2")
    assert learner.mtp is not None and not learner.mtp.loaded
    trunk = _trunk(learner)
    batch = _batch()
    first = learner.mtp_step(batch)
    for _ in range(15):
        last = learner.mtp_step(batch)
    assert last["mtp/loss"] < first["mtp/loss"] - 1.0, (first, last)
    assert last["mtp/acc_d1"] > first["mtp/acc_d1"] and last["mtp/acc_d2"] > 0.5
    for k, v in learner.model.state_dict().items():
        assert torch.equal(v, trunk[k]), k


@pytest.mark.parametrize("loss", ["plain", "advantage"])
def test_rl_step_trains_the_drafter_without_changing_the_policy_update(model_dir, loss):
    """Trunk detached (the default): the policy's update is exactly a run's without MTP."""
    with_mtp = _learner(model_dir, *SPEC, f"algorithm.mtp.loss={loss}")
    without = _learner(model_dir)
    before = {k: v.clone() for k, v in with_mtp.mtp.module.state_dict().items()}
    metrics = with_mtp.train_step(_batch())
    without.train_step(_batch())
    for k, v in with_mtp.model.state_dict().items():
        torch.testing.assert_close(v, without.model.state_dict()[k], rtol=0, atol=0)
    moved = [not torch.equal(v, before[k]) for k, v in with_mtp.mtp.module.state_dict().items()]
    assert all(moved)
    assert metrics["mtp/grad_norm"] > 0 and metrics["mtp/loss"] > 0
    assert {"mtp/ce_d1", "mtp/acc_d2"} <= set(metrics)
    # The policy's metrics are the same as without the drafter.
    plain = without.train_step(_batch())
    fresh = _learner(model_dir, *SPEC, f"algorithm.mtp.loss={loss}")
    fresh.train_step(_batch())
    again = fresh.train_step(_batch())
    for k, v in plain.items():
        if k.startswith("actor/") and "grad_norm" not in k:
            assert again[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert not [k for k in metrics if "_sum_" in k or "targets" in k or "hits" in k]


def test_frozen_drafter_does_not_move_and_attached_trunk_does(model_dir):
    frozen = _learner(model_dir, *SPEC, "algorithm.mtp.loss=frozen")
    before = {k: v.clone() for k, v in frozen.mtp.module.state_dict().items()}
    metrics = frozen.train_step(_batch())
    assert not any(k.startswith("mtp/") for k in metrics)
    for k, v in frozen.mtp.module.state_dict().items():
        assert torch.equal(v, before[k])
    attached = _learner(
        model_dir, *SPEC, "algorithm.mtp.detach_trunk=false", "algorithm.mtp.scale=5"
    )
    detached = _learner(model_dir, *SPEC)
    attached.train_step(_batch())
    detached.train_step(_batch())
    diff = [
        not torch.equal(v, detached.model.state_dict()[k])
        for k, v in attached.model.state_dict().items()
    ]
    assert any(diff)  # the MTP loss reached the trunk


def test_zero_advantage_samples_still_teach_a_plain_drafter(model_dir):
    """GRPO zeroes groups of equal rewards and the policy loss skips them; the plain MTP loss
    weights them 1, so they are run (without trunk gradients) for the drafter."""
    batch = _batch(rewards=(0.5, 0.5, 1.0, 1.0, 0.0, 0.0))  # every group equal
    learner = _learner(model_dir, *SPEC)
    metrics = learner.train_step(batch)
    assert metrics["actor/skipped_frac"] == 1.0
    assert metrics["mtp/loss"] > 0 and metrics["mtp/grad_norm"] > 0
    positive = _learner(
        model_dir, *SPEC, "algorithm.mtp.loss=advantage", "algorithm.mtp.weight=positive"
    )
    assert positive.train_step(batch)["mtp/loss"] == 0.0


def test_weights_and_checkpoints_carry_the_module(model_dir, tmp_path):
    learner = _learner(model_dir, *SPEC)
    learner.mtp_step(_batch())
    weights = learner.weights("float32")
    mtp_keys = [k for k in weights if k.startswith("mtp.")]
    assert mtp_keys and "model.norm.weight" in weights
    assert sorted(learner.weights("float32", only="mtp")) == sorted(mtp_keys)
    learner.save(str(tmp_path))
    assert os.path.isfile(tmp_path / "model" / MTP_FILE)
    saved = load_mtp(str(tmp_path / "model"), learner.model.args)
    for k, v in learner.mtp.module.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v)
    # Transformers still loads the trunk; a new learner loads the module with it.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"))
    other = _learner(str(tmp_path / "model"), *SPEC)
    assert other.mtp.loaded
    other.load(str(tmp_path))
    for k, v in learner.mtp.module.state_dict().items():
        assert torch.equal(other.mtp.module.state_dict()[k], v)


def test_weight_variants():
    adv = torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert set(MTP_WEIGHTS.names()) == {"plain", "linear", "positive", "exp"}
    for name in MTP_WEIGHTS.names():
        w = mtp_weights(adv, mask, name, beta=0.5)
        assert (w >= 0).all() and (w[mask == 0] == 0).all()
        assert torch.isclose((w * mask).sum() / mask.sum(), torch.tensor(1.0)), name
    lin = mtp_weights(adv, mask, "linear", beta=0.5)
    # 1 + 0.5 A: 1.5 for A = 1, 0.5 for A = -1, 1 for A = 0, over a mean of 1.
    mean = (1.5 * 2 + 0.5 * 3 + 1.0) / 6
    torch.testing.assert_close(lin[0, 0], torch.tensor(1.5 / mean))
    pos = mtp_weights(adv, mask, "positive")
    assert (pos[1] == 0).all() and (pos[2] == 0).all() and pos[0, 0] > 0
    assert (mtp_weights(-adv.abs(), mask, "positive") == 0).all()  # nothing to fit: zero


@pytest.mark.parametrize("soft", [False, True])
def test_frozen_head_token_stats_match_autograd(soft):
    """mtp_token_stats (gradient in the states computed in the forward, chunked) gives the
    scores, hits and state gradients of a plain log-softmax through autograd, across chunk
    boundaries, and leaves the head and the teacher without a gradient. soft: the score is
    sum_v p_v log q_v against the teacher's distribution p at temperature 0.7."""
    from rlkit.algorithms.mtp import mtp_token_stats

    g = torch.Generator().manual_seed(0)
    states = torch.randn(37, 16, generator=g, dtype=torch.float64).requires_grad_()
    head = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(37, 16, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=g)
    weights = torch.rand(37, generator=g, dtype=torch.float64)
    kw = {"teacher": teacher, "temperature": 0.7} if soft else {}
    score, hit = mtp_token_stats(states, head, targets, chunk_size=8, **kw)
    (weights * score).sum().backward()
    assert head.grad is None and teacher.grad is None
    ref_states = states.detach().clone().requires_grad_()
    w = head.detach().float()
    logits = ref_states.float() @ w.T
    logq = torch.log_softmax(logits, -1)
    if soft:
        p = torch.softmax(teacher.detach().float() @ w.T / 0.7, -1)
        ref = (p * logq).sum(-1)
    else:
        ref = logq.gather(-1, targets[:, None])[:, 0]
    (weights.float() * ref).sum().backward()
    torch.testing.assert_close(score, ref.detach(), atol=1e-5, rtol=0)
    assert torch.equal(hit, logits.argmax(-1) == targets)
    torch.testing.assert_close(states.grad.float(), ref_states.grad.float(), atol=1e-5, rtol=0)
    assert states.grad.dtype == torch.float64
    with torch.no_grad():
        again, hit2 = mtp_token_stats(states, head, targets, chunk_size=8, **kw)
    torch.testing.assert_close(again, score.detach())
    assert torch.equal(hit2, hit)


def test_policy_target_distils_the_trunks_distribution(model_dir):
    """algorithm.mtp.target=policy: the drafter learns the trunk's own next-token distribution
    (soft cross-entropy falls towards the trunk's entropy), the trunk does not move."""
    learner = _learner(model_dir, *SPEC, "algorithm.mtp.lr=1e-2", "algorithm.mtp.target=policy")
    with torch.no_grad():  # a random tiny trunk is near uniform: nothing to distil
        learner.model.lm_head.weight.mul_(40.0)
    trunk = _trunk(learner)
    batch = _batch()
    with torch.no_grad():  # the entropy of the distributions depth 1 learns (rows 1..)
        states, valid = learner.response_states(learner.model, batch)
        p = torch.softmax(states.float() @ learner.model.lm_head.weight.float().T, -1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)[:, 1:][valid[:, 1:]].mean().item()
    first = learner.mtp_step(batch)
    for _ in range(15):
        last = learner.mtp_step(batch)
    # A soft cross-entropy is at least the target's entropy (one-hot targets on these
    # repeated tokens would go below it), and falls towards it as q approaches p.
    assert first["mtp/ce_d1"] > ent + 5.0, (first, ent)
    assert ent - 1e-3 <= last["mtp/ce_d1"] < ent + 0.5, (last, ent)
    assert last["mtp/ce_d2"] < first["mtp/ce_d2"] - 5.0, (first, last)
    for k, v in learner.model.state_dict().items():
        assert torch.equal(v, trunk[k]), k
