"""Score completions with a verifier in worker processes, each call under a timeout.

A verifier that raises, hangs, or returns no number gives reward 0.0 for its sample(s) and is
counted; scoring never raises over it. A worker stuck past the timeout is killed (SIGKILL) and
replaced, so a verifier caught in `time.sleep(1e9)` or `while True: pass` costs one timeout,
not the run. Per-sample styles (rlkit, verl) get one call, hence one timeout, per sample; a TRL
batch function gets one call per chunk (one chunk per worker) and the timeout covers that call.

Workers are fresh interpreters (`subprocess`: fork+exec, safe when the parent holds threads)
that import only rlkit.rewards and the verifier; `worker.py` has the protocol.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from .adapters import Style, resolve_verifier
from .worker import Result, normalize_result


@dataclass
class ScoreResult:
    scores: list[float]
    # Per sample: the verifier's extra dict fields (numbers as floats, strings kept).
    extras: list[dict[str, Any]]
    n_errors: int = 0
    n_timeouts: int = 0
    n_invalid: int = 0
    first_error: str | None = None
    # score_mean, error_count, timeout_count, invalid_count, time_s, and `<extra>_mean` for each
    # numeric extra field (averaged over the samples that returned it).
    metrics: dict[str, float] = field(default_factory=dict)


class _Outcomes:
    def __init__(self, n: int) -> None:
        self.result = ScoreResult(scores=[0.0] * n, extras=[{} for _ in range(n)])
        # The failure of the lowest sample index, whatever order the workers finish in.
        self._first: tuple[int, str] | None = None

    def ok(self, indices: list[int], results: list[Result]) -> None:
        for i, (value, extras, reason) in zip(indices, results, strict=True):
            if value is None:
                self.result.n_invalid += 1
                self._note(i, f"invalid result: {reason}")
            else:
                self.result.scores[i] = value
                self.result.extras[i] = extras

    def error(self, indices: list[int], message: str) -> None:
        self.result.n_errors += len(indices)
        self._note(indices[0], message)

    def timeout(self, indices: list[int], timeout_s: float) -> None:
        self.result.n_timeouts += len(indices)
        self._note(indices[0], f"timed out after {timeout_s} s")

    def _note(self, index: int, message: str) -> None:
        if self._first is None or index < self._first[0]:
            self._first = (index, message)

    def finish(self, elapsed_s: float) -> ScoreResult:
        r = self.result
        if self._first is not None:
            r.first_error = f"sample {self._first[0]}: {self._first[1]}"
        n = len(r.scores)
        r.metrics = {
            "score_mean": sum(r.scores) / n if n else 0.0,
            "error_count": float(r.n_errors),
            "timeout_count": float(r.n_timeouts),
            "invalid_count": float(r.n_invalid),
            "time_s": elapsed_s,
        }
        numeric: dict[str, list[float]] = {}
        for extras in r.extras:
            for key, value in extras.items():
                if isinstance(value, float):
                    numeric.setdefault(key, []).append(value)
        for key, values in numeric.items():
            r.metrics[f"{key}_mean"] = sum(values) / len(values)
        return r


@dataclass
class _Task:
    task_id: int
    indices: list[int]


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    started_at: float
    ready: bool = False
    task: _Task | None = None
    deadline: float = math.inf


class VerifierPool:
    """Worker processes that keep one resolved verifier loaded across `score` calls.

    `num_workers=0` scores in the calling process: no start-up cost, but no timeout either.
    Not thread-safe: one `score` call at a time.
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
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        # Resolving here turns a bad spec into a ValueError before any process starts.
        self.verifier = resolve_verifier(spec, style, kwargs, base_dir)
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self._base_dir = base_dir
        self._next_task_id = 0
        self._closed = False
        self._slots: list[_Worker | None] = [self._start() for _ in range(num_workers)]
        # Kills the workers if the pool is dropped, or the interpreter exits, without close().
        self._finalizer = weakref.finalize(self, _kill_all, self._slots)

    def score(self, completions: list[str], samples: list[dict]) -> ScoreResult:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
        start = time.monotonic()
        outcomes = _Outcomes(len(samples))
        pending = deque(self._split(len(samples)))
        if self._slots:
            self._run(pending, completions, samples, outcomes)
        else:
            for indices in pending:
                self._score_inline(indices, completions, samples, outcomes)
        return outcomes.finish(time.monotonic() - start)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._slots:
            if worker is not None:
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
        for slot, worker in enumerate(self._slots):
            if worker is not None:
                try:
                    worker.process.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
                self._kill(slot)

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
        self, indices: list[int], completions: list[str], samples: list[dict], outcomes: _Outcomes
    ) -> None:
        try:
            raw = self.verifier([completions[i] for i in indices], [samples[i] for i in indices])
            outcomes.ok(indices, [normalize_result(r) for r in raw])
        except Exception as e:
            outcomes.error(indices, f"{type(e).__name__}: {e}")

    def _run(
        self,
        pending: deque[list[int]],
        completions: list[str],
        samples: list[dict],
        outcomes: _Outcomes,
    ) -> None:
        start_failure: str | None = None
        while pending or self._busy():
            if start_failure is not None:
                while pending:
                    outcomes.error(pending.popleft(), start_failure)
                if not self._busy():
                    return
            self._dispatch(pending, completions, samples, may_start=start_failure is None)
            live = [w for w in self._slots if w is not None]
            deadlines = [w.deadline for w in live if w.task is not None]
            deadlines += [w.started_at + self.start_timeout_s for w in live if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for conn in wait([w.conn for w in live], timeout=wait_s):
                slot = next(
                    s for s, w in enumerate(self._slots) if w is not None and w.conn is conn
                )
                start_failure = self._receive(slot, outcomes) or start_failure
            now = time.monotonic()
            for slot, worker in enumerate(self._slots):
                if worker is None:
                    continue
                if worker.task is not None and now >= worker.deadline:
                    outcomes.timeout(worker.task.indices, self.timeout_s)
                    self._kill(slot)
                elif not worker.ready and now >= worker.started_at + self.start_timeout_s:
                    start_failure = f"verifier worker did not start within {self.start_timeout_s} s"
                    self._kill(slot)

    def _dispatch(
        self,
        pending: deque[list[int]],
        completions: list[str],
        samples: list[dict],
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
            try:
                worker.conn.send(
                    (task.task_id, [completions[i] for i in indices], [samples[i] for i in indices])
                )
            except OSError:
                # The worker died while idle; the task waits for its replacement.
                pending.appendleft(indices)
                self._kill(slot)
                continue
            worker.task = task
            worker.deadline = time.monotonic() + self.timeout_s

    def _receive(self, slot: int, outcomes: _Outcomes) -> str | None:
        """Handle one message from (or the death of) a worker; returns a start-up failure."""
        worker = self._slots[slot]
        assert worker is not None
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            try:
                code = worker.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                code = None
            died = f"verifier worker died (exit code {code})"
            if worker.task is not None:
                outcomes.error(worker.task.indices, died)
            self._kill(slot)
            return None if worker.ready else died
        if not worker.ready:
            kind, payload = message
            if kind == "ready":
                worker.ready = True
                return None
            self._kill(slot)
            return f"verifier worker failed to start: {payload}"
        task_id, status, payload = message
        if worker.task is None or task_id != worker.task.task_id:
            return None
        if status == "ok":
            outcomes.ok(worker.task.indices, payload)
        else:
            outcomes.error(worker.task.indices, payload)
        worker.task = None
        worker.deadline = math.inf
        return None

    def _busy(self) -> bool:
        return any(w is not None and w.task is not None for w in self._slots)

    def _start(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        process = subprocess.Popen(
            [sys.executable, "-c", "from rlkit.rewards.worker import main; main()", str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
        )
        child_sock.close()
        conn = Connection(parent_sock.detach())
        v = self.verifier
        conn.send((list(sys.path), v.spec, v.style, v.kwargs, self._base_dir))
        return _Worker(process=process, conn=conn, started_at=time.monotonic())

    def _kill(self, slot: int) -> None:
        worker = self._slots[slot]
        self._slots[slot] = None
        if worker is not None:
            _kill_worker(worker)


def _kill_worker(worker: _Worker) -> None:
    if worker.process.poll() is None:
        worker.process.kill()
    try:
        worker.process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass
    worker.conn.close()


def _kill_all(slots: list[_Worker | None]) -> None:
    for worker in slots:
        if worker is not None and not worker.conn.closed:
            _kill_worker(worker)


def score(
    verifier_spec: str,
    completions: list[str],
    samples: list[dict],
    timeout_s: float = 10.0,
    num_workers: int = 1,
    style: Style = "auto",
    kwargs: dict[str, Any] | None = None,
    base_dir: str | None = None,
) -> ScoreResult:
    """One-off scoring; a training loop keeps a `VerifierPool` to pay the start-up once."""
    with VerifierPool(verifier_spec, style, kwargs, num_workers, timeout_s, base_dir) as pool:
        return pool.score(completions, samples)
