"""The learner: holds the trainable policy and its optimizer, runs the policy-gradient update.

A plain class, so it is tested without Ray; `rlkit.workers.actors` wraps it as a Ray actor.
"""

from __future__ import annotations

import copy
import math
import os
import time
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
from rlkit.device import pick_dtype, slow_dtype_warning
from rlkit.models.decoder import Decoder
from rlkit.models.loading import DTYPES, load_model, save_pretrained
from rlkit.models.mtp import wanted as mtp_wanted
from rlkit.models.shared_prefix import response_hidden
from rlkit.trainer.optim import build_optimizer, build_scheduler
from rlkit.workers import heap, weight_wire
from rlkit.workers.master_weights import MasterWeights, StateView
from rlkit.workers.mtp_trainer import MTPTrainer, target_count

# The shared-prefix forward (each group's prompt once) pays when it removes at least this
# fraction of a micro-batch's tokens: its attention takes an explicit mask, which runs slower
# than plain causal attention (a flash kernel on a GPU), so long responses after short prompts
# (a 64-token prompt, 1024-token responses: 5% of the tokens) run the plain forward.
_SHARED_PREFIX_MIN_SAVING = 0.2


def _sharing_pays(mb: RolloutBatch) -> bool:
    """Whether computing each group's prompt once removes enough of the micro-batch's tokens."""
    total = int(mb.attention_mask.sum())
    uniq, group = torch.unique(mb.group_ids, return_inverse=True)
    # One prompt length per group (a group's samples share their prompt).
    per_group = mb.prompt_lens.new_zeros(len(uniq)).scatter_(0, group, mb.prompt_lens)
    # Prompt tokens repeated across a group's samples (one copy per group is still computed).
    repeated = int(mb.prompt_lens.sum() - per_group.sum())
    return total > 0 and repeated / total >= _SHARED_PREFIX_MIN_SAVING


class NonFiniteWeightsError(RuntimeError):
    """The policy's weights hold NaN or inf: the run stops (training on would be meaningless)."""


