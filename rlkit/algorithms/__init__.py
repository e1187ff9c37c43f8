"""Pure tensor RL algorithms: advantages, policy losses, KL, log-probs, sampling, TIS,
Sparse-RL corrections.

No Ray, no YAML, no files: tensors in, tensors and numbers out. Variants are picked by name
from `ADVANTAGES` and `POLICY_LOSSES`.
"""

from rlkit.algorithms.advantages import (
    ADVANTAGES,
    dr_grpo,
    grpo,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)
from rlkit.algorithms.kl import KL_ESTIMATORS, entropy_from_logits, kl_penalty
from rlkit.algorithms.logprobs import token_logprobs
from rlkit.algorithms.losses import (
    AGG_MODES,
    POLICY_LOSSES,
    agg_normalisers,
    aggregate,
    ppo_clip_loss,
)
from rlkit.algorithms.registry import Registry
from rlkit.algorithms.sampling import filter_groups, select_groups
from rlkit.algorithms.sparse_rl import sparse_corrections
from rlkit.algorithms.tis import tis_weights

__all__ = [
    "ADVANTAGES",
    "AGG_MODES",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "Registry",
    "agg_normalisers",
    "aggregate",
    "dr_grpo",
    "entropy_from_logits",
    "filter_groups",
    "grpo",
    "kl_penalty",
    "ppo_clip_loss",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "rloo",
    "select_groups",
    "sparse_corrections",
    "tis_weights",
    "token_logprobs",
]
