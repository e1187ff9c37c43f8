"""Two learner ranks over gloo (two processes, no Ray) against one learner on the same batches:
data parallelism and FSDP2 give the same per-step metrics and weights within float32
tolerance, and a checkpoint written by the ranks resumes to the same step.

The learning rate is 1e-4: AdamW's first steps move each weight by about lr whatever its
gradient's size, so a weight whose gradient is near zero turns float32 summation-order noise
(two ranks add the micro-batches' gradients in another order) into a difference of a few
percent of lr (1.9e-5 at lr 1e-3 in 1 of 8192 weights). Every weight moves by ~2e-4 here,
so a rank's share missing or counted twice still shows."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from rlkit.algorithms import ADVANTAGES
from rlkit.config import load_recipe
from rlkit.data.batch import RolloutBatch
from rlkit.models.tiny import save_tiny_model
from rlkit.workers import distributed
from rlkit.workers.learner import Learner
from rlkit.workers.step_metrics import finish

COMMON = ["model.compute_dtype=none", "optim.lr=1e-4", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"), seed=1)


def _batch(seed: int) -> RolloutBatch:
    """Four GRPO groups of two (one with equal rewards: skipped), responses of unequal length:
    three live micro-batches of two, so the ranks run two and one."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 250, (6,), generator=g).tolist() for _ in range(4)]
    responses = [
        torch.randint(0, 250, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        for _ in range(8)
    ]
    logps = [[-5.0] * len(r) for r in responses]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    b = RolloutBatch.from_sequences(
        [prompts[i // 2] for i in range(8)], responses, logps, rewards, [i // 2 for i in range(8)]
    )
    b.advantages = ADVANTAGES.get("grpo")(b.rewards, b.group_ids, b.response_mask)
    return b


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _rank_main(rank, world, address, model_dir, overrides, ckpt, resume, out):
    """One rank: (resume from `ckpt` or) step on batch 0, save to `ckpt`, step on batch 1;
    rank 0 writes each step's part and the final full weights to `out`."""
    torch.set_num_threads(1)
    cfg = load_recipe(None, overrides)
    learner = Learner(model_dir, cfg, num_threads=1, rank=rank, world=world)
    learner.join(address)
    parts = []
    if resume:
        learner.load(ckpt)
    else:
        parts.append(learner.train_step_part(_batch(0)))
        learner.save(ckpt)
    parts.append(learner.train_step_part(_batch(1)))
    weights = learner.weights("float32")
    torch.save({"parts": parts, "weights": weights}, f"{out}.{rank}")
    # Tear the gloo group down before the process exits: left to the interpreter's exit, its
    # threads were once destroyed while joinable (std::terminate, SIGABRT) after the rank had
    # written its results. Both ranks first meet at a barrier: under a loaded CPU one rank's
    # teardown while the other still talked aborted it the same way (2026-12-01). That
    # still happened once more in a clean suite run (rank 1, fsdp2), though not in 126 spawns
    # of this test alone, loaded or not: so past the group's teardown the rank leaves without
    # the interpreter's finalisation, whose C++ destructors (the store, gloo's threads) run
    # in an order neither rank controls. Every result is on disk by then.
    torch.distributed.barrier()
    distributed.leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ranks(model_dir, overrides, ckpt, out, resume=False):
    """Two ranks in two processes; what each wrote (its parts, rank 0's weights)."""
    address = _free_address()
    mp.start_processes(
        _rank_main,
        args=(2, address, model_dir, overrides, ckpt, resume, out),
        nprocs=2,
        start_method="spawn",
    )
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


def _one_learner(model_dir, overrides):
    learner = Learner(model_dir, load_recipe(None, overrides), num_threads=1)
    metrics = [learner.train_step(_batch(0)), learner.train_step(_batch(1))]
    return metrics, learner.weights("float32")


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(["train.num_learners=2"], id="data-parallel"),
        # Sparse-RL's batch-wide corrections (old log-probs scored first, each rank its share)
        # and the MTP drafter, whose gradients are summed like the policy's.
        pytest.param(
            [
                "train.num_learners=2",
                "rollout.kv_compression.policy=snapkv",
                "algorithm.sparse.normalize_weights=true",
                "rollout.speculative.drafter=mtp",
            ],
            id="dp-sparse-mtp",
        ),
        # Two mini-batches: old log-probs scored first, each rank its share (FSDP2: padded).
        pytest.param(
            ["train.num_learners=2", "train.shard=true", "train.mini_batches=2"], id="fsdp2"
        ),
    ],
)
def test_two_ranks_make_one_learners_update_and_resume(model_dir, tmp_path, mode):
    overrides = [*COMMON, *mode]
    one = [o for o in overrides if not o.startswith(("train.num_learners", "train.shard"))]
    metrics, weights = _one_learner(model_dir, one)
    got = _ranks(model_dir, overrides, str(tmp_path / "ckpt"), str(tmp_path / "out"))
    for step in range(2):
        ranks = finish([got[0]["parts"][step], got[1]["parts"][step]])
        # Both ranks ran micro-batches (three live ones: two and one).
        assert got[0]["parts"][step]["tokens"] > 0 and got[1]["parts"][step]["tokens"] > 0
        assert metrics[step]["actor/grad_norm"] > 0
        if "rollout.speculative.drafter=mtp" in mode:
            assert {"sparse/masked_token_frac", "mtp/loss", "mtp/grad_norm"} <= set(ranks)
        for k, v in metrics[step].items():
            if k.startswith(("actor/", "sparse/", "mtp/")):
                assert ranks[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
    assert got[1]["weights"] == {} or set(got[1]["weights"]) == set(weights)
    moved = 0
    for k, v in weights.items():
        torch.testing.assert_close(got[0]["weights"][k], v, rtol=1e-5, atol=1e-5, msg=k)
        if k in _initial(model_dir):  # the trunk's (the MTP module's are seeded apart)
            moved += int(not torch.equal(v, _initial(model_dir)[k]))
    assert moved > 0
    # Resumed from the checkpoint the ranks wrote after step 1: step 2 as before.
    again = _ranks(
        model_dir, overrides, str(tmp_path / "ckpt"), str(tmp_path / "out2"), resume=True
    )
    for k, v in got[0]["weights"].items():
        torch.testing.assert_close(again[0]["weights"][k], v, rtol=1e-6, atol=1e-6, msg=k)
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"model", "learner.pt"} <= files
    assert ("optimizer" in files) == ("train.shard=true" in mode)


_INITIAL: dict = {}


def _initial(model_dir):
    if model_dir not in _INITIAL:
        cfg = load_recipe(None, COMMON)
        _INITIAL[model_dir] = Learner(model_dir, cfg, num_threads=1).weights("float32")
    return _INITIAL[model_dir]
