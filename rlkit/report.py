"""PNG plots of a run's `metrics.jsonl` (`rlkit report RUN_DIR`), and of several runs compared.

Each figure plots whatever numeric series exist under its key prefix, so new metrics show up
without changes here; a prefix with no figure of its own gets `<prefix>.png`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# (x on one axis across stages, stage, row)
Point = tuple[float, Any, dict]

# file, title, which keys it plots
_FIGURES: list[tuple[str, str, Callable[[str], bool]]] = [
    ("reward.png", "Reward", lambda k: k.startswith("reward/")),
    # eval_sparse/: the same under the rollouts' compressed KV cache (Sparse-RL runs).
    (
        "accuracy.png",
        "Held-out accuracy",
        lambda k: k.startswith("eval/") or k.startswith("eval_sparse/"),
    ),
    # JudgeRLVR: judge accuracy on train items (judge/accuracy) and held-out (eval/judge_*).
    (
        "judge.png",
        "Judge (JudgeRLVR)",
        lambda k: k.startswith("judge/") or k.startswith("eval/judge_"),
    ),
    ("response_length.png", "Responses (lengths in tokens)", lambda k: k.startswith("response/")),
    ("kl.png", "KL divergence", lambda k: k.startswith("actor/") and "kl" in k),
    (
        "entropy.png",
        "Policy entropy (nats / token)",
        lambda k: k.startswith("actor/") and "entropy" in k,
    ),
    (
        "actor.png",
        "Learner",
        lambda k: k.startswith("actor/") and "kl" not in k and "entropy" not in k,
    ),
    # MTP-RL: accepted length per verify step, acceptance rate, drafting time; the drafter's
    # own loss and accuracy by depth, and its held-out acceptance after the warm-up.
    ("speculative.png", "Speculative rollouts", lambda k: k.startswith("spec/")),
    ("mtp.png", "MTP drafter", lambda k: k.startswith("mtp/")),
    ("timings.png", "Seconds per step by phase", lambda k: k.startswith("timing/")),
    ("throughput.png", "Throughput", lambda k: k.startswith("throughput/")),
]
# Timing keys that are sums of the phases: drawn as a line over the stack, not stacked.
_TIMING_TOTALS = ("timing/step", "timing/total")

# file, title, key: one curve per run on shared axes
_COMPARED = [
    ("accuracy.png", "Held-out accuracy", "eval/accuracy"),
    (
        "sparse_eval_accuracy.png",
        "Held-out accuracy, compressed KV",
        "eval_sparse/accuracy",
    ),
    ("judge_accuracy.png", "Held-out judge accuracy", "eval/judge_accuracy"),
    ("reward.png", "Mean reward", "reward/mean"),
    ("response_length.png", "Mean response length (tokens)", "response/length_mean"),
    ("rollout_throughput.png", "Rollout tokens / s", "throughput/rollout_tokens_per_s"),
    ("accept_len.png", "Mean accepted length per verify step", "spec/accept_len_mean"),
    ("rollout_seconds.png", "Rollout seconds per step", "timing/rollout"),
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: str) -> list[dict]:
    """Rows of a JSONL file; a malformed line raises ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            # A run that is still writing may leave its last line half written.
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(
                f"{path}:{number}: malformed JSON line ({e.msg}, column {e.colno})"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def _timeline(rows: list[dict]) -> list[Point]:
    """Rows placed on one x axis: a stage whose step counter starts again continues after the
    previous stage's last step; a resumed run that logs steps again replaces the older rows."""
    points: list[Point] = []
    offset = 0.0
    for row in rows:
        if not _is_number(row.get("step")):
            continue
        step, stage = float(row["step"]), row.get("stage")
        if points and step + offset < points[-1][0]:
            if stage != points[-1][1]:
                offset = points[-1][0] + 1 - step
            else:
                while points and points[-1][1] == stage and points[-1][0] >= step + offset:
                    points.pop()
        points.append((step + offset, stage, row))
    return points


def _series(points: list[Point], key: str) -> tuple[list[float], list[float]]:
    """x and y where `key` is logged; a NaN between stages breaks the line there."""
    xs: list[float] = []
    ys: list[float] = []
    last_stage = None
    for x, stage, row in points:
        if _is_number(row.get(key)):
            if xs and stage != last_stage:
                xs.append(x)
                ys.append(math.nan)
            xs.append(x)
            ys.append(float(row[key]))
            last_stage = stage
    return xs, ys


def _numeric_keys(points: list[Point]) -> list[str]:
    keys: dict[str, None] = {}
    for _, _, row in points:
        keys.update((k, None) for k, v in row.items() if "/" in k and _is_number(v))
    return list(keys)


def _stage_starts(points: list[Point]) -> list[tuple[float, str]]:
    starts = []
    for i, (x, stage, _) in enumerate(points):
        if i == 0 or stage != points[i - 1][1]:
            starts.append((x, str(stage)))
    return starts if len({stage for _, stage, _ in points}) > 1 else []


def _mark_stages(ax: Axes, starts: list[tuple[float, str]]) -> None:
    for x, stage in starts:
        ax.axvline(x, color="0.5", linestyle="--", linewidth=0.8)
        ax.text(
            x,
            0.98,
            f" {stage}",
            transform=ax.get_xaxis_transform(),
            va="top",
            fontsize=8,
            color="0.3",
        )


def _plot(ax: Axes, xs: list[float], ys: list[float], total_rows: int, **kwargs: Any) -> None:
    # Series logged on a few rows only (eval every N steps) read better as dots joined by lines.
    sparse = len(xs) < 30 or len(xs) < total_rows / 2
    ax.plot(xs, ys, marker="o" if sparse else None, markersize=3, **kwargs)


def _draw_panels(points: list[Point], keys: list[str], title: str, starts: list) -> Figure:
    """One axes per series, stacked, sharing x: series under one prefix differ in scale."""
    keys = [k for k in keys if not (k == "reward/std" and "reward/mean" in keys)]
    fig = Figure(figsize=(8, 1.2 + 2.2 * len(keys)), layout="constrained")
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=True):
        xs, ys = _series(points, key)
        _plot(ax, xs, ys, len(points), color="C0")
        if key == "reward/mean":
            _shade_std(ax, points)
        ax.set_ylabel(key.split("/", 1)[1], fontsize=9)
        ax.grid(alpha=0.3)
        _mark_stages(ax, starts)
    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    return fig


