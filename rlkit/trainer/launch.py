"""Start Ray and the actors, load the data, and hand back a RunContext."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import asdict
from typing import Any

import ray

from rlkit import faults
from rlkit.config import to_dict
from rlkit.config.schema import RecipeConfig
from rlkit.data.stream import PromptStream
from rlkit.device import cuda_allocator_env
from rlkit.models.loading import parameter_count, resolve_model_dir
from rlkit.models.mtp import wanted as mtp_wanted
from rlkit.models.tokenizer import load_tokenizer
from rlkit.trainer.context import RunContext
from rlkit.trainer.data_setup import load_split, verifier_spec
from rlkit.trainer.metrics import MetricsLogger
from rlkit.workers.colocated import ColocatedWorker
from rlkit.workers.learner import Learner
from rlkit.workers.learner_group import LearnerGroup
from rlkit.workers.placement import Placement, plan, visible_gpus
from rlkit.workers.restarting import RestartingActor, first_line
from rlkit.workers.reward_pool import RewardPool
from rlkit.workers.rollout_group import RolloutGroup
from rlkit.workers.rollout_worker import RolloutWorker


def object_store_bytes(cfg: RecipeConfig, model_dir: str) -> int:
    """The object store's size: the recipe's, else twice the model's float32 weights plus
    256 MiB (weights of one sync in flight, and room for the batches beside them)."""
    if cfg.ray.object_store_memory_mb is not None:
        return cfg.ray.object_store_memory_mb << 20
    return max(512 << 20, 2 * 4 * parameter_count(model_dir) + (256 << 20))


def init_ray(
    cfg: RecipeConfig, num_cpus: int, num_gpus: int = 0, object_store: int = 512 << 20
) -> None:
    if ray.is_initialized():
        return
    # Actors inherit the driver's environment; quiet, single-threaded BLAS start-up in each.
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    # The fault-injection tests' settings reach the actors on a cluster too (rlkit/faults.py).
    env.update({k: os.environ[k] for k in (faults.ENV, faults.DIR_ENV) if k in os.environ})
    env.update(cuda_allocator_env())
    # ray.init installs a SIGTERM handler that kills Ray's processes and exits 1, skipping the
    # run's own ending (trainer/interrupts.py); the run keeps its own.
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        _start_ray(cfg, num_cpus, num_gpus, object_store, env)
    finally:
        if threading.current_thread() is threading.main_thread() and on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


def _start_ray(
    cfg: RecipeConfig, num_cpus: int, num_gpus: int, object_store: int, env: dict[str, str]
) -> None:
    if cfg.ray.address:
        ray.init(
            address=cfg.ray.address, runtime_env={"env_vars": env}, logging_level=logging.WARNING
        )
        return
    # Ray starts its worker processes at niceness 15; the actors are the run's compute, and
    # at 15 they yield to anything else on the machine. A local Ray starts them at 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        # A new local instance even when `ray start` ran on this machine (Ray would join the
        # cluster it recorded, or fail on its stale address) or RAY_ADDRESS is set.
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        object_store_memory=object_store,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )


def _placement(cfg: RecipeConfig, model_dir: str) -> Placement:
    """Count the GPUs (this machine's, or the cluster's once Ray joins it), plan, start Ray."""
    if cfg.ray.address:
        init_ray(cfg, 0)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        return plan(cfg, gpus)
    gpus = visible_gpus() if cfg.device != "cpu" else 0
    place = plan(cfg, gpus)
    init_ray(cfg, place.num_cpus, place.num_gpus, object_store_bytes(cfg, model_dir))
    return place


def launch(
    cfg: RecipeConfig, run_dir: str, raw_data: dict[str, list[dict[str, Any]]] | None = None
) -> RunContext:
    """`raw_data`: the splits as `data_setup.load_raw` read them (None: read them here)."""
    raw_data = raw_data or {}
    # Checked enforceable when the recipe loaded (config/rules.py).
    sandbox = asdict(cfg.reward.sandbox)
    # Convert the embedded default model once, here, before two actors race to do it.
    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = load_tokenizer(model_dir)
    # Tokenized before Ray starts, so a split left empty stops the run here.
    train_samples, train_ids, dropped_train = load_split(
        cfg, tokenizer, "train", raw_data.get("train")
    )
    eval_samples, eval_ids, dropped_eval = load_split(cfg, tokenizer, "eval", raw_data.get("eval"))
    if dropped_train or dropped_eval:
        print(
            f"rlkit: dropped {dropped_train} train and {dropped_eval} eval prompts longer than "
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}",
            flush=True,
        )
    place = _placement(cfg, model_dir)
    print(f"rlkit: {place.device} ({place.why})", flush=True)
    faults.point("launch")
    learner: LearnerGroup
    rollout_factory: Any
    if place.colocated:
        # One actor holds the learner and the rollout engine on one GPU: it is the learner and
        # the group's one rollout worker (it cannot be restarted apart from the learner).
        both = ray.remote(**place.actor_options("learner"))(ColocatedWorker).remote(
            model_dir, cfg, place.learner_threads, place.device
        )
        learner = LearnerGroup([both])
        rollout_factory = lambda: both  # noqa: E731
    else:
        rank_actor = ray.remote(**place.actor_options("learner"))(Learner)
        world = place.num_learners
        learner = LearnerGroup.start(
            lambda r: rank_actor.remote(
                model_dir, cfg, place.learner_threads, place.device, r, world
            ),
            world,
            sharded=cfg.train.shard,
        )
        rollout_actor = ray.remote(**place.actor_options("rollout"))(RolloutWorker)
        mtp_seed = cfg.train.seed if mtp_wanted(cfg) else None
        rollout_factory = lambda: rollout_actor.remote(  # noqa: E731
            model_dir, cfg.rollout, place.rollout_threads, place.device, True, mtp_seed
        )
    reward_actor = ray.remote(**place.actor_options("reward"))(RewardPool)
    reward_args = (
        verifier_spec(cfg),
        cfg.reward.style,
        cfg.reward.kwargs,
        cfg.reward.num_workers,
        cfg.reward.timeout_s,
        os.getcwd(),
        sandbox,
    )
    summary: dict[str, Any] = {}

    def restarted(role: str, name: str, error: BaseException) -> None:
        counts = summary.setdefault("worker_restarts", {})
        counts[role] = counts.get(role, 0) + 1
        print(
            f"rlkit: {name} died ({first_line(error)}); started a new one, its work is done again",
            flush=True,
        )

    rollout = RolloutGroup(
        rollout_factory,
        place.num_rollout_workers,
        on_restart=lambda k, e: restarted("rollout", f"rollout worker {k}", e),
        max_restarts=0 if place.colocated else 3,
    )
    reward = RestartingActor(
        lambda: reward_actor.remote(*reward_args),
        on_restart=lambda e: restarted("reward", "the reward pool", e),
    )
    logger = MetricsLogger(
        run_dir,
        wandb_mode=cfg.run.wandb,
        wandb_project=cfg.run.wandb_project,
        run_name=os.path.basename(run_dir),
        config=to_dict(cfg),
        progress=cfg.run.progress_bar,
    )
    ctx = RunContext(
        cfg=cfg,
        run_dir=run_dir,
        learner=learner,
        rollout=rollout,
        reward=reward,
        tokenizer=tokenizer,
        train_samples=train_samples,
        train_prompt_ids=train_ids,
        eval_samples=eval_samples,
        eval_prompt_ids=eval_ids,
        stream=PromptStream(len(train_samples), cfg.data.seed),
        logger=logger,
    )
    ctx.summary = summary
    ctx.summary["dropped_prompts"] = {"train": dropped_train, "eval": dropped_eval}
    ctx.summary["model_dir"] = model_dir
    # The rollout workers loaded the same checkpoint as the learner: no initial sync needed.
    learner.ready()
    rollout.ready()
    reward.ready()
    ctx.summary["actor_nodes"] = _actor_nodes(learner, rollout, reward)
    ctx.rollout_dtype = rollout.weights_dtype()
    ctx.colocated = place.colocated
    return ctx


def _node_of(actor: Any) -> str:
    return str(
        ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    )


def _actor_nodes(
    learner: LearnerGroup, rollout: RolloutGroup, reward: RestartingActor
) -> dict[str, Any]:
    """Which Ray node each actor runs on (summary.json's `actor_nodes`), and what each node
    offers: on a cluster, where `ray.actor_resources` put them."""
    nodes = {
        n["NodeID"]: {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}
        for n in ray.nodes()
        if n.get("Alive")
    }
    return {
        "learner": [_node_of(r) for r in learner.ranks],
        "rollout": [_node_of(w) for w in rollout.workers],
        "reward": [_node_of(reward.actor)],
        "nodes": nodes,
    }
