"""`rlkit train`: set up the run, start the actors, run the stages, print the outcome."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from rlkit.config import apply_overrides, save_resolved, to_dict
from rlkit.config.schema import RecipeConfig
from rlkit.data.stream import PromptStream
from rlkit.trainer import checkpoint, judge
from rlkit.trainer.context import RunContext, StageSpec, truncate_metrics
from rlkit.trainer.data_setup import load_raw
from rlkit.trainer.memory import PeakMemoryMonitor


def stage_specs(cfg: RecipeConfig) -> list[StageSpec]:
    specs = []
    names: set[str] = set()
    for i, st in enumerate(cfg.stages):
        name = st.name or st.type
        if name in names:
            name = f"{name}{i}"
        names.add(name)
        stage_cfg = (
            apply_overrides(cfg, st.overrides, where=f"stages[{i}].overrides")
            if st.overrides
            else cfg
        )
        specs.append(StageSpec(index=i, name=name, type=st.type, cfg=stage_cfg))
    return specs


def prepare_run_dir(cfg: RecipeConfig) -> str:
    """runs/<name>/; a fresh run never writes into an existing run's folder (it takes name-2, ...)."""
    base = os.path.join(cfg.run.dir, cfg.run.name)
    if cfg.run.resume:
        if not os.path.isdir(base):
            raise FileNotFoundError(f"run.resume=true but {base} does not exist: nothing to resume")
        return base
    path, k = base, 1
    while os.path.exists(path) and os.listdir(path):
        k += 1
        path = f"{base}-{k}"
    os.makedirs(path, exist_ok=True)
    return path