def _shade_std(ax: Axes, points: list[Point]) -> None:
    keys = ("reward/mean", "reward/std")
    both = [
        (x, row[keys[0]], row[keys[1]])
        for x, _, row in points
        if all(_is_number(row.get(k)) for k in keys)
    ]
    if both:
        xs, mean, std = zip(*both, strict=True)
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(xs, low, high, alpha=0.2, color="C0", label="± std")
        ax.legend(fontsize=8, loc="lower right")


def _draw_timings(points: list[Point], keys: list[str], title: str, starts: list) -> Figure:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    rows = [(x, row) for x, _, row in points if any(_is_number(row.get(k)) for k in keys)]
    phases = [k for k in keys if k not in _TIMING_TOTALS]
    xs = [x for x, _ in rows]
    if phases:
        # A phase missing from a row took no time in that step.
        stacks = [
            [float(row[k]) if _is_number(row.get(k)) else 0.0 for _, row in rows] for k in phases
        ]
        ax.stackplot(xs, stacks, labels=[k.split("/", 1)[1] for k in phases], alpha=0.8)
    for key in keys:
        if key in _TIMING_TOTALS:
            ax.plot(*_series(points, key), color="black", linewidth=1, label=key.split("/", 1)[1])
    ax.set(title=title, xlabel="step", ylabel="seconds")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _mark_stages(ax, starts)
    return fig


def _draw_lines(
    points: list[Point], keys: list[str], title: str, ylabel: str, starts: list
) -> Figure:
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for key in keys:
        _plot(ax, *_series(points, key), len(points), label=key.split("/", 1)[1])
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _mark_stages(ax, starts)
    return fig


def _save(fig: Figure, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    return path


def _under(prefix: str) -> Callable[[str], bool]:
    return lambda key: key.startswith(prefix + "/")


def make_report(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Plot `run_dir/metrics.jsonl` into `out_dir` (default `run_dir/report/`); return the PNG paths."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    points = _timeline(read_metrics(metrics))
    if not points:
        raise ValueError(f"{metrics}: no rows with a numeric 'step'")
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    keys = _numeric_keys(points)
    starts = _stage_starts(points)
    figures = list(_FIGURES)
    # Prefixes without a figure of their own (sparse/, spec/, ...) each get one.
    for prefix in dict.fromkeys(k.split("/", 1)[0] for k in keys):
        if not any(match(prefix + "/x") for _, _, match in _FIGURES):
            figures.append((f"{prefix}.png", prefix, _under(prefix)))
    paths = []
    for name, title, match in figures:
        chosen = [k for k in keys if match(k)]
        if not chosen:
            continue
        if name == "timings.png":
            fig = _draw_timings(points, chosen, title, starts)
        elif name == "throughput.png":
            fig = _draw_lines(points, chosen, title, "tokens / s", starts)
        else:
            fig = _draw_panels(points, chosen, title, starts)
        paths.append(_save(fig, out_dir, name))
    return paths


def compare_runs(
    run_dirs: Sequence[str], out_dir: str, labels: Sequence[str] | None = None
) -> list[str]:
    """Accuracy, reward, response length and rollout throughput of several runs, one axes each."""
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    timelines = [_timeline(read_metrics(os.path.join(d, "metrics.jsonl"))) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, title, key in _COMPARED:
        curves = [
            (label, _series(points, key), len(points))
            for label, points in zip(labels, timelines, strict=True)
        ]
        if not any(xs for _, (xs, _), _ in curves):
            continue
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.subplots()
        for label, (xs, ys), total in curves:
            if xs:
                _plot(ax, xs, ys, total, label=label)
        ax.set(title=title, xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir, name))
    return paths
