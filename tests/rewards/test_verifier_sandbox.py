"""Hostile verifiers through the real pool: every failure counted under its kind, nothing left.

`test_hostile_suite` sends over 1,000 calls of the behaviours in `hostile.py` through three pools
(plain, sandboxed, TRL batch) and checks: no pool call raised, the count of every kind equals
the behaviours of that kind, scores are right, texts are capped, the driver's own stdout/stderr
stayed (nearly) empty, and no process any behaviour started survives.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import psutil
import pytest
from hostile import MARK_VAR, VERIFIER, marked, survivors
from rlkit.rewards import VerifierPool
from rlkit.rewards.outcomes import KINDS
from rlkit.rewards.results import MAX_TEXT
from rlkit.rewards.sandbox import Sandbox, landlock_abi

from rlkit.workers.reward_pool import RewardPool

OK = {
    "ok": 1.0, "wrong": 0.0, "fork_sleeper": 1.0, "daemon": 1.0, "popen": 1.0, "flood": 1.0,
    "close_stdio": 1.0, "print_after_close": 1.0, "huge_extras": 1.0, "surrogate": 1.0,
    "setsid_self": 1.0, "ignore_term": 1.0, "stdin": 1.0, "forged_reply": 0.0,
}  # fmt: skip
ERROR = ["raise", "raise_huge", "sys_exit", "keyboard", "recursion", "input", "print_then_raise"]
CRASH = [
    "os_exit", "segfault", "abort", "kill_self", "crash_after_fork", "segfault_after_fork",
    "flood_then_crash", "close_all_fds", "garbage_to_fds", "deep_json_frame", "kill_parent",
]  # fmt: skip
TIMEOUT = ["sleep", "spin", "pipe_block", "term_ignored_hang", "forks_then_hang", "stop_parent"]
INVALID = [
    "none", "nan", "inf", "text", "bytes", "huge_list", "bad_float", "bad_repr", "no_score",
    "nan_in_dict", "complex",
]  # fmt: skip

# How many calls of each behaviour: cheap ones often, slow ones (timeouts, worker kills) rarely.
PLAIN = {
    **dict.fromkeys(OK, 10), "ok": 200, "wrong": 100, "popen": 6, "flood": 4, "stdin": 20,
    **dict.fromkeys(ERROR, 20), "raise": 60,
    **dict.fromkeys(CRASH, 10), "crash_after_fork": 5, "segfault_after_fork": 5,
    "flood_then_crash": 3, "kill_parent": 3,
    **dict.fromkeys(TIMEOUT, 3), "sleep": 4, "spin": 4, "stop_parent": 2,
    **dict.fromkeys(INVALID, 25),
}  # fmt: skip
# Landlock ABI 6 scopes signals: a sandboxed call cannot kill or stop its worker.
SCOPED = landlock_abi() >= 6
SANDBOXED = {
    "ok": 50, "write_tmp": 20, "network": 20, "write_outside": 20, "alloc_8g": 10,
    "cpu_child": 2, "kill_parent": 3, "stop_parent": 2, "fork_sleeper": 5, "daemon": 5,
    "crash_after_fork": 5, "sleep": 2, "raise": 20, "nan": 20,
}  # fmt: skip
SANDBOX_KIND = {
    "ok": "ok", "write_tmp": "ok", "fork_sleeper": "ok", "daemon": "ok",
    "network": "error", "write_outside": "error", "raise": "error",
    "alloc_8g": "limit", "cpu_child": "limit", "crash_after_fork": "crash", "sleep": "timeout",
    "nan": "invalid",
    "kill_parent": "error" if SCOPED else "crash",
    "stop_parent": "error" if SCOPED else "timeout",
}  # fmt: skip
TRL_KIND = {"ok": "ok", "sleep": "timeout", "os_exit": "crash", "huge_list": "error"}


def temp_dirs() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "rlkit-*"))


def kind_of(behaviour: str) -> str:
    for kind, names in (("error", ERROR), ("crash", CRASH), ("timeout", TIMEOUT)):
        if behaviour in names:
            return kind
    return "invalid" if behaviour in INVALID else "ok"


@pytest.fixture
def mark(monkeypatch):
    # Workers inherit the environment, and with it the mark, as does everything they start.
    value = f"hostile-{uuid.uuid4().hex}"
    monkeypatch.setenv(MARK_VAR, value)
    return value


@pytest.fixture(scope="module")
def verifier_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "hostile_verifier.py"
    path.write_text(VERIFIER)
    return path


def run(pool, behaviours, expect, samples, tally, batch=300):
    """Score `behaviours` in batches; add counts to `tally`; check each sample's score and kind."""
    for start in range(0, len(behaviours), batch):
        chunk = behaviours[start : start + batch]
        result = pool.score(chunk, samples[: len(chunk)])
        counts = {
            "error": result.n_errors, "crash": result.n_crashes, "timeout": result.n_timeouts,
            "limit": result.n_limits, "invalid": result.n_invalid,
        }  # fmt: skip
        wrong = [(b, k) for b, k in zip(chunk, result.kinds, strict=True) if k != expect(b)]
        assert not wrong, (wrong, result.first_errors)
        assert counts == {kind: sum(expect(b) == kind for b in chunk) for kind in KINDS}
        for b, s in zip(chunk, result.scores, strict=True):
            assert s == (OK.get(b, 1.0) if expect(b) == "ok" else 0.0), b
        for text in [result.first_error or "", *result.first_errors.values()]:
            assert len(text) <= MAX_TEXT
        tally["calls"] += len(chunk)
        tally["output_bytes"] += result.output_bytes
        for kind in KINDS:
            tally[kind] += counts[kind]
        yield result


