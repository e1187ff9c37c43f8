"""How a run that fails or resumes says so: one line naming where and the checkpoint to continue
from (`trainer/run.py`), without Ray: the errors are built as Ray builds them."""

import json
import os
from types import SimpleNamespace

from ray.exceptions import RayActorError

from rlkit.exit_codes import RunFailed
from rlkit.trainer import checkpoint
from rlkit.trainer.run import _failure, _resume_hint, _rows_at
from rlkit.workers.learner import NonFiniteWeightsError


def _ctx(where="learn of stage 0 (rlvr) step 2", learner_id="ab12"):
    learner = SimpleNamespace(actor_ids=lambda: {learner_id})
    return SimpleNamespace(where=lambda: where, learner=learner)


class TaskError(Exception):
    """Like ray.exceptions.RayTaskError: the actor's own error as `.cause`."""

    def __init__(self, cause):
        super().__init__("ray::Learner.weights() (pid=1)\nTraceback ...")
        self.cause = cause


def _checkpointed(run_dir, step):
    tmp, final = checkpoint.begin(str(run_dir), 0, "rlvr", step)
    checkpoint.commit(tmp, final, {"step": step, "metrics_rows": step + 1}, keep=3)
    return final


def test_the_learner_dying_names_the_phase_and_the_checkpoint(tmp_path):
    final = _checkpointed(tmp_path, 1)
    died = RayActorError(actor_id="ab12", error_msg="The actor died unexpectedly")
    failed = _failure(died, _ctx(), str(tmp_path))
    assert isinstance(failed, RunFailed)
    assert str(failed) == (
        "the learner's process died during learn of stage 0 (rlvr) step 2; "
        f"run.resume=true continues from {final} (stage 0 (rlvr), step 1)"
    )
    other = _failure(RayActorError(actor_id="cd34"), _ctx(), str(tmp_path))
    assert str(other).startswith("a Ray actor's process died during learn")


def test_non_finite_weights_are_a_failure_not_a_traceback(tmp_path):
    error = TaskError(NonFiniteWeightsError("the policy's weights are not finite (1 of 9 ...)"))
    failed = _failure(error, _ctx("sync of stage 0 (rlvr) step 2"), str(tmp_path))
    assert str(failed) == (
        "the policy's weights are not finite (1 of 9 ...), found during sync of stage 0 (rlvr) "
        "step 2; nothing of that step was saved; no checkpoint was written yet: "
        "run.resume=true starts the run over"
    )


def test_other_errors_are_left_to_the_command(tmp_path):
    assert _failure(ValueError("a bug"), _ctx(), str(tmp_path)) is None
    # An actor whose constructor raised: its own error is the news, not "it died".
    init = RayActorError(actor_id="ab12", actor_init_failed=True)
    assert _failure(init, _ctx(), str(tmp_path)) is None
    group = RunFailed("rollout worker 1 died 4 times in one call (last: ...)")
    assert str(_failure(group, _ctx("rollout of stage 0 (rlvr) step 1"), str(tmp_path))) == (
        "rollout worker 1 died 4 times in one call (last: ...) (during rollout of stage 0 "
        "(rlvr) step 1); no checkpoint was written yet: run.resume=true starts the run over"
    )


def test_resume_keeps_the_rows_the_checkpoint_counted(tmp_path):
    metrics = str(tmp_path / "metrics.jsonl")
    assert _rows_at(None, metrics) == 0  # no checkpoint: the run starts over
    _checkpointed(tmp_path, 2)
    assert _rows_at(checkpoint.latest(str(tmp_path)), metrics) == 3
    assert "continues from" in _resume_hint(str(tmp_path))


def test_a_checkpoint_without_a_row_count_keeps_the_rows_up_to_its_step(tmp_path):
    metrics = str(tmp_path / "metrics.jsonl")
    with open(metrics, "w") as f:
        for step in (0, 1, 2, 3):
            f.write(json.dumps({"stage_index": 0, "step": step}) + "\n")
    tmp, final = checkpoint.begin(str(tmp_path), 0, "rlvr", 2)
    checkpoint.commit(tmp, final, {"step": 2}, keep=3)  # as rlkit wrote them before
    assert os.path.isdir(final)
    assert _rows_at(checkpoint.latest(str(tmp_path)), metrics) == 3
