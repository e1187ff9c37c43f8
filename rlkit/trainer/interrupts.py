"""Ctrl-C and SIGTERM during `rlkit train`: stop within seconds in every phase, leave nothing.

The first SIGINT or SIGTERM raises KeyboardInterrupt in the driver's main thread (Ray's
`ray.get` and `ray.wait` check for signals while they block, so a wait on an actor is cut
short too), after noting where the run was. The run then shuts Ray down and kills whatever of
its process tree is left (`stop_process_tree`), and the command exits 130 (SIGINT) or 143
(SIGTERM). Two things make that bounded whatever the main thread is doing:

- a listener thread reads the signal numbers from `signal.set_wakeup_fd`, which the
  interpreter writes at once even while the main thread is stuck in a C call; if the process
  is still alive `grace_s` after the first signal, the listener kills the tree and exits;
- a second signal makes the listener kill the tree and exit at once ("stops at once").

`deferred()` holds a first signal back over a few lines that must not be cut in half (a
checkpoint's rename into place); the KeyboardInterrupt is raised when they end.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import psutil

from rlkit.exit_codes import ExitCode

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_NAMES: dict[int, str] = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def exit_code(signum: int) -> int:
    return ExitCode.TERMINATED if signum == signal.SIGTERM else ExitCode.INTERRUPTED


def descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def stop_process_tree(procs: list[psutil.Process], timeout_s: float = 3.0) -> None:
    """SIGKILL whichever of `procs` still run and reap them (ours) or wait until they are gone."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
            alive.append(p)
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=timeout_s)


class StopSignals:
    """SIGINT/SIGTERM handling for one run, installed from the main thread (a context manager).

    `describe` says where the run is ("rollout of stage 0 (rlvr) step 3"), called when the
    first signal arrives; `signum` and `where` keep what it said.
    """

    def __init__(self, describe: Callable[[], str] = lambda: "", grace_s: float = 5.0) -> None:
        self.describe = describe
        self.grace_s = grace_s
        self.signum: int | None = None
        self.where = ""
        self._defer = 0
        self._pending = False
        self._old: dict[int, object] = {}
        self._old_wakeup = -1
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._listener: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._count = 0
        self._closed = False  # the run ended its signal handling: the listener does nothing
        self._lock = threading.Lock()

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only; nothing to install here
        for s in _SIGNALS:
            self._old[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._sockets = (reader, writer)
        self._old_wakeup = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._listener = threading.Thread(target=self._listen, name="rlkit-signals", daemon=True)
        self._listener.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sockets is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for s, handler in self._old.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        # The listener may still be reading a signal the main thread has handled already: from
        # here on it arms nothing, and a deadline it armed is called off.
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
        reader, writer = self._sockets
        writer.close()  # the listener's recv returns b"" and it ends
        if self._listener is not None:
            self._listener.join(timeout=1)
        reader.close()
        self._sockets = None

    def reinstall_term(self) -> None:
        """Take SIGTERM back after a library replaced its handler (ray.init installs one that
        kills Ray's processes and exits 1, skipping the run's own ending)."""
        if self._sockets is not None:
            signal.signal(signal.SIGTERM, self._handle)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A first signal arriving inside is raised when the block ends."""
        self._defer += 1
        try:
            yield
        finally:
            self._defer -= 1
            if self._defer == 0 and self._pending:
                self._pending = False
                raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return _NAMES.get(self.signum or signal.SIGINT, "a signal")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if self._listener is None:
                self._stop_now("a second signal")
            return  # the listener thread handles a second signal
        self.signum = signum
        try:
            self.where = self.describe()
        except Exception:  # a half-built run: say less rather than fail here
            self.where = ""
        if self._defer:
            self._pending = True
            return
        raise KeyboardInterrupt

    def _listen(self) -> None:
        assert self._sockets is not None
        reader = self._sockets[0]
        while True:
            try:
                data = reader.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum not in _SIGNALS:
                    continue
                with self._lock:
                    if self._closed:
                        return
                    self._count += 1
                    if self._count == 1:
                        self._timer = threading.Timer(self.grace_s, self._overdue, (signum,))
                        self._timer.daemon = True
                        self._timer.start()
                        continue
                self._stop_now("a second signal", signum)

    def _overdue(self, signum: int) -> None:
        with self._lock:
            if self._closed:
                return
        self._stop_now(f"clean-up still running {self.grace_s:.0f} s after the signal", signum)

    def _stop_now(self, why: str, signum: int | None = None) -> None:
        """Kill every process of the run (Ray's, the verifiers') and exit, from any thread."""
        code = exit_code(self.signum or signum or signal.SIGINT)
        try:
            sys.stderr.write(
                f"rlkit train: stopping at once ({why}); killing the run's processes\n"
            )
            sys.stderr.flush()
        except Exception:
            pass
        stop_process_tree(descendants(), timeout_s=2.0)
        os._exit(code)
