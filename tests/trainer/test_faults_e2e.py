"""Kill-and-resume, Ctrl-C and dead workers through the real CLI, checked against one
uninterrupted run (issue 14's acceptance figures).

One run is interrupted over and over: each attempt is stopped at a chosen moment (the driver
SIGKILLed, a Ctrl-C, the learner's process killed, the weights made NaN), and the next attempt
resumes it with `run.resume=true`. After every attempt the run directory must be a prefix of
the uninterrupted run's: its metrics rows (timing fields aside) equal the baseline's first
rows, no row twice, and every checkpoint on disk holds the baseline's weights, data cursor and
metrics row count for that step. At the end the run equals the baseline row for row and weight for
weight. An attempt resumes from what the one before left, so a resume that duplicated a row,
restored a wrong cursor or a wrong RNG state fails the check of the attempt after it.

Moments are hit exactly through `rlkit/faults.py` (RLKIT_FAULTS): `kill` makes the named
process SIGKILL itself at that point; `stall` makes it wait there, and the test sends SIGINT to
the driver's process group (as a terminal's Ctrl-C does) once the point is reached.

SIGKILL attempts join a Ray cluster the test starts once (`ray start --head`), which saves each
of them Ray's start-up; Ctrl-C attempts start their own local Ray, as `rlkit train` does, so
that the check that nothing of the run outlives it covers Ray's own processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import pytest
import torch
from safetensors.torch import load_file

from rlkit.models.tiny import save_tiny_model

pytestmark = pytest.mark.slow

STEPS = 3
# The whole chain (18 runs, ~9 minutes on 2 cores) with RLKIT_FAULT_CHAIN=full; by default
# the moments that later ones do not build on are left out (11 runs) so that the suite stays
# within its budget. Each left-out moment is also one the full chain covers.
FULL_CHAIN = os.environ.get("RLKIT_FAULT_CHAIN", "") == "full"
VOLATILE = ("timing/", "throughput/", "reward/time_s", "rollout/time_")
VERIFIER = '''
def parity(completion, sample):
    """Half the completions of a random model score 1: the learner moves."""
    return float(sum(map(ord, completion)) % 2)
'''


def _recipe(tmp, model_dir: str) -> str:
    path = tmp / "recipe.yaml"
    path.write_text(
        f"""# Run: rlkit train recipe.yaml
model: {{path: {model_dir}, compute_dtype: none}}
data: {{task: arithmetic, num_train: 64, num_eval: 8}}
rollout: {{n: 4, temperature: 1.0, max_new_tokens: 6, dtype: float32}}
algorithm: {{advantage: grpo}}
optim: {{lr: 1.0e-2}}
train: {{steps: {STEPS}, prompts_per_step: 4, micro_batch_size: 8, save_every: 1,
        keep_checkpoints: {STEPS}, eval_every: 2}}