def train(cfg: RecipeConfig, recipe_path: str | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    specs = stage_specs(cfg)
    # Data errors (a bad file, an empty split) surface here, before the run directory exists.
    raw_data = load_raw(cfg)
    run_dir = prepare_run_dir(cfg)
    save_resolved(cfg, run_dir)
    monitor = PeakMemoryMonitor().start()
    from rlkit.trainer.launch import launch

    resume_from = checkpoint.latest(run_dir) if cfg.run.resume else None
    if resume_from is not None:
        # Rows logged after the checkpoint would be logged again: drop them before logging starts.
        truncate_metrics(
            os.path.join(run_dir, "metrics.jsonl"), resume_from.stage_index, resume_from.step
        )
    ctx = launch(cfg, run_dir, raw_data)
    try:
        spec = cfg.rollout.speculative
        if spec.sam_static and "sam" in spec.drafter:
            from rlkit.trainer.mtp_warmup import static_corpus

            ctx.call(ctx.rollout.set_draft_corpus, static_corpus(ctx))
        if judge.evaluates(cfg):
            # Built (or reloaded) while the rollout worker still holds the initial model.
            with ctx.timer.phase("judge_data"):
                ctx.eval_hooks.append(judge.HeldOutJudge(ctx, cfg))
        if resume_from is None:
            ctx.summary["eval_before"] = _eval_row(ctx, specs[0], step=0)
        summary = _run_stages(ctx, specs, resume_from, t_start)
    finally:
        monitor.stop()
        ctx.logger.close()
        import ray

        ray.shutdown()
    summary["peak_memory_gb"] = monitor.peak_bytes / 2**30
    summary["peak_memory_pss_gb"] = monitor.peak_pss_bytes / 2**30
    summary["peak_memory_by_process_gb"] = [
        [title, rss / 2**30] for title, rss in monitor.peak_breakdown[:8]
    ]
    summary["run_dir"] = run_dir
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    from rlkit.report import make_report

    plots = make_report(run_dir)
    _print_summary(summary, plots)
    return summary


def _eval_row(ctx: RunContext, stage: StageSpec, step: int) -> dict[str, float]:
    with ctx.timer.phase("eval"):
        metrics = ctx.evaluate()
    row = {
        "stage": stage.name,
        "stage_index": stage.index,
        "step": step,
        **metrics,
        **ctx.timer.pop(),
    }
    ctx.log(row)
    return metrics


def _run_stages(
    ctx: RunContext, specs: list[StageSpec], resume_from, t_start: float
) -> dict[str, Any]:
    from rlkit.trainer.mtp_warmup import run_mtp_warmup
    from rlkit.trainer.rlvr import run_rlvr
    from rlkit.trainer.sft import run_sft, sft_examples

    runners = {
        "rlvr": run_rlvr,
        "sft": run_sft,
        "judge": judge.run_judge,
        "generate": run_rlvr,
        "mtp_warmup": run_mtp_warmup,
    }
    t_first_step = None
    for spec in specs:
        start_step = 0
        if resume_from is not None:
            if spec.index < resume_from.stage_index:
                continue
            if spec.index == resume_from.stage_index:
                start_step = resume_from.step
        ctx.cfg = spec.cfg
        # Each stage walks its own items in its own seeded order: the task's prompts for RL,
        # the SFT pairs (which may come from other files) for SFT.
        ctx.sft_examples = sft_examples(ctx) if spec.type == "sft" else None
        n_items = len(ctx.sft_examples) if ctx.sft_examples is not None else len(ctx.train_samples)
        resuming = resume_from is not None and spec.index == resume_from.stage_index
        if spec.type == "judge" and resuming:
            # The judge stage walks its current judge set, whose size the checkpoint records.
            n_items = checkpoint.read_state(resume_from.path)["data"]["size"]
        ctx.stream = PromptStream(n_items, spec.cfg.data.seed)
        ctx.call(ctx.learner.configure, spec.cfg)
        if resuming:
            ctx.restore(resume_from)
        ctx.logger.start_stage(
            f"{spec.index}:{spec.name}", total=spec.cfg.train.steps, initial=start_step
        )
        if t_first_step is None:
            t_first_step = time.perf_counter()
            ctx.summary.setdefault("setup_seconds", t_first_step - t_start)
        runners[spec.type](ctx, spec, start_step)
        if spec.type == "judge" and spec is not specs[-1] and start_step < spec.cfg.train.steps:
            # Stage-1 judge accuracy (held-out), before the generate stage moves the weights.
            metrics = _eval_row(ctx, spec, step=spec.cfg.train.steps)
            ctx.summary.setdefault("eval_after_stage", {})[spec.name] = metrics
    t_end = time.perf_counter()
    ctx.summary["train_seconds"] = t_end - (t_first_step or t_end)
    ctx.summary["eval_after"] = _eval_row(ctx, specs[-1], step=specs[-1].cfg.train.steps)
    ctx.summary["config"] = to_dict(ctx.cfg)
    return ctx.summary


def _print_summary(summary: dict[str, Any], plots: list[str]) -> None:
    before = summary.get("eval_before", {}).get("eval/accuracy")
    after = summary.get("eval_after", {}).get("eval/accuracy")
    lines = ["", "rlkit: training finished"]
    if before is not None:
        lines.append(f"  held-out accuracy before: {before:.3f}")
    if after is not None:
        lines.append(f"  held-out accuracy after:  {after:.3f}")
    sparse_before = summary.get("eval_before", {}).get("eval_sparse/accuracy")
    sparse_after = summary.get("eval_after", {}).get("eval_sparse/accuracy")
    if sparse_before is not None and sparse_after is not None:
        lines.append(
            f"  under the rollouts' KV compression: {sparse_before:.3f} -> {sparse_after:.3f}"
        )
    for name, heldout in summary.get("mtp_warmup", {}).items():
        lines.append(
            f"  {name}: held-out MTP accepted length {heldout['mtp/heldout_accept_len']:.2f} "
            f"tokens per verify step"
        )
    judge_before = summary.get("eval_before", {}).get("eval/judge_accuracy")
    judge_after = summary.get("eval_after", {}).get("eval/judge_accuracy")
    if judge_before is not None:
        lines.append(f"  held-out judge accuracy before: {judge_before:.3f}")
    if judge_after is not None:
        lines.append(f"  held-out judge accuracy after:  {judge_after:.3f}")
    lines.append(
        f"  set-up {summary.get('setup_seconds', 0):.0f} s, training {summary.get('train_seconds', 0):.0f} s, peak memory {summary['peak_memory_gb']:.2f} GB"
        f" (sum of RSS; {summary['peak_memory_pss_gb']:.2f} GB PSS)"
    )
    lines.append(f"  run directory: {summary['run_dir']}")
    if plots:
        lines.append(
            f"  plots: {os.path.dirname(plots[0])}/ ({', '.join(os.path.basename(p) for p in plots)})"
        )
    print("\n".join(lines), flush=True)
