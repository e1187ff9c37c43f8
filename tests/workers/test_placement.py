"""Placement: the one place that decides every actor's device and resources."""

import pytest

from rlkit.config import load_recipe
from rlkit.workers.placement import PlacementError, plan


def _cfg(*overrides):
    return load_recipe(None, ["ray.num_cpus=4", *overrides])


def test_cpu_runs_a_learner_and_a_rollout_actor_without_gpus():
    p = plan(_cfg("device=cpu"), gpus=2)
    assert p.device == "cpu" and not p.colocated
    assert p.learner_gpus == p.rollout_gpus == 0
    assert p.num_cpus == 4 and p.learner_threads == 4


def test_auto_takes_the_gpu_when_there_is_one():
    p = plan(_cfg(), gpus=1)
    assert p.device == "cuda" and p.why.startswith("device=auto")
    # One learner and one rollout worker on one GPU: one colocated actor asking for it.
    assert p.colocated and p.learner_gpus == 1.0 and p.rollout_gpus == 0.0
    assert plan(_cfg(), gpus=0).device == "cpu"


def test_cuda_without_a_gpu_is_a_user_error():
    cfg = _cfg()
    cfg.device = "cuda"  # past the loader's own check (tests/config: a machine with no GPU)
    with pytest.raises(PlacementError, match="device: is cuda but no CUDA GPU is visible"):
        plan(cfg, gpus=0)


def test_several_rollout_workers_on_gpus_need_a_gpu_each():
    p = plan(_cfg("rollout.num_workers=2"), gpus=3)
    assert p.device == "cuda" and not p.colocated
    assert p.learner_gpus == p.rollout_gpus == 1.0
    with pytest.raises(
        PlacementError, match="2 rollout workers beside 1 learner rank need 3 GPUs, 2"
    ):
        plan(_cfg("rollout.num_workers=2"), gpus=2)


def test_learner_ranks_share_the_cores_and_take_a_gpu_each():
    p = plan(_cfg("device=cpu", "train.num_learners=2", "rollout.num_workers=2"), gpus=0)
    assert p.num_learners == 2 and p.learner_threads == 2 and p.rollout_threads == 2
    assert p.actor_options("learner") == {"num_cpus": 1.0}
    g = plan(_cfg("train.num_learners=2"), gpus=3)
    assert g.device == "cuda" and not g.colocated and g.learner_gpus == g.rollout_gpus == 1.0
    with pytest.raises(PlacementError, match="beside 2 learner ranks need 3 GPUs, 2 visible"):
        plan(_cfg("train.num_learners=2"), gpus=2)


def test_one_step_off_splits_the_cores_and_needs_apart_workers():
    p = plan(_cfg("device=cpu", "train.async_mode=one_step_off"), gpus=0)
    # Rollout and learning run at once: half the cores each.
    assert p.learner_threads == 2 and p.rollout_threads == 2
    with pytest.raises(PlacementError, match="needs rollout workers apart from the learner"):
        plan(_cfg("train.async_mode=one_step_off"), gpus=1)


def test_actor_resources_go_into_each_roles_request():
    p = plan(_cfg("device=cpu", "ray.actor_resources={rollout: {second_node: 1}}"), gpus=0)
    assert p.actor_options("rollout")["resources"] == {"second_node": 1.0}
    assert "resources" not in p.actor_options("learner")
