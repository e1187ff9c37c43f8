"""Score completions with a verifier in worker processes, each call under a timeout.

A verifier that raises, hangs, crashes, exceeds a sandbox limit or returns no number gives
reward 0.0 for its sample(s), counted by kind; scoring never raises over it. Per-sample styles
(rlkit, verl) get one call, hence one timeout, per sample; a TRL batch function gets one call
per chunk (one chunk per worker) and the timeout covers that call.

Each pool slot is a worker process (`worker.py`: a fresh interpreter started with
fork+exec, safe when the parent holds threads, that imports only rlkit.rewards and the
verifier) whose call processes run the verifier. The worker times the calls and kills a failed
call's whole process tree; the pool only keeps a backstop deadline on the worker itself and
replaces a worker that dies. Nothing a verifier started outlives the pool: workers kill
everything below them when the pool closes, and when the pool's process dies their socket
reaches EOF and they do the same.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import IO, Any

import psutil

from . import proctree
from .adapters import Style, resolve_verifier
from .frames import FrameReader, send_frame
from .outcomes import Outcomes, ScoreResult, check_results
from .results import cap_text, describe_exception, normalize_result, output_excerpt
from .sandbox import Sandbox, check, remove_dir

# A worker enforces the timeout itself; the pool gives up on it this much later.
_GRACE_S = 3.0


@dataclass
class _Task:
    task_id: int
    indices: list[int]


@dataclass
class _Worker:
    process: subprocess.Popen
    sock: socket.socket
    reader: FrameReader
    # The worker's own stdout/stderr until it is ready (import-time output, start-up errors).
    log: IO[bytes] | None
    # The worker's temp dir (its call processes' dirs are inside), removed when it ends.
    tmp: str
    started_at: float
    ready: bool = False
    task: _Task | None = None
    deadline: float = math.inf


class VerifierPool:
    """Worker processes that keep one resolved verifier loaded across `score` calls.

    `num_workers=0` scores in the calling process: no start-up cost, but no timeout, no
    sandbox and no protection either. Not thread-safe: one `score` call at a time.
    `sandbox` limits each call (see `sandbox.py`); a limit that this machine cannot enforce is
    a ValueError here.
    """

    def __init__(
        self,
        spec: str,
        style: Style = "auto",
        kwargs: dict[str, Any] | None = None,
        num_workers: int = 1,
        timeout_s: float = 10.0,
        base_dir: str | None = None,
        start_timeout_s: float = 60.0,
        sandbox: Sandbox | None = None,
    ) -> None:
        if type(num_workers) is not int or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        self.sandbox = sandbox or Sandbox()
        if self.sandbox.active and num_workers == 0:
            raise ValueError("a sandbox needs worker processes: num_workers must be >= 1")
        # Resolving here turns a bad spec into a ValueError before any process starts.
        self.verifier = resolve_verifier(spec, style, kwargs, base_dir)
        # How `network: false` is enforced here (None: network allowed).
        self.network_mode = check(self.sandbox) if self.sandbox.active else None
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self._base_dir = base_dir
        self._next_task_id = 0
        self._closed = False
        _sweep_stale_dirs()
        self._slots: list[_Worker | None] = [self._start() for _ in range(num_workers)]
        # Stops the workers if the pool is dropped, or the interpreter exits, without close().
        self._finalizer = weakref.finalize(self, _shutdown, self._slots)

    def score(self, completions: list[str], samples: list[dict]) -> ScoreResult:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
        start = time.monotonic()
        outcomes = Outcomes(len(samples))
        pending = deque(self._split(len(samples)))
        if self._slots:
            self._run(pending, completions, samples, outcomes)
        else:
            for indices in pending:
                self._score_inline(indices, completions, samples, outcomes)
        return outcomes.finish(time.monotonic() - start)

    def close(self) -> None:
        """Stop every worker and everything below it; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _split(self, n: int) -> list[list[int]]:
        if not self.verifier.batched:
            return [[i] for i in range(n)]
        if n == 0:
            return []
        size = math.ceil(n / max(1, min(len(self._slots), n)))
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def _score_inline(
        self, indices: list[int], completions: list[str], samples: list[dict], outcomes: Outcomes
    ) -> None:
        try:
            raw = self.verifier([completions[i] for i in indices], [samples[i] for i in indices])
            outcomes.ok(indices, [normalize_result(r) for r in raw])
        except Exception as e:
            outcomes.fail(indices, "error", describe_exception(e))

    def _run(
        self,
        pending: deque[list[int]],
        completions: list[str],
        samples: list[dict],
        outcomes: Outcomes,
    ) -> None:
        # Workers that failed to start (or died starting). A worker killed from outside is
        # replaced; a verifier that cannot load fails every worker: after as many failures
        # as slots (at least two), the call's remaining samples are errors.
        start_failures: list[str] = []
        while pending or self._busy():
            may_start = len(start_failures) < max(2, len(self._slots))
            if not may_start and all(w is None for w in self._slots):
                while pending:
                    outcomes.fail(pending.popleft(), "error", start_failures[-1])
                return
            self._dispatch(pending, completions, samples, outcomes, may_start)
            live = [w for w in self._slots if w is not None]
            if not live:
                # Every worker was found dead while dispatching: the next pass replaces them.
                continue
            deadlines = [w.deadline for w in live if w.task is not None]
            deadlines += [w.started_at + self.start_timeout_s for w in live if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for sock in wait([w.sock for w in live], timeout=wait_s):
                slot = next(
                    s for s, w in enumerate(self._slots) if w is not None and w.sock is sock
                )
                failure = self._receive(slot, outcomes)
                if failure is not None:
                    start_failures.append(failure)
            now = time.monotonic()
            for slot, worker in enumerate(self._slots):
                if worker is None:
                    continue
                if worker.task is not None and now >= worker.deadline:
                    outcomes.fail(
                        worker.task.indices,
                        "timeout",
                        f"timed out after {self.timeout_s} s (the worker did not answer)",
                    )
                    self._kill(slot)
                elif not worker.ready and now >= worker.started_at + self.start_timeout_s:
                    start_failures.append(
                        f"verifier worker did not start within {self.start_timeout_s} s"
                    )
                    self._kill(slot)

    def _dispatch(
        self,
        pending: deque[list[int]],
        completions: list[str],
        samples: list[dict],
        outcomes: Outcomes,
        may_start: bool,
    ) -> None:
        for slot in range(len(self._slots)):
            if not pending:
                return
            worker = self._slots[slot]
            if worker is None:
                if may_start:
                    self._slots[slot] = self._start()
                continue
            if not worker.ready or worker.task is not None:
                continue
            indices = pending.popleft()
            task = _Task(self._next_task_id, indices)
            self._next_task_id += 1
            message = (
                task.task_id,
                [completions[i] for i in indices],
                [samples[i] for i in indices],
            )
            try:
                payload = pickle.dumps(message)
            except Exception as e:
                outcomes.fail(indices, "error", f"cannot send the sample: {describe_exception(e)}")
                continue
            try:
                send_frame(worker.sock, payload, timeout=self.timeout_s)
            except OSError:
                # The worker died (or stopped reading) while idle; the task waits for its
                # replacement.
                pending.appendleft(indices)
                self._kill(slot)
                continue
            worker.task = task
            worker.deadline = time.monotonic() + self.timeout_s + _GRACE_S

    def _receive(self, slot: int, outcomes: Outcomes) -> str | None:
        """Handle what a worker sent (or its death); returns a start-up failure."""
        worker = self._slots[slot]
        assert worker is not None
        try:
            frames = worker.reader.read()
            for frame in frames:
                failure = self._handle(worker, json.loads(frame), outcomes)
                if failure is not None:
                    self._kill(slot)
                    return failure
        except Exception as e:
            # Anything a worker sends that does not parse is its failure, never the pool's.
            broken = cap_text(f"verifier worker broke the protocol: {describe_exception(e)}")
            if worker.task is not None:
                outcomes.fail(worker.task.indices, "crash", broken)
                worker.task = None
            self._kill(slot)
            return None if worker.ready else broken
        if worker.reader.eof:
            end = time.monotonic() + 1.0
            while not _exited(worker.process.pid) and time.monotonic() < end:
                time.sleep(0.005)
            died = f"verifier worker died ({_status(worker.process.pid)}){_log_tail(worker)}"
            if worker.task is not None:
                outcomes.fail(worker.task.indices, "crash", died)
                worker.task = None
            self._kill(slot)
            return None if worker.ready else died
        return None

    def _handle(self, worker: _Worker, message: Any, outcomes: Outcomes) -> str | None:
        if not worker.ready:
            kind, payload = message
            if kind == "ready":
                worker.ready = True
                if worker.log is not None:
                    worker.log.close()
                    worker.log = None
                return None
            return f"verifier worker failed to start: {cap_text(str(payload))}{_log_tail(worker)}"
        task_id, kind, payload, (output_bytes, excerpt) = message
        task = worker.task
        if task is None or task_id != task.task_id:
            return None
        outcomes.result.output_bytes += int(output_bytes)
        if kind == "ok":
            outcomes.ok(task.indices, check_results(payload, len(task.indices)))
        elif kind in ("error", "crash", "timeout", "limit"):
            text = cap_text(str(payload))
            if excerpt:
                text = cap_text(
                    f"{text} [output: {int(output_bytes)} bytes, ending {str(excerpt)!r}]"
                )
            outcomes.fail(task.indices, kind, text)
        else:
            raise ValueError(f"unknown reply kind {str(kind)[:40]!r}")
        worker.task = None
        worker.deadline = math.inf
        return None

    def _busy(self) -> bool:
        return any(w is not None and w.task is not None for w in self._slots)

    def _start(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        log = tempfile.TemporaryFile()
        tmp = tempfile.mkdtemp(prefix=f"rlkit-verifier-{os.getpid()}-")
        process = subprocess.Popen(
            [sys.executable, "-c", "from rlkit.rewards.worker import main; main()", str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Its own session: no Ctrl-C from the terminal, and one id to find what it started.
            start_new_session=True,
        )
        child_sock.close()
        v = self.verifier
        init = (
            list(sys.path),
            v.spec,
            v.style,
            v.kwargs,
            self._base_dir,
            self.timeout_s,
            self.sandbox.to_dict(),
            self.network_mode,
            tmp,
        )
        worker = _Worker(process, parent_sock, FrameReader(parent_sock), log, tmp, time.monotonic())
        with contextlib.suppress(OSError):
            send_frame(parent_sock, pickle.dumps(init), timeout=self.start_timeout_s)
        return worker

    def _kill(self, slot: int) -> None:
        worker = self._slots[slot]
        self._slots[slot] = None
        if worker is not None:
            _stop(worker, ask=False)


def _status(pid: int) -> str:
    """How a child that has exited ended, without reaping it (its id must stay ours)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        info = None
    if info is None:
        return "exit status unknown"
    if info.si_code == os.CLD_EXITED:
        return f"exit code {info.si_status}"
    try:
        return f"killed by {signal.Signals(info.si_status).name}"
    except ValueError:
        return f"killed by signal {info.si_status}"


def _log_tail(worker: _Worker) -> str:
    if worker.log is None:
        return ""
    try:
        worker.log.seek(0, os.SEEK_END)
        worker.log.seek(max(0, worker.log.tell() - 2048))
        tail = output_excerpt(worker.log.read())
    except OSError:
        return ""
    return f"; its output ended: {tail!r}" if tail else ""


def _exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _stop(worker: _Worker, ask: bool, grace_s: float = 1.0) -> None:
    """End a worker and everything below it.

    Asked (`ask`: the pool sends None) or not (SIGTERM), a live worker kills its tree and exits
    by itself; one that does not within `grace_s` is frozen and killed with its whole tree from
    here. The worker is reaped last, so that its id cannot be reused meanwhile.
    """
    pid = worker.process.pid
    if worker.process.returncode is None:
        if not ask:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
        end = time.monotonic() + grace_s
        while not _exited(pid) and time.monotonic() < end:
            time.sleep(0.005)
        proctree.kill_tree(pid)
        worker.process.wait()
    worker.sock.close()
    if worker.log is not None:
        worker.log.close()
    remove_dir(worker.tmp)


def _sweep_stale_dirs() -> None:
    """Remove the temp dirs of pools whose process is gone.

    A worker removes its dir when it exits, but not when it is SIGKILLed, as Ray does to an
    actor's children when the actor dies. The dirs are named after their pool's process id."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "rlkit-verifier-*-*")):
        pid = os.path.basename(path).split("-")[2]
        try:
            mine = os.stat(path).st_uid == os.geteuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not psutil.pid_exists(int(pid)):
            remove_dir(path)


def _shutdown(slots: list[_Worker | None]) -> None:
    workers = [w for w in slots if w is not None]
    slots[:] = [None] * len(slots)
    for worker in workers:
        try:
            send_frame(worker.sock, pickle.dumps(None), timeout=0.5)
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(worker.process.pid, signal.SIGTERM)
    for worker in workers:
        _stop(worker, ask=True, grace_s=2.0)


def score(
    verifier_spec: str,
    completions: list[str],
    samples: list[dict],
    timeout_s: float = 10.0,
    num_workers: int = 1,
    style: Style = "auto",
    kwargs: dict[str, Any] | None = None,
    base_dir: str | None = None,
    sandbox: Sandbox | None = None,
) -> ScoreResult:
    """One-off scoring; a training loop keeps a `VerifierPool` to pay the start-up once."""
    with VerifierPool(
        verifier_spec, style, kwargs, num_workers, timeout_s, base_dir, sandbox=sandbox
    ) as pool:
        return pool.score(completions, samples)
