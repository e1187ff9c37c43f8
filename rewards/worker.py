"""The verifier worker: one per pool slot, parent of the processes that call the verifier.

The pool starts `python -c "from rlkit.rewards.worker import main; main()" FD` in a new session:
a fresh interpreter that imports only rlkit.rewards and the user's module (multiprocessing's
spawn would also re-run the parent's `__main__`, which in Ray or the rlkit CLI imports torch
and Ray in every worker).

The worker imports the verifier once, then forks a call process that calls it
(`call_process.py`): a fresh one per call when a sandbox limit is set, else one that serves call
after call until it fails. The worker times each call, drains and caps its stdout/stderr, tells
a crash (the call process died) from a timeout, kills what a failed call left behind (it is a
child subreaper, so setsid() daemons stay below it), and, when the pool closes or dies (its
socket reaches EOF) or sends SIGTERM, kills everything below it and exits.

Protocol with the pool, in `frames.py` frames: the pool sends a pickled
`(sys_path, spec, style, kwargs, base_dir, timeout_s, sandbox, network, tmp)`, then
`(task_id, completions, samples)` per task, or None to stop. The worker answers in JSON:
`["ready", null]` or `["init_error", text]`, then `[task_id, kind, payload, output]` per task,
where kind is ok (payload: `[score, extras, reason]` per sample), error, crash, timeout or limit
(payload: text), and output is `[bytes written, excerpt of the last ones]`.
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import select
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import call_process, proctree
from .adapters import BatchVerifier, resolve_verifier
from .frames import FrameReader, recv_frame, send_frame
from .results import describe_exception, output_excerpt
from .sandbox import Sandbox, remove_dir

# How much of a call's output is kept to quote from (its total size is counted, not kept).
_TAIL_BYTES = 4096
# At most this much output is read per wake-up, so that deadlines are checked in time.
_DRAIN_BYTES = 16 * 2**20
# How often a call's CPU time is measured (sandbox.cpu_seconds), or its exit polled without pidfd.
_POLL_S = 0.05


class _Stop(BaseException):
    """SIGTERM, or the pool closed the socket: kill everything below and exit."""


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    proctree.become_subreaper()
    fd = int(sys.argv[1])
    os.set_inheritable(fd, False)
    pool = socket.socket(fileno=fd)
    code = 0
    worker: Worker | None = None
    try:
        init = pickle.loads(recv_frame(pool))
        worker = Worker(pool, *init)
        worker.run()
    except (_Stop, EOFError, OSError):
        pass
    except BaseException:
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if worker is not None:
            worker.cleanup()
        proctree.kill_descendants()
    os._exit(code)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop()


class _Output:
    """A call process's stdout+stderr: drained as it comes, counted, the last bytes kept."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.total = 0
        self.tail = b""
        self.closed = False

    def drain(self) -> None:
        budget = 0 if self.closed else _DRAIN_BYTES
        while budget > 0:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            if not chunk:
                return
            self.total += len(chunk)
            self.tail = (self.tail + chunk)[-_TAIL_BYTES:]
            budget -= len(chunk)

    def take(self) -> list[Any]:
        self.drain()
        taken = [self.total, output_excerpt(self.tail) if self.total else ""]
        self.total, self.tail = 0, b""
        return taken

    def close(self) -> None:
        self.drain()
        self.closed = True
        os.close(self.fd)


@dataclass
class _CallProcess:
    pid: int
    sock: socket.socket
    reader: FrameReader
    output: _Output
    pidfd: int | None
    tmp: str
    lifeline: int


