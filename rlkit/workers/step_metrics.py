"""A learner step's metrics from its ranks' raw sums: one function for one learner and for N.

Each rank returns a `StepPart` (sums over the micro-batches it ran, their weights, extremes,
counts); `finish` turns a list of them into the metrics row's `actor/*`, `sparse/*`, `mtp/*`
and throughput values, so N ranks report exactly what one learner reports for the same batch
(token-weighted means over all micro-batches, maxima of maxima, totals of counts).
"""

from __future__ import annotations

from typing import Any

StepPart = dict[str, Any]


def new_part() -> StepPart:
    return {
        "sums": {},  # metric -> sum of value * weight (sparse/* keys: their own weights)
        "weight": 0.0,  # the policy metrics' weight: loss-mask tokens of the micro-batches run
        "weight_sparse": 0.0,
        "extremes": {},  # *_max / *_min of Sparse-RL's ratios
        "loss": 0.0,  # sum of the micro-batches' losses (each already batch-normalised)
        "updates": 0,  # optimizer steps (same on every rank)
        "grad_norms": [],  # per optimizer step, after the ranks' gradients were summed
        "lr": 0.0,
        "tokens": 0,  # tokens this rank's forwards processed
        "elapsed": 0.0,
        "active": 0,  # samples with a non-zero advantage (or all, when none is skipped)
        "samples": 0,
        "nonfinite": 0,
        "memory": {},
        "mtp": None,  # {"sums", "loss", "targets", "norms"} when the MTP drafter trains
    }


def add_extreme(extremes: dict[str, float], key: str, value: float) -> None:
    if key.endswith("_max"):
        extremes[key] = max(extremes.get(key, value), value)
    else:
        extremes[key] = min(extremes.get(key, value), value)


def finish(parts: list[StepPart]) -> dict[str, float]:
    """The metrics of one learner step from its ranks' parts (rank 0 first)."""
    from rlkit.workers.mtp_trainer import MTPTrainer

    lead = parts[0]
    sums: dict[str, float] = {}
    extremes: dict[str, float] = {}
    for part in parts:
        for k, v in part["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
        for k, v in part["extremes"].items():
            add_extreme(extremes, k, v)
    weight = sum(p["weight"] for p in parts)
    weight_sparse = sum(p["weight_sparse"] for p in parts)
    out = {
        k: v / max(weight_sparse if k.startswith("sparse/") else weight, 1e-9)
        for k, v in sums.items()
    }
    out.update(extremes)
    updates = max(1, lead["updates"])
    out["actor/loss"] = sum(p["loss"] for p in parts) / updates
    out["actor/grad_norm"] = sum(lead["grad_norms"]) / max(1, len(lead["grad_norms"]))
    out["actor/lr"] = lead["lr"]
    tokens = sum(p["tokens"] for p in parts)
    out["throughput/learner_tokens_per_s"] = tokens / max(max(p["elapsed"] for p in parts), 1e-9)
    out["actor/skipped_frac"] = 1.0 - lead["active"] / max(1, lead["samples"])
    out["actor/tokens"] = float(tokens)
    for part in parts:
        for k, v in part["memory"].items():
            out[k] = max(out.get(k, v), v)
    out["actor/nonfinite_skipped"] = float(lead["nonfinite"])
    if lead["mtp"] is not None:
        mtp_sums: dict[str, float] = {}
        for part in parts:
            for k, v in part["mtp"]["sums"].items():
                mtp_sums[k] = mtp_sums.get(k, 0.0) + v
        loss = sum(p["mtp"]["loss"] for p in parts)
        out.update(MTPTrainer.metrics(mtp_sums, loss, lead["mtp"]["targets"]))
        norms = lead["mtp"]["norms"]
        out["mtp/grad_norm"] = sum(norms) / max(1, len(norms))
    return out


def finish_sft(parts: list[StepPart]) -> dict[str, float]:
    """An SFT step's metrics from its ranks' parts."""
    lead = parts[0]
    tokens = sum(p["tokens"] for p in parts)
    out = {
        "sft/loss": sum(p["loss"] for p in parts),
        "actor/grad_norm": lead["grad_norms"][0],
        "actor/lr": lead["lr"],
        "actor/nonfinite_skipped": float(lead["nonfinite"]),
        "throughput/learner_tokens_per_s": tokens / max(max(p["elapsed"] for p in parts), 1e-9),
    }
    for part in parts:
        for k, v in part["memory"].items():
            out[k] = max(out.get(k, v), v)
    return out


def finish_mtp(parts: list[StepPart]) -> dict[str, float]:
    """An MTP warm-up step's metrics from its ranks' parts."""
    from rlkit.workers.mtp_trainer import MTPTrainer

    lead = parts[0]
    sums: dict[str, float] = {}
    for part in parts:
        for k, v in part["mtp"]["sums"].items():
            sums[k] = sums.get(k, 0.0) + v
    out = MTPTrainer.metrics(sums, sum(p["mtp"]["loss"] for p in parts), lead["mtp"]["targets"])
    out["mtp/grad_norm"] = lead["mtp"]["norms"][0]
    tokens = sum(p["tokens"] for p in parts)
    out["throughput/learner_tokens_per_s"] = tokens / max(max(p["elapsed"] for p in parts), 1e-9)
    for part in parts:
        for k, v in part["memory"].items():
            out[k] = max(out.get(k, v), v)
    return out
