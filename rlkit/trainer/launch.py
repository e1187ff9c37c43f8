"""Start Ray and the actors, load the data, and hand back a RunContext."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from rlkit.config import to_dict
from rlkit.config.schema import RecipeConfig
from rlkit.data.stream import PromptStream
from rlkit.models.loading import resolve_model_dir
from rlkit.models.mtp import wanted as mtp_wanted
from rlkit.models.tokenizer import load_tokenizer
from rlkit.trainer.context import RunContext
from rlkit.trainer.data_setup import load_split, verifier_spec
from rlkit.trainer.metrics import MetricsLogger
from rlkit.workers.learner import Learner
from rlkit.workers.placement import plan
from rlkit.workers.reward_pool import RewardPool
from rlkit.workers.rollout_worker import RolloutWorker


def init_ray(cfg: RecipeConfig, num_cpus: int) -> None:
    if ray.is_initialized():
        return
    # Actors inherit the driver's environment; quiet, single-threaded BLAS start-up in each.
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if cfg.ray.address:
        ray.init(
            address=cfg.ray.address, runtime_env={"env_vars": env}, logging_level=logging.WARNING
        )
        return
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=cfg.ray.object_store_memory_mb * 2**20,
        include_dashboard=False,
        runtime_env={"env_vars": env},
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )


def launch(
    cfg: RecipeConfig, run_dir: str, raw_data: dict[str, list[dict[str, Any]]] | None = None
) -> RunContext:
    """`raw_data`: the splits as `data_setup.load_raw` read them (None: read them here)."""
    raw_data = raw_data or {}
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
    place = plan(cfg)
    init_ray(cfg, place.num_cpus)
    learner = ray.remote(num_cpus=place.learner_cpus)(Learner).remote(
        model_dir, cfg, place.learner_threads
    )
    rollout = ray.remote(num_cpus=place.rollout_cpus)(RolloutWorker).remote(
        model_dir, cfg.rollout, place.rollout_threads, cfg.train.seed if mtp_wanted(cfg) else None
    )
    reward = ray.remote(num_cpus=place.reward_cpus)(RewardPool).remote(
        verifier_spec(cfg),
        cfg.reward.style,
        cfg.reward.kwargs,
        cfg.reward.num_workers,
        cfg.reward.timeout_s,
        os.getcwd(),
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
    ctx.summary["dropped_prompts"] = {"train": dropped_train, "eval": dropped_eval}
    ctx.summary["model_dir"] = model_dir
    # The rollout worker loaded the same checkpoint as the learner: no initial sync needed.
    ray.get(
        [
            learner.__ray_ready__.remote(),  # type: ignore[union-attr]
            rollout.__ray_ready__.remote(),  # type: ignore[union-attr]
            reward.__ray_ready__.remote(),  # type: ignore[union-attr]
        ]
    )
    ctx.rollout_dtype = str(ray.get(rollout.weights_dtype.remote()))  # type: ignore[attr-defined]
    return ctx
