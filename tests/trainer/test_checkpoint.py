import os

from rlkit.trainer import checkpoint


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
