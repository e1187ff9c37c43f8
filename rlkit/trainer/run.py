"""`rlkit train`: set up the run, start the actors, run the stages, print the outcome."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from rlkit import faults
from rlkit.config import apply_overrides, save_resolved, to_dict
from rlkit.config.schema import RecipeConfig
from rlkit.data.stream import PromptStream
from rlkit.exit_codes import RunFailed, RunInterrupted
from rlkit.trainer import checkpoint, judge
from rlkit.trainer.context import RunContext, StageSpec, truncate_metrics
from rlkit.trainer.data_setup import load_raw
from rlkit.trainer.interrupts import StopSignals, descendants, stop_process_tree
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
    launched: list[RunContext] = []  # the run's context, once launch returns it
    stop = StopSignals(lambda: launched[0].where() if launched else "start-up")
    with stop:
        try:
            summary = _train(cfg, specs, raw_data, run_dir, t_start, stop, launched)
            from rlkit.report import make_report

            plots = make_report(run_dir)
            _print_summary(summary, plots)
        except KeyboardInterrupt:
            where = stop.where or (launched[0].where() if launched else "start-up")
            raise RunInterrupted(
                f"interrupted by {stop.name} during {where}; {_resume_hint(run_dir)}",
                stop.signum or signal.SIGINT,
            ) from None
        except Exception as e:
            failed = _failure(e, launched[0] if launched else None, run_dir)
            if failed is None:
                raise
            raise failed from e
    return summary


def _train(
    cfg: RecipeConfig,
    specs: list[StageSpec],
    raw_data: dict[str, Any],
    run_dir: str,
    t_start: float,
    stop: StopSignals,
    launched: list[RunContext],
) -> dict[str, Any]:
    monitor = PeakMemoryMonitor().start()
    from rlkit.trainer.launch import launch

    resume_from = None
    if cfg.run.resume:
        checkpoint.clean_partial(run_dir)
        resume_from = checkpoint.latest(run_dir)
        # Rows logged after the checkpoint (all of them without one) would be logged again.
        metrics = os.path.join(run_dir, "metrics.jsonl")
        truncate_metrics(metrics, _rows_at(resume_from, metrics))
    ctx: RunContext | None = None
    try:
        ctx = launch(cfg, run_dir, raw_data)
        ctx.deferred = stop.deferred
        launched.append(ctx)
        spec = cfg.rollout.speculative
        if spec.sam_static and "sam" in spec.drafter:
            from rlkit.trainer.mtp_warmup import static_corpus

            ctx.rollout.set_draft_corpus(static_corpus(ctx))
        if judge.evaluates(cfg):
            # Built (or reloaded) while the rollout workers still hold the initial model.
            with ctx.timer.phase("judge_data"):
                ctx.eval_hooks.append(judge.HeldOutJudge(ctx, cfg))
        if resume_from is None:
            ctx.summary["eval_before"] = _eval_row(ctx, specs[0], step=0)
        summary = _run_stages(ctx, specs, resume_from, t_start)
    finally:
        monitor.stop()
        if ctx is not None:
            ctx.logger.close()
        _shut_down()
    summary["peak_memory_gb"] = monitor.peak_bytes / 2**30
    summary["peak_memory_pss_gb"] = monitor.peak_pss_bytes / 2**30
    summary["peak_memory_by_process_gb"] = [
        [title, rss / 2**30] for title, rss in monitor.peak_breakdown[:8]
    ]
    summary["peak_memory_per_process_gb"] = [
        [title, rss / 2**30] for title, rss in monitor.process_peaks()[:8]
    ]
    summary["run_dir"] = run_dir
    with open(os.path.join(run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def _shut_down() -> None:
    """Stop Ray and anything of the run still alive (a verifier's child, a worker Ray missed)."""
    import ray

    procs = descendants()
    ray.shutdown()
    stop_process_tree(procs)


def _rows_at(ref: checkpoint.CheckpointRef | None, metrics_path: str) -> int:
    """How many metrics rows the run had logged when the checkpoint was written (0: none)."""
    if ref is None:
        return 0
    state = checkpoint.read_state(ref.path)
    if "metrics_rows" in state:
        return int(state["metrics_rows"])
    # A checkpoint written before rlkit recorded the count: the rows up to its step.
    count = 0
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                if (row.get("stage_index", 0), row.get("step", 0)) > (ref.stage_index, ref.step):
                    break
                count += 1
    return count


def _resume_hint(run_dir: str) -> str:
    ref = checkpoint.latest(run_dir)
    if ref is None:
        return "no checkpoint was written yet: run.resume=true starts the run over"
    return (
        f"run.resume=true continues from {ref.path} "
        f"(stage {ref.stage_index} ({ref.stage_name}), step {ref.step})"
    )


def _failure(error: Exception, ctx: RunContext | None, run_dir: str) -> RunFailed | None:
    """A worker that died or weights that went non-finite, as one line saying where and how to
    continue; None for errors the command reports as they are."""
    from ray.exceptions import RayActorError

    from rlkit.workers.learner import NonFiniteWeightsError
    from rlkit.workers.restarting import died_starting

    where = ctx.where() if ctx is not None else "start-up"
    cause: BaseException = error
    for _ in range(8):  # Ray's RayTaskError carries the actor's error as .cause
        inner = getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    if isinstance(error, RayActorError) and not died_starting(error):
        who = "a Ray actor's process"
        learner = getattr(ctx, "learner", None)
        if learner is not None and error.actor_id in learner.actor_ids():
            who = "the learner's process"
        what = f"{who} died during {where}"
    elif isinstance(cause, NonFiniteWeightsError):
        what = f"{cause}, found during {where}; nothing of that step was saved"
    elif isinstance(error, RunFailed):
        what = f"{error} (during {where})"
    else:
        return None
    return RunFailed(f"{what}; {_resume_hint(run_dir)}")


def _eval_row(ctx: RunContext, stage: StageSpec, step: int) -> dict[str, float]:
    ctx.at(stage, step)
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
    faults.point("eval_row", step)
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
        ctx.at(spec, start_step)
        ctx.learner.configure(spec.cfg)
        if resuming:
            ctx.restore(resume_from)
        ctx.logger.start_stage(
            f"{spec.index}:{spec.name}", total=spec.cfg.train.steps, initial=start_step
        )
        if ctx.train_started_at is None:
            # Times of the whole run: earlier attempts' (restored with the checkpoint) + this one's.
            now = time.perf_counter()
            ctx.summary["setup_seconds"] = ctx.summary.get("setup_seconds", 0.0) + now - t_start
            ctx.train_seconds_before = ctx.summary.get("train_seconds", 0.0)
            ctx.train_started_at = now
        runners[spec.type](ctx, spec, start_step)
        done = ctx.summary.get("eval_after_stage", {})
        if spec.type == "judge" and spec is not specs[-1] and spec.name not in done:
            # Stage-1 judge accuracy (held-out), before the generate stage moves the weights.
            # Logged after the stage's last checkpoint, so a run resumed from that checkpoint
            # (whose summary does not have it yet) measures it again.
            metrics = _eval_row(ctx, spec, step=spec.cfg.train.steps)
            ctx.summary.setdefault("eval_after_stage", {})[spec.name] = metrics
    ctx.summary["train_seconds"] = ctx.train_seconds()
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
        f"  set-up {summary.get('setup_seconds', 0):.0f} s, training {summary.get('train_seconds', 0):.1f} s "
        f"(first step to last {summary.get('steps_seconds', 0):.1f} s), peak memory {summary['peak_memory_gb']:.2f} GB"
        f" (sum of RSS; {summary['peak_memory_pss_gb']:.2f} GB PSS)"
    )
    lines.append(f"  run directory: {summary['run_dir']}")
    if plots:
        lines.append(
            f"  plots: {os.path.dirname(plots[0])}/ ({', '.join(os.path.basename(p) for p in plots)})"
        )
    print("\n".join(lines), flush=True)
