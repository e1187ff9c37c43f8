"""The learner's MTP drafter: the module, its own AdamW, and its loss on a micro-batch.

The learner owns one when the run has an MTP module (`rlkit.models.mtp.wanted`). It trains on
the trunk's hidden states from the policy forward (no second trunk pass; detached unless
`algorithm.mtp.detach_trunk` is false), teacher-forced over `depth` = the drafts per step, with
per-token weights from `rlkit.algorithms.mtp`. Its optimizer is separate from the policy's: the
drafter's learning rate is its own (the policy's RL rates of ~1e-6 would barely move it), and
its gradients never enter the policy's clipping.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rlkit.algorithms.mtp import mtp_token_stats
from rlkit.config.schema import RecipeConfig
from rlkit.data.batch import RolloutBatch
from rlkit.models.decoder import Decoder
from rlkit.models.mtp import init_mtp, load_mtp, mtp_state, save_mtp
from rlkit.workers.distributed import Rank, sum_gradients


def target_count(resp_lens: torch.Tensor, depth: int) -> float:
    """MTP targets of responses of these lengths: depth d predicts tokens d.. of each."""
    return float(sum((resp_lens - d).clamp(min=0).sum() for d in range(1, depth + 1)))


class MTPTrainer:
    def __init__(self, model_dir: str, trunk: Decoder, seed: int) -> None:
        module = load_mtp(model_dir, trunk.args)
        self.loaded = module is not None
        self.module = module if module is not None else init_mtp(trunk.args, seed)
        self.module.to(trunk.lm_head_weight.device).train()
        self.opt: torch.optim.Optimizer | None = None

    def configure(self, cfg: RecipeConfig) -> None:
        self.cfg = cfg.algorithm.mtp
        self.depth = cfg.rollout.speculative.num_draft_tokens
        # The distribution the rollouts sample from, for target "policy" (greedy: 1).
        self.temperature = cfg.rollout.temperature or 1.0
        self.clip = cfg.optim.grad_clip
        o = cfg.optim
        self.opt = torch.optim.AdamW(
            self.module.parameters(),
            lr=self.cfg.lr,
            betas=(o.betas[0], o.betas[1]),
            eps=o.eps,
            weight_decay=0.0,
        )

    @property
    def trains_in_rl(self) -> bool:
        return self.cfg.loss != "frozen"

    def loss(
        self,
        trunk: Decoder,
        states: torch.Tensor,  # [n, T, H] row j: the state that predicts response token j
        valid: torch.Tensor,  # [n, T] bool
        mb: RolloutBatch,
        weights: torch.Tensor,  # [n, T] per response token
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over depths and targets of weight * cross-entropy (divide by the batch's
        `target_count`), and sums for metrics: per depth targets and top-1 hits."""
        h = states.detach() if self.cfg.detach_trunk else states
        n, T = mb.response_ids.shape
        dev = h.device
        outs = self.module.forward_train(
            trunk, h.float(), mb.response_ids.to(dev), (mb.prompt_lens - 1).to(dev), self.depth
        )
        head = trunk.lm_head_weight.detach()
        total = h.new_zeros((), dtype=torch.float32)
        sums: dict[str, float] = {}
        for d, g in enumerate(outs, 1):
            if d >= T:
                break
            ok = valid[:, d:].to(dev)  # [n, T - d]: target j + d exists
            # Row j + d of the trunk's states is the policy's distribution of token j + d.
            teacher = states[:, d:][ok] if self.cfg.target == "policy" else None
            logp, hit = mtp_token_stats(
                g[:, : T - d][ok], head, mb.response_ids[:, d:].to(dev)[ok], 256, teacher,
                self.temperature,
            )  # fmt: skip
            total = total - (weights[:, d:].to(dev)[ok] * logp).sum()
            sums[f"mtp/ce_sum_d{d}"] = float(-logp.detach().sum())
            sums[f"mtp/hits_d{d}"] = float(hit.sum())
            sums[f"mtp/targets_d{d}"] = float(ok.sum())
        return total, sums

    def step(self, rank: Rank | None = None) -> float:
        """Clip and step the module; over N learner ranks their gradients are summed first
        (each ran its share of the micro-batches, normalised by the whole batch's targets)."""
        assert self.opt is not None
        if rank is not None:
            sum_gradients([p for p in self.module.parameters() if p.requires_grad], rank)
        norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    @staticmethod
    def metrics(sums: dict[str, float], loss_sum: float, targets: float) -> dict[str, float]:
        """mtp/loss (the weighted loss), and per depth d mtp/ce_d (mean cross-entropy against
        the target: the sampled token, or with target "policy" the policy's distribution) and
        mtp/acc_d (top-1 accuracy) on the batch's rollout tokens."""
        out = {"mtp/loss": loss_sum / max(targets, 1.0)}
        for key, value in sums.items():
            if key.startswith("mtp/ce_sum_d"):
                d = key.removeprefix("mtp/ce_sum_d")
                count = max(sums.get(f"mtp/targets_d{d}", 0.0), 1.0)
                out[f"mtp/ce_d{d}"] = value / count
                out[f"mtp/acc_d{d}"] = sums.get(f"mtp/hits_d{d}", 0.0) / count
        return out

    def weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(dtype) for k, v in mtp_state(self.module).items()}

    def save(self, model_dir: str) -> None:
        save_mtp(self.module, model_dir)

    def state(self) -> dict[str, Any]:
        return {"mtp_optimizer": self.opt.state_dict() if self.opt is not None else None}

    def load(self, path: str, state: dict[str, Any] | None) -> None:
        loaded = load_mtp(os.path.join(path, "model"), self.module.args)
        if loaded is not None:
            self.module.load_state_dict(loaded.state_dict())
        if state and state.get("mtp_optimizer") and self.opt is not None:
            self.opt.load_state_dict(state["mtp_optimizer"])
