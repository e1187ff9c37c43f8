"""MTP-RL's speed figures (issue 15) from what the runs and the bench wrote.

    # CPU, small batch: rows of `rlkit bench rollout --modes dense,spec ... --json ROWS`
    python benchmarks/spec_summary.py cpu ROWS.json benchmarks/results/cpu_spec_small_batch.json

    # GPU, at a fixed policy: rows of `rlkit bench rollout --modes dense,spec --stop-at-eos
    # --interleave --group G ... --json ROWS` (one file per speculative setting, each with its
    # own dense row timed between its repeats)
    python benchmarks/spec_summary.py bench ROWS_A.json ROWS_B.json --out OUT.json

    # GPU: the rollout phase of RL steps, a dense run against speculative runs of the same
    # recipe and seed (each run's drafter is read from its config.yaml)
    python benchmarks/spec_summary.py gpu --dense runs/DENSE --spec runs/SPEC_A runs/SPEC_B \\
        --out benchmarks/results/gpu_spec_rollout.json [--stage rl] [--skip-first 1]

cpu: one record per drafter: batch, tokens_per_s_dense, tokens_per_s_spec, speedup,
accept_len_mean, and the bench's settings. gpu: one record per speculative run: device,
drafter, accept_len_mean (mean over the stage's steps of spec/accept_len_mean),
rollout_seconds_dense and rollout_seconds_spec (mean `timing/rollout` per step of the stage,
after the first `--skip-first` steps), reduction (1 - spec / dense); `best` names the drafter
with the largest reduction. Caution: each run trains on its own samples, so its policy and its
response lengths drift apart from the dense run's; the records carry both runs' mean and
longest response lengths (a phase ends with its longest sequence), and a spec run whose
responses average more than 10% shorter or longer than dense's is flagged (`lengths_differ`).
bench: the same figures at one policy (the bench's model), where dense and speculative rows
sample the same distribution: rollout seconds are the means of the rows' interleaved repeats
(each repeat one phase: --batch sequences to their EOS or the cap).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def _cpu(rows_path: str, out: str) -> list[dict]:
    with open(rows_path, encoding="utf-8") as f:
        rows = json.load(f)
    dense = [r for r in rows if r["engine"] == "native" and r["mode"] == "dense"]
    if not dense:
        raise SystemExit(
            f"{rows_path}: no native dense row (run the bench with --modes dense,spec)"
        )
    base = dense[0]
    records = [
        {
            "batch": r["settings"]["batch"],
            "drafter": r["drafter"],
            "tokens_per_s_dense": base["tokens_per_s"],
            "tokens_per_s_spec": r["tokens_per_s"],
            "speedup": r["tokens_per_s"] / base["tokens_per_s"],
            "accept_len_mean": r["accept_len_mean"],
            "drafted_per_step": r["drafted_per_step"],
            "settings": r["settings"],
        }
        for r in rows
        if r["engine"] == "native" and r["mode"] == "spec"
    ]
    if not records:
        raise SystemExit(f"{rows_path}: no spec rows")
    _write(out, records)
    return records


def _rows(run_dir: str, stage: str | None) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "timing/rollout" in r and (stage is None or r.get("stage") == stage)]
    if not rows:
        raise SystemExit(
            f"{path}: no rows with timing/rollout" + (f" in stage {stage!r}" if stage else "")
        )
    return rows


def _speculative(run_dir: str) -> dict:
    import yaml

    with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    return cfg.get("rollout", {}).get("speculative", {}) or {}


def _drafter(run_dir: str) -> str:
    return _speculative(run_dir).get("drafter", "none")


def _gpu(args: argparse.Namespace) -> dict:
    def seconds(rows: list[dict]) -> float:
        return statistics.mean(r["timing/rollout"] for r in rows[args.skip_first :])

    def lengths(rows: list[dict]) -> tuple[float | None, float | None]:
        rows = rows[args.skip_first :]
        mean = [r["response/length_mean"] for r in rows if "response/length_mean" in r]
        top = [r["response/length_max"] for r in rows if "response/length_max" in r]
        return (
            statistics.mean(mean) if mean else None,
            statistics.mean(top) if top else None,
        )

    dense_rows = _rows(args.dense, args.stage)
    dense = seconds(dense_rows)
    dense_len, dense_max = lengths(dense_rows)
    device = args.device
    if device is None:
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    records = []
    for run in args.spec:
        rows = _rows(run, args.stage)
        spec = seconds(rows)
        accept = [r["spec/accept_len_mean"] for r in rows if "spec/accept_len_mean" in r]
        spec_len, spec_max = lengths(rows)
        differ = bool(dense_len and spec_len and abs(spec_len / dense_len - 1.0) > 0.10)
        if differ:
            print(
                f"spec_summary: {run}: responses average {spec_len:.0f} tokens against dense's "
                f"{dense_len:.0f}: its rollout seconds are not the same work",
                file=sys.stderr,
            )
        records.append(
            {
                "device": device,
                "drafter": _drafter(run),
                "num_draft_tokens": _speculative(run).get("num_draft_tokens"),
                "tail_rows": _speculative(run).get("tail_rows", 0),
                "tail_draft_tokens": _speculative(run).get("tail_draft_tokens", 0),
                "mtp_draft": _speculative(run).get("mtp_draft", "sample"),
                "draft_chains": _speculative(run).get("draft_chains", 1),
                "tail_draft_chains": _speculative(run).get("tail_draft_chains", 0),
                "chain_kinds": _speculative(run).get("chain_kinds"),
                "sam_min_match": _speculative(run).get("sam_min_match"),
                "run": run,
                "accept_len_mean": statistics.mean(accept) if accept else None,
                "rollout_seconds_dense": dense,
                "rollout_seconds_spec": spec,
                "reduction": 1.0 - spec / dense,
                "steps": len(rows) - args.skip_first,
                "response_length_mean_dense": dense_len,
                "response_length_mean_spec": spec_len,
                "response_length_max_dense": dense_max,
                "response_length_max_spec": spec_max,
                "lengths_differ": differ,
            }
        )
    best = max(records, key=lambda r: r["reduction"])
    summary = {
        "records": records,
        "best": best["drafter"],
        "best_num_draft_tokens": best["num_draft_tokens"],
        "best_tail": [best["tail_rows"], best["tail_draft_tokens"]],
        "best_chains": [best["draft_chains"], best["tail_draft_chains"]],
        "dense_run": args.dense,
    }
    _write(args.out, summary)
    return summary


# The bench's settings each record carries.
_BENCH_SETTINGS = (
    "batch", "group", "max_new_tokens", "temperature", "top_p", "top_k", "task", "task_args", "num_draft_tokens",
    "sam_min_match", "sam_match", "mtp_draft", "mtp_vocab", "tail_rows", "tail_draft_tokens",
    "draft_chains", "tail_draft_chains", "chain_kinds", "mtp",
)  # fmt: skip


def _bench(paths: list[str], out: str, skip_first: int = 0) -> dict:
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        dense = [r for r in rows if r["engine"] == "native" and r["mode"] == "dense"]
        spec = [r for r in rows if r["engine"] == "native" and r["mode"] == "spec"]
        if not dense or not spec:
            raise SystemExit(f"{path}: needs a native dense row and spec rows (--modes dense,spec)")
        base = dense[0]
        if not base["settings"].get("interleave"):
            raise SystemExit(f"{path}: time the rows with --interleave (noisy machines)")
        if len(base["seconds_all"]) <= skip_first:
            raise SystemExit(
                f"{path}: {len(base['seconds_all'])} repeats, --skip-first {skip_first}"
            )
        t_dense = statistics.mean(base["seconds_all"][skip_first:])
        for r in spec:
            st = r["settings"]
            t_spec = statistics.mean(r["seconds_all"][skip_first:])
            records.append(
                {
                    "method": "fixed policy (rlkit bench rollout, interleaved repeats)",
                    "device": st.get("device"),
                    "drafter": r["drafter"],
                    **{k: st.get(k) for k in _BENCH_SETTINGS},
                    "repeats": len(r["seconds_all"]),
                    "repeats_skipped": skip_first,
                    "accept_len_mean": r["accept_len_mean"],
                    "rollout_seconds_dense": t_dense,
                    "rollout_seconds_spec": t_spec,
                    "reduction": 1.0 - t_spec / t_dense,
                    "tokens_per_phase_dense": base["tokens"] / len(base["seconds_all"]),
                    "tokens_per_phase_spec": r["tokens"] / len(r["seconds_all"]),
                    "tokens_per_s_ratio": r["tokens_per_s"] / base["tokens_per_s"],
                    "seconds_all_dense": base["seconds_all"],
                    "seconds_all_spec": r["seconds_all"],
                    "rows": path,
                }
            )
    best = max(records, key=lambda r: r["reduction"])
    summary = {"records": records, "best": {k: best[k] for k in ("drafter", "rows", "reduction")}}
    _write(out, summary)
    return summary


def _write(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    print(json.dumps(data, indent=1))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    cpu = sub.add_parser("cpu")
    cpu.add_argument("rows")
    cpu.add_argument("out")
    bench = sub.add_parser("bench")
    bench.add_argument("rows", nargs="+")
    bench.add_argument("--out", required=True)
    bench.add_argument(
        "--skip-first",
        type=int,
        default=0,
        help="repeats left out of the seconds (rows from a bench whose warm-up did not reach the "
        "tail's CUDA graphs; tokens and tok/s stay over all repeats)",
    )
    gpu = sub.add_parser("gpu")
    gpu.add_argument("--dense", required=True)
    gpu.add_argument("--spec", nargs="+", required=True)
    gpu.add_argument("--out", required=True)
    gpu.add_argument("--stage", default=None, help="only this stage's rows (e.g. rl)")
    gpu.add_argument("--skip-first", type=int, default=1, help="warm-up steps left out")
    gpu.add_argument("--device", default=None, help="device name (default: this machine's GPU)")
    args = ap.parse_args(argv)
    if args.what == "cpu":
        _cpu(args.rows, args.out)
    elif args.what == "bench":
        _bench(args.rows, args.out, args.skip_first)
    else:
        _gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
