"""Hostile verifier behaviours, one per completion text, and helpers to find what they leave.

`verify` is an rlkit-style verifier: the completion names the behaviour. Every process a
behaviour starts carries MARK (from the environment) in its argv or inherits it in its
environment, so a test can find any survivor, wherever it was re-parented.
"""

from __future__ import annotations

import os
import time

import psutil

MARK_VAR = "RLKIT_HOSTILE_RUN"

VERIFIER = r"""
import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import time

MARK = os.environ["RLKIT_HOSTILE_RUN"]


def sleeper(env=None):
    return subprocess.Popen(
        [sys.executable, "-S", "-c", "import time; time.sleep(600)", MARK],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def fork_sleeper():
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)


def daemon():
    # Double fork + setsid: the classic way out of a process group.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(600)
        os._exit(0)
    os.wait()


def sockets():
    import stat

    found = []
    for fd in range(3, 100):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                found.append(fd)
        except OSError:
            pass
    return found


def frame(payload):
    return len(payload).to_bytes(4, "big") + payload


class BadFloat:
    def __float__(self):
        raise RuntimeError("no float for you")


class BadRepr:
    def __float__(self):
        raise ValueError("nope")

    def __repr__(self):
        return "r" * 5_000_000


def verify(completion, sample):
    c = completion
    if c == "ok":
        return 1.0
    if c == "wrong":
        return {"score": 0.0, "acc": 0.0}
    if c == "fork_sleeper":
        fork_sleeper()
        return 1.0
    if c == "daemon":
        daemon()
        return 1.0
    if c == "popen":
        sleeper()
        sleeper(env={})
        return 1.0
    if c == "flood":
        sys.stdout.write("x" * (12 * 2**20))
        sys.stdout.flush()
        os.write(2, b"\xff\xfe\x00\x1b[2J not utf-8 \xc3\x28" * 1000)
        return 1.0
    if c == "close_stdio":
        for fd in (0, 1, 2):
            os.close(fd)
        return 1.0
    if c == "print_after_close":
        print("still printing", flush=True)
        return 1.0
    if c == "huge_extras":
        return {"score": 1.0, **{f"k{i}": "v" * 100_000 for i in range(200)}}
    if c == "surrogate":
        return {"score": 1.0, "note": "\udcff\x00"}
    if c == "setsid_self":
        # Leaves its worker's session (a second call in the same process is already a leader).
        if os.getsid(0) != os.getpid():
            os.setsid()
        return 1.0
    if c == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return 1.0
    if c == "stdin":
        return 1.0 if sys.stdin.read() == "" else 0.0
    # Errors: the verifier raises.
    if c == "raise":
        raise RuntimeError("verifier failed")
    if c == "raise_huge":
        raise ValueError("E" * (10 * 2**20))
    if c == "sys_exit":
        sys.exit(3)
    if c == "keyboard":
        raise KeyboardInterrupt
    if c == "recursion":
        def f(n):
            return f(n + 1) + 1
        return f(0)
    if c == "input":
        return float(input())
    if c == "print_then_raise":
        print("diagnostic: the checker broke")
        raise RuntimeError("see output")
    # Crashes: the call process dies.
    if c == "os_exit":
        os._exit(7)
    if c == "segfault":
        ctypes.string_at(0)
    if c == "abort":
        os.abort()
    if c == "kill_self":
        os.kill(os.getpid(), signal.SIGKILL)
    if c == "crash_after_fork":
        sleeper()
        fork_sleeper()
        daemon()
        os._exit(1)
    if c == "segfault_after_fork":
        sleeper()
        daemon()
        ctypes.string_at(0)
    if c == "flood_then_crash":
        os.write(1, b"y" * (12 * 2**20) + b"\xff\xfe last words \x00")
        os._exit(9)
    if c == "close_all_fds":
        os.closerange(0, 4096)
        return 1.0
    if c == "garbage_to_fds":
        for fd in range(3, 100):
            try:
                os.write(fd, b"\xff\xff\xff\xff" + b"junk" * 100)
            except OSError:
                pass
        return 1.0
    if c == "deep_json_frame":
        for fd in sockets():
            os.write(fd, frame(b"[" * 200_000))
        return 1.0
    if c == "forged_reply":
        # A reply for a call that is not this one is ignored: this call's real answer counts.
        for fd in sockets():
            os.write(fd, frame(b'[123456789, "ok", [[1.0, {}, null]]]'))
        return 0.0
    # Timeouts.
    if c == "sleep":
        time.sleep(1e9)
    if c == "spin":
        while True:
            pass
    if c == "pipe_block":
        r, w = os.pipe()
        os.read(r, 1)
    if c == "term_ignored_hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(1e9)
    if c == "forks_then_hang":
        for _ in range(5):
            fork_sleeper()
        daemon()
        sleeper()
        time.sleep(1e9)
    # Invalid results.
    if c == "none":
        return None
    if c == "nan":
        return math.nan
    if c == "inf":
        return -math.inf
    if c == "text":
        return "1.0"
    if c == "bytes":
        return b"1"
    if c == "huge_list":
        return [1.0] * 1_000_000
    if c == "bad_float":
        return BadFloat()
    if c == "bad_repr":
        return BadRepr()
    if c == "no_score":
        return {"acc": 1.0}
    if c == "nan_in_dict":
        return {"score": math.nan}
    if c == "complex":
        return 1j
    # Against the worker itself.
    if c == "kill_parent":
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(5)
        return 1.0
    if c == "stop_parent":
        os.kill(os.getppid(), signal.SIGSTOP)
        return 1.0
    # Sandbox limits.
    if c == "alloc_8g":
        return float(len(bytearray(8 * 2**30)) > 0)
    if c == "cpu_child":
        subprocess.run([sys.executable, "-S", "-c", "while True: pass", MARK])
        return 1.0
    if c == "network":
        socket.create_connection(("10.255.255.1", 80), timeout=0.5)
        return 1.0
    if c == "write_outside":
        with open(sample["outside"], "w") as f:
            f.write("escaped")
        return 1.0
    if c == "write_tmp":
        with open("scratch.txt", "w") as f:
            f.write("fine")
        return {"score": 1.0, "cwd": os.getcwd()}
    # Probes of what the sandbox changed.
    if c == "rlimit_as":
        import resource

        child = subprocess.run(
            [sys.executable, "-S", "-c", "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"],
            capture_output=True, text=True,
        )
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        return {"score": 1.0, "soft": float(soft), "child": float(child.stdout)}
    if c == "interfaces":
        return {"score": 1.0, "names": ",".join(name for _, name in socket.if_nameindex())}
    if c == "loopback":
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname(), timeout=1):
                return 1.0
    if c == "where":
        import tempfile

        with open("scratch.txt", "w") as f:
            f.write("fine")
        return {"score": 1.0, "cwd": os.getcwd(), "tmp": tempfile.gettempdir(), "home": os.environ.get("HOME")}
    if c == "child_write_outside":
        done = subprocess.run(["sh", "-c", f"echo escaped > {sample['outside']}"], stderr=subprocess.DEVNULL)
        return {"score": 1.0, "code": float(done.returncode)}
    if c == "spin_cpu":
        while True:
            pass
    raise AssertionError(f"unknown behaviour {c!r}")


def batch(prompts, completions, **kwargs):
    if "sleep" in completions:
        time.sleep(1e9)
    if "os_exit" in completions:
        os._exit(2)
    if "huge_list" in completions:
        return [1.0] * 1_000_000
    return [1.0 if c == "ok" else 0.0 for c in completions]
"""


