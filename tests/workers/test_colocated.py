"""The colocated worker (learner + rollout engine in one process): the in-process weight sync
and the phases through one object. On CPU here; tests/workers/test_gpu.py runs it on CUDA."""

import pytest
import torch

from rlkit.algorithms import ADVANTAGES
from rlkit.config import load_recipe
from rlkit.data.batch import RolloutBatch
from rlkit.models.tiny import save_tiny_model
from rlkit.rollout.sampling import SamplingParams
from rlkit.workers.colocated import ColocatedWorker


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"), tie_word_embeddings=False)


def _engine_state(worker):
    model = worker.rollout.engine.model
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.numel()}


def _rollout_batch(w):
    """Two prompts x 4 samples from the worker's engine, as a GRPO batch."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    outs = w.generate(prompts, SamplingParams(max_new_tokens=4, temperature=1.0, seed=0), n=4)
    assert len(outs) == 8
    batch = RolloutBatch.from_sequences(
        [prompts[o["prompt_index"]] for o in outs],
        [o["token_ids"] for o in outs],
        [o["logprobs"] for o in outs],
        [float(i % 2) for i in range(8)],
        [o["prompt_index"] for o in outs],
    )
    batch.advantages = ADVANTAGES.get("grpo")(batch.rewards, batch.group_ids, batch.response_mask)
    return batch


def test_sync_copies_the_learners_weights_into_the_engine(model_dir):
    cfg = load_recipe(None, ["optim.lr=1e-2", "rollout.dtype=float32", "model.compute_dtype=none"])
    w = ColocatedWorker(model_dir, cfg, num_threads=1, device="cpu")
    batch = _rollout_batch(w)
    before = _engine_state(w)
    w.train_step(batch)
    assert all(torch.equal(v, _engine_state(w)[k]) for k, v in before.items())  # not yet
    ms = w.sync_engine()
    assert ms >= 0
    learner = w.learner.model.state_dict()
    after = _engine_state(w)
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert moved, "the update must reach the engine"
    for k in after:
        assert torch.equal(after[k], learner[k].to(after[k].dtype)), k


def test_direct_copy_casts_the_learners_weights_into_plain_parameters(model_dir):
    """The colocated sync's direct path (no intermediate state dict): every parameter of a
    plain bf16 model receives the learner's weights cast; a non-finite weight stops it before
    anything is copied."""
    from rlkit.models import load_model
    from rlkit.workers.learner import NonFiniteWeightsError

    cfg = load_recipe(None, ["optim.lr=1e-2", "model.compute_dtype=none"])
    w = ColocatedWorker(model_dir, cfg, num_threads=1, device="cpu")
    model, _ = load_model(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    targets = model.state_dict(keep_vars=True)
    assert w.learner.copy_weights_into(targets)
    source = w.learner.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k].to(torch.bfloat16)), k
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        next(w.learner.model.parameters()).view(-1)[3] = float("nan")
    with pytest.raises(NonFiniteWeightsError):
        w.learner.copy_weights_into(targets)
    assert all(not v.any() for v in model.state_dict().values())
    assert not w.learner.copy_weights_into({"not.a.weight": torch.zeros(1)})


def _trained_worker(model_dir, overrides):
    """A colocated worker after one learner step (its weights have moved)."""
    cfg = load_recipe(None, ["optim.lr=1e-2", *overrides])
    w = ColocatedWorker(model_dir, cfg, num_threads=1, device="cpu")
    w.train_step(_rollout_batch(w))
    return w


def test_direct_copy_under_master_weights_sends_the_masters_values(model_dir):
    """bf16 compute with float32 masters: a bf16 engine receives the masters cast to bf16 (the
    compute parameters, copied without a cast), a float32 one the masters themselves; a NaN in
    a master (the bf16 copy then also NaN) or an inf stops the copy before anything moves."""
    from rlkit.models import load_model
    from rlkit.workers.learner import NonFiniteWeightsError

    w = _trained_worker(model_dir, ["model.compute_dtype=bfloat16"])
    assert w.learner.master is not None
    masters = w.learner.master.state_dict(w.learner.model)
    for dtype in (torch.bfloat16, torch.float32):
        model, _ = load_model(model_dir, dtype=dtype)
        targets = model.state_dict(keep_vars=True)
        assert w.learner.copy_weights_into(targets)
        for k, v in model.state_dict().items():
            assert torch.equal(v, masters[k].to(dtype)), (dtype, k)
    model, _ = load_model(model_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    targets = model.state_dict(keep_vars=True)
    compute = dict(w.learner.model.named_parameters())
    name = w.learner.master.names[2]
    for bad in (float("inf"), float("nan")):
        with torch.no_grad():
            keep = compute[name].view(-1)[1].clone()
            compute[name].view(-1)[1] = bad
        with pytest.raises(NonFiniteWeightsError, match=name.split(".")[-1]):
            w.learner.copy_weights_into(targets)
        with torch.no_grad():
            compute[name].view(-1)[1] = keep
    assert all(not v.any() for v in model.state_dict().values())


def test_all_finite_reads_every_tensor_of_every_dtype():
    from rlkit.workers.learner import _all_finite

    good = [torch.full((3,), 3e38), torch.ones(5, dtype=torch.bfloat16), torch.zeros(0)]
    assert _all_finite(good)  # 3e38 is finite (an L2 norm of it would overflow)
    assert _all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i in range(2):
            ts = [t.clone() for t in good]
            ts[i][-1] = bad
            assert not _all_finite(ts), (bad, i)
