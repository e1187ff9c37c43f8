"""Sparse-RL vs dense training runs with long responses (issue 16): one JSON of the figures.

    python benchmarks/sparse_rl_long_summary.py SPARSE_RUN_DIR DENSE_RUN_DIR [--json FILE]
        [--metric eval/reward_mean]

Reads each run's metrics.jsonl and summary.json and reports: mean generated tokens per
response (response/length_mean averaged over steps), the sparse run's KV kept per sequence
(rollout/kv_retained_frac, mean and worst step of rollout/kv_retained_frac_max) and so the
fraction of an average sequence's entries removed, the rollout phase seconds of each
(timing/rollout summed) and their ratio, and the held-out score after training (dense
decoding; and the sparse run's under its compression, eval_sparse/...) with the gap in points.
The score is `--metric` (default eval/accuracy; a partial-credit task such as arithmetic_set
scores with eval/reward_mean, the fraction of its problems answered right).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _rows(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(sparse_dir: str, dense_dir: str, metric: str = "eval/accuracy") -> dict[str, Any]:
    if not metric.startswith("eval/"):
        raise ValueError(f"--metric must be an eval/ key, got {metric!r}")
    sparse_metric = "eval_sparse/" + metric.removeprefix("eval/")
    out: dict[str, Any] = {"metric": metric}
    runs = {"sparse": sparse_dir, "dense": dense_dir}
    for name, run_dir in runs.items():
        rows = [r for r in _rows(run_dir) if "timing/rollout" in r]
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        after = summary.get("eval_after", {})
        out[name] = {
            "steps": len(rows),
            "mean_response_tokens": _mean(rows, "response/length_mean"),
            "rollout_seconds": sum(r["timing/rollout"] for r in rows),
            "step_seconds": sum(r.get("timing/step", 0.0) for r in rows),
            "kv_retained_frac": _mean(rows, "rollout/kv_retained_frac"),
            "kv_retained_frac_max": max(
                (
                    r["rollout/kv_retained_frac_max"]
                    for r in rows
                    if "rollout/kv_retained_frac_max" in r
                ),
                default=None,
            ),
            "seqs_admitted": _mean(rows, "rollout/seqs_admitted_peak"),
            "eval_before": summary.get("eval_before", {}).get(metric),
            "eval_after": after.get(metric),
            "eval_sparse_after": after.get(sparse_metric),
            "eval_accuracy_after": after.get("eval/accuracy"),
            "sparse_rejected_token_frac": _mean(rows, "sparse/rejected_token_frac"),
        }
    s, d = out["sparse"], out["dense"]
    out["rollout_time_ratio_dense_over_sparse"] = (
        d["rollout_seconds"] / s["rollout_seconds"] if s["rollout_seconds"] else None
    )
    kept = s["kv_retained_frac"]
    out["kv_removed_frac_mean"] = 1 - kept if kept is not None else None
    if s["eval_after"] is not None and d["eval_after"] is not None:
        out["accuracy_gap_points"] = 100 * (s["eval_after"] - d["eval_after"])
    else:
        out["accuracy_gap_points"] = None
    tokens = s["mean_response_tokens"]
    out["acceptance"] = {
        "mean_response_tokens>=512": tokens is not None and tokens >= 512,
        "kv_removed_frac>=0.4": out["kv_removed_frac_mean"] is not None
        and out["kv_removed_frac_mean"] >= 0.4,
        "accuracy_within_3_points": out["accuracy_gap_points"] is not None
        and abs(out["accuracy_gap_points"]) <= 3,
    }
    return out


def main(argv: list[str]) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("sparse_dir")
    ap.add_argument("dense_dir")
    ap.add_argument("--json", default=None)
    ap.add_argument("--metric", default="eval/accuracy")
    a = ap.parse_args(argv)
    out = summarize(a.sparse_dir, a.dense_dir, a.metric)
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
