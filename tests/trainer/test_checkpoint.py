import json
import os

import pytest

from rlkit.trainer import checkpoint
from rlkit.trainer.context import truncate_metrics


def _save(run_dir, stage, step, keep=2):
    tmp, final = checkpoint.begin(run_dir, 0, stage, step)
    with open(os.path.join(tmp, "weights.bin"), "w") as f:
        f.write(str(step))
    checkpoint.commit(tmp, final, {"step": step}, keep=keep)
    return final


def test_latest_ignores_a_killed_write(tmp_path):
    run = str(tmp_path)
    _save(run, "rlvr", 2)
    # A write killed half-way leaves only the hidden temporary folder behind.
    tmp, _final = checkpoint.begin(run, 0, "rlvr", 4)
    with open(os.path.join(tmp, "weights.bin"), "w") as f:
        f.write("partial")
    ref = checkpoint.latest(run)
    assert ref is not None and ref.step == 2
    assert checkpoint.read_state(ref.path) == {"step": 2}
    # The next save cleans the leftover up.
    _save(run, "rlvr", 6)
    names = os.listdir(checkpoint.stage_dir(run, 0, "rlvr"))
    assert not any(n.startswith(".tmp_") for n in names)
    assert checkpoint.latest(run).step == 6


def test_prune_keeps_the_newest(tmp_path):
    run = str(tmp_path)
    for step in (1, 2, 3, 4):
        _save(run, "rlvr", step, keep=2)
    names = sorted(os.listdir(checkpoint.stage_dir(run, 0, "rlvr")))
    assert names == ["step_3", "step_4"]


def test_latest_prefers_later_stage(tmp_path):
    run = str(tmp_path)
    _save(run, "sft", 10)
    tmp, final = checkpoint.begin(run, 1, "rlvr", 1)
    checkpoint.commit(tmp, final, {"step": 1}, keep=2)
    ref = checkpoint.latest(run)
    assert (ref.stage_index, ref.stage_name, ref.step) == (1, "rlvr", 1)


def test_a_resume_removes_every_leftover(tmp_path):
    run = str(tmp_path)
    _save(run, "rlvr", 2)
    parent = checkpoint.stage_dir(run, 0, "rlvr")
    # A write cut short, and an old checkpoint whose deletion was cut short.
    checkpoint.begin(run, 0, "rlvr", 3)
    os.makedirs(os.path.join(parent, ".tmp_old_step_1"))
    assert checkpoint.latest(run).step == 2
    checkpoint.clean_partial(run)
    assert os.listdir(parent) == ["step_2"]


def test_pruning_cut_short_never_leaves_a_checkpoint_that_looks_whole(tmp_path, monkeypatch):
    run = str(tmp_path)
    _save(run, "rlvr", 1)
    _save(run, "rlvr", 2)

    def killed(path, **kwargs):  # the process dies inside the deletion
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(run, "rlvr", 3)
    monkeypatch.undo()
    names = sorted(os.listdir(checkpoint.stage_dir(run, 0, "rlvr")))
    # step_1 was renamed out of sight before its deletion started.
    assert names == [".tmp_old_step_1", "step_2", "step_3"]
    assert checkpoint.latest(run).step == 3


def test_saving_a_step_again_replaces_it(tmp_path):
    run = str(tmp_path)
    _save(run, "rlvr", 2)
    tmp, final = checkpoint.begin(run, 0, "rlvr", 2)
    checkpoint.commit(tmp, final, {"step": 2, "again": True}, keep=2)
    assert checkpoint.read_state(final) == {"step": 2, "again": True}
    assert os.listdir(checkpoint.stage_dir(run, 0, "rlvr")) == ["step_2"]


def _metrics(path, rows, tail=""):
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": i}) + "\n" for i in range(rows))
        f.write(tail)


def test_truncate_metrics_keeps_the_rows_logged_before_the_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    # A kill mid-write can leave half a row at the end.
    _metrics(path, 5, tail='{"step": 5, "rew')
    truncate_metrics(path, 3)
    with open(path) as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1, 2]
    truncate_metrics(path, 0)  # resumed without a checkpoint: the run starts over
    assert open(path).read() == ""
