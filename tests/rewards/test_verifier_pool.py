import os
import textwrap
import time

import pytest
from rlkit.rewards import VerifierPool, score

BEHAVIOURS = """
import math
import os
import time


def verify(completion, sample):
    if completion == "hang":
        time.sleep(1e9)
    if completion == "spin":
        while True:
            pass
    if completion == "crash":
        raise RuntimeError("verifier crashed")
    if completion == "exit":
        os._exit(3)
    if completion == "none":
        return None
    if completion == "text":
        return "1.0"
    if completion == "nan":
        return math.nan
    if completion == "nodict":
        return {"acc": 1.0}
    if completion == "bool":
        return True
    ok = float(completion == sample["ground_truth"])
    return {"score": ok, "acc": ok, "note": "seen", "dropped": object()}


def batch(prompts, completions, ground_truth, **kwargs):
    if "hang" in completions:
        time.sleep(1e9)
    if "short" in completions:
        return [1.0]
    return [float(c == g) for c, g in zip(completions, ground_truth)]
"""


def samples(n, truth="1"):
    return [
        {"prompt": "p", "ground_truth": truth, "data_source": "t", "extra_info": {}}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("verifiers") / "behaviours.py"
    path.write_text(BEHAVIOURS)
    return path


@pytest.fixture(scope="module")
def pool(user_file):
    with VerifierPool(f"{user_file}:verify", num_workers=2, timeout_s=0.5) as pool:
        yield pool


def test_scores_extras_and_metrics(pool):
    result = pool.score(["1", "2", "1", "1"], samples(4))
    assert result.scores == [1.0, 0.0, 1.0, 1.0]
    assert result.extras[0] == {"acc": 1.0, "note": "seen"}
    assert result.metrics["score_mean"] == 0.75 and result.metrics["acc_mean"] == 0.75
    assert (result.n_errors, result.n_timeouts, result.n_invalid, result.first_error) == (
        0,
        0,
        0,
        None,
    )


def test_crash_gives_zero_and_is_counted(pool):
    result = pool.score(["1", "crash", "1"], samples(3))
    assert result.scores == [1.0, 0.0, 1.0]
    assert result.n_errors == 1 and result.metrics["error_count"] == 1.0
    assert (
        "sample 1" in result.first_error and "RuntimeError: verifier crashed" in result.first_error
    )


def test_invalid_results_are_counted(pool):
    result = pool.score(["none", "text", "nan", "nodict", "bool", "1"], samples(6))
    assert result.scores == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert result.n_invalid == 4 and result.n_errors == 0
    assert "non-numeric score None" in result.first_error


def test_hung_verifiers_are_killed_and_the_rest_scored(pool):
    start = time.monotonic()
    result = pool.score(["1", "hang", "1", "spin", "1", "2", "1"], samples(7))
    elapsed = time.monotonic() - start
    assert result.scores == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert result.n_timeouts == 2 and result.n_errors == 0
    assert "timed out after 0.5 s" in result.first_error
    assert elapsed < 5.0
    # The replacement workers serve the next call.
    again = pool.score(["1", "1"], samples(2))
    assert again.scores == [1.0, 1.0] and again.n_timeouts == 0


def test_call_process_that_exits_is_a_crash_and_is_replaced(pool):
    result = pool.score(["exit", "1", "1"], samples(3))
    assert result.scores == [0.0, 1.0, 1.0]
    assert result.n_crashes == 1 and result.n_errors == 0 and result.n_timeouts == 0
    assert "exited (exit code 3) without a result" in result.first_error
    assert result.metrics["crash_count"] == 1.0


def test_trl_batch_timeout_covers_the_whole_call(user_file):
    with VerifierPool(f"{user_file}:batch", num_workers=2, timeout_s=0.5) as pool:
        result = pool.score(["1", "1", "hang", "2"], samples(4))
        assert result.scores == [1.0, 1.0, 0.0, 0.0]
        assert result.n_timeouts == 2


def test_trl_wrong_length_is_an_error(user_file):
    result = score(
        f"{user_file}:batch", ["short", "1", "1"], samples(3), num_workers=1, timeout_s=5.0
    )
    assert result.scores == [0.0, 0.0, 0.0] and result.n_errors == 3
    assert "returned 1 rewards for 3 completions" in result.first_error


def test_inline_mode_and_registered_names():
    result = score("arithmetic", ["85", "x"], samples(2, "85"), num_workers=0)
    assert result.scores == [1.0, 0.0]


def test_math_verify_in_a_worker():
    result = score(
        "math_verify", [r"\boxed{\frac{1}{2}}", "0.25"], samples(2, "0.5"), timeout_s=30.0
    )
    assert result.scores == [1.0, 0.0] and result.n_errors == 0


def test_module_spec_is_importable_in_the_worker(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    result = score("behaviours:verify", ["1", "2"], samples(2), timeout_s=5.0)
    assert result.scores == [1.0, 0.0] and result.n_errors == 0


def test_worker_start_failure_fails_the_samples_not_the_call(tmp_path):
    path = tmp_path / "parent_only.py"
    path.write_text(
        textwrap.dedent(f"""
        import os
        if os.getpid() != {os.getpid()}:
            raise ImportError("only importable in the parent")

        def verify(completion, sample):
            return 1.0
        """)
    )
    result = score(f"{path}:verify", ["1", "1"], samples(2), timeout_s=5.0)
    assert result.scores == [0.0, 0.0] and result.n_errors == 2
    assert (
        "failed to start" in result.first_error
        and "only importable in the parent" in result.first_error
    )


def test_bad_spec_raises_before_starting_workers():
    with pytest.raises(ValueError, match="does not exist"):
        VerifierPool("nowhere.py:verify")
