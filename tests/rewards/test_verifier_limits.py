"""Each sandbox key takes effect, through the real pool, and the recipe keys reach it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict

import pytest
from hostile import MARK_VAR, VERIFIER, survivors
from rlkit.rewards import VerifierPool
from rlkit.rewards import sandbox as sandbox_module
from rlkit.rewards.sandbox import Sandbox, SandboxError, landlock_abi

from rlkit.config import ConfigError, load_recipe
from rlkit.config.schema import SandboxConfig


@pytest.fixture
def mark(monkeypatch):
    value = f"limits-{uuid.uuid4().hex}"
    monkeypatch.setenv(MARK_VAR, value)
    return value


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("limits") / "probe_verifier.py"
    path.write_text(VERIFIER)
    return f"{path}:verify"


def score(pool, *behaviours, **sample):
    return pool.score(list(behaviours), [dict(sample)] * len(behaviours))


def test_memory_limit_applies_to_the_call_and_its_children(spec, mark):
    with VerifierPool(spec, timeout_s=5.0, sandbox=Sandbox(memory_mb=1536)) as pool:
        result = score(pool, "rlimit_as", "alloc_8g", "ok")
        assert result.extras[0] == {"soft": 1536 * 2**20, "child": 1536 * 2**20}
        assert result.kinds == ["ok", "limit", "ok"] and result.n_limits == 1
        assert result.first_errors["limit"] == "sample 1: MemoryError: over sandbox.memory_mb=1536"
    assert survivors(mark) == ([], [])


def test_cpu_limit_counts_the_processes_a_call_starts(spec, mark):
    with VerifierPool(spec, timeout_s=10.0, sandbox=Sandbox(cpu_seconds=1)) as pool:
        start = time.monotonic()
        result = score(pool, "cpu_child", "spin_cpu", "ok")
        # Both are killed at about one CPU second each, long before the timeout.
        assert time.monotonic() - start < 6.0
        assert result.kinds == ["limit", "limit", "ok"]
        assert "CPU time over sandbox.cpu_seconds=1" in result.first_errors["limit"]
    assert survivors(mark) == ([], [])


def test_network_off_leaves_only_a_private_loopback(spec, mark):
    with VerifierPool(spec, timeout_s=5.0, sandbox=Sandbox(network=False)) as pool:
        result = score(pool, "interfaces", "loopback", "network")
        if pool.network_mode == "landlock-tcp":
            assert result.kinds == ["ok", "error", "error"]
        else:
            assert result.extras[0]["names"] == "lo"
            assert result.kinds == ["ok", "ok", "error"]
            assert "Network is unreachable" in result.first_errors["error"]
    assert survivors(mark) == ([], [])


@pytest.mark.parametrize("mode", ["netns", "userns+netns", "landlock-tcp"])
def test_each_network_mode(mode, tmp_path):
    """Every fallback, applied in a throwaway process: no route out (or no TCP) afterwards."""
    code = f"""
import json, socket
from rlkit.rewards.sandbox import Sandbox, confine
server = socket.create_server(("127.0.0.1", 0))
try:
    confine(Sandbox(network=False), {mode!r}, {str(tmp_path)!r})
except OSError as e:
    print(json.dumps({{"skip": str(e)}}))
    raise SystemExit
names = [n for _, n in socket.if_nameindex()]
try:
    socket.create_connection(server.getsockname(), timeout=1).close()
    outcome = "connected"
except OSError as e:
    outcome = type(e).__name__
