"""One metrics row per step: appended to metrics.jsonl, mirrored to wandb, shown on a progress bar."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tqdm import tqdm


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


class MetricsLogger:
    def __init__(
        self,
        run_dir: str,
        *,
        wandb_mode: str = "offline",
        wandb_project: str = "rlkit",
        run_name: str = "run",
        config: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.path = os.path.join(run_dir, "metrics.jsonl")
        # Rows in the file, a resumed run's earlier ones included (checkpoints record it).
        self.rows = 0
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.rows = sum(1 for line in f if line.strip())
        self._file = open(self.path, "a", encoding="utf-8")
        self._wandb = None
        if wandb_mode != "disabled":
            self._wandb = _start_wandb(run_dir, wandb_mode, wandb_project, run_name, config)
        self._progress = progress
        self._bar: tqdm | None = None

    def start_stage(self, name: str, total: int, initial: int = 0) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._progress:
            self._bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        row = _clean(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.rows += 1
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))})
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(_postfix(row), refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
            # Stop wandb's service process now: the run's shutdown ends every process it
            # left, and wandb's own exit hook would then print a ConnectionResetError.
            import wandb

            wandb.teardown()


def _postfix(row: dict[str, Any]) -> str:
    parts = []
    for key, label, fmt in (
        ("reward/mean", "reward", "{:.3f}"),
        ("eval/accuracy", "acc", "{:.3f}"),
        ("train/accuracy", "train_acc", "{:.3f}"),
        ("throughput/rollout_tokens_per_s", "rollout tok/s", "{:.0f}"),
        ("throughput/learner_tokens_per_s", "learn tok/s", "{:.0f}"),
    ):
        if row.get(key) is not None:
            parts.append(f"{label}={fmt.format(row[key])}")
    return " ".join(parts)


def _start_wandb(run_dir: str, mode: str, project: str, name: str, config: dict[str, Any] | None):
    try:
        import wandb
    except ImportError:
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=project,
        name=name,
        dir=run_dir,
        mode=mode,  # type: ignore[arg-type]
        config=config or {},
        settings=wandb.Settings(console="off", x_disable_stats=True),
    )
