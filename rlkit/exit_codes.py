"""The `rlkit` command's exit statuses (README, "Exit codes")."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    # Something failed while running: a worker died, memory ran out, a bug.
    FAILURE = 1
    # The command line, the recipe or the data is wrong; said in one line naming where.
    USAGE = 2
    # Stopped by Ctrl-C (SIGINT): 128 + 2, as a shell reports it.
    INTERRUPTED = 130
