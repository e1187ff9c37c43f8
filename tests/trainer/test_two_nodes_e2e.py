"""A two-node Ray cluster on loopback (`ray start --head`, then a second `ray start --address`
with resources of its own), started and torn down here; `rlkit train --address` runs two
steps with two learner ranks on the head and two rollout workers on the second node, and
matches a one-learner run step for step.

Other Ray instances may run on this machine: nothing here touches them (no `ray stop`, which
stops every Ray process of the machine); the cluster's processes are found by its own temp
dir and stopped by pid."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest

from rlkit.cli import main
from rlkit.models.loading import read_state_dict

pytestmark = pytest.mark.slow

# `ray` of this interpreter (the venv's `ray` script may name another python in its shebang).
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_args(temp_dir: str, resources: dict) -> list[str]:
    # Fixed default ports (the dashboard agent's, the metrics') would clash between two nodes
    # on one machine, and with other Ray instances here.
    agent, grpc, env, metrics = _ports(4)
    return [
        "--num-cpus=2",
        "--object-store-memory=200000000",
        f"--resources={json.dumps(resources)}",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--runtime-env-agent-port={env}",
        f"--metrics-export-port={metrics}",
        "--disable-usage-stats",
    ]


def _stop(temp_dir: str) -> None:
    """Every process of this cluster, found by its temp dir on its command line."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def two_nodes():
    # Short paths: Ray's Unix sockets live under the temp dir (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rk2n", dir="/tmp")
    (port,) = _ports(1)
    # No token authentication between this cluster's own processes and the test's driver.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run(
            [*RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=false", *_node_args(temp_dir, {"head_node": 4})],
            check=True, env=env, capture_output=True, timeout=180,
        )  # fmt: skip
        subprocess.run(
            [*RAY, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
             *_node_args(temp_dir, {"second_node": 4})],
            check=True, env=env, capture_output=True, timeout=180,
        )  # fmt: skip
        yield address
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(tmp_path, name, recipe, *args):
    assert main(["train", recipe, f"run.name={name}", *args]) == 0
    run_dir = tmp_path / "runs" / name
    with open(run_dir / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "actor/loss" in r]
    with open(run_dir / "summary.json") as f:
        summary = json.load(f)
    weights = read_state_dict(str(run_dir / "checkpoints" / "0_rlvr" / "step_2" / "model"))
    return rows, summary, weights


def test_two_learners_on_two_nodes_make_one_learners_steps(
    tmp_path, two_nodes, tiny_model_dir, tiny_recipe, parity_verifier, monkeypatch
):
    """Two learner ranks (gloo) on the head and two rollout workers on the second node, float32:
    every step's loss, and the weights at the end, equal a one-learner run's on the same
    batches (a local run with the same two rollout workers: samples depend on the rollout
    worker count, not the learners'; docs/ARCHITECTURE.md, "Rollout group")."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    recipe = tiny_recipe(str(tmp_path / "r.yaml"), tiny_model_dir, str(tmp_path / "runs"), steps=2)
    # Micro-batches of 4 of the 16 rollouts: each rank runs its share of the live ones.
    common = [
        f"reward.verifier={parity_verifier}",
        "rollout.num_workers=2",
        "optim.lr=1e-4",
        "train.micro_batch_size=4",
    ]
    one, _, w_one = _run(tmp_path, "one", recipe, *common)
    placed = "ray.actor_resources={learner: {head_node: 1}, rollout: {second_node: 1}}"
    two, summary, w_two = _run(
        tmp_path, "two", recipe, "--address", two_nodes, *common, "train.num_learners=2", placed
    )
    where = summary["actor_nodes"]
    nodes = where["nodes"]
    assert len(nodes) == 2
    (head,) = [n for n, res in nodes.items() if "head_node" in res]
    (second,) = [n for n, res in nodes.items() if "second_node" in res]
    assert where["learner"] == [head, head]
    assert where["rollout"] == [second, second]
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        # The same batches (same samples, same rewards) ...
        assert a["reward/mean"] == b["reward/mean"]
        assert a["response/length_mean"] == b["response/length_mean"]
        assert a["actor/grad_norm"] > 0 and a["actor/skipped_frac"] < 1
        # ... the same update.
        for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/tis_ratio_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    for name, value in w_one.items():
        assert (w_two[name] - value).abs().max() <= 1e-5, name
