"""The learner: holds the trainable policy and its optimizer, runs the policy-gradient update.

A plain class, so it is tested without Ray; `trainer/launch.py` wraps it as a Ray actor, one
per learner rank (`train.num_learners`). Rank r of N runs micro-batches r, r + N, ... of every
mini-batch and the ranks' gradients are summed (`workers/distributed.py`), or, with
`train.shard`, FSDP2 shards the model across them (`workers/fsdp.py`);
`workers/learner_group.py` is the driver's handle on them.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import torch

from rlkit import faults
from rlkit.algorithms import (
    POLICY_LOSSES,
    aggregate,
    kl_penalty,
    sparse_corrections,
    tis_weights,
    token_logprobs,
)
from rlkit.algorithms.mtp import mtp_weights
from rlkit.config.schema import RecipeConfig
from rlkit.data.batch import RolloutBatch
from rlkit.device import (
    CPU_MICRO_BATCH,
    GPU_MICRO_BATCH_TOKENS,
    micro_batch_size,
    pick_dtype,
    slow_dtype_warning,
    to_device,
    use_attention_backends,
)
from rlkit.models.decoder import Decoder
from rlkit.models.loading import DTYPES, load_model, save_pretrained
from rlkit.models.mtp import wanted as mtp_wanted
from rlkit.models.shared_prefix import response_hidden
from rlkit.trainer.optim import build_optimizer, build_scheduler
from rlkit.workers import distributed, fsdp, heap, lora, weight_wire
from rlkit.workers.distributed import Rank
from rlkit.workers.master_weights import MasterWeights, StateView
from rlkit.workers.mtp_trainer import MTPTrainer, target_count
from rlkit.workers.step_metrics import StepPart, finish, finish_mtp, finish_sft, new_part

# The shared-prefix forward (each group's prompt once) pays when it removes at least this
# fraction of a micro-batch's tokens: its attention takes an explicit mask, which runs slower
# than plain causal attention (a flash kernel on a GPU), so long responses after short prompts
# (a 64-token prompt, 1024-token responses: 5% of the tokens) run the plain forward.
_SHARED_PREFIX_MIN_SAVING = 0.2


# On a GPU the shared-prefix forward also costs a second pass of every layer's launches
# (about 150 ops forward, recomputation and backward at ~20 us of host time each, from a
# profile of the default recipe's learner step on an H200) and pays only when the prompt
# FLOPs it removes (~8 x parameters a token with recomputation, at ~400 TFLOP/s) outweigh
# them: SmolLM2 with 16 prompts of 46 tokens x 8 samples removes ~5k tokens, ~0.1 ms of
# GPU work against ~90 ms of launches, so it runs the plain forward there.
_GPU_LAYER_PASS_SECONDS = 150 * 2e-5
_GPU_FLOPS = 4e14


def _sharing_pays(
    mb: RolloutBatch, params: int = 0, layers: int = 0, on_gpu: bool | None = None
) -> bool:
    """Whether computing each group's prompt once removes enough of the micro-batch's tokens
    (on a GPU, `params` and `layers` given: also enough work to pay for its launches). `mb`
    may be the CPU copy of a GPU micro-batch (`on_gpu` says where it runs)."""
    total = int(mb.attention_mask.sum())
    uniq, group = torch.unique(mb.group_ids, return_inverse=True)
    # One prompt length per group (a group's samples share their prompt).
    per_group = mb.prompt_lens.new_zeros(len(uniq)).scatter_(0, group, mb.prompt_lens)
    # Prompt tokens repeated across a group's samples (one copy per group is still computed).
    repeated = int(mb.prompt_lens.sum() - per_group.sum())
    if total == 0 or repeated / total < _SHARED_PREFIX_MIN_SAVING:
        return False
    if (mb.input_ids.is_cuda if on_gpu is None else on_gpu) and params:
        return repeated * 8 * params / _GPU_FLOPS > layers * _GPU_LAYER_PASS_SECONDS
    return True


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite: a multi-tensor max-abs per dtype (a
    handful of launches for hundreds of tensors on a GPU; NaN propagates, and unlike an L2
    norm it cannot overflow) and one device sync."""
    if not tensors:
        return True
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():  # an empty tensor has no max (and nothing to check)
            by_dtype.setdefault(t.dtype, []).append(t)
    if not by_dtype:
        return True
    flags = [
        torch.stack(torch._foreach_norm(ts, float("inf"))).isfinite().all()
        for ts in by_dtype.values()
    ]
    return bool(torch.stack(flags).all())


class NonFiniteWeightsError(RuntimeError):
    """The policy's weights hold NaN or inf: the run stops (training on would be meaningless)."""


def _check_finite(state: dict[str, torch.Tensor]) -> None:
    """Raise NonFiniteWeightsError if a floating tensor of `state` holds NaN or inf: one
    reduction (one device sync on a GPU), then the names only when something is wrong."""
    if _all_finite([v for v in state.values() if v.is_floating_point()]):
        return
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    raise NonFiniteWeightsError(
        f"the policy's weights are not finite ({len(bad)} of {len(state)} tensors hold "
        f"NaN or inf, first {bad[0]})"
    )