def test_hostile_suite(verifier_file, mark, tmp_path, capfd):
    rng = random.Random(0)
    tally = dict.fromkeys(["calls", "output_bytes", *KINDS], 0)
    dirs_before = set(temp_dirs())
    outside = tmp_path / "outside.txt"
    samples = [{"prompt": "p", "ground_truth": "1", "outside": str(outside)}] * 300
    start = time.monotonic()

    plain = [b for b, n in PLAIN.items() for _ in range(n)]
    rng.shuffle(plain)
    with VerifierPool(f"{verifier_file}:verify", num_workers=4, timeout_s=1.0) as pool:
        for result in run(pool, plain, kind_of, samples, tally):
            assert result.metrics["crash_count"] == result.n_crashes
        # What calls started died with them: only workers and call processes carry the mark.
        left = [" ".join(p.cmdline()) for p in marked(mark)]
        assert len(left) <= 8 and all("rlkit.rewards.worker" in c for c in left), left
        # A crash after a flood quotes the end of the output, not all 12 MB of it.
        crashed = pool.score(["flood_then_crash"], samples[:1])
        assert "last words" in crashed.first_error and len(crashed.first_error) <= MAX_TEXT

    sandbox = Sandbox(memory_mb=1024, cpu_seconds=1, network=False, writable_tmp_only=True)
    boxed = [b for b, n in SANDBOXED.items() for _ in range(n)]
    rng.shuffle(boxed)
    with VerifierPool(
        f"{verifier_file}:verify", num_workers=3, timeout_s=2.5, sandbox=sandbox
    ) as pool:
        for result in run(pool, boxed, SANDBOX_KIND.__getitem__, samples, tally):
            if result.n_limits:
                assert "sandbox.memory_mb=1024" in result.first_errors["limit"] or (
                    "sandbox.cpu_seconds=1" in result.first_errors["limit"]
                )
    assert not outside.exists()

    with VerifierPool(f"{verifier_file}:batch", num_workers=1, timeout_s=1.0) as pool:
        for behaviour in list(TRL_KIND) * 3:
            # One chunk, one call: its failure is both samples'.
            list(run(pool, [behaviour, "ok"], lambda b, k=TRL_KIND[behaviour]: k, samples, tally))
            tally["calls"] -= 1

    live, zombies = survivors(mark)
    out, err = capfd.readouterr()
    elapsed = time.monotonic() - start
    assert live == [] and zombies == []
    # Temp dirs go too, also those of workers that were killed.
    assert set(temp_dirs()) - dirs_before == set()
    assert len(out) + len(err) < 2000, (out[-300:], err[-300:])
    assert tally["calls"] >= 1000
    with capfd.disabled():
        counts = ", ".join(f"{k} {tally[k]}" for k in KINDS)
        print(
            f"\nhostile suite: {tally['calls']} calls in {elapsed:.1f} s, 0 pool crashes, {counts}, "
            f"0 survivors, verifier output {tally['output_bytes']} bytes captured, driver "
            f"output {len(out) + len(err)} bytes"
        )


