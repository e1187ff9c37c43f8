"""The `rlkit` command's exit statuses (README, "Exit codes"), and the two run-ending errors
that carry their own: a run that failed (`RunFailed`) and a run that was stopped
(`RunInterrupted`)."""

from __future__ import annotations

import enum
import signal


class ExitCode(enum.IntEnum):
    OK = 0
    # Something failed while running: a worker died, memory ran out, a bug.
    FAILURE = 1
    # The command line, the recipe or the data is wrong; said in one line naming where.
    USAGE = 2
    # Stopped by Ctrl-C (SIGINT): 128 + 2, as a shell reports it.
    INTERRUPTED = 130
    # Stopped by SIGTERM (kill, a scheduler's time limit): 128 + 15.
    TERMINATED = 143


class RunFailed(RuntimeError):
    """A run ended by a failure the message explains in full (a worker process died, the
    weights became non-finite): printed as one line, exit status 1, no traceback hint."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal; the text says where it stopped and how to continue."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.TERMINATED if self.signum == signal.SIGTERM else ExitCode.INTERRUPTED