class Learner:
    def __init__(
        self,
        model_path: str,
        cfg: RecipeConfig,
        num_threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        """device: where the model, its optimizer states and every batch live (the run's
        placement decides it: rlkit/workers/placement.py)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        torch.manual_seed(cfg.train.seed)
        self.device = torch.device(device)
        model_cfg = cfg.model
        model, self.tokenizer = load_model(model_path, dtype=DTYPES[model_cfg.dtype])
        self.model = model.to(self.device)
        self.model.gradient_checkpointing = model_cfg.gradient_checkpointing
        self.model.train()
        spec = model_cfg.compute_dtype
        choice = pick_dtype(model_cfg.dtype if spec == "none" else spec, self.device)
        if spec == "bfloat16" and (
            warning := slow_dtype_warning(choice.dtype, self.device, "model.compute_dtype")
        ):
            print(f"rlkit: warning: {warning}", flush=True)
        # A compute dtype below the parameters' (bf16 over float32): the model computes in it,
        # the optimizer updates float32 master weights.
        self.master: MasterWeights | None = None
        if choice.dtype != DTYPES[model_cfg.dtype]:
            self.master = MasterWeights(self.model, choice.dtype)
        why = "model.compute_dtype=none" if spec == "none" else choice.why
        master = ", float32 master weights" if self.master is not None else ""
        print(f"rlkit learner: {choice.name} compute{master} on {self.device} ({why})", flush=True)
        self.ref_model: Decoder | None = None
        # Optimizer updates skipped for a non-finite loss or gradient, in the current step.
        self.nonfinite_skipped = 0
        # MTP-RL's drafter, beside the checkpoint or freshly initialised (the rollout worker
        # initialises the same one from the same seed).
        self.mtp = MTPTrainer(model_path, self.model, cfg.train.seed) if mtp_wanted(cfg) else None
        self.configure(cfg)

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
            norm = float(
                torch.nn.utils.clip_grad_norm_(self._trainable(), self.optim_cfg.grad_clip)
            )
            if math.isfinite(norm):
                self.opt.step()
        self.model.zero_grad(set_to_none=True)
        self.opt.zero_grad(set_to_none=True)
        if not math.isfinite(norm):
            self.nonfinite_skipped += 1
        return norm

    def _full_state(self) -> dict[str, torch.Tensor]:
        return (
            self.master.state_dict(self.model)
            if self.master is not None
            else self.model.state_dict()
        )

    def response_states(
        self, model: Decoder, mb: RolloutBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [n, T, H] whose row j predicts response token j, and valid [n, T]."""
        n, t = mb.response_ids.shape
        dev = mb.input_ids.device
        seq_lens = mb.attention_mask.sum(1)  # [n]
        resp_lens = seq_lens - mb.prompt_lens  # [n]
        steps = torch.arange(t, device=dev)
        valid = steps[None, :] < resp_lens[:, None]  # [n, T]
        if bool((mb.prompt_lens >= 2).all()) and _sharing_pays(mb):
            # Each group's prompt runs once; its samples attend to the shared keys/values.
            hidden = response_hidden(
                model, mb.input_ids, mb.prompt_lens, seq_lens, mb.group_ids
            )  # [n, R, H]
            return hidden[:, :t], valid
        hidden = model(mb.input_ids, mb.attention_mask)  # [n, L, H]
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of the response tokens; the LM head never sees prompt
        positions. `states`: `response_states`' result, when the caller has it already."""
        n, t = mb.response_ids.shape
        hidden, valid = states if states is not None else self.response_states(model, mb)
        h = hidden[valid]  # [M, H]
        logp_flat, ent_flat = token_logprobs(
            h,
            model.lm_head_weight,
            mb.response_ids[valid],
            with_entropy=with_entropy,
            temperature=self.temperature,
            # 256 rows x a 49k vocab: ~50 MB of float32 logits per chunk (1024 rows cost the
            # default recipe ~0.25 GB of peak memory; benchmarks/NOTES.md).
            chunk_size=256,
        )
        logp = hidden.new_zeros(n, t, dtype=torch.float32).masked_scatter(valid, logp_flat)
        ent = None
        if ent_flat is not None:
            ent = hidden.new_zeros(n, t, dtype=torch.float32).masked_scatter(valid, ent_flat)
        return logp, ent

    @torch.no_grad()
    def _score(self, model: Decoder, batch: RolloutBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        return torch.cat(
            [
                torch.nn.functional.pad(lp, (0, batch.response_ids.shape[1] - lp.shape[1]))
                for lp in (
                    self.response_logprobs(model, mb)[0]
                    for mb in batch.split(self.train_cfg.micro_batch_size)
                )
            ]
        )

    def train_step(self, batch: RolloutBatch) -> dict[str, float]:
        """One rollout batch: recompute old log-probs, then PPO epochs over mini-batches."""
        if batch.advantages is None:
            raise ValueError("train_step needs batch.advantages (computed by the driver)")
        faults.point("learner.train_step")
        start = time.perf_counter()
        self.nonfinite_skipped = 0
        self._begin_phase()
        batch = batch.to(self.device)
        self.model.train()
        cfg, algo = self.train_cfg, self.algo
        # On-policy with one update per batch, the learner's old log-probs are exactly the detached
        # log-probs of the training forward pass (the weights have not moved yet): no second pass.
        fused_old = cfg.mini_batches == 1 and cfg.ppo_epochs == 1
        # Sparse-RL weights normalised by their batch mean need every sample's old log-probs first.
        if self.sparse is not None and self.sparse.normalize_weights:
            fused_old = False
        old_logp = None if fused_old else self._score(self.model, batch)  # [N, T]
        ref_logp = self._score(self.ref_model, batch) if self.ref_model is not None else None
        sums: dict[str, float] = {}
        extremes: dict[str, float] = {}
        weight_total = 0.0
        order = torch.arange(len(batch))
        grad_norms = []
        processed_tokens = 0
        # A sample whose advantage is zero on every token adds exactly zero to the PPO loss and
        # its gradient (the clipped objective is A times a ratio), so with no KL or entropy term
        # it is skipped; it still counts in the loss normalisers, so the update is unchanged.
        # GRPO zeroes every group whose rewards are all equal: early and late in training, most.
        skip_zero = self.ref_model is None and algo.entropy_coef == 0
        # Index bookkeeping stays on the CPU (indexing device tensors with it is fine).
        assert batch.advantages is not None
        active = batch.advantages.ne(0).any(1).cpu() | (not skip_zero)  # [N]
        # MTP-RL: the drafter learns from the same forward's hidden states.
        mtp = self.mtp if self.mtp is not None and self.mtp.trains_in_rl else None
        if mtp is not None:
            mtp_w = self._mtp_token_weights(batch)  # [N, T]
            resp_lens = batch.attention_mask.sum(1) - batch.prompt_lens  # [N]
            mtp_sums: dict[str, float] = {}
            mtp_loss_sum, mtp_targets, mtp_norms = 0.0, 0.0, []
        # With old log-probs in hand, Sparse-RL's corrections are taken over the whole batch
        # (exact batch-mean normalisation; the normalisers count the surviving tokens). In the
        # fused on-policy pass they are taken per micro-batch and the normalisers count the
        # rollout's valid tokens (a rejected token then adds zero instead of leaving the mean).
        loss_mask, sparse_w = batch.response_mask, None
        weight_total_sparse = 0.0
        if self.sparse is not None and old_logp is not None:
            loss_mask, sparse_w, sp_stats = self._sparse(old_logp, batch.sampler_logp, loss_mask)
            self._merge_stats(sp_stats, 1.0, sums, extremes)
            weight_total_sparse = 1.0
        for _ in range(cfg.ppo_epochs):
            for mini_idx in order.chunk(cfg.mini_batches):
                finite = True
                mini = batch.select(mini_idx)
                mini_mask = loss_mask[mini_idx]
                n_tokens = max(1.0, float(mini_mask.sum()))
                n_seqs = max(1.0, float((mini_mask.sum(1) > 0).sum()))
                live = torch.arange(len(mini))[active[mini_idx]]
                if mtp is not None:
                    mtp_norm = max(1.0, target_count(resp_lens[mini_idx], mtp.depth))
                for mb_idx in live.split(cfg.micro_batch_size):
                    if len(mb_idx) == 0:
                        continue
                    mb = mini.select(mb_idx)
                    gidx = mini_idx[mb_idx]
                    processed_tokens += int(mb.attention_mask.sum())
                    states = self.response_states(self.model, mb)
                    logp, ent = self.response_logprobs(self.model, mb, True, states)
                    t = logp.shape[1]
                    old = logp.detach() if old_logp is None else old_logp[gidx, :t]
                    mask = loss_mask[gidx, :t]
                    weights, stats = None, {}
                    if self.sparse is not None:
                        if old_logp is not None:  # corrected over the whole batch above
                            weights = None if sparse_w is None else sparse_w[gidx, :t]
                        else:
                            mask, weights, sp_stats = self._sparse(old, mb.sampler_logp, mask)
                            n_valid = float(mb.response_mask.sum())
                            self._merge_stats(sp_stats, n_valid, sums, extremes)
                            weight_total_sparse += n_valid
                    elif algo.tis_cap is not None:
                        weights, tis_stats = tis_weights(old, mb.sampler_logp, mask, algo.tis_cap)
                        stats = {f"actor/{k}": v for k, v in tis_stats.items()}
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
                        kl = kl_penalty(logp, ref_logp[gidx, :t], algo.kl_estimator)
                        kl_loss = aggregate(
                            kl, mask, algo.loss_agg, global_tokens=n_tokens, global_seqs=n_seqs
                        )
                        loss = loss + algo.kl_coef * kl_loss
                        stats["actor/kl"] = float((kl * mask).sum() / mask.sum().clamp(min=1))
                    if ent is not None:
                        stats["actor/entropy"] = float(
                            (ent.detach() * mask).sum() / mask.sum().clamp(min=1)
                        )
                        if algo.entropy_coef > 0:
                            ent_loss = aggregate(
                                ent, mask, algo.loss_agg, global_tokens=n_tokens, global_seqs=n_seqs
                            )
                            loss = loss - algo.entropy_coef * ent_loss
                    if mtp is not None:
                        mtp_loss, part = mtp.loss(self.model, *states, mb, mtp_w[gidx, :t])
                        loss = loss + mtp.cfg.scale * mtp_loss / mtp_norm
                        mtp_loss_sum += float(mtp_loss.detach())
                        self._add(mtp_sums, part)
                    finite = finite and bool(torch.isfinite(loss.detach()))
                    loss.backward()
                    w = float(mask.sum())
                    weight_total += w
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * w
                if mtp is not None:
                    # Samples the policy loss skipped (zero advantage) still teach the drafter
                    # where their weight is not zero: a forward without gradients for them.
                    idle = torch.arange(len(mini))[~active[mini_idx]]
                    idle = idle[(mtp_w[mini_idx[idle]] > 0).any(1).cpu()]
                    for mb_idx in idle.split(cfg.micro_batch_size):
                        if len(mb_idx) == 0:
                            continue
                        mb, gidx = mini.select(mb_idx), mini_idx[mb_idx]
                        with torch.no_grad():
                            states = self.response_states(self.model, mb)
                        mtp_loss, part = mtp.loss(
                            self.model, *states, mb, mtp_w[gidx, : mb.response_ids.shape[1]]
                        )
                        (mtp.cfg.scale * mtp_loss / mtp_norm).backward()
                        mtp_loss_sum += float(mtp_loss.detach())
                        self._add(mtp_sums, part)
                    mtp_targets += mtp_norm
                    mtp_norms.append(mtp.step())
                grad_norms.append(self._optimizer_step(finite))
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        elapsed = time.perf_counter() - start
        sparse_keys = {k for k in sums if k.startswith("sparse/")}
        out = {
            k: v / max(weight_total_sparse if k in sparse_keys else weight_total, 1e-9)
            for k, v in sums.items()
        }
        out.update(extremes)
        out["actor/grad_norm"] = sum(grad_norms) / max(1, len(grad_norms))
        out["actor/lr"] = lr
        out["throughput/learner_tokens_per_s"] = processed_tokens / max(elapsed, 1e-9)
        out["actor/skipped_frac"] = 1.0 - float(active.float().mean())
        out["actor/tokens"] = float(processed_tokens)
        out.update(self._end_phase())
        out["actor/nonfinite_skipped"] = float(self.nonfinite_skipped)
        if mtp is not None:
            out.update(MTPTrainer.metrics(mtp_sums, mtp_loss_sum, mtp_targets))
            out["mtp/grad_norm"] = sum(mtp_norms) / max(1, len(mtp_norms))
        heap.trim()
        return out

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
        """MTP warm-up (`mtp_warmup`): one update of the MTP module alone on the policy's own
        samples (plain cross-entropy, every token weighted 1); the trunk runs without
        gradients and does not change."""
        if self.mtp is None:
            raise RuntimeError("mtp_step needs an MTP module (rlkit.models.mtp.wanted)")
        start = time.perf_counter()
        self._begin_phase()
        batch = batch.to(self.device)
        resp_lens = batch.attention_mask.sum(1) - batch.prompt_lens
        norm = max(1.0, target_count(resp_lens, self.mtp.depth))
        sums: dict[str, float] = {}
        loss_sum = 0.0
        self.model.eval()
        for mb in batch.split(self.train_cfg.micro_batch_size):
            with torch.no_grad():
                states, valid = self.response_states(self.model, mb)
            loss, part = self.mtp.loss(self.model, states, valid, mb, valid.float())
            (loss / norm).backward()
            loss_sum += float(loss.detach())
            self._add(sums, part)
        self.model.train()
        out = MTPTrainer.metrics(sums, loss_sum, norm)
        out["mtp/grad_norm"] = self.mtp.step()
        out["throughput/learner_tokens_per_s"] = int(batch.attention_mask.sum()) / max(
            time.perf_counter() - start, 1e-9
        )
        out.update(self._end_phase())
        heap.trim()
        return out

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
        """Cross-entropy on the response tokens (token-mean over the batch), one optimizer step."""
        start = time.perf_counter()
        self.nonfinite_skipped = 0
        self._begin_phase()
        batch = batch.to(self.device)
        self.model.train()
        n_tokens = max(1.0, float(batch.response_mask.sum()))
        total = 0.0
        for mb in batch.split(self.train_cfg.micro_batch_size):
            logp, _ = self.response_logprobs(self.model, mb)
            loss = -(logp * mb.response_mask).sum() / n_tokens
            loss.backward()
            total += float(loss)
        lr = self.opt.param_groups[0]["lr"]
        grad_norm = self._optimizer_step(math.isfinite(total))
        self.sched.step()
        elapsed = time.perf_counter() - start
        heap.trim()
        return {
            "sft/loss": total,
            "actor/grad_norm": grad_norm,
            "actor/lr": lr,
            "actor/nonfinite_skipped": float(self.nonfinite_skipped),
            "throughput/learner_tokens_per_s": int(batch.attention_mask.sum()) / max(elapsed, 1e-9),
            **self._end_phase(),
        }

    def weights(
        self, dtype: str = "bfloat16", device: str = "cpu", only: str | None = None
    ) -> dict[str, torch.Tensor]:
        """The policy's weights for the rollout workers, cast to their dtype, on `device`
        (the CPU for the object store; the learner's own device for an in-process copy), with
        the MTP module's (`mtp.*`) when there is one; only="mtp": those alone.

        Raises NonFiniteWeightsError if any is NaN or inf: they would be sampled from, and
        saved in the next checkpoint (the driver syncs before it saves)."""
        target = DTYPES[dtype]
        mtp = self.mtp.weights(target) if self.mtp is not None else {}
        if only == "mtp":
            return {k: v.to(device) for k, v in mtp.items()}
        state = self.model.state_dict()
        if next(iter(state.values())).dtype != target:
            state = self._full_state()
        out = {k: v.detach().to(device=device, dtype=target) for k, v in state.items()}
        out.update({k: v.to(device) for k, v in mtp.items()})
        floats = [v for v in out.values() if v.is_floating_point()]
        # One reduction (one device sync on a GPU), then the names only when something is wrong.
        if not bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()):
            bad = [
                k for k, v in out.items() if v.is_floating_point() and not torch.isfinite(v).all()
            ]
            raise NonFiniteWeightsError(
                f"the policy's weights are not finite ({len(bad)} of {len(out)} tensors hold "
                f"NaN or inf, first {bad[0]})"
            )
        return out

    def packed_weights(self, dtype: str = "bfloat16", only: str | None = None) -> dict[str, Any]:
        """`weights(dtype, only=only)` on the CPU as numpy arrays (`weight_wire.pack`): what
        crosses Ray's object store to the rollout workers without a copy on arrival."""
        return weight_wire.pack(self.weights(dtype, only=only))

    def save(self, path: str) -> None:
        # StateView carries the fp32 master values under the model's names and args.
        save_pretrained(
            StateView(self.model.args, self._full_state()),  # type: ignore[arg-type]
            self.tokenizer,
            os.path.join(path, "model"),
        )
        faults.point("learner.save")
        if self.mtp is not None:  # beside the trunk, in its own file
            self.mtp.save(os.path.join(path, "model"))
        torch.save(
            {
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": torch.get_rng_state(),
                **(self.mtp.state() if self.mtp is not None else {}),
            },
            os.path.join(path, "learner.pt"),
        )

    def load(self, path: str, with_optimizer: bool = True) -> None:
        model, _ = load_model(os.path.join(path, "model"), dtype=torch.float32)
        if self.master is not None:
            self.master.load(model.state_dict())
        else:
            self.model.load_state_dict(model.state_dict())
        state_file = os.path.join(path, "learner.pt")
        state = None
        if with_optimizer and os.path.exists(state_file):
            state = torch.load(state_file, weights_only=False, map_location=self.device)
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        if self.mtp is not None:
            self.mtp.load(path, state)
