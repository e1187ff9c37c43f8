"""Non-finite guards in the learner: a NaN/inf loss or gradient skips the update (counted),
non-finite weights stop the run instead of being synced and saved."""

import math

import pytest
import torch

from rlkit.algorithms import ADVANTAGES
from rlkit.config import load_recipe
from rlkit.data.batch import RolloutBatch
from rlkit.models.tiny import save_tiny_model
from rlkit.workers.learner import Learner, NonFiniteWeightsError
from rlkit.workers.master_weights import MasterWeights


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


def _learner(model_dir, compute="none"):
    cfg = load_recipe(None, [f"model.compute_dtype={compute}", "optim.lr=1e-2"])
    return Learner(model_dir, cfg, num_threads=1)


def _weights(learner):
    return {k: v.detach().clone() for k, v in learner._full_state().items()}


def _assert_unchanged(learner, before):
    for k, v in learner._full_state().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("compute", ["none", "bfloat16"])
def test_nan_loss_skips_the_update(model_dir, compute):
    learner = _learner(model_dir, compute)
    before = _weights(learner)
    batch = _batch()
    batch.advantages[0, 0] = math.nan  # one token: the token-mean loss is NaN
    m = learner.train_step(batch)
    assert m["actor/nonfinite_skipped"] == 1.0
    _assert_unchanged(learner, before)
    # The learner goes on: the next finite batch updates the weights (and counts nothing).
    m = learner.train_step(_batch())
    assert m["actor/nonfinite_skipped"] == 0.0 and math.isfinite(m["actor/grad_norm"])
    assert any(not torch.equal(v, before[k]) for k, v in learner._full_state().items())
    learner.weights("float32")  # finite: no error


@pytest.mark.parametrize("compute", ["none", "bfloat16"])
def test_inf_gradient_skips_the_update(model_dir, compute):
    learner = _learner(model_dir, compute)
    before = _weights(learner)
    # The loss stays finite; one parameter's gradient becomes inf on its way back.
    param = next(learner.model.parameters())
    handle = param.register_hook(lambda g: g.clone().fill_(math.inf))
    m = learner.train_step(_batch())
    handle.remove()
    assert m["actor/nonfinite_skipped"] == 1.0
    assert not math.isfinite(m["actor/grad_norm"])
    _assert_unchanged(learner, before)
    assert all(p.grad is None for p in learner.model.parameters())


def test_nan_sft_loss_skips_the_update(model_dir):
    learner = _learner(model_dir)
    before = _weights(learner)
    batch = _batch()
    param = next(learner.model.parameters())
    with torch.no_grad():
        saved = param.clone()
        param.fill_(math.nan)  # the forward is NaN, so is the loss
    m = learner.sft_step(batch)
    with torch.no_grad():
        param.copy_(saved)
    assert m["actor/nonfinite_skipped"] == 1.0
    _assert_unchanged(learner, before)


@pytest.mark.parametrize("compute", ["none", "bfloat16"])
def test_non_finite_weights_are_never_synced(model_dir, compute):
    learner = _learner(model_dir, compute)
    with torch.no_grad():
        learner._trainable()[3].view(-1)[0] = math.inf
        if learner.master is not None:
            learner.master.master_to_model()
    with pytest.raises(NonFiniteWeightsError, match="not finite .*1 of .* tensors"):
        learner.weights("float32")


def test_master_weights_step_drops_a_non_finite_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    master = MasterWeights(model, torch.bfloat16)
    opt = torch.optim.AdamW(master.parameters(), lr=1e-1)
    before = [m.detach().clone() for m in master.parameters()]
    model(torch.randn(2, 4, dtype=torch.bfloat16)).float().sum().backward()
    model.bias.grad.fill_(math.nan)
    assert math.isnan(master.step(opt, 1.0))
    assert all(p.grad is None for p in model.parameters())
    for m, b in zip(master.parameters(), before):
        assert torch.equal(m.detach(), b)
