"""Find and kill every process below a process, including those that called setsid().

On Linux a worker and its call processes make themselves *child subreapers*
(PR_SET_CHILD_SUBREAPER): when a process below them dies, its orphans are re-parented to
them instead of to init, so a double fork + setsid() still leaves the daemon inside their
subtree, where `/proc/<pid>/task/<tid>/children` lists it. Killing "everything below me" is then
a loop: list my descendants, SIGKILL them, reap my own children, until none are left.

Elsewhere (no prctl, no children files) psutil walks the parent links instead; a process whose
ancestors have all died is then out of reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

import psutil

_PR_SET_CHILD_SUBREAPER = 36
_LINUX = sys.platform.startswith("linux")


def prctl(option: int, value: int) -> bool:
    if not _LINUX:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) == 0


def become_subreaper() -> bool:
    return prctl(_PR_SET_CHILD_SUBREAPER, 1)


def children(pid: int) -> list[int]:
    """Direct children of `pid` (zombies included)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    found: list[int] = []
    listed = False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
            listed = True
        except (OSError, ValueError):
            pass
    if listed or (_LINUX and not tids):
        return found
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children(todo.pop()):
            if child not in out:
                out.append(child)
                todo.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, sig)


def kill_descendants(keep: frozenset[int] = frozenset(), deadline_s: float = 3.0) -> int:
    """SIGKILL every process below this one except the subtrees of `keep`; reap them.

    Returns how many processes were killed. Gives up after `deadline_s` (a process stuck in an
    uninterruptible sleep cannot be reaped until it wakes).
    """
    me = os.getpid()
    killed: set[int] = set()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        direct = [p for p in children(me) if p not in keep]
        if not direct:
            break
        for child in direct:
            for pid in [child, *descendants(child)]:
                if pid not in killed:
                    _signal(pid, signal.SIGKILL)
                    killed.add(pid)
        reaped = False
        for child in direct:
            with contextlib.suppress(ChildProcessError):
                reaped |= os.waitpid(child, os.WNOHANG)[0] != 0
        if not reaped:
            time.sleep(0.001)
    return len(killed)


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of `pid` and every process below it, each with its reaped children's."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        total += _cpu_seconds(p)
    return total


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # utime, stime, cutime, cstime, in clock ticks.
        return sum(int(x) for x in fields[11:15]) / _TICK
    except (OSError, IndexError, ValueError):
        pass
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return 0.0


def session_members(sid: int) -> list[int]:
    """Processes whose session id is `sid` (Linux; [] elsewhere)."""
    members = []
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp, session.
        if len(fields) > 3 and int(fields[3]) == sid:
            members.append(pid)
    return members


def kill_below(root: int) -> None:
    """SIGKILL every process below `root`, leaving `root` itself running.

    Each process found is stopped first so that it cannot fork while the tree is walked. The
    order matters when `root` is a subreaper whose own watcher kills its tree once its parent
    dies (a call process): if the caller dies part way, `root` still holds everything left
    (stopped or not) and kills it. Killing `root` first would re-parent its tree to the
    caller, and the caller's death then to init, out of everyone's reach.
    """
    found: list[int] = []
    for _ in range(100):
        new = [p for p in descendants(root) if p not in found]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
            found.append(pid)
    for pid in found:
        _signal(pid, signal.SIGKILL)


def kill_tree(root: int) -> None:
    """SIGKILL `root` (a session leader), everything below it and everything in its session.

    Each process found is stopped first so that it cannot fork while the tree is walked. The
    caller reaps `root` if it is its child; the others are re-parented and reaped elsewhere.
    """
    found: list[int] = []
    todo = [root, *session_members(root)]
    for _ in range(100):
        new = [p for p in todo if p not in found]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
            found.append(pid)
        todo = [d for pid in new for d in descendants(pid)]
    with contextlib.suppress(OSError):
        os.killpg(root, signal.SIGKILL)
    for pid in found:
        _signal(pid, signal.SIGKILL)
