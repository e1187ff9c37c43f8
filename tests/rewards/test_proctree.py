"""rlkit.rewards.proctree.kill_below: the tree below a process dies, the process itself keeps
running (a call process must outlive its tree's killing: if the worker killing it dies part
way, the call process's own watcher finishes the job; killed first, its tree would escape)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from rlkit.rewards import proctree

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="child subreapers are Linux's"
)

ROOT = textwrap.dedent("""
    import os, sys, time
    from rlkit.rewards import proctree
    proctree.become_subreaper()
    for _ in range(3):
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(600)
            time.sleep(600)
    if os.fork() == 0:  # a daemon: double fork + setsid, re-parented to this subreaper
        os.setsid()
        if os.fork() == 0:
            time.sleep(600)
        os._exit(0)
    print("ready", flush=True)
    time.sleep(600)
""")


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_below_kills_the_whole_tree_and_leaves_its_root_running():
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout is not None and root.stdout.readline().strip() == "ready"
        end = time.monotonic() + 10
        below = [p for p in proctree.descendants(root.pid) if not _dead(p)]
        while len(below) < 7 and time.monotonic() < end:  # 3 children, 3 grandchildren, daemon
            time.sleep(0.02)
            below = [p for p in proctree.descendants(root.pid) if not _dead(p)]
        assert len(below) >= 7, below
        proctree.kill_below(root.pid)
        end = time.monotonic() + 10
        while not all(_dead(p) for p in below) and time.monotonic() < end:
            time.sleep(0.02)
        assert all(_dead(p) for p in below), [p for p in below if not _dead(p)]
        assert root.poll() is None and not _dead(root.pid)
    finally:
        root.kill()
        root.wait()