eval: {{max_new_tokens: 6}}
reward: {{verifier: {tmp / "verifier.py"}:parity}}
run: {{dir: {tmp / "runs"}, wandb: disabled, progress_bar: false}}
ray: {{num_cpus: 2, object_store_memory_mb: 128}}
"""
    )
    (tmp / "verifier.py").write_text(VERIFIER)
    return str(path)


def _session(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _kill_session(sid: int) -> None:
    for p in _session(sid):
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def cluster():
    """A Ray head for the SIGKILL attempts, in its own session, torn down by killing that
    session (never `ray stop`, which would stop every Ray instance of this user). Its own
    temp dir: `ray start` records its address there, and in /tmp/ray every `ray.init()`
    without an address on this machine would try to join it (or its stale address)."""
    temp_dir = tempfile.mkdtemp(prefix="rlkit-ray-", dir="/tmp")  # short: socket paths
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Loopback only; without Ray's token auth (its token file is shared by every Ray start).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        # Through this interpreter: the `ray` script's shebang may name another environment,
        # whose workers would import another checkout's rlkit.
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--num-cpus=8", "--disable-usage-stats",
         "--include-dashboard=false", f"--object-store-memory={256 * 2**20}",
         f"--temp-dir={temp_dir}"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        assert proc.wait(timeout=120) == 0, "ray start --head failed"
        yield f"127.0.0.1:{port}"
    finally:
        _kill_session(proc.pid)
        time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class Attempt:
    moment: str
    code: int
    output: str  # stdout and stderr
    exit_s: float = 0.0  # SIGINT: signal to the driver's exit
    gone_s: float = 0.0  # SIGINT: signal to the last process of the run gone


@dataclass
class Run:
    tmp: object
    recipe: str
    name: str
    address: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def dir(self) -> str:
        return os.path.join(str(self.tmp), "runs", self.name)

    def attempt(
        self,
        moment: str,
        faults: str = "",
        local: bool = False,
        interrupt_at: str | None = None,
        timeout: float = 300,
    ) -> Attempt:
        fault_dir = os.path.join(str(self.tmp), "faults", f"{self.name}-{len(self.attempts)}")
        os.makedirs(fault_dir)
        env = {**os.environ, "RLKIT_FAULTS": faults, "RLKIT_FAULTS_DIR": fault_dir}
        env.pop("RLKIT_DEBUG", None)
        args = [f"run.name={self.name}", f"run.resume={'true' if self.attempts else 'false'}"]
        if not local:
            args.append(f"ray.address={self.address}")
            env["RAY_AUTH_MODE"] = "disabled"
        err_path = os.path.join(fault_dir, "output")
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rlkit.cli", "train", self.recipe, *args],
                env=env, start_new_session=True, stdout=err, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                exit_s = gone_s = 0.0
                if interrupt_at is not None:
                    exit_s, gone_s = _interrupt(proc, os.path.join(fault_dir, interrupt_at))
                code = proc.wait(timeout=timeout)
            finally:
                _kill_session(proc.pid)  # whatever the attempt left (a killed driver's Ray)
        with open(err_path) as f:
            output = f.read()
        result = Attempt(moment, code, output, exit_s, gone_s)
        self.attempts.append(result)
        return result


def _interrupt(proc: subprocess.Popen, marker: str) -> tuple[float, float]:
    """Ctrl-C once the run reached the marked point; seconds until it exited, and until
    every process of its session was gone."""
    deadline = time.monotonic() + 240
    while not os.path.exists(marker + ".fired"):
        assert proc.poll() is None, f"the run ended before reaching {marker}"
        assert time.monotonic() < deadline, f"{marker} not reached in 240 s"
        time.sleep(0.05)
    time.sleep(0.2)  # the driver is waiting on the stalled actor by now
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    exit_s = time.monotonic() - start
    while _session(proc.pid) and time.monotonic() - start < 30:
        time.sleep(0.05)
    return exit_s, time.monotonic() - start


def _rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _checkpoints(run_dir: str) -> dict[int, dict]:
    """step -> (model weights, trainer state) of every complete checkpoint."""
    root = os.path.join(run_dir, "checkpoints", "0_rlvr")
    out = {}
    for name in os.listdir(root) if os.path.isdir(root) else []:
        state_file = os.path.join(root, name, "trainer_state.json")
        if name.startswith("step_") and os.path.exists(state_file):
            with open(state_file) as f:
                state = json.load(f)
            weights = load_file(os.path.join(root, name, "model", "model.safetensors"))
            out[int(name[5:])] = {"weights": weights, "state": state}
    return out


def _assert_prefix_of(run_dir: str, base_rows: list[dict], base_ckpts: dict, moment: str):
    rows = _rows(run_dir)
    assert rows == base_rows[: len(rows)], f"after {moment}: rows differ from the baseline's"
    for step, ck in _checkpoints(run_dir).items():
        ref = base_ckpts[step]
        for k, v in ref["weights"].items():
            assert torch.equal(ck["weights"][k], v), f"after {moment}: step_{step} {k} differs"
        # (The driver's RNG state is not compared: nothing of a run draws from it, so it is
        # whatever the process started with; equal weights and rows show that.)
        for k in ("data", "metrics_rows", "step"):
            assert ck["state"][k] == ref["state"][k], f"after {moment}: step_{step} {k} differs"
    return rows


def test_kill_interrupt_and_worker_death_resume_to_the_uninterrupted_run(tmp_path, cluster):
    model_dir = save_tiny_model(str(tmp_path / "tiny"), seed=1, tie_word_embeddings=False)
    recipe = _recipe(tmp_path, model_dir)
    started = time.monotonic()
    base = Run(tmp_path, recipe, "base", cluster)
    assert base.attempt("uninterrupted").code == 0
    base_rows, base_ckpts = _rows(base.dir), _checkpoints(base.dir)
    # The initial evaluation, steps 1-3 (step 2's row with its evaluation), the final evaluation.
    assert [r["step"] for r in base_rows] == [0, 1, 2, 3, 3]
    assert "eval/accuracy" in base_rows[2]
    # The learner really moves and the rewards vary: equal weights would prove nothing.
    assert not torch.equal(
        base_ckpts[1]["weights"]["model.embed_tokens.weight"],
        base_ckpts[2]["weights"]["model.embed_tokens.weight"],
    )
    assert all(0 < r["reward/mean"] < 1 for r in base_rows if "reward/mean" in r)

    run = Run(tmp_path, recipe, "chain", cluster)
    kills, sigints = [], []

    def check(a: Attempt, expect: int, *texts: str) -> None:
        assert a.code == expect, f"{a.moment}: exit {a.code}, stderr: {a.output[-2000:]}"
        for text in texts:
            assert text in a.output, f"{a.moment}: {text!r} not in {a.output[-2000:]!r}"
        _assert_prefix_of(run.dir, base_rows, base_ckpts, a.moment)

    def kill(moment: str, point: str, **kw) -> None:
        a = run.attempt(moment, f"{point}:kill", **kw)
        check(a, -signal.SIGKILL)
        kills.append(a)

    def sigint(moment: str, faults: str, marker: str, where: str, resume: str) -> None:
        a = run.attempt(moment, faults, local=True, interrupt_at=marker)
        check(a, 130, f"interrupted by SIGINT during {where}", resume)
        assert a.gone_s < 10, f"{moment}: processes left {a.gone_s:.1f} s after SIGINT"
        sigints.append(a)

    none_yet = "no checkpoint was written yet: run.resume=true starts the run over"
    ckpt = os.path.join(run.dir, "checkpoints", "0_rlvr", "step_{}")

    def from_step(k: int) -> str:
        return f"run.resume=true continues from {ckpt.format(k)} (stage 0 (rlvr), step {k})"

    if FULL_CHAIN:
        kill("start-up (Ray up, actors not yet)", "launch")
        sigint("start-up", "launch:mark", "launch", "start-up", none_yet)
        kill("the initial evaluation", "eval@0")
        assert _rows(run.dir) == []
    kill("step 1 rollout, before any checkpoint", "rollout@1")
    assert len(_rows(run.dir)) == 1  # the initial evaluation's row, dropped by the next resume
    if FULL_CHAIN:
        sigint(
            "rollout",
            "rollout.generate@2:stall",  # the worker's 2nd generate: step 1 (1st: the evaluation)
            "rollout.generate@2",
            "rollout of stage 0 (rlvr) step 1",
            none_yet,
        )
    sigint(
        "learner step", "learner.train_step:stall", "learner.train_step",
        "learn of stage 0 (rlvr) step 1", none_yet,
    )  # fmt: skip
    if FULL_CHAIN:
        kill("step 1 logged, its checkpoint not yet", "logged@1")
    kill("checkpoint write (files written, not committed)", "checkpoint@1")
    if FULL_CHAIN:
        sigint(
            "checkpoint write", "learner.save:stall", "learner.save",
            "checkpoint of stage 0 (rlvr) step 1", none_yet,
        )  # fmt: skip
    assert os.path.isdir(os.path.join(os.path.dirname(ckpt.format(1)), ".tmp_step_1"))
    # The rollout worker SIGKILLed in step 1's rollout: restarted, its prompts generated again;
    # the run goes on (step 1's checkpoint must equal the baseline's), then the driver is killed.
    # (Two workers, one of them killed, are compared sample by sample in
    # tests/workers/test_worker_restarts.py.)
    a = run.attempt(
        "step 2 reward (after a rollout worker died in step 1)",
        "rollout.generate@2:kill,reward@2:kill",
    )
    check(a, -signal.SIGKILL, "rlkit: rollout worker")
    kills.append(a)
    assert not any(n.startswith(".tmp_") for n in os.listdir(os.path.dirname(ckpt.format(1))))
    assert 1 in _checkpoints(run.dir)
    worker_kill = a
    a = run.attempt("learner process killed in step 2", "learner.train_step:kill")
    check(a, 1, "rlkit train: error: the learner's process died during learn of stage 0 (rlvr) "
          "step 2", from_step(1))  # fmt: skip
    kill("the evaluation at step 2", "eval@2")
    kill("the final checkpoint write", "checkpoint@3")
    sigint(
        "final evaluation",
        "rollout.generate@2:stall",  # resumed from step 2: step 3's rollout, then this
        "rollout.generate@2",
        "eval of stage 0 (rlvr) step 3",
        from_step(3),
    )
    if FULL_CHAIN:
        kill("the final evaluation", "eval@3")
    kill("after the final evaluation", "eval_row@3")
    final = run.attempt("none (completes)")
    assert final.code == 0, final.output[-2000:]

    assert _rows(run.dir) == base_rows
    ckpts = _checkpoints(run.dir)
    assert sorted(ckpts) == sorted(base_ckpts)
    _assert_prefix_of(run.dir, base_rows, base_ckpts, "the last attempt")
    # Times cover every attempt that reached a checkpoint: each later checkpoint adds some.
    summary = json.load(open(os.path.join(run.dir, "summary.json")))
    s = [ckpts[k]["state"]["summary"] for k in (1, 2, 3)]
    assert 0 < s[0]["setup_seconds"] < s[1]["setup_seconds"] < s[2]["setup_seconds"]
    assert s[2]["setup_seconds"] < summary["setup_seconds"]
    assert 0 < s[0]["train_seconds"] < s[2]["train_seconds"] <= summary["train_seconds"]
    assert summary["worker_restarts"] == {"rollout": 1}

    want_kills, want_sigints = (10, 5) if FULL_CHAIN else (6, 2)
    assert len(kills) == want_kills and len(sigints) == want_sigints
    lines = [
        f"kill-and-resume {len(kills)}/{want_kills} (weights, data cursor and every metrics row "
        "equal)",
        f"SIGINT {len(sigints)}/{want_sigints}, max time to exit {max(a.exit_s for a in sigints):.1f} s, "
        f"to the last process gone {max(a.gone_s for a in sigints):.1f} s",
        f"rollout worker kill: samples equal ({worker_kill.moment})",
        f"total {time.monotonic() - started:.0f} s for {len(base.attempts + run.attempts)} runs",
    ]
    lines += [
        f"  SIGINT at {a.moment}: exit {a.exit_s:.1f} s, gone {a.gone_s:.1f} s" for a in sigints
    ]
    print("\n" + "\n".join(lines))