class Learner:
    def __init__(
        self,
        model_path: str,
        cfg: RecipeConfig,
        num_threads: int | None = None,
        device: str = "cpu",
        rank: int = 0,
        world: int = 1,
    ) -> None:
        """device: where the model, its optimizer states and every batch live (the run's
        placement decides it: rlkit/workers/placement.py). rank/world: this learner's place
        among `train.num_learners` ranks; with world > 1 nothing trains before `join`."""
        if num_threads:
            torch.set_num_threads(num_threads)
        torch.manual_seed(cfg.train.seed)
        self.device = torch.device(device)
        use_attention_backends(self.device)
        self.rank = Rank(rank, world)
        self.model_path = model_path
        model_cfg = cfg.model
        model, self.tokenizer = load_model(model_path, dtype=DTYPES[model_cfg.dtype])
        self.model = model.to(self.device)
        # For the shared-prefix forward's cost model on a GPU (_sharing_pays).
        self._params = sum(p.numel() for p in model.parameters())
        self._layers = model.args.num_layers
        self.model.gradient_checkpointing = model_cfg.gradient_checkpointing
        self.model.train()
        spec = model_cfg.compute_dtype
        choice = pick_dtype(model_cfg.dtype if spec == "none" else spec, self.device)
        self.compute_dtype = choice.dtype
        # LM-head rows per chunk of the log-prob pass. A CPU: 256 rows x a 49k vocab, ~50 MB of
        # float32 logits a chunk (1024 rows cost the default recipe ~0.25 GB of peak memory;
        # benchmarks/NOTES.md). A GPU: ~64 MB of logits a chunk, 341 rows of SmolLM2's vocab,
        # 512 of a 32k one (each chunk costs launches forward, recomputed and backward; the
        # chunk's logits, probabilities and their gradient are ~4x that at its peak: 256 MB
        # chunks put the default recipe's learner peak 0.6 GB higher).
        vocab = model.args.vocab_size
        self._head_chunk = 256 if self.device.type == "cpu" else max(256, (64 << 20) // (4 * vocab))
        if self.device.type == "cuda" and choice.dtype == torch.bfloat16:
            # The log-prob pass keeps the LM head's matmul in float32 (bf16 logits would round
            # log-probs by ~0.03); TF32 tensor cores run it ~8x faster than float32 FMA, with
            # float32 accumulation and logits: finer than the bf16 sampler it is compared to.
            # The bf16 trunk's matmuls are unaffected.
            torch.backends.cuda.matmul.allow_tf32 = True
        if spec == "bfloat16" and (
            warning := slow_dtype_warning(choice.dtype, self.device, "model.compute_dtype")
        ):
            print(f"rlkit: warning: {warning}", flush=True)
        # FSDP2 over the ranks: its mixed precision keeps the sharded float32 parameters as
        # the master weights (set up in `join`).
        self.sharded = cfg.train.shard and world > 1
        # Each backward's loss factor: FSDP2 averages the ranks' gradients (fsdp.grad_scale).
        self._grad_scale = fsdp.grad_scale(world) if self.sharded else 1.0
        self.lora_cfg = model_cfg.lora
        self.peft: Any = None
        # A compute dtype below the parameters' (bf16 over float32): the model computes in it,
        # the optimizer updates float32 master weights. LoRA adapters stay float32 themselves
        # (PEFT casts their inputs), so the frozen base is simply cast.
        self.master: MasterWeights | None = None
        lower = choice.dtype != DTYPES[model_cfg.dtype]
        if model_cfg.lora.r > 0:
            if lower:
                self.model.to(choice.dtype)
            self.peft = lora.attach(self.model, model_cfg.lora, model_path)
        elif lower and not self.sharded:
            self.master = MasterWeights(self.model, choice.dtype)
        why = "model.compute_dtype=none" if spec == "none" else choice.why
        master = ", float32 master weights" if self.master is not None or self.sharded else ""
        if self.peft is not None:
            trained, total = lora.trainable_count(self.model)
            master += f", LoRA r={model_cfg.lora.r} ({trained:,} of {total:,} parameters train)"
        where = f" (rank {rank} of {world}{', FSDP2' if self.sharded else ''})" if world > 1 else ""
        mb_spec = cfg.train.micro_batch_size
        micro = (
            f"micro-batches of {mb_spec}"
            if mb_spec != "auto"
            else (
                f"micro-batches of {CPU_MICRO_BATCH} (auto on a CPU)"
                if self.device.type == "cpu"
                else f"micro-batches of <= {GPU_MICRO_BATCH_TOKENS} padded tokens (auto on a GPU)"
            )
        )
        print(
            f"rlkit learner: {choice.name} compute{master} on {self.device}{where} ({why}), "
            f"{micro}",
            flush=True,
        )
        self.ref_model: Decoder | None = None
        # Optimizer updates skipped for a non-finite loss or gradient, in the current step.
        self.nonfinite_skipped = 0
        # MTP-RL's drafter, beside the checkpoint or freshly initialised (the rollout worker
        # initialises the same one from the same seed).
        self.mtp = MTPTrainer(model_path, self.model, cfg.train.seed) if mtp_wanted(cfg) else None
        self._cfg = cfg
        if world == 1:
            self.configure(cfg)
            if self.device.type == "cuda":
                self.warm_up()

    def rendezvous(self) -> str:
        """Rank 0: the address the ranks meet at (this node, a free port)."""
        return distributed.rendezvous_address()

    def join(self, address: str) -> None:
        """Join the other ranks (`distributed.rendezvous_address` of rank 0), shard the model
        when `train.shard`, then build the optimizer on what this rank holds."""
        distributed.join(address, self.rank, self.device)
        if self.sharded:
            fsdp.shard(self.model, self.compute_dtype)
        self.configure(self._cfg)
        if self.device.type == "cuda":
            self.warm_up()  # every rank: under FSDP2 the backward is a collective

    def warm_up(self) -> None:
        """One forward and backward of the training path on a two-sample dummy batch, its
        gradients dropped: the lazy initialisation a first backward pays on a GPU (kernel
        modules loaded, the cuBLAS handles of autograd's device thread, the allocator's first
        segments: 2.2-2.6 s of the default recipe's first step on an H200) happens while the
        run sets up, as the engine's does, not inside the first step. Weights, optimizer
        states and random streams are untouched (the model draws no random numbers)."""
        batch = RolloutBatch.from_sequences(
            [[1, 2, 3, 4]] * 2, [[5, 6, 7]] * 2, [[0.0] * 3] * 2, [0.0, 1.0], [0, 0]
        ).to(self.device)
        was_training = self.model.training
        self.model.train()
        logp, _ = self.response_logprobs(self.model, batch, True)
        (logp.sum() * 0.0).backward()
        self.model.zero_grad(set_to_none=True)
        self.model.train(was_training)

    def configure(self, cfg: RecipeConfig) -> None:
        """Start a stage: its algorithm settings, a fresh optimizer and schedule on the current weights."""
        self.algo = cfg.algorithm
        self.train_cfg = cfg.train
        self.optim_cfg = cfg.optim
        # Log-probs are taken under the distribution the sampler drew from (logits / temperature).
        self.temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        self.opt = build_optimizer(self._trainable(), cfg.optim, fused=self.device.type == "cuda")
        self.sched = build_scheduler(self.opt, cfg.train.steps, cfg.optim)
        self.policy_loss = POLICY_LOSSES.get(cfg.algorithm.policy_loss)
        # Sparse-RL: rollouts decoded against a compressed KV cache are corrected by the
        # dense-vs-sparse ratio (rejection and/or reweighting), in place of TIS.
        sp = cfg.algorithm.sparse
        compressed = cfg.rollout.kv_compression.policy != "none"
        self.sparse = sp if compressed and (sp.rejection or sp.reweight) else None
        # The KL reference is the policy as the stage starts.
        self.ref_model = None
        if cfg.algorithm.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        if self.mtp is not None:
            self.mtp.configure(cfg)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return (
            self.master.parameters() if self.master is not None else list(self.model.parameters())
        )

    def _optimizer_step(self, finite_loss: bool = True) -> float:
        """Clip, step, zero; returns the gradient norm before clipping.

        A non-finite loss or gradient norm skips the update (gradients zeroed, no step; the
        schedule still advances) and counts it in `self.nonfinite_skipped`: one NaN would
        otherwise spread to every weight it touches.
        """
        if not finite_loss:
            self.model.zero_grad(set_to_none=True)
            self.opt.zero_grad(set_to_none=True)
            self.nonfinite_skipped += 1
            return math.nan
        if self.master is not None:
            # MasterWeights.step steps only when the norm is finite: on a CPU one float32
            # gradient at a time (memory), on a GPU all at once through the fused optimizer.
            norm = self.master.step(
                self.opt, self.optim_cfg.grad_clip, one_at_a_time=self.device.type == "cpu"
            )
        else:
            norm = fsdp.norm_value(
                torch.nn.utils.clip_grad_norm_(self._trainable(), self.optim_cfg.grad_clip)
            )
            if math.isfinite(norm):
                self.opt.step()
        self.model.zero_grad(set_to_none=True)
        self.opt.zero_grad(set_to_none=True)
        if not math.isfinite(norm):
            self.nonfinite_skipped += 1
        return norm

    def _grad_params(self) -> list[torch.nn.Parameter]:
        """The parameters whose gradients the backward fills (the model's, before MasterWeights
        moves them to its float32 copies)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _sum_over_ranks(self) -> None:
        """Data parallelism: the ranks' gradients summed (FSDP2 reduce-scatters its own)."""
        if not self.sharded:
            distributed.sum_gradients(self._grad_params(), self.rank)

    def _full_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's full weights under Hugging Face names, one tensor at a time: float32
        master values, adapters merged (LoRA), or gathered from the ranks' shards (FSDP2: a
        collective, so every rank iterates; ranks > 0 get nothing)."""
        if self.sharded:
            for name, value in fsdp.full_tensors(self.model.state_dict(), self.rank.lead):
                if value is not None:
                    yield name, value
            return
        if self.peft is not None:
            yield from lora.merged_state(self.model).items()
        elif self.master is not None:
            yield from self.master.state_dict(self.model).items()
        else:
            yield from self.model.state_dict().items()

    def _full_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._full_items()}

    def response_states(
        self, model: Decoder, mb: RolloutBatch, host: RolloutBatch | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [n, T, H] whose row j predicts response token j, and valid [n, T].
        `host`: the same rows on the CPU (`_rows`), which the decisions here read instead of
        the device's (each read of a device tensor is a sync on a GPU)."""
        host = mb.to("cpu") if host is None else host
        n, t = mb.response_ids.shape
        dev = mb.input_ids.device
        seq_lens = mb.attention_mask.sum(1)  # [n]
        resp_lens = seq_lens - mb.prompt_lens  # [n]
        steps = torch.arange(t, device=dev)
        valid = steps[None, :] < resp_lens[:, None]  # [n, T]
        # FSDP2 gathers the root's weights (embedding, norm) in the model's own forward;
        # the shared-prefix forward calls the layers from outside it.
        if (
            not self.sharded
            and bool((host.prompt_lens >= 2).all())
            and _sharing_pays(host, self._params, self._layers, on_gpu=dev.type == "cuda")
        ):
            # Each group's prompt runs once; its samples attend to the shared keys/values.
            hidden = response_hidden(
                model, mb.input_ids, mb.prompt_lens, seq_lens, mb.group_ids
            )  # [n, R, H]
            return hidden[:, :t], valid
        # A RolloutBatch is right-padded by construction (from_sequences), which is all the
        # forward's mask check would verify (at a device sync).
        hidden = model(mb.input_ids)  # [n, L, H]
        # Response token j is predicted by the hidden state at position prompt_len - 1 + j.
        pos = (mb.prompt_lens[:, None] - 1 + steps[None, :]).clamp(
            max=hidden.shape[1] - 1
        )  # [n, T]
        rows = torch.arange(n, device=dev)[:, None].expand(n, t)
        return hidden[rows, pos], valid  # [n, T, H]

    def response_logprobs(
        self,
        model: Decoder,
        mb: RolloutBatch,
        with_entropy: bool = False,
        states: tuple[torch.Tensor, torch.Tensor] | None = None,
        host: RolloutBatch | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of the response tokens; the LM head never sees prompt
        positions. `states`: `response_states`' result, when the caller has it already;
        `host`: the rows on the CPU, where the valid positions are counted (no device sync)."""
        host = mb.to("cpu") if host is None else host
        n, t = mb.response_ids.shape
        hidden, _ = states if states is not None else self.response_states(model, mb, host)
        steps = torch.arange(t)
        valid = steps[None, :] < (host.attention_mask.sum(1) - host.prompt_lens)[:, None]
        rows, cols = (to_device(i, hidden.device) for i in valid.nonzero(as_tuple=True))
        logp_flat, ent_flat = token_logprobs(
            hidden[rows, cols],  # [M, H]
            model.lm_head_weight,
            mb.response_ids[rows, cols],
            with_entropy=with_entropy,
            temperature=self.temperature,
            chunk_size=self._head_chunk,
        )
        logp = hidden.new_zeros(n, t, dtype=torch.float32).index_put_((rows, cols), logp_flat)
        ent = None
        if ent_flat is not None:
            ent = hidden.new_zeros(n, t, dtype=torch.float32).index_put_((rows, cols), ent_flat)
        return logp, ent

    def _rows(
        self, dev: RolloutBatch, host: RolloutBatch, idx: torch.Tensor
    ) -> tuple[RolloutBatch, RolloutBatch, torch.Tensor]:
        """Rows `idx` (CPU int64) of a batch held on the device and on the host: the host's
        selected and trimmed there, the device's gathered by the same indices (copied to the
        device without a stream sync) and trimmed to the host's widths, and those indices on
        the device (for the caller's other [N, ...] tensors). Selecting on the device alone
        would read its lengths back (a sync a micro-batch, each draining the launch queue of a
        host-bound step)."""
        h = host.select(idx)
        d_idx = to_device(idx, dev.input_ids.device)
        if dev is host:
            return h, h, d_idx
        kw: dict[str, Any] = {}
        for f in fields(dev):
            value, like = getattr(dev, f.name), getattr(h, f.name)
            if isinstance(value, torch.Tensor):
                value = value.index_select(0, d_idx)
                if value.dim() == 2:
                    value = value[:, : like.shape[1]]
            kw[f.name] = value
        return RolloutBatch(**kw), h, d_idx

    @torch.no_grad()
    def _score(
        self, model: Decoder, batch: RolloutBatch, host: RolloutBatch | None = None
    ) -> torch.Tensor:
        """Log-probs [N, T] of every response token of `batch` (`host`: its CPU copy). Over N
        ranks each scores its share of the micro-batches and the rows are summed (the others'
        rows are zeros)."""
        host = batch.to("cpu") if host is None else host
        batch = batch.to(self.device)
        n, t = batch.response_ids.shape
        out = torch.zeros(n, t, dtype=torch.float32, device=self.device)
        chunks = list(torch.arange(n).split(self._micro_size(batch)))
        real = len(self.rank.mine(len(chunks)))
        for pos, j in enumerate(self._my_share(len(chunks))):
            idx = chunks[j]
            mb, hmb, d_idx = self._rows(batch, host, idx)
            lp = self.response_logprobs(model, mb, host=hmb)[0]  # [n_j, T_j]
            if pos < real:  # not a padding repeat (FSDP2)
                out[d_idx, : lp.shape[1]] = lp
        return distributed.sum_tensor(out, self.rank)

    def _my_share(self, count: int) -> list[int]:
        """Indices of the micro-batches this rank runs; under FSDP2 padded (with repeats of
        its first, whose results are dropped or weighted zero) to the busiest rank's count,
        since every forward gathers weights together with the other ranks."""
        mine = self.rank.mine(count)
        if not self.sharded or count == 0:
            return mine
        return mine + [mine[0] if mine else 0] * (self.rank.most(count) - len(mine))

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One rollout batch (one learner): recompute old log-probs, PPO epochs, metrics."""
        return finish([self.train_step_part(batch)])

    def train_step_part(self, batch: RolloutBatch) -> StepPart:
        """This rank's part of one rollout batch's update (every rank gets the whole batch and
        runs its share of each mini-batch's micro-batches): old log-probs, then PPO epochs over
        mini-batches, the ranks' gradients summed before each optimizer step. Returns raw
        sums for `step_metrics.finish`."""
        if batch.advantages is None:
            raise ValueError("train_step needs batch.advantages (computed by the driver)")
        faults.point("learner.train_step")
        start = time.perf_counter()
        self.nonfinite_skipped = 0
        self._begin_phase()
        # Index bookkeeping and every count the step needs read the batch's CPU copy: on a
        # GPU each read of a device tensor is a sync that drains the launch queue.
        host = batch.to("cpu")
        batch = batch.to(self.device)
        self.model.train()
        cfg, algo = self.train_cfg, self.algo
        part = new_part()
        sums, extremes = part["sums"], part["extremes"]
        # On-policy with one update per batch, the learner's old log-probs are exactly the detached
        # log-probs of the training forward pass (the weights have not moved yet): no second pass.
        # One-step-off rollouts (train.async_mode) were sampled by the weights one update
        # before these; the old policy of PPO's ratio is still these weights (the proximal
        # policy), and TIS / Sparse-RL's ratio exp(old - sampler) corrects sampler vs old.
        fused_old = cfg.mini_batches == 1 and cfg.ppo_epochs == 1
        # Sparse-RL weights normalised by their batch mean need every sample's old log-probs first.
        if self.sparse is not None and self.sparse.normalize_weights:
            fused_old = False
        old_logp = None if fused_old else self._score(self.model, batch, host)  # [N, T]
        ref_logp = self._score(self.ref_model, batch, host) if self.ref_model is not None else None
        order = torch.arange(len(batch))
        # A sample whose advantage is zero on every token adds exactly zero to the PPO loss and
        # its gradient (the clipped objective is A times a ratio), so with no KL or entropy term
        # it is skipped; it still counts in the loss normalisers, so the update is unchanged.
        # GRPO zeroes every group whose rewards are all equal: early and late in training, most.
        skip_zero = self.ref_model is None and algo.entropy_coef == 0
        assert host.advantages is not None
        active = host.advantages.ne(0).any(1) | (not skip_zero)  # [N]
        part["active"], part["samples"] = int(active.sum()), len(batch)
        # MTP-RL: the drafter learns from the same forward's hidden states.
        mtp = self.mtp if self.mtp is not None and self.mtp.trains_in_rl else None
        if mtp is not None:
            mtp_w = self._mtp_token_weights(batch)  # [N, T]
            resp_lens = batch.attention_mask.sum(1) - batch.prompt_lens  # [N]
            part["mtp"] = {"sums": {}, "loss": 0.0, "targets": 0.0, "norms": []}
        # With old log-probs in hand, Sparse-RL's corrections are taken over the whole batch
        # (exact batch-mean normalisation; the normalisers count the surviving tokens). In the
        # fused on-policy pass they are taken per micro-batch and the normalisers count the
        # rollout's valid tokens (a rejected token then adds zero instead of leaving the mean).
        loss_mask, sparse_w = batch.response_mask, None
        if self.sparse is not None and old_logp is not None:
            loss_mask, sparse_w, sp_stats = self._sparse(old_logp, batch.sampler_logp, loss_mask)
            if self.rank.lead:  # every rank computed the same batch-wide figures
                self._merge_stats(sp_stats, 1.0, sums, extremes)
                part["weight_sparse"] = 1.0
        # The loss mask's CPU copy, where it is the batch's own (not Sparse-RL's batch-wide
        # rejection, computed on the device).
        host_mask = host.response_mask if loss_mask is batch.response_mask else None
        # The policy loss, KL and entropy metrics, summed on the device and read once.
        loss_sum = torch.zeros((), device=self.device)
        device_sums: dict[str, Any] = {}
        for _ in range(cfg.ppo_epochs):
            for mini_idx in order.chunk(cfg.mini_batches):
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                mini_mask = (loss_mask if host_mask is None else host_mask)[mini_idx]
                n_tokens = max(1.0, float(mini_mask.sum()))
                n_seqs = max(1.0, float((mini_mask.sum(1) > 0).sum()))
                live = mini_idx[active[mini_idx]]
                if mtp is not None:
                    mtp_norm = max(1.0, target_count(resp_lens[mini_idx], mtp.depth))
                micro = [m for m in live.split(self._micro_size(batch)) if len(m)]
                real = len(self.rank.mine(len(micro)))
                for pos, j in enumerate(self._my_share(len(micro))):
                    # A padding repeat (FSDP2) runs forward and backward weighted zero.
                    scale = 1.0 if pos < real else 0.0
                    gidx = micro[j]  # rows of the batch
                    mb, hmb, d_gidx = self._rows(batch, host, gidx)
                    if scale:
                        part["tokens"] += int(hmb.attention_mask.sum())
                    states = self.response_states(self.model, mb, hmb)
                    logp, ent = self.response_logprobs(self.model, mb, True, states, hmb)
                    t = logp.shape[1]
                    old = logp.detach() if old_logp is None else old_logp[d_gidx, :t]
                    mask = loss_mask[d_gidx, :t]
                    weights = None
                    stats: dict[str, float | torch.Tensor] = {}
                    if self.sparse is not None:
                        if old_logp is not None:  # corrected over the whole batch above
                            weights = None if sparse_w is None else sparse_w[d_gidx, :t]
                        else:
                            mask, weights, sp_stats = self._sparse(old, mb.sampler_logp, mask)
                            if scale:
                                n_valid = float(mb.response_mask.sum())
                                self._merge_stats(sp_stats, n_valid, sums, extremes)
                                part["weight_sparse"] += n_valid
                    elif algo.tis_cap is not None:
                        weights, tis_stats = tis_weights(old, mb.sampler_logp, mask, algo.tis_cap)
                        stats.update({f"actor/{k}": v for k, v in tis_stats.items()})
                    loss, pl_stats = self.policy_loss(
                        logp,
                        old,
                        mb.advantages,
                        mask,
                        eps_low=algo.eps_low,
                        eps_high=algo.eps_high,
                        weights=weights,
                        agg=algo.loss_agg,
                        global_tokens=n_tokens,
                        global_seqs=n_seqs,
                    )
                    stats.update(
                        {f"actor/{k}": v for k, v in pl_stats.items() if k != "num_tokens"}
                    )
                    if ref_logp is not None:
                        kl = kl_penalty(logp, ref_logp[d_gidx, :t], algo.kl_estimator)
                        kl_loss = aggregate(
                            kl, mask, algo.loss_agg, global_tokens=n_tokens, global_seqs=n_seqs
                        )
                        loss = loss + algo.kl_coef * kl_loss
                        stats["actor/kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
                    if ent is not None:
                        stats["actor/entropy"] = (ent.detach() * mask).sum() / mask.sum().clamp(
                            min=1
                        )
                        if algo.entropy_coef > 0:
                            ent_loss = aggregate(
                                ent, mask, algo.loss_agg, global_tokens=n_tokens, global_seqs=n_seqs
                            )
                            loss = loss - algo.entropy_coef * ent_loss
                    # actor/loss: the policy's objective (PPO + KL - entropy), MTP's apart.
                    policy_loss = loss.detach()
                    if mtp is not None:
                        mtp_loss, mtp_part = mtp.loss(self.model, *states, mb, mtp_w[d_gidx, :t])
                        loss = loss + mtp.cfg.scale * mtp_loss / mtp_norm
                        self._add_mtp(part, float(mtp_loss.detach()), mtp_part)
                    finite &= torch.isfinite(loss.detach())
                    (loss * (self._grad_scale * scale)).backward()
                    if not scale:
                        continue
                    loss_sum += policy_loss
                    w = float((hmb.response_mask if host_mask is not None else mask).sum())
                    part["weight"] += w
                    for k, v in stats.items():
                        if isinstance(v, torch.Tensor):  # summed on the device, read once
                            device_sums[k] = device_sums.get(k, 0.0) + v * w
                        else:
                            sums[k] = sums.get(k, 0.0) + v * w
                if mtp is not None:
                    self._mtp_idle(part, mtp, batch, host, mini_idx, active, mtp_w, mtp_norm)
                    part["mtp"]["targets"] += mtp_norm
                    part["mtp"]["norms"].append(mtp.step(self.rank))
                ok = distributed.all_true(bool(finite), self.rank, self.device)
                if micro:  # some rank ran a micro-batch: every rank joins the sum
                    self._sum_over_ranks()
                part["grad_norms"].append(self._optimizer_step(ok))
                part["updates"] += 1
        values = torch.stack([loss_sum, *device_sums.values()]).tolist()
        part["loss"] += values[0]
        for k, v in zip(device_sums, values[1:], strict=True):
            sums[k] = sums.get(k, 0.0) + v
        part["lr"] = self.opt.param_groups[0]["lr"]
        self.sched.step()
        part["elapsed"] = time.perf_counter() - start
        part["memory"] = self._end_phase()
        part["nonfinite"] = self.nonfinite_skipped
        heap.trim(self.device)
        return part

    def _mtp_idle(self, part, mtp, batch, host, mini_idx, active, mtp_w, mtp_norm) -> None:
        """Samples the policy loss skipped (zero advantage) still teach the drafter where
        their weight is not zero: a forward without gradients for them (this rank's share)."""
        idle = mini_idx[~active[mini_idx]]  # rows of the batch
        idle = idle[(mtp_w[to_device(idle, self.device)] > 0).any(1).cpu()]
        micro = [m for m in idle.split(self._micro_size(batch)) if len(m)]
        for j in self.rank.mine(len(micro)):
            gidx = micro[j]
            mb, hmb, d_gidx = self._rows(batch, host, gidx)
            with torch.no_grad():
                states = self.response_states(self.model, mb, hmb)
            mtp_loss, mtp_part = mtp.loss(
                self.model, *states, mb, mtp_w[d_gidx, : mb.response_ids.shape[1]]
            )
            (mtp.cfg.scale * mtp_loss / mtp_norm).backward()
            self._add_mtp(part, float(mtp_loss.detach()), mtp_part)

    def _add_mtp(self, part: StepPart, loss: float, sums: dict[str, float]) -> None:
        part["mtp"]["loss"] += loss
        self._add(part["mtp"]["sums"], sums)

    def _mtp_token_weights(self, batch: RolloutBatch) -> torch.Tensor:
        """Weights [N, T] of each response token in the MTP loss (`algorithm.mtp`)."""
        assert self.mtp is not None and batch.advantages is not None
        cfg = self.mtp.cfg
        resp_lens = batch.attention_mask.sum(1) - batch.prompt_lens
        steps = torch.arange(batch.response_ids.shape[1], device=resp_lens.device)
        valid = (steps[None] < resp_lens[:, None]).float()
        if cfg.loss == "plain":
            return valid
        return mtp_weights(batch.advantages, valid, cfg.weight, cfg.beta)

    @staticmethod
    def _add(into: dict[str, float], sums: dict[str, float]) -> None:
        for k, v in sums.items():
            into[k] = into.get(k, 0.0) + v

    def mtp_step(self, batch: RolloutBatch) -> dict[str, float]:
        """MTP warm-up (`mtp_warmup`), one learner: see `mtp_step_part`."""
        return finish_mtp([self.mtp_step_part(batch)])

    def mtp_step_part(self, batch: RolloutBatch) -> StepPart:
        """MTP warm-up (`mtp_warmup`): one update of the MTP module alone on the policy's own
        samples (plain cross-entropy, every token weighted 1); the trunk runs without
        gradients and does not change. This rank's share of the micro-batches."""
        if self.mtp is None:
            raise RuntimeError("mtp_step needs an MTP module (rlkit.models.mtp.wanted)")
        start = time.perf_counter()
        self._begin_phase()
        batch = batch.to(self.device)
        resp_lens = batch.attention_mask.sum(1) - batch.prompt_lens
        norm = max(1.0, target_count(resp_lens, self.mtp.depth))
        part = new_part()
        part["mtp"] = {"sums": {}, "loss": 0.0, "targets": norm, "norms": []}
        self.model.eval()
        micro = list(torch.arange(len(batch)).split(self._micro_size(batch)))
        for j in self.rank.mine(len(micro)):
            mb = batch.select(micro[j])
            with torch.no_grad():
                states, valid = self.response_states(self.model, mb)
            loss, sums = self.mtp.loss(self.model, states, valid, mb, valid.float())
            (loss / norm).backward()
            self._add_mtp(part, float(loss.detach()), sums)
            part["tokens"] += int(mb.attention_mask.sum())
        self.model.train()
        part["mtp"]["norms"].append(self.mtp.step(self.rank))
        part["elapsed"] = time.perf_counter() - start
        part["memory"] = self._end_phase()
        heap.trim(self.device)
        return part

    def _micro_size(self, batch: RolloutBatch) -> int:
        """Sequences per micro-batch (`train.micro_batch_size`, "auto" by device)."""
        return micro_batch_size(
            self.train_cfg.micro_batch_size, self.device, batch.input_ids.shape[1]
        )

    def _begin_phase(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _end_phase(self) -> dict[str, float]:
        """The phase's peak device memory (GPU only): allocated by tensors, and reserved by
        PyTorch's caching allocator (what the process holds)."""
        if self.device.type != "cuda":
            return {}
        return {
            "memory/learner_peak_allocated_gb": torch.cuda.max_memory_allocated(self.device)
            / 2**30,
            "memory/learner_peak_reserved_gb": torch.cuda.max_memory_reserved(self.device) / 2**30,
        }

    def _sparse(
        self, old: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        sp = self.sparse
        assert sp is not None
        return sparse_corrections(
            old,
            sampler,
            mask,
            rejection=sp.rejection,
            rho_low=sp.rho_low,
            rho_high=sp.rho_high,
            veto_threshold=sp.veto_threshold,
            reweight=sp.reweight,
            weight_cap=sp.weight_cap,
            normalize=sp.normalize_weights,
            log_ratio_clamp=sp.log_ratio_clamp,
        )

    @staticmethod
    def _merge_stats(
        stats: dict[str, float], weight: float, sums: dict[str, float], extremes: dict[str, float]
    ) -> None:
        """Sparse-RL metrics under `sparse/`: means weighted by valid tokens, max of maxima, min of minima."""
        for k, v in stats.items():
            key = "sparse/" + k.removeprefix("sparse_")
            if k.endswith("_max"):
                extremes[key] = max(extremes.get(key, v), v)
            elif k.endswith("_min"):
                extremes[key] = min(extremes.get(key, v), v)
            else:
                sums[key] = sums.get(key, 0.0) + v * weight

    def sft_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One SFT step (one learner): see `sft_step_part`."""
        return finish_sft([self.sft_step_part(batch)])

    def sft_step_part(self, batch: RolloutBatch) -> StepPart:
        """Cross-entropy on the response tokens (token-mean over the batch), one optimizer
        step; this rank's share of the micro-batches, gradients summed over the ranks."""
        start = time.perf_counter()
        self.nonfinite_skipped = 0
        self._begin_phase()
        batch = batch.to(self.device)
        self.model.train()
        n_tokens = max(1.0, float(batch.response_mask.sum()))
        part = new_part()
        micro = list(torch.arange(len(batch)).split(self._micro_size(batch)))
        real = len(self.rank.mine(len(micro)))
        for pos, j in enumerate(self._my_share(len(micro))):
            mb = batch.select(micro[j])
            logp, _ = self.response_logprobs(self.model, mb)
            loss = -(logp * mb.response_mask).sum() / n_tokens
            if pos >= real:  # a padding repeat (FSDP2)
                (loss * 0.0).backward()
                continue
            (loss * self._grad_scale).backward()
            part["loss"] += float(loss)
            part["tokens"] += int(mb.attention_mask.sum())
        part["lr"] = self.opt.param_groups[0]["lr"]
        finite = distributed.all_true(math.isfinite(part["loss"]), self.rank, self.device)
        self._sum_over_ranks()
        part["grad_norms"].append(self._optimizer_step(finite))
        part["updates"] = 1
        self.sched.step()
        part["elapsed"] = time.perf_counter() - start
        part["memory"] = self._end_phase()
        part["nonfinite"] = self.nonfinite_skipped
        heap.trim(self.device)
        return part

    def weights(
        self, dtype: str = "bfloat16", device: str = "cpu", only: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The policy's weights for the rollout workers, cast to their dtype, on `device`
        (the CPU for the object store; the learner's own device for an in-process copy), with
        the MTP module's (`mtp.*`) when there is one; only="mtp": those alone. Over FSDP2
        ranks every rank must call this (the full weights are gathered a tensor at a time,
        each cast at once); ranks > 0 return {}.

        Raises NonFiniteWeightsError if any is NaN or inf: they would be sampled from, and
        saved in the next checkpoint (the driver syncs before it saves)."""
        target = DTYPES[dtype]
        mtp = self.mtp.weights(target) if self.mtp is not None else {}
        if only == "mtp":
            return {k: v.to(device) for k, v in mtp.items()}
        out = {k: v.detach().to(device=device, dtype=target) for k, v in self._full_items()}
        if not out:  # a rank > 0 of FSDP2: it took part in the gather
            return {}
        out.update({k: v.to(device) for k, v in mtp.items()})
        _check_finite(out)
        return out

    @torch.no_grad()
    def copy_weights_into(self, targets: dict[str, torch.Tensor]) -> bool:
        """Copy the policy's weights straight into `targets` (name -> tensor on this device,
        e.g. a colocated engine's parameters), casting on the way: no intermediate state dict,
        one device sync for the finite check. Returns False, copying nothing, where this
        learner's weights are not plain tensors of its own (FSDP2 shards, LoRA, an MTP
        module); `weights` serves those. Raises NonFiniteWeightsError like `weights`."""
        if self.sharded or self.peft is not None or self.mtp is not None:
            return False
        source = {k: v for k, v in self._full_items() if k in targets}
        if len(source) != len(targets) or any(
            targets[k].device != v.device for k, v in source.items()
        ):
            return False
        if self.master is not None:
            # The model's compute-dtype parameters are the float32 masters cast after every
            # update (MasterWeights.step): where the engine holds that dtype they are the
            # values to copy, without a cast.
            compute = self.model.state_dict()
            source = {
                k: compute[k] if compute[k].dtype == targets[k].dtype else v
                for k, v in source.items()
            }
        _check_finite(source)
        names = list(source)
        # One multi-tensor copy (a few launches), not one copy per tensor.
        torch._foreach_copy_([targets[k] for k in names], [source[k] for k in names])
        return True

    def packed_weights(
        self, dtype: str = "bfloat16", only: str | None = None
    ) -> dict[str, Any] | None:
        """`weights(dtype, only=only)` on the CPU as numpy arrays (`weight_wire.pack`): what
        crosses Ray's object store to the rollout workers without a copy on arrival (None
        on FSDP2's ranks > 0, which only took part in the gather)."""
        state = self.weights(dtype, only=only)
        return weight_wire.pack(state) if state or only else None

    def save(self, path: str) -> None:
        """The checkpoint's learner part; every rank calls it. Rank 0 writes the model
        (`model/`: float32 master values, adapters merged, or gathered from FSDP2's shards)
        or, under LoRA, `adapter/` in PEFT's format (plus the merged `model/` with
        `model.lora.save_merged`), and `learner.pt` (optimizer unless sharded, schedule, every
        rank's RNG). FSDP2's optimizer shards go to `optimizer/` (torch.distributed.checkpoint,
        every rank writing its own)."""
        lead = self.rank.lead
        if self.peft is None or self.lora_cfg.save_merged:
            # StateView carries the full values under the model's names and args.
            state = self._full_state()
            if lead:
                save_pretrained(
                    StateView(self.model.args, state),  # type: ignore[arg-type]
                    self.tokenizer,
                    os.path.join(path, "model"),
                )
            del state
        if self.peft is not None and lead:
            lora.save_adapter(self.peft, os.path.join(path, "adapter"))
        faults.point("learner.save")
        if self.mtp is not None and lead:  # beside the trunk, in its own file
            self.mtp.save(os.path.join(path, "model"))
        if self.sharded:
            fsdp.save_optimizer(self.model, self.opt, path)
        rngs = distributed.gather_objects(torch.get_rng_state(), self.rank)
        if lead:
            torch.save(
                {
                    **({} if self.sharded else {"optimizer": self.opt.state_dict()}),
                    "scheduler": self.sched.state_dict(),
                    "rng": rngs[0],
                    "rng_ranks": rngs,
                    "world": self.rank.world,
                    **(self.mtp.state() if self.mtp is not None else {}),
                },
                os.path.join(path, "learner.pt"),
            )

    def load(self, path: str, with_optimizer: bool = True) -> None:
        """A checkpoint written by any number of ranks (every rank calls this): the weights;
        then, with_optimizer, the optimizer (one learner's, which data-parallel ranks share,
        or FSDP2's shards resharded for this many ranks), the schedule and this rank's RNG."""
        if self.peft is not None:
            lora.load_adapter(self.peft, os.path.join(path, "adapter"))
        else:
            model, _ = load_model(os.path.join(path, "model"), dtype=torch.float32)
            if self.sharded:
                fsdp.load_full(self.model, model.state_dict())
            elif self.master is not None:
                self.master.load(model.state_dict())
            else:
                self.model.load_state_dict(model.state_dict())
            del model
        state_file = os.path.join(path, "learner.pt")
        state = None
        if with_optimizer and os.path.exists(state_file):
            state = torch.load(state_file, weights_only=False, map_location=self.device)
            if self.sharded:
                fsdp.load_optimizer(self.model, self.opt, path)
            elif "optimizer" in state:
                self.opt.load_state_dict(state["optimizer"])
            else:
                raise ValueError(
                    f"{path} was written by {state.get('world')} sharded ranks "
                    "(train.shard=true): its optimizer states are in optimizer/, resume "
                    "it with train.shard=true"
                )
            self.sched.load_state_dict(state["scheduler"])
            rngs = state.get("rng_ranks", [state["rng"]])
            if self.rank.rank < len(rngs):
                torch.set_rng_state(rngs[self.rank.rank])
        if self.mtp is not None:
            self.mtp.load(path, state)