def marked(mark: str) -> list[psutil.Process]:
    """Processes other than this one whose argv or environment carries `mark`, and this one's
    children (a zombie's argv and environment are empty: an unreaped worker is found here)."""
    found = psutil.Process().children(recursive=True)
    for p in psutil.process_iter(["cmdline"]):
        if p.pid == os.getpid() or p in found:
            continue
        try:
            if any(mark in a for a in p.info["cmdline"] or ()):
                found.append(p)
            elif p.environ().get(MARK_VAR) == mark:
                found.append(p)
        except psutil.Error:
            continue
    return found


def survivors(mark: str, wait_s: float = 15.0) -> tuple[list[str], list[str]]:
    """(live, zombie) processes carrying `mark`, after giving the dying up to `wait_s` seconds (a loaded 2-core machine can take several to schedule a dying tree's last processes)."""
    end = time.monotonic() + wait_s
    while True:
        live, zombies = [], []
        for p in marked(mark):
            try:
                status = p.status()
                name = f"{p.pid} {status} {' '.join(p.cmdline())[:80]}"
            except psutil.Error:
                continue
            (zombies if status == psutil.STATUS_ZOMBIE else live).append(name)
        if (not live and not zombies) or time.monotonic() > end:
            return live, zombies
        time.sleep(0.05)