class Worker:
    def __init__(
        self,
        pool: socket.socket,
        sys_path: list[str],
        spec: str,
        style: str,
        kwargs: dict[str, Any],
        base_dir: str | None,
        timeout_s: float,
        sandbox: dict[str, Any],
        network: str | None,
        tmp: str,
    ) -> None:
        # The parent's path, so that `package.module:function` imports here as it did there.
        sys.path[:] = list(dict.fromkeys([*sys_path, *sys.path]))
        self.pool = pool
        self.spec, self.style, self.kwargs, self.base_dir = spec, style, kwargs, base_dir
        self.timeout_s = timeout_s
        self.sandbox = Sandbox(**sandbox)
        self.network = network
        # Made by the pool, which removes it even if this process is killed.
        self.root_tmp = tmp
        self.verifier: BatchVerifier | None = None
        self.calls: _CallProcess | None = None
        self.call_id = 0
        # Processes the verifier's import started (a server it talks to): kept until the end.
        self.base: frozenset[int] = frozenset()

    def run(self) -> None:
        error = self._import()
        if error is not None:
            self._send(["init_error", error])
            return
        self.base = frozenset(proctree.children(os.getpid()))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
        # Call processes are forks: frozen objects are not touched by their collector, so
        # fewer of the parent's pages get copied.
        gc.freeze()
        self._send(["ready", None])
        while True:
            message = pickle.loads(recv_frame(self.pool))
            if message is None:
                return
            task_id, completions, samples = message
            kind, payload, output = self._call(completions, samples)
            self._send([task_id, kind, payload, output])

    def cleanup(self) -> None:
        if self.calls is not None:
            self._end_calls()
        proctree.kill_descendants()
        remove_dir(self.root_tmp)

    def _send(self, message: list[Any]) -> None:
        send_frame(self.pool, json.dumps(message).encode())

    def _import(self) -> str | None:
        """Resolve the verifier; if the pool goes away meanwhile, exit (imports can hang)."""
        stop_r, stop_w = os.pipe()

        def watch() -> None:
            pool_fd = self.pool.fileno()
            ready, _, _ = select.select([pool_fd, stop_r], [], [])
            if pool_fd in ready:
                proctree.kill_descendants()
                os._exit(0)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            self.verifier = resolve_verifier(self.spec, self.style, self.kwargs, self.base_dir)  # type: ignore[arg-type]
            return None
        except _Stop:
            raise
        except BaseException as e:
            return describe_exception(e)
        finally:
            os.write(stop_w, b"x")
            watcher.join()
            os.close(stop_r)
            os.close(stop_w)

    def _fork(self) -> _CallProcess:
        assert self.verifier is not None
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        # Never written: its EOF tells the call process that this worker died.
        life_r, life_w = os.pipe()
        tmp = tempfile.mkdtemp(dir=self.root_tmp)
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                os.close(out_r)
                os.close(life_w)
                self.pool.close()
                call_process.serve(
                    theirs,
                    out_w,
                    life_r,
                    self.verifier,
                    self.sandbox,
                    self.network,
                    tmp,
                    os.getppid(),
                )
            finally:
                os._exit(1)
        theirs.close()
        os.close(out_w)
        os.close(life_r)
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        return _CallProcess(pid, ours, FrameReader(ours), _Output(out_r), pidfd, tmp, life_w)

    def _call(self, completions: list[str], samples: list[dict]) -> tuple[str, Any, list[Any]]:
        self.call_id += 1
        task = pickle.dumps((self.call_id, completions, samples))
        calls = self._start_call(task)
        if calls is None:
            return "crash", "the call process died before taking the call", [0, ""]
        deadline = time.monotonic() + self.timeout_s
        cpu_limit = self.sandbox.cpu_seconds
        cpu_start = proctree.tree_cpu_seconds(calls.pid) if cpu_limit is not None else 0.0
        reply: list[Any] | None = None
        failure: tuple[str, str] | None = None
        while reply is None and failure is None:
            left = deadline - time.monotonic()
            if left <= 0:
                failure = ("timeout", f"timed out after {self.timeout_s} s")
                break
            fds: list[Any] = [calls.sock, calls.output.fd, self.pool]
            if calls.pidfd is not None:
                fds.append(calls.pidfd)
            if calls.pidfd is None or cpu_limit is not None:
                left = min(left, _POLL_S)
            ready, _, _ = select.select(fds, [], [], left)
            if self.pool in ready:
                raise _Stop()
            if calls.output.fd in ready:
                calls.output.drain()
            try:
                reply = self._reply(calls)
            except Exception as e:
                broken = describe_exception(e)
                failure = ("crash", f"the call process broke the protocol: {broken}")
                break
            if reply is None and (calls.reader.eof or self._exited(calls, ready)):
                failure = ("crash", "")
            elif reply is None and cpu_limit is not None:
                used = proctree.tree_cpu_seconds(calls.pid) - cpu_start
                if used > cpu_limit:
                    failure = (
                        "limit",
                        f"CPU time over sandbox.cpu_seconds={cpu_limit} ({used:.1f} s)",
                    )
        if reply is not None and reply[1] in ("setup_error", "limit"):
            # A call process at its memory limit (or unconfined) is not used again.
            failure = ("error" if reply[1] == "setup_error" else "limit", str(reply[2]))
        if failure is not None:
            kind, message = self._end_calls(failure)
            return kind, message, calls.output.take()
        assert reply is not None
        return reply[1], reply[2], calls.output.take()

    def _start_call(self, task: bytes) -> _CallProcess | None:
        for _ in range(2):
            if self.calls is None:
                self.calls = self._fork()
            calls = self.calls
            calls.output.take()
            try:
                send_frame(calls.sock, task, timeout=self.timeout_s)
                return calls
            except OSError:
                # It died while idle (or stopped reading): replace it, once.
                self._end_calls()
        return None

    def _reply(self, calls: _CallProcess) -> list[Any] | None:
        for frame in calls.reader.read():
            message = json.loads(frame)
            if not (isinstance(message, list) and len(message) == 3):
                raise ValueError("a reply that is not [call_id, kind, payload]")
            if message[1] == "setup_error" or message[0] == self.call_id:
                if message[1] not in ("ok", "error", "limit", "setup_error"):
                    raise ValueError(f"unknown reply kind {str(message[1])[:40]!r}")
                return message
        return None

    def _exited(self, calls: _CallProcess, ready: list[Any]) -> bool:
        if calls.pidfd is not None:
            return calls.pidfd in ready
        try:
            return os.waitid(os.P_PID, calls.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _end_calls(self, failure: tuple[str, str] | None = None) -> tuple[str, str]:
        """Kill the call process and all it left behind; name its death for a failed call."""
        calls = self.calls
        assert calls is not None
        self.calls = None
        # What the call started first, while the call process still holds it: if this worker
        # is killed part way (Ray kills an actor's children too), the call process's lifeline
        # still fires and kills the rest. The call process first would leave its tree to this
        # worker, and this worker's death would leave it to init.
        proctree.kill_below(calls.pid)
        try:
            os.kill(calls.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(calls.pid, 0)
        proctree.kill_descendants(keep=self.base)
        calls.output.close()
        calls.sock.close()
        os.close(calls.lifeline)
        if calls.pidfd is not None:
            os.close(calls.pidfd)
        remove_dir(calls.tmp)
        if failure is None or failure[1]:
            return failure or ("", "")
        return self._death(status)

    def _death(self, status: int) -> tuple[str, str]:
        if os.WIFSIGNALED(status):
            try:
                name = signal.Signals(os.WTERMSIG(status)).name
            except ValueError:
                name = f"signal {os.WTERMSIG(status)}"
            return "crash", f"the call process was killed by {name}"
        code = os.WEXITSTATUS(status)
        return "crash", f"the call process exited (exit code {code}) without a result"