@pytest.mark.parametrize("workers_too", [False, True], ids=["driver", "driver-and-workers"])
def test_killed_driver_leaves_nothing(verifier_file, mark, tmp_path, workers_too):
    """SIGKILL the process that holds the pool mid-call (and, as Ray does when it kills an
    actor, its children, the workers): nothing any call started survives."""
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        from rlkit.rewards import VerifierPool
        pool = VerifierPool({str(verifier_file)!r} + ":verify", num_workers=2, timeout_s=60)
        pool.score(["forks_then_hang", "forks_then_hang", "daemon"], [{{}}] * 3)
        """)
    )
    dirs_before = set(temp_dirs())
    driver = subprocess.Popen([sys.executable, str(script)])
    try:
        # Two calls, each with 5 forks, a setsid daemon and a sleeper, besides its worker.
        end = time.monotonic() + 30
        while len(marked(mark)) < 2 * (2 + 5 + 2) and time.monotonic() < end:
            time.sleep(0.05)
        assert len(marked(mark)) >= 2 * (2 + 5 + 2)
        workers = psutil.Process(driver.pid).children() if workers_too else []
        assert len(workers) == (2 if workers_too else 0)
    finally:
        driver.send_signal(signal.SIGKILL)
        for worker in workers:
            worker.kill()
        driver.wait()
    live, zombies = survivors(mark)
    assert live == [] and zombies == []
    if workers_too:
        # A SIGKILLed worker cannot remove its temp dir: the next pool sweeps it.
        VerifierPool("arithmetic", num_workers=0).close()
    assert set(temp_dirs()) - dirs_before == set()


def test_dead_workers_are_replaced(verifier_file, mark):
    with VerifierPool(f"{verifier_file}:verify", num_workers=2, timeout_s=2.0) as pool:
        assert pool.score(["ok", "ok"], [{}] * 2).scores == [1.0, 1.0]
        workers = [p for p in marked(mark) if p.ppid() == os.getpid()]
        assert len(workers) == 2
        for p in workers:
            p.kill()
        psutil.wait_procs(workers, timeout=5)
        result = pool.score(["ok"] * 4, [{}] * 4)
        assert result.scores == [1.0] * 4 and result.n_crashes == 0
        # A call process killed from outside while idle is replaced too.
        for p in marked(mark):
            if p.ppid() != os.getpid():
                p.kill()
        time.sleep(0.2)
        assert pool.score(["ok"] * 4, [{}] * 4).scores == [1.0] * 4
    assert survivors(mark) == ([], [])


def test_reward_pool_is_cheap_to_recreate(verifier_file, mark):
    """What the driver does when the RewardPool actor died: build it again, score again."""
    args = (f"{verifier_file}:verify", "auto", {}, 2, 2.0, str(verifier_file.parent))
    batch = ["ok", "wrong", "raise", "nan"]
    first = RewardPool(*args, sandbox={"memory_mb": 2048})
    one = first.score(batch, [{}] * 4)
    first.close()
    first.close()
    second = RewardPool(*args, sandbox={"memory_mb": 2048})
    two = second.score(batch, [{}] * 4)
    second.close()
    assert one["scores"] == two["scores"] == [1.0, 0.0, 0.0, 0.0]
    assert one["metrics"]["error_count"] == 1.0 and one["metrics"]["invalid_count"] == 1.0
    assert one["first_error"].startswith("sample 2: RuntimeError: verifier failed")
    assert survivors(mark) == ([], [])


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1.0, "10"])
def test_bad_timeouts_are_refused(timeout):
    with pytest.raises(ValueError, match="timeout_s must be a finite number of seconds > 0"):
        VerifierPool("arithmetic", timeout_s=timeout)
