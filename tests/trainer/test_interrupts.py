"""Ctrl-C / SIGTERM handling of a run (`trainer/interrupts.py`), without Ray: where a signal
is noted, what holds it back, and the bounds that hold even when the main thread is stuck."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from rlkit.trainer.interrupts import StopSignals

# The main thread stuck in one C call that checks no signals (a billion PBKDF2 rounds: minutes;
# it releases the GIL, as ray.get and torch ops do), so a Python signal handler cannot run.
STUCK = textwrap.dedent(
    """
    import hashlib, subprocess, sys
    from rlkit.trainer.interrupts import StopSignals

    child = subprocess.Popen(["sleep", "120"])
    with StopSignals(lambda: "a C call", grace_s=float(sys.argv[1])):
        print(child.pid, flush=True)
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10**9)
    """
)


def _stuck_process(grace_s: float) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK, str(grace_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = int(proc.stdout.readline())
    time.sleep(0.3)  # into the regex
    return proc, child


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_signal_raises_in_the_main_thread_and_says_where():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(lambda: "the rollout of step 3") as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert stop.signum == signal.SIGINT and stop.where == "the rollout of step 3"
        assert stop.name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_is_noted_as_sigterm():
    with StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert stop.name == "SIGTERM"


def test_a_deferred_block_is_not_cut_in_half():
    done = []
    with StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            with stop.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append("the rest of the block")
        assert done == ["the rest of the block"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stuck_main_thread_is_stopped_after_the_grace_period(sig):
    proc, child = _stuck_process(grace_s=1.0)
    start = time.monotonic()
    os.kill(proc.pid, sig)
    code = proc.wait(timeout=20)
    took = time.monotonic() - start
    assert code == (130 if sig == signal.SIGINT else 143)
    assert 0.9 < took < 5.0, took
    assert _gone(child), "the run's child process outlived it"
    assert "stopping at once (clean-up still running 1 s after the signal)" in proc.stderr.read()


def test_a_second_ctrl_c_stops_at_once():
    proc, child = _stuck_process(grace_s=60.0)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    assert time.monotonic() - start < 3.0
    assert _gone(child)
    assert "stopping at once (a second signal)" in proc.stderr.read()


def test_a_handled_signal_arms_nothing_after_the_run():
    """The deadline of a signal the run handled is called off when its handling ends (a
    process that goes on, like a test session, is not killed `grace_s` later)."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from rlkit.trainer.interrupts import StopSignals

        try:
            with StopSignals(grace_s=0.3):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        except KeyboardInterrupt:
            pass
        time.sleep(1.5)
        print("alive")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, "alive\n"), done.stderr