print(json.dumps({{"names": names, "outcome": outcome}}))
"""
    if mode == "landlock-tcp" and landlock_abi() < 4:
        pytest.skip("Landlock network rules need ABI 4 (Linux 6.7)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    answer = json.loads(out.stdout)
    if "skip" in answer:
        pytest.skip(f"{mode} is not allowed here: {answer['skip']}")
    if mode == "landlock-tcp":
        # The interfaces are the host's; TCP to anything, even the host's loopback, is denied.
        assert answer["outcome"] == "PermissionError"
    else:
        # A new namespace: only its own loopback, so the host's listening socket is unreachable.
        assert answer["names"] == ["lo"] and answer["outcome"] == "ConnectionRefusedError"


@pytest.mark.skipif(landlock_abi() < 1, reason="needs Linux Landlock")
def test_writes_only_in_the_call_temp_dir(spec, mark, tmp_path):
    outside = tmp_path / "outside.txt"
    sandbox = Sandbox(writable_tmp_only=True)
    with VerifierPool(spec, timeout_s=5.0, sandbox=sandbox) as pool:
        result = score(pool, "where", "write_outside", "child_write_outside", outside=str(outside))
        where = result.extras[0]
        assert result.kinds == ["ok", "error", "ok"]
        assert "PermissionError" in result.first_errors["error"]
        # The shell the call started could not write there either.
        assert result.extras[2]["code"] != 0.0
        assert where["cwd"] == where["tmp"] == where["home"]
        assert os.path.basename(os.path.dirname(where["cwd"])).startswith("rlkit-verifier-")
        assert os.path.exists(os.path.join(where["cwd"], "scratch.txt"))
    assert not outside.exists()
    # The temp dir went with its call process.
    assert not os.path.exists(where["cwd"])
    assert survivors(mark) == ([], [])


def test_signals_out_of_the_sandbox_are_denied_where_landlock_scopes_them(spec, mark):
    with VerifierPool(spec, timeout_s=1.0, sandbox=Sandbox(memory_mb=4096)) as pool:
        result = score(pool, "kill_parent", "ok")
    # Landlock ABI 6 scopes signals: the call cannot kill its worker. Before it, it can, and
    # that is a crash of the call (the worker is replaced).
    assert result.kinds == (["error", "ok"] if landlock_abi() >= 6 else ["crash", "ok"])
    assert survivors(mark) == ([], [])


def test_output_excerpt_in_the_error(spec, mark):
    with VerifierPool(spec, timeout_s=5.0) as pool:
        result = score(pool, "print_then_raise", "ok")
    assert result.kinds == ["error", "ok"]
    assert result.first_error == (
        "sample 0: RuntimeError: see output "
        "[output: 30 bytes, ending 'diagnostic: the checker broke']"
    )


@pytest.mark.parametrize(
    "fields",
    [{"memory_mb": 0}, {"memory_mb": -5}, {"memory_mb": 1.5}, {"cpu_seconds": True},
     {"network": "no"}, {"writable_tmp_only": 1}],
)  # fmt: skip
def test_bad_sandbox_values_are_refused(fields):
    with pytest.raises(ValueError, match=f"sandbox.{next(iter(fields))}"):
        Sandbox(**fields)


def test_a_sandbox_needs_workers():
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        VerifierPool("arithmetic", num_workers=0, sandbox=Sandbox(memory_mb=512))


def test_recipe_keys_reach_the_pool():
    assert asdict(SandboxConfig()) == Sandbox().to_dict()
    cfg = load_recipe(None, ["reward.sandbox.memory_mb=512", "reward.sandbox.network=false"])
    assert Sandbox(**asdict(cfg.reward.sandbox)) == Sandbox(memory_mb=512, network=False)
    with pytest.raises(ConfigError, match="reward.sandbox.cpu_seconds"):
        load_recipe(None, ["reward.sandbox.cpu_seconds=0"])


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to drop capabilities"
)
def test_network_off_without_privileges(spec, mark):
    """With every capability dropped (as an ordinary user runs), a user namespace isolates."""
    code = f"""
from rlkit.rewards import VerifierPool
from rlkit.rewards.sandbox import Sandbox
with VerifierPool({spec!r}, timeout_s=5.0, sandbox=Sandbox(network=False)) as pool:
    result = pool.score(["interfaces", "network"], [{{}}, {{}}])
    print(pool.network_mode, result.extras[0]["names"], result.kinds)
"""
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code]
    out = subprocess.run(drop, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["userns+netns", "lo", "['ok',", "'error']"]


def test_an_unenforceable_sandbox_is_refused_when_the_recipe_loads(monkeypatch):
    from rlkit.rewards import sandbox as sandbox_mod

    cfg = load_recipe(None, ["reward.sandbox.memory_mb=64"])
    assert asdict(cfg.reward.sandbox) == asdict(SandboxConfig(memory_mb=64))

    def cannot(sandbox):
        raise SandboxError("writable_tmp_only", "needs Linux Landlock, which this machine ...")

    monkeypatch.setattr(sandbox_mod, "check", cannot)
    with pytest.raises(ConfigError, match=r"reward\.sandbox\.writable_tmp_only: needs Linux"):
        load_recipe(None, ["reward.sandbox.writable_tmp_only=true"])


def test_probe_names_the_key_it_cannot_enforce(monkeypatch, capsys, tmp_path):
    """Without Landlock, writable_tmp_only is refused (in the probe process, as here)."""
    monkeypatch.setattr(sandbox_module, "landlock_abi", lambda: 0)
    given = {"sandbox": {"writable_tmp_only": True}, "tmp": str(tmp_path)}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(given)))
    cwd, home = os.getcwd(), os.environ.get("HOME")
    sandbox_module._probe()
    assert (os.getcwd(), os.environ.get("HOME")) == (cwd, home)
    answer = json.loads(capsys.readouterr().out)
    assert answer["key"] == "writable_tmp_only" and "needs Linux Landlock" in answer["error"]
