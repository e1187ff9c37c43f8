"""Fault injection at named points, for the fault-tolerance tests (off unless RLKIT_FAULTS is set).

The tests of kill-and-resume, Ctrl-C and dead workers need a process to die, hang or be
interrupted at an exact moment of a real run (a checkpoint half written, a rollout in flight),
which polling from outside cannot hit reliably on a busy machine. The driver and the actors
call `point(name, step)` at those moments; nothing happens unless the environment says so:

    RLKIT_FAULTS="name[@step]:action[,...]"    RLKIT_FAULTS_DIR=/some/dir

Actions: `kill` (SIGKILL this process), `stall` (sleep ten minutes: a phase that takes long),
`mark` (only record that the point was reached). Each fault fires once per RLKIT_FAULTS_DIR:
it first creates `<dir>/<name>[@step].fired` (exclusively), so a restarted process that reaches
the same point again goes on, and the test learns that the point was reached. The points are
listed in docs/ARCHITECTURE.md ("Fault tolerance").
"""

from __future__ import annotations

import os
import signal
import time

ENV = "RLKIT_FAULTS"
DIR_ENV = "RLKIT_FAULTS_DIR"
ACTIONS = ("kill", "stall", "mark")


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        where, _, action = entry.rpartition(":")
        if not where or action not in ACTIONS:
            raise ValueError(f"{ENV}: {entry!r} is not name[@step]:{'|'.join(ACTIONS)}")
        out[where] = action
    return out


def point(name: str, step: int | None = None) -> str | None:
    """The action of the fault at this point if one fires now (after doing it), else None."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    faults = _parse(spec)
    # A fault named without a step fires the first time the point is reached.
    where = f"{name}@{step}" if step is not None and f"{name}@{step}" in faults else name
    action = faults.get(where)
    if action is None:
        return None
    try:
        # The marker is created before acting: a killed process leaves it behind.
        fd = os.open(
            os.path.join(os.environ[DIR_ENV], where + ".fired"),
            os.O_CREAT | os.O_EXCL | os.O_WRONLY,
        )
    except FileExistsError:
        return None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stall":
        time.sleep(600)
    return action
