"""The process that calls the verifier: a fork of its worker, confined by the sandbox.

It reads `(call_id, completions, samples)` frames (pickled by its worker) and answers each with a
JSON frame `[call_id, kind, payload]`: kind "ok" with one `normalize_result` per sample, "error"
with the exception's text, "limit" for a MemoryError under `sandbox.memory_mb`; a process that
cannot confine itself answers `[0, "setup_error", text]`. Before answering it kills whatever the
call left running: it is a child subreaper, so even a daemon that called setsid() is below it.
Its stdout and stderr are a pipe that the worker drains; stdin is /dev/null. A thread waits on a
lifeline pipe from the worker and, when the worker dies, kills the tree and exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
from typing import Any, NoReturn

from . import proctree
from .adapters import BatchVerifier
from .frames import recv_frame, send_frame
from .results import describe_exception, normalize_result
from .sandbox import Sandbox, confine


def serve(
    sock: socket.socket,
    output_fd: int,
    lifeline: int,
    verifier: BatchVerifier,
    sandbox: Sandbox,
    network: str | None,
    tmp: str,
    worker_pid: int,
) -> NoReturn:
    """Serve calls until the worker closes the socket, or dies."""
    code = 0
    try:
        stdio = _setup(output_fd, lifeline, sandbox, network, tmp, worker_pid)
    except BaseException as e:
        _send(sock, [0, "setup_error", f"sandbox setup failed: {describe_exception(e)}"])
        os._exit(1)
    try:
        while True:
            try:
                call_id, completions, samples = pickle.loads(recv_frame(sock))
            except EOFError:
                break
            kind, payload = _call(verifier, completions, samples, sandbox)
            proctree.kill_descendants()
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            # A call that closed or redirected fds 0-2 does not change the next call's.
            for fd, saved in enumerate(stdio):
                os.dup2(saved, fd)
            _send(sock, [call_id, kind, payload])
    except BaseException:
        code = 1
    _exit(code)


def _exit(code: int) -> NoReturn:
    proctree.kill_descendants()
    os._exit(code)


def _setup(
    output_fd: int,
    lifeline: int,
    sandbox: Sandbox,
    network: str | None,
    tmp: str,
    worker_pid: int,
) -> tuple[int, int, int]:
    """Returns copies of the new fds 0, 1 and 2 (numbered from 100, out of a verifier's way)."""
    # The worker's handlers (SIGTERM raises its stop exception) are not this process's.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    proctree.become_subreaper()
    if os.getppid() != worker_pid:
        os._exit(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(devnull)
    os.close(output_fd)
    saved_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 100)
    saved_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 100)
    os.environ["TMPDIR"] = tmp
    tempfile.tempdir = tmp
    if sandbox.active:
        # Before any thread starts: a user namespace needs a single-threaded process.
        confine(sandbox, network, tmp)
    threading.Thread(target=_watch_worker, args=(lifeline,), daemon=True).start()
    return saved_in, saved_out, saved_out


def _watch_worker(lifeline: int) -> None:
    """When the worker dies, even by SIGKILL (Ray kills an actor's children so), kill this
    process's tree and exit: as a subreaper it still holds all the call started.

    Not PR_SET_PDEATHSIG: a SIGKILL would kill this process but orphan its tree, and a
    catchable signal would wait for the verifier's code. This thread runs whenever the
    verifier releases the GIL (Python code, sleeps, I/O)."""
    while True:
        try:
            if not os.read(lifeline, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    _exit(1)


def _call(
    verifier: BatchVerifier, completions: list[str], samples: list[dict], sandbox: Sandbox
) -> tuple[str, Any]:
    try:
        return "ok", [list(normalize_result(raw)) for raw in verifier(completions, samples)]
    except MemoryError as e:
        if sandbox.memory_mb is not None:
            return "limit", f"MemoryError: over sandbox.memory_mb={sandbox.memory_mb}"
        return "error", describe_exception(e)
    except BaseException as e:  # noqa: B036  # a user's sys.exit() is an error of that call
        return "error", describe_exception(e)


def _send(sock: socket.socket, message: list[Any]) -> None:
    send_frame(sock, json.dumps(message).encode())
