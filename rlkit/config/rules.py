"""Every recipe value's rule, in one table, checked when the recipe loads.

The schema's types come first (`loader._build`): a key of the wrong type, a value outside a
`Literal`'s choices, a number that is not finite or an integer beyond +-(2**31 - 1) never gets
here. `RULES` then gives each key of the schema its own range (None: its type is the whole
rule); `CROSS_RULES` relate keys to each other and to what the recipe names outside itself
(files, built-in tasks, verifiers and their signatures); `STAGE_RULES` apply to each stage's
config; `LAUNCH_ONLY` lists what a stage's `overrides` may not change. A test walks the schema
and fails for a key missing from `RULES`, so a new key gets a rule when it is added.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from rlkit.config.checks import (
    Check,
    Invalid,
    actor_resources,
    all_of,
    at_least,
    auto_or,
    cuda_visible,
    data_file,
    each,
    executable,
    existing_path,
    in_range,
    judge_template,
    model_path,
    no_empty_strings,
    non_empty,
    non_empty_list,
    not_a_file,
    one_of,
    optional,
    plain_name,
    positive,
    registered_task,
    unit_betas,
)
from rlkit.config.errors import ConfigError
from rlkit.config.schema import RecipeConfig, SpeculativeConfig

# The decoder layers' linear layers (rlkit/models/decoder.py) that LoRA adapters may wrap; the
# embedding and LM head are read as plain weights by the learner and stay frozen.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NON_NEGATIVE = at_least(0)
SEED = in_range(0, 2**31 - 1)
PROBABILITY = in_range(0, 1)
PROBABILITY_OPEN = in_range(0, 1, low_open=True)
# Built-in task splits are built in memory.
SPLIT_SIZE = in_range(1, 1_000_000)
# Seconds; the OS's waits overflow past about 24 days.
TIMEOUT = in_range(0, 86_400, low_open=True)

RULES: dict[str, Check | None] = {
    "device": None,  # a GPU must be there: _cuda_here
    "model.path": model_path,
    "model.dtype": None,
    "model.compute_dtype": None,
    "model.gradient_checkpointing": None,
    "model.lora.r": in_range(0, 4096),  # 0: no LoRA
    "model.lora.alpha": positive,
    "model.lora.dropout": in_range(0, 1, high_open=True),
    "model.lora.target_modules": all_of(non_empty_list, each(one_of(LORA_TARGETS))),
    "model.lora.save_merged": None,  # needs model.lora.r > 0: _lora_fits
    "data.task": optional(registered_task),
    "data.task_args": None,  # against the task's parameters: _task_args below
    "data.train_files": each(data_file),
    "data.eval_files": each(data_file),
    "data.num_train": SPLIT_SIZE,
    "data.num_eval": SPLIT_SIZE,
    "data.max_prompt_tokens": positive,
    "data.seed": SEED,
    "reward.verifier": optional(non_empty),  # resolved in _verifier below
    "reward.style": None,
    "reward.kwargs": None,  # against the verifier's signature: _verifier below
    "reward.timeout_s": TIMEOUT,
    "reward.num_workers": in_range(1, 1024),
    "reward.sandbox.memory_mb": optional(in_range(16, 1 << 20)),  # enforceable: _sandbox
    "reward.sandbox.cpu_seconds": optional(in_range(1, 86_400)),
    "reward.sandbox.network": None,
    "reward.sandbox.writable_tmp_only": None,
    "rollout.engine": None,
    "rollout.n": positive,
    "rollout.temperature": NON_NEGATIVE,  # 0: greedy
    "rollout.top_p": in_range(0, 1, low_open=True),
    "rollout.top_k": NON_NEGATIVE,  # 0: off
    "rollout.max_new_tokens": positive,
    "rollout.stop": no_empty_strings,
    "rollout.dtype": None,
    "rollout.max_batch_size": positive,
    "rollout.kv_memory_gb": optional(in_range(0, 1 << 20, low_open=True)),  # one at most:
    "rollout.kv_memory_fraction": optional(PROBABILITY_OPEN),  # _kv_memory_fits
    "rollout.num_workers": positive,
    "rollout.kv_compression.policy": None,
    "rollout.kv_compression.budget": at_least(2),
    "rollout.kv_compression.window": positive,  # and < budget: _window_below_budget
    "rollout.kv_compression.interval": positive,
    "rollout.kv_compression.sink": NON_NEGATIVE,
    "rollout.kv_compression.pool_kernel": positive,
    "rollout.kv_compression.rkv_lambda": PROBABILITY,
    "rollout.kv_compression.rkv_threshold": in_range(-1, 1),  # a cosine similarity
    "rollout.kv_compression.full_every": positive,
    "rollout.kv_compression.hybrid_local": None,
    "rollout.kv_compression.compaction": None,
    "rollout.speculative.drafter": None,
    "rollout.speculative.num_draft_tokens": in_range(1, 16),
    "rollout.speculative.sam_min_match": positive,
    "rollout.speculative.sam_static": None,
    "rollout.speculative.sam_match": None,
    "rollout.speculative.mtp_vocab": in_range(0, 10_000_000),
    "rollout.speculative.mtp_draft": None,  # needs an MTP drafter: _speculative_fits
    "rollout.speculative.max_batch": in_range(0, 1_000_000),
    "rollout.speculative.tail_rows": in_range(0, 1_000_000),
    "rollout.speculative.tail_draft_tokens": in_range(0, 16),  # >= num_draft_tokens: below
    "rollout.speculative.draft_chains": in_range(1, 4),  # what the drafter makes: below
    "rollout.speculative.tail_draft_chains": in_range(0, 4),
    "rollout.speculative.chain_kinds": None,  # known kinds, once each: _speculative_fits
    "rollout.speculative.adaptive_draft": None,
    "rollout.vllm.python": optional(executable),
    "rollout.vllm.gpu_memory_utilization": in_range(0, 1, low_open=True),
    "rollout.vllm.sleep_between_steps": None,
    "rollout.vllm.enforce_eager": None,
    "rollout.vllm.cpu_kv_cache_gb": in_range(0, 65_536, low_open=True),
    "rollout.vllm.startup_timeout_s": TIMEOUT,
    "rollout.vllm.request_timeout_s": TIMEOUT,
    "rollout.vllm.engine_kwargs": None,  # vllm.LLM's own keyword arguments
    "algorithm.advantage": None,
    "algorithm.policy_loss": None,
    "algorithm.eps_low": in_range(0, 1, high_open=True),  # the clip range starts at 1 - eps_low
    "algorithm.eps_high": NON_NEGATIVE,
    "algorithm.loss_agg": None,
    "algorithm.kl_coef": NON_NEGATIVE,
    "algorithm.kl_estimator": None,
    "algorithm.entropy_coef": NON_NEGATIVE,
    "algorithm.dynamic_sampling": None,
    "algorithm.max_refill_rounds": NON_NEGATIVE,
    "algorithm.tis_cap": optional(positive),
    "algorithm.overlong": None,
    "algorithm.sparse.rejection": None,
    # Tokens keep rho in [rho_low, rho_high], which holds 1 (an on-policy token).
    "algorithm.sparse.rho_low": PROBABILITY,
    "algorithm.sparse.rho_high": at_least(1),
    "algorithm.sparse.veto_threshold": in_range(0, 1, high_open=True),
    "algorithm.sparse.reweight": None,
    "algorithm.sparse.weight_cap": positive,
    "algorithm.sparse.normalize_weights": None,
    # exp(80) is still a float32; past about 88 a clamped ratio overflows to inf.
    "algorithm.sparse.log_ratio_clamp": in_range(0, 80, low_open=True),
    # AdamW moves each weight by about lr per step: past 1 any run diverges at once.
    "algorithm.mtp.loss": None,
    "algorithm.mtp.scale": NON_NEGATIVE,
    "algorithm.mtp.weight": None,
    # exp(beta * A) with |A| up to a few: past 10 one sample takes all the weight.
    "algorithm.mtp.beta": in_range(0, 10),
    "algorithm.mtp.lr": in_range(0, 1, low_open=True),
    "algorithm.mtp.target": None,
    "algorithm.mtp.detach_trunk": None,
    "algorithm.mtp.eval_prompts": positive,
    "optim.lr": in_range(0, 1, low_open=True),
    "optim.weight_decay": PROBABILITY,  # AdamW multiplies weights by 1 - lr * weight_decay
    "optim.betas": unit_betas,
    "optim.eps": positive,
    "optim.grad_clip": positive,  # 0 would zero every gradient
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.schedule": None,
    "optim.min_lr_ratio": PROBABILITY,
    "train.steps": positive,
    "train.prompts_per_step": positive,
    "train.mini_batches": positive,  # and at most the step's rollouts: _mini_batches_fill
    "train.ppo_epochs": positive,
    "train.micro_batch_size": auto_or(positive),
    "train.seed": SEED,
    "train.eval_every": NON_NEGATIVE,
    "train.save_every": NON_NEGATIVE,
    "train.keep_checkpoints": positive,
    "train.num_learners": in_range(1, 1024),  # devices: workers/placement.py
    "train.shard": None,  # needs num_learners > 1: _learner_ranks_fit
    "train.async_mode": None,  # corrected off-policy: _async_is_corrected
    "sft.train_files": each(data_file),
    "sft.batch_size": positive,
    "judge.template": optional(judge_template),
    "judge.num_problems": positive,
    "judge.candidates_per_problem": positive,
    "judge.pairs_per_problem": positive,
    "judge.min_pairs": positive,
    "judge.temperature": optional(NON_NEGATIVE),
    "judge.candidate_max_new_tokens": optional(positive),
    "judge.max_new_tokens": positive,
    "judge.refresh_every": NON_NEGATIVE,
    "judge.extra_checkpoints": each(existing_path),
    "judge.num_eval_problems": positive,
    "judge.num_eval_pairs": at_least(2),  # half correct, half incorrect
    "judge.evaluate": None,
    "eval.max_new_tokens": positive,
    "eval.k": positive,
    "eval.temperature": NON_NEGATIVE,
    "eval.sparse_too": None,
    "run.name": plain_name,
    "run.dir": all_of(non_empty, not_a_file),
    "run.resume": None,  # the run must exist: _resume_finds_the_run
    "run.wandb": None,
    "run.wandb_project": non_empty,
    "run.progress_bar": None,
    "ray.address": optional(non_empty),
    "ray.num_cpus": optional(positive),
    "ray.object_store_memory_mb": optional(at_least(75)),  # Ray's minimum object store
    "ray.actor_resources": actor_resources,
    "stages": non_empty_list,
    "stages[].type": None,
    "stages[].name": optional(plain_name),
    "stages[].overrides": None,  # keys checked when applied: LAUNCH_ONLY
}

# What a stage's `overrides` cannot change, and why: these are read once, at launch. A stage
# re-reads algorithm.*, optim.*, train.*, sft.*, eval.*, judge.* (but the held-out judge set
# below) and the sampling keys of rollout.* (n, temperature, top_p, top_k, max_new_tokens,
# stop), which go with every generate call.
LAUNCH_ONLY: dict[str, str] = {
    "device": "the workers are placed once, at launch",
    "model": "the learner and the rollout worker load the model once, at launch",
    "data": "the prompts are loaded and tokenized once, at launch",
    "reward": "the verifier pool starts once, at launch",
    "rollout.engine": "the rollout worker is built once, at launch",
    "rollout.dtype": "the rollout worker is built once, at launch",
    "rollout.max_batch_size": "the rollout worker is built once, at launch",
    "rollout.kv_memory_gb": "the rollout worker is built once, at launch",
    "rollout.kv_memory_fraction": "the rollout worker is built once, at launch",
    "rollout.num_workers": "the rollout workers are placed once, at launch",
    "train.num_learners": "the learner ranks are placed once, at launch",
    "train.shard": "the learner ranks shard the model once, at launch",
    "rollout.kv_compression": "the rollout worker's KV cache is built once, at launch",
    "rollout.speculative": "the rollout worker's drafter is built once, at launch",
    "rollout.vllm": "the rollout worker is built once, at launch",
    "judge.evaluate": "the held-out judge set is built once per run",
    "judge.num_eval_problems": "the held-out judge set is built once per run",
    "judge.num_eval_pairs": "the held-out judge set is built once per run",
    "run": "it belongs to the whole run",
    "ray": "Ray starts once, at launch",
}

# Advantage estimators whose baseline is the group mean: a group of one sample gets 0.
GROUP_BASELINES = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def _window_below_budget(cfg: RecipeConfig) -> None:
    kv = cfg.rollout.kv_compression
    if kv.window >= kv.budget:
        raise Invalid(
            f"must be less than rollout.kv_compression.budget ({kv.budget}), got {kv.window}",
            key="rollout.kv_compression.window",
        )
    if kv.compaction == "fill" and kv.policy != "none" and not kv.can_fill():
        raise Invalid(
            f"fill needs policy snapkv, rkv or h2o and window <= interval, got policy "
            f"{kv.policy}, window {kv.window}, interval {kv.interval}",
            key="rollout.kv_compression.compaction",
        )
    if kv.policy == "streaming" and kv.sink > kv.budget - kv.window:
        room = kv.budget - kv.window
        raise Invalid(
            f"must be at most budget - window ({room}), got {kv.sink}",
            key="rollout.kv_compression.sink",
        )


def _kv_memory_fits(cfg: RecipeConfig) -> None:
    r = cfg.rollout
    if r.kv_memory_gb is not None and r.kv_memory_fraction is not None:
        raise Invalid(
            f"and rollout.kv_memory_gb ({r.kv_memory_gb}) both size the batch; give one",
            key="rollout.kv_memory_fraction",
        )
    key = "rollout.kv_memory_gb" if r.kv_memory_gb is not None else "rollout.kv_memory_fraction"
    if (r.kv_memory_gb is not None or r.kv_memory_fraction is not None) and r.engine != "native":
        raise Invalid(
            "needs rollout.engine: native (vLLM sizes its pool with "
            "rollout.vllm.gpu_memory_utilization or cpu_kv_cache_gb)",
            key=key,
        )


def _compression_needs_native(cfg: RecipeConfig) -> None:
    if cfg.rollout.kv_compression.policy != "none" and cfg.rollout.engine != "native":
        raise Invalid(
            "needs rollout.engine: native (vLLM has no compressed KV cache)",
            key="rollout.kv_compression.policy",
        )


def _speculative_fits(cfg: RecipeConfig) -> None:
    spec = cfg.rollout.speculative
    if spec.sam_static and "sam" not in spec.drafter:
        raise Invalid(
            f"needs rollout.speculative.drafter sam or sam+mtp, got {spec.drafter!r}",
            key="rollout.speculative.sam_static",
        )
    warmup = any(st.type == "mtp_warmup" for st in cfg.stages)
    if spec.mtp_draft != "sample" and "mtp" not in spec.drafter and not warmup:
        raise Invalid(
            f"({spec.mtp_draft!r}) sets how the MTP module drafts: it needs rollout."
            f"speculative.drafter mtp or sam+mtp (or an mtp_warmup stage), got {spec.drafter!r}",
            key="rollout.speculative.mtp_draft",
        )
    if cfg.rollout.engine != "native" and warmup:
        raise Invalid(
            "has an mtp_warmup stage, which needs rollout.engine: native (the MTP module's "
            "held-out acceptance is measured with the native engine's drafter)",
            key="rollout.engine",
        )
    if spec.drafter == "none":
        plain = SpeculativeConfig()
        for key in ("draft_chains", "tail_draft_chains", "chain_kinds"):
            if getattr(spec, key) != getattr(plain, key):
                raise Invalid(
                    f"({getattr(spec, key)}) needs rollout.speculative.drafter",
                    key=f"rollout.speculative.{key}",
                )
        return
    tail = spec.tail_problem() or spec.chains_problem()
    if tail is not None:
        raise Invalid(tail[1], key=f"rollout.speculative.{tail[0]}")
    if spec.max_chains > 1 and cfg.rollout.kv_compression.policy != "none":
        raise Invalid(
            f"({spec.max_chains}) needs a dense cache: several draft chains run on the verify "
            "step that keeps the cache's lengths on the device, which a compressed cache's "
            f"trigger does not (rollout.kv_compression.policy {cfg.rollout.kv_compression.policy!r})",
            key="rollout.speculative.draft_chains",
        )
    if cfg.rollout.engine != "native":
        raise Invalid(
            "needs rollout.engine: native (the vLLM backend drafts with its own settings)",
            key="rollout.speculative.drafter",
        )
    if cfg.rollout.kv_compression.policy == "h2o":
        # H2O's statistic sums the attention every query paid each entry: the queries of
        # rejected drafts would count, so the sparse policy would differ from plain decoding's.
        raise Invalid(
            "does not combine with rollout.kv_compression.policy h2o: its accumulated "
            "attention would count the queries of rejected drafts (snapkv, rkv, streaming "
            "and layer_hybrid combine)",
            key="rollout.speculative.drafter",
        )


def _rho_bounds(cfg: RecipeConfig) -> None:
    sp = cfg.algorithm.sparse
    if not sp.rho_low < sp.rho_high:
        raise Invalid(
            f"must be less than algorithm.sparse.rho_high ({sp.rho_high}), got {sp.rho_low}",
            key="algorithm.sparse.rho_low",
        )


def _groups_of_two(cfg: RecipeConfig) -> None:
    if cfg.rollout.n >= 2:
        return
    if cfg.algorithm.advantage in GROUP_BASELINES:
        raise Invalid(
            f"must be >= 2 for algorithm.advantage {cfg.algorithm.advantage!r}: a group "
            "of one sample has zero advantage, so nothing would be learned",
            key="rollout.n",
        )
    if cfg.algorithm.dynamic_sampling:
        raise Invalid(
            "must be >= 2 with algorithm.dynamic_sampling: a group of one sample "
            "always has equal rewards and would always be dropped",
            key="rollout.n",
        )


def _mini_batches_fill(cfg: RecipeConfig) -> None:
    rollouts = cfg.train.prompts_per_step * cfg.rollout.n
    if cfg.train.mini_batches > rollouts:
        raise Invalid(
            f"{cfg.train.mini_batches} mini-batches of {rollouts} rollouts per step "
            "leaves some empty",
            key="train.mini_batches",
        )


def _data_named(cfg: RecipeConfig) -> None:
    for split in ("train", "eval"):
        if cfg.data.task is None and not getattr(cfg.data, f"{split}_files"):
            raise Invalid(
                f"is null and data.{split}_files is empty: name a task or give {split} files",
                key="data.task",
            )


# (task, seed, task_args) that built: tasks are deterministic, and each stage re-validates.
_TASKS_BUILT: set[str] = set()


def _task_args(cfg: RecipeConfig) -> None:
    """The built-in task takes these arguments: each split builds one sample with them."""
    # Without a task they are unused, as data.num_train is with files: a recipe for a task
    # takes `data.task=null data.train_files=[...]` on the command line unchanged.
    if cfg.data.task is None:
        return
    from rlkit.data.tasks import get_task

    memo = json.dumps([cfg.data.task, cfg.data.seed, cfg.data.task_args], sort_keys=True)
    if memo in _TASKS_BUILT:
        return
    task = get_task(cfg.data.task)
    for split in ("train", "eval"):
        try:
            task.build(split, 1, cfg.data.seed, **cfg.data.task_args)
        except ValueError as e:
            raise Invalid(str(e), key="data.task_args") from None
    _TASKS_BUILT.add(memo)


def _verifier(cfg: RecipeConfig) -> None:
    """The verifier resolves (a registered name, module:function, file.py:function), in the
    style asked for, and its signature takes the call that style makes with reward.kwargs."""
    spec = cfg.reward.verifier
    if spec is None:
        if cfg.data.task is None:
            raise Invalid(
                "is null and data.task is null: name a verifier for your data files",
                key="reward.verifier",
            )
        from rlkit.data.tasks import get_task

        spec = get_task(cfg.data.task).default_verifier
    from rlkit.rewards import resolve_verifier

    try:
        verifier = resolve_verifier(spec, cfg.reward.style, {}, base_dir=os.getcwd())
    except ValueError as e:
        raise Invalid(str(e), key="reward.verifier") from None
    except SystemExit as e:
        raise Invalid(
            f"importing {spec} called sys.exit({e.code!r})", key="reward.verifier"
        ) from None
    try:
        verifier.check_call({})
    except ValueError as e:
        if not cfg.reward.kwargs:
            raise Invalid(str(e), key="reward.verifier") from None
    try:
        verifier.check_call(cfg.reward.kwargs)
    except ValueError as e:
        raise Invalid(str(e), key="reward.kwargs") from None


def _sandbox(cfg: RecipeConfig) -> None:
    # The limits must be enforceable on this machine (rewards/sandbox.py says how each is).
    from dataclasses import asdict

    from rlkit.rewards.sandbox import Sandbox, SandboxError, check

    try:
        check(Sandbox(**asdict(cfg.reward.sandbox)))
    except SandboxError as e:
        raise Invalid(str(e), key=f"reward.sandbox.{e.key}") from None


def _cuda_here(cfg: RecipeConfig) -> None:
    # A local run needs the GPU on this machine; a cluster's GPUs are checked when Ray joins it.
    if cfg.device == "cuda" and cfg.ray.address is None and not cuda_visible():
        raise Invalid(
            "is cuda but this machine has no CUDA device (no /dev/nvidia*, or "
            "CUDA_VISIBLE_DEVICES hides them); use device=cpu or device=auto",
            key="device",
        )


def _lora_fits(cfg: RecipeConfig) -> None:
    lora = cfg.model.lora
    if lora.save_merged and lora.r == 0:
        raise Invalid(
            "needs model.lora.r > 0 (no LoRA adapters to merge)", key="model.lora.save_merged"
        )


def _learner_ranks_fit(cfg: RecipeConfig) -> None:
    """What N learner ranks (and FSDP2 sharding) can train; the rest is refused here."""
    t = cfg.train
    if t.shard and t.num_learners < 2:
        raise Invalid(
            "needs train.num_learners >= 2 (one rank has nothing to shard across)",
            key="train.shard",
        )
    if not t.shard:
        return
    from rlkit.models.mtp import wanted as mtp_wanted

    # FSDP2 gathers a layer's weights inside its forward; these read the model's weights
    # outside one, or copy the whole model.
    refused = [
        (mtp_wanted(cfg), "an MTP module (it reads the trunk's embedding and LM head directly)"),
        (
            cfg.algorithm.kl_coef > 0,
            "algorithm.kl_coef > 0 (the KL reference is a full copy of the model)",
        ),
        (cfg.model.lora.r > 0, "model.lora (adapters train unsharded: use train.shard=false)"),
    ]
    for hit, what in refused:
        if hit:
            raise Invalid(f"does not combine with {what}", key="train.shard")


def _async_is_corrected(cfg: RecipeConfig) -> None:
    """One-step-off rollouts are sampled by the weights one update behind the learner's: TIS
    (or Sparse-RL's ratios, which replace it under a compressed KV cache) corrects for it."""
    if cfg.train.async_mode == "off":
        return
    sp = cfg.algorithm.sparse
    sparse = cfg.rollout.kv_compression.policy != "none" and (sp.rejection or sp.reweight)
    if cfg.algorithm.tis_cap is None and not sparse:
        raise Invalid(
            "one_step_off samples with weights one update old and needs algorithm.tis_cap "
            "(or Sparse-RL's corrections) to correct for it; set algorithm.tis_cap (e.g. 2.0)",
            key="train.async_mode",
        )
    for i, st in enumerate(cfg.stages):
        if st.type == "judge":
            raise Invalid(
                f"one_step_off does not combine with a judge stage (stages[{i}]): the judge "
                "set is rebuilt from the rollout workers between steps",
                key="train.async_mode",
            )


def _resume_finds_the_run(cfg: RecipeConfig) -> None:
    path = os.path.join(cfg.run.dir, cfg.run.name)
    if cfg.run.resume and not os.path.isdir(path):
        raise Invalid(f"is true but {path} does not exist: nothing to resume", key="run.resume")


CROSS_RULES: list[Callable[[RecipeConfig], None]] = [
    _window_below_budget,
    _kv_memory_fits,
    _compression_needs_native,
    _speculative_fits,
    _rho_bounds,
    _groups_of_two,
    _mini_batches_fill,
    _data_named,
    _task_args,
    _verifier,
    _sandbox,
    _cuda_here,
    _lora_fits,
    _learner_ranks_fit,
    _async_is_corrected,
    _resume_finds_the_run,
]


def _sft_has_examples(cfg: RecipeConfig, index: int) -> None:
    if cfg.stages[index].type == "sft" and not cfg.sft.train_files and cfg.data.task is None:
        raise Invalid(
            "is sft, which needs sft.train_files or a built-in data.task (whose "
            "reference answers it learns)",
            key=f"stages[{index}].type",
        )


# Rules about one stage, checked on that stage's config (the recipe plus its overrides).
STAGE_RULES: list[Callable[[RecipeConfig, int], None]] = [_sft_has_examples]


def launch_only(key: str) -> str | None:
    """Why a stage's overrides cannot set `key` (None: they can). A key above a launch-only
    one (`rollout`, `judge`) would replace it too."""
    for fixed, why in LAUNCH_ONLY.items():
        if (
            key == fixed
            or key.startswith((fixed + ".", fixed + "["))
            or fixed.startswith(key + ".")
        ):
            return why
    return None


def _values(cfg: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(concrete key, value) for a table key; `stages[].name` gives one per stage."""
    head, sep, rest = key.partition("[].")
    value = cfg
    for part in head.split("."):
        value = getattr(value, part)
    if not sep:
        yield head, value
        return
    for i, item in enumerate(value):
        yield from ((f"{head}[{i}].{k}", v) for k, v in _values(item, rest))


def validate(cfg: RecipeConfig, locate: Callable[[str], str]) -> None:
    """The first broken rule raises a ConfigError at its key, where the recipe set it."""
    for table_key, check in RULES.items():
        if check is None:
            continue
        for key, value in _values(cfg, table_key):
            try:
                check(value)
            except Invalid as e:
                raise ConfigError(locate(key + e.suffix), key + e.suffix, e.problem) from None
    for rule in CROSS_RULES:
        try:
            rule(cfg)
        except Invalid as e:
            key = e.key or ""
            raise ConfigError(locate(key), key, e.problem) from None


def validate_stage(cfg: RecipeConfig, index: int, locate: Callable[[str], str]) -> None:
    for rule in STAGE_RULES:
        try:
            rule(cfg, index)
        except Invalid as e:
            key = e.key or ""
            raise ConfigError(locate(key), key, e.problem) from None
