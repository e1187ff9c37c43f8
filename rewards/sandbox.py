"""Optional limits on each verifier call: memory, CPU time, network, where it may write.

Calls run in a call process (a fork of their worker, made after the verifier was imported, and
used call after call until one fails), which confines itself once before its first call; what a
call starts inherits the confinement. What each key enforces, on Linux:

- `memory_mb`: RLIMIT_AS (address space, soft = hard) of the call process and of each process it
  starts, each counted alone; the call process's count includes the verifier's imports. Python
  raises MemoryError: a call that ends in it counts as a limit, and its process is replaced.
- `cpu_seconds`: the CPU time of one call: the call process's, plus that of every process below
  it (with their reaped children's), measured by the worker every 50 ms; over it, the call's
  whole tree is killed and the call counts as a limit. (Not RLIMIT_CPU: that counts each
  process alone, over its whole life, and a forked child starts again from zero.)
- `network: false`: the call process enters a new network namespace (only its own loopback,
  which is brought up); unprivileged users get it through a user namespace. Where neither is
  allowed but Landlock ABI >= 4 is, TCP connect and bind are denied instead (mode
  "landlock-tcp": UDP is not blocked). Otherwise the pool refuses to start.
- `writable_tmp_only: true`: Landlock denies creating, writing, truncating, renaming and
  removing files anywhere but the call process's own temp dir (its cwd, TMPDIR and HOME, removed
  when the process ends) and /dev/null; reading stays allowed. Files opened before (its
  stdout, the worker's sockets) stay writable. Without Landlock (Linux >= 5.13 with landlock
  among its LSMs) the pool refuses to start.

Whenever Landlock is applied and its ABI is >= 6, the call also cannot signal processes outside
its own tree (so it cannot kill or stop its worker). A process running as root inside the call
can raise its own rlimits; Landlock, namespaces and the CPU measurement hold for root too.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

_LINUX = sys.platform.startswith("linux")
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
# Landlock system calls (the same numbers on every architecture that has them).
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446
_LL_VERSION = 1
_LL_RULE_PATH_BENEATH = 1
# LANDLOCK_ACCESS_FS_*: write file, remove dir/file, make char/dir/reg/sock/fifo/block/sym.
_FS_WRITE_FILE = 1 << 1
_FS_WRITES = _FS_WRITE_FILE | sum(1 << b for b in range(4, 13))
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect (ABI 4)
_SCOPE_SIGNAL = 1 << 1  # ABI 6


@dataclass(frozen=True)
class Sandbox:
    memory_mb: int | None = None
    cpu_seconds: int | None = None
    network: bool = True
    writable_tmp_only: bool = False

    def __post_init__(self) -> None:
        for key in ("memory_mb", "cpu_seconds"):
            value = getattr(self, key)
            if value is not None and (type(value) is not int or value <= 0):
                raise ValueError(f"sandbox.{key} must be a positive integer or null, got {value!r}")
        for key in ("network", "writable_tmp_only"):
            if type(getattr(self, key)) is not bool:
                raise ValueError(f"sandbox.{key} must be true or false, got {getattr(self, key)!r}")

    @property
    def active(self) -> bool:
        return self != Sandbox()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def landlock_abi() -> int:
    if not _LINUX:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(ctypes.c_long(_LL_CREATE), None, ctypes.c_size_t(0), _LL_VERSION)
    return max(0, int(version))


class SandboxError(ValueError):
    """A sandbox key this machine cannot enforce; `key` names it (network, writable_tmp_only)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def check(sandbox: Sandbox) -> str | None:
    """How `network: false` is enforced on this machine ("netns", "userns+netns", "landlock-tcp"),
    None when the network is allowed; SandboxError when a key cannot be enforced here.

    Runs the confinement in a throwaway process, exactly as a call process would.
    """
    if sandbox.network and not sandbox.writable_tmp_only:
        return None
    key = "network" if not sandbox.network else "writable_tmp_only"
    if not _LINUX:
        raise SandboxError(key, f"sandbox.{key} needs Linux (namespaces and Landlock)")
    # Made and removed here: once confined, the probe cannot remove its own directory.
    tmp = tempfile.mkdtemp(prefix="rlkit-sandbox-probe-")
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "from rlkit.rewards.sandbox import _probe; _probe()"],
            input=json.dumps({"sandbox": sandbox.to_dict(), "tmp": tmp}),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
    finally:
        remove_dir(tmp)
    try:
        answer = json.loads(probe.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise SandboxError(
            key, f"the sandbox probe failed (exit code {probe.returncode}): {probe.stderr[-300:]}"
        ) from None
    if "error" in answer:
        raise SandboxError(answer["key"], answer["error"])
    return answer["network"]


def _probe() -> None:
    given = json.loads(sys.stdin.read())
    sandbox = Sandbox(**given["sandbox"])
    key = "network"
    try:
        network = None if sandbox.network else _network_mode()
        key = "writable_tmp_only"
        confine(sandbox, network, given["tmp"])
        print(json.dumps({"network": network}))
    except (OSError, ValueError) as e:
        print(json.dumps({"key": key, "error": str(e)}))


def _network_mode() -> str:
    """Which isolation this machine allows, tried in a child so this process keeps its network."""
    for mode in ("netns", "userns+netns"):
        pid = os.fork()
        if pid == 0:
            try:
                _isolate_network(mode)
                os._exit(0)
            except BaseException:
                os._exit(1)
        if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0:
            return mode
    if landlock_abi() >= 4:
        return "landlock-tcp"
    raise ValueError(
        "sandbox.network: false cannot be enforced here: no network namespace (not root, and "
        "unprivileged user namespaces are disabled) and no Landlock network rules (kernel < 6.7)"
    )


def confine(sandbox: Sandbox, network: str | None, tmp: str) -> None:
    """Apply `sandbox` to this process (a call process, single-threaded, just forked)."""
    writable = tmp if sandbox.writable_tmp_only else None
    abi = landlock_abi()
    if writable is not None and abi < 1:
        raise ValueError(
            "sandbox.writable_tmp_only needs Linux Landlock (kernel >= 5.13 with landlock among "
            "its LSMs), which this machine does not offer"
        )
    if network in ("netns", "userns+netns"):
        _isolate_network(network)
    if writable is not None:
        os.chdir(tmp)
        os.environ["HOME"] = tmp
    if writable is not None or network == "landlock-tcp" or abi >= 6:
        _landlock(abi, writable, deny_tcp=network == "landlock-tcp")
    if sandbox.memory_mb is not None:
        size = sandbox.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _fail(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _isolate_network(mode: str) -> None:
    libc = _libc()
    if mode == "netns":
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise _fail("unshare(CLONE_NEWNET)")
    else:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
            raise _fail("unshare(CLONE_NEWUSER | CLONE_NEWNET)")
        # The same uid and gid inside. Best effort: mapping uid 0 needs CAP_SETFCAP, and an
        # unmapped process still touches files as itself (it only sees its ids as 65534).
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with contextlib.suppress(OSError), open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    # A private loopback keeps local IPC (127.0.0.1) working inside the namespace.
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
        flags = struct.unpack_from(
            "16sH", fcntl.ioctl(s, siocgifflags, struct.pack("16sH14x", b"lo", 0))
        )[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def _landlock(abi: int, writable: str | None, deny_tcp: bool) -> None:
    libc = _libc()
    fs = 0
    if writable is not None:
        fs = _FS_WRITES | (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    net = _NET_TCP if deny_tcp else 0
    scoped = _SCOPE_SIGNAL if abi >= 6 else 0
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", fs, net, scoped)[:size], size)
    ruleset = libc.syscall(ctypes.c_long(_LL_CREATE), attr, ctypes.c_size_t(size), 0)
    if ruleset < 0:
        raise _fail("landlock_create_ruleset")
    try:
        if writable is not None:
            file_rights = _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
            for path, rights in ((writable, fs), ("/dev/null", file_rights)):
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    rule = ctypes.create_string_buffer(struct.pack("=Qi", rights, fd), 12)
                    if libc.syscall(
                        ctypes.c_long(_LL_ADD_RULE), ruleset, _LL_RULE_PATH_BENEATH, rule, 0
                    ):
                        raise _fail(f"landlock_add_rule({path})")
                finally:
                    os.close(fd)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(ctypes.c_long(_LL_RESTRICT), ruleset, 0) != 0:
            raise _fail("landlock_restrict_self")
    finally:
        os.close(ruleset)


def remove_dir(path: str) -> None:
    """rmtree that also removes what a verifier made unwritable (chmod 000 dirs)."""

    def retry(function: Any, failed: str, _: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
            function(failed)

    shutil.rmtree(path, onerror=retry)
