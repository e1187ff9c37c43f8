"""Atomic checkpoints: `checkpoints/<stage>/step_<N>/` appears whole or not at all.

Everything is written into a hidden temporary folder beside the target, flushed to disk
(every file, then the folders), and renamed into place at the end, so a run killed mid-write,
or a machine that loses power, leaves the previous checkpoint intact. A checkpoint counts only
with its `trainer_state.json`, written last. Leftover hidden folders (`.tmp_*`: a write cut
short, an old checkpoint half deleted) are ignored, and removed by the next save and when a
run resumes. Old checkpoints are renamed out of sight before they are deleted, so a deletion
cut short never leaves a folder that looks like a checkpoint but misses files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointRef:
    stage_index: int
    stage_name: str
    step: int
    path: str


def stage_dir(run_dir: str, stage_index: int, stage_name: str) -> str:
    return os.path.join(run_dir, "checkpoints", f"{stage_index}_{stage_name}")


def begin(run_dir: str, stage_index: int, stage_name: str, step: int) -> tuple[str, str]:
    """Return (temporary dir to write into, final dir)."""
    parent = stage_dir(run_dir, stage_index, stage_name)
    os.makedirs(parent, exist_ok=True)
    _remove_hidden(parent)
    final = os.path.join(parent, f"step_{step}")
    tmp = os.path.join(parent, f".tmp_step_{step}")
    os.makedirs(tmp)
    return tmp, final


def commit(tmp: str, final: str, state: dict[str, Any], keep: int) -> None:
    """Write the trainer state last, fsync everything, and rename the folder into place."""
    with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    # The learner wrote the weights; a rename may reach the disk before their data does.
    _fsync_tree(tmp)
    parent = os.path.dirname(final)
    if os.path.exists(final):
        os.rename(final, os.path.join(parent, f".tmp_old_{os.path.basename(final)}"))
    os.rename(tmp, final)
    _fsync_dir(parent)
    _prune(parent, keep)
    _remove_hidden(parent)


def clean_partial(run_dir: str) -> None:
    """Remove every hidden leftover under the run's checkpoints (a resume starts with this)."""
    root = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(root):
        for name in os.listdir(root):
            if os.path.isdir(os.path.join(root, name)):
                _remove_hidden(os.path.join(root, name))


def _remove_hidden(parent: str) -> None:
    for name in os.listdir(parent):
        if name.startswith(".tmp_"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(folder)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _steps(parent: str) -> list[int]:
    if not os.path.isdir(parent):
        return []
    out = []
    for name in os.listdir(parent):
        m = _STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(parent, name, STATE_FILE)):
            out.append(int(m.group(1)))
    return sorted(out)


def _prune(parent: str, keep: int) -> None:
    if keep <= 0:
        return
    for step in _steps(parent)[:-keep]:
        doomed = os.path.join(parent, f".tmp_old_step_{step}")
        os.rename(os.path.join(parent, f"step_{step}"), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def latest(run_dir: str) -> CheckpointRef | None:
    """The newest complete checkpoint across stages (later stage wins, then higher step)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    best: CheckpointRef | None = None
    for name in os.listdir(root):
        m = re.match(r"^(\d+)_(.+)$", name)
        if not m:
            continue
        steps = _steps(os.path.join(root, name))
        if not steps:
            continue
        ref = CheckpointRef(
            int(m.group(1)), m.group(2), steps[-1], os.path.join(root, name, f"step_{steps[-1]}")
        )
        if best is None or (ref.stage_index, ref.step) > (best.stage_index, best.step):
            best = ref
    return best


def read_state(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)
