"""`rlkit train` end to end through Ray on a tiny random model: metrics, checkpoints, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlkit.cli import main

pytestmark = pytest.mark.slow


def _rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_writes_metrics_checkpoints_and_report(
    tmp_path, tiny_model_dir, tiny_recipe, parity_verifier
):
    recipe = tiny_recipe(str(tmp_path / "r.yaml"), tiny_model_dir, str(tmp_path / "runs"), steps=3)
    # The verifier runs sandboxed: the recipe's keys reach the RewardPool actor's workers.
    sandbox = ["reward.sandbox.memory_mb=4096", "reward.sandbox.network=false"]
    args = ["train", recipe, "train.save_every=2", f"reward.verifier={parity_verifier}", *sandbox]
    assert main(args) == 0
    run_dir = str(tmp_path / "runs" / "e2e")
    rows = _rows(run_dir)
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert 1 <= r["response/length_mean"] <= 6
        assert r["timing/rollout"] > 0 and r["timing/learn"] > 0 and r["timing/reward"] > 0
        assert r["throughput/rollout_tokens_per_s"] > 0
        # The custom verifier gives mixed rewards, so the learner really updates the weights.
        assert 0.0 < r["reward/mean"] < 1.0
        assert r["actor/grad_norm"] > 0
        assert r["actor/entropy"] > 0
        assert r["throughput/learner_tokens_per_s"] > 0
        assert r["reward/error_count"] == r["reward/crash_count"] == r["reward/limit_count"] == 0
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in evals)
    ckpts = os.listdir(os.path.join(run_dir, "checkpoints", "0_rlvr"))
    assert sorted(ckpts) == ["step_2", "step_3"]
    model_dir = os.path.join(run_dir, "checkpoints", "0_rlvr", "step_3", "model")
    assert os.path.exists(os.path.join(model_dir, "config.json"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["peak_memory_gb"] > 0
    # First step to last, then the final checkpoint's write on top.
    assert 0 < summary["steps_seconds"] < summary["train_seconds"]
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    assert os.path.exists(os.path.join(run_dir, "report", "reward.png"))


def test_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, tiny_recipe):
    run_root = str(tmp_path / "runs")
    recipe = tiny_recipe(str(tmp_path / "r.yaml"), tiny_model_dir, run_root, steps=6, extra="")
    run_dir = os.path.join(run_root, "e2e")
    ckpt = os.path.join(run_dir, "checkpoints", "0_rlvr", "step_2", "trainer_state.json")
    # A verifier slow enough that the run is still going when step 2's checkpoint is seen:
    # tiny-model steps take ~40 ms, and step 6 prunes step 2's checkpoint (keep 2).
    slow = tmp_path / "slow_verifier.py"
    slow.write_text(
        "import time\n\ndef score(completion, sample):\n    time.sleep(0.1)\n    return 0.0\n"
    )
    verifier = f"reward.verifier={slow}:score"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlkit.cli",
            "train",
            recipe,
            "train.save_every=2",
            "train.steps=6",
            verifier,
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not os.path.exists(ckpt):
            assert proc.poll() is None, "the run exited before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (
        main(["train", recipe, "train.save_every=2", "train.steps=6", "run.resume=true", verifier])
        == 0
    )
    steps = [r["step"] for r in _rows(run_dir) if "reward/mean" in r]
    # Every step exactly once: rows past the checkpoint from the killed run were dropped.
    assert steps == [1, 2, 3, 4, 5, 6]
    state = json.load(
        open(os.path.join(run_dir, "checkpoints", "0_rlvr", "step_6", "trainer_state.json"))
    )
    assert state["step"] == 6 and state["data"]["pos"] == 6 * 4 % 64


def test_sft_then_rlvr_stages_in_one_run(tmp_path, tiny_model_dir, tiny_recipe, parity_verifier):
    extra = """stages:
  - type: sft
    overrides: {train.steps: 2, sft.batch_size: 4, optim.lr: 1.0e-2}
  - type: rlvr
"""
    recipe = tiny_recipe(
        str(tmp_path / "r.yaml"), tiny_model_dir, str(tmp_path / "runs"), steps=2, extra=extra
    )
    assert main(["train", recipe, f"reward.verifier={parity_verifier}"]) == 0
    run_dir = str(tmp_path / "runs" / "e2e")
    rows = _rows(run_dir)
    sft = [r for r in rows if r["stage"] == "sft" and "sft/loss" in r]
    rl = [r for r in rows if r["stage"] == "rlvr" and "reward/mean" in r]
    assert [r["step"] for r in sft] == [1, 2] and [r["step"] for r in rl] == [1, 2]
    assert sft[1]["sft/loss"] < sft[0]["sft/loss"]  # lr 1e-2 on 4 fixed-ish answers: the loss falls
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "0_sft", "step_2", "model"))
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "1_rlvr", "step_2", "model"))


def _train_two_steps(tmp_path, model_dir, tiny_recipe, verifier, *overrides) -> list[dict]:
    """`rlkit train` of the tiny recipe for 2 steps with the parity verifier; the metric rows."""
    recipe = tiny_recipe(str(tmp_path / "r.yaml"), model_dir, str(tmp_path / "runs"), steps=2)
    assert main(["train", recipe, f"reward.verifier={verifier}", *overrides]) == 0
    return _rows(str(tmp_path / "runs" / "e2e"))


def test_dynamic_sampling_refills_the_batch(tmp_path, tiny_model_dir, tiny_recipe, parity_verifier):
    rows = _train_two_steps(
        tmp_path,
        tiny_model_dir,
        tiny_recipe,
        parity_verifier,
        "algorithm.dynamic_sampling=true",
        "rollout.n=2",
    )
    rows = [r for r in rows if "reward/mean" in r]
    assert len(rows) == 2
    for r in rows:
        # With 2 samples per prompt and a coin-flip verifier about half the groups are uniform
        # and dropped; each dropped group triggers a refill round (at most 1 + max_refill_rounds).
        assert 1 <= r["rollout/rounds"] <= 4
        assert r["rollout/filtered_groups"] >= 0
        assert r["rollout/rounds"] > 1 or r["rollout/filtered_groups"] == 0


def test_sparse_rl_run_logs_compression_corrections_and_both_evals(
    tmp_path, tiny_model_dir, tiny_recipe, parity_verifier
):
    """rollout.kv_compression through Ray: the rollout's KV metrics and the learner's
    corrections are logged per step; held-out accuracy is measured dense (the model as
    deployed) and, beside it, under the rollouts' compression. Two rollout workers: each
    step's prompts are split between them and their engines' figures merged."""
    rows = _train_two_steps(
        tmp_path,
        tiny_model_dir,
        tiny_recipe,
        parity_verifier,
        "rollout.kv_compression.policy=snapkv",
        "rollout.kv_compression.budget=8",
        "rollout.kv_compression.window=2",
        "rollout.kv_compression.interval=1",
        "rollout.num_workers=2",
    )
    steps = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # Both workers' engines compressed: the events add up, the retained fraction is the
        # ratio of the merged per-sequence means.
        assert r["rollout/compression_events"] > 0
        assert r["rollout/kv_retained_frac"] == pytest.approx(
            r["rollout/kv_bytes_retained_per_seq"] / r["rollout/kv_bytes_dense_per_seq"]
        )
        # Arithmetic prompts in the chat template are far over 8 entries.
        assert 0 < r["rollout/kv_retained_frac_max"] < 0.6
        assert r["rollout/compression_events"] > 0
        assert 0.0 <= r["sparse/rejected_token_frac"] <= 1.0
        assert r["sparse/rho_min"] <= r["sparse/rho_mean"] <= r["sparse/rho_max"]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert all("eval_sparse/accuracy" in r for r in evals)


def test_mtp_warmup_then_speculative_rl(tmp_path, tiny_model_dir, tiny_recipe, parity_verifier):
    """MTP-RL through Ray: a warm-up stage trains the drafter on the policy's samples and
    measures held-out acceptance, the RL stage's rollouts draft with SAM + MTP and log
    spec/*, the learner keeps training the drafter (mtp/*), checkpoints hold it beside the
    trunk, and the report plots accepted length."""
    rows = _train_two_steps(
        tmp_path,
        tiny_model_dir,
        tiny_recipe,
        parity_verifier,
        "rollout.speculative.drafter=sam+mtp",
        "rollout.speculative.num_draft_tokens=2",
        "rollout.speculative.sam_min_match=2",
        "rollout.speculative.sam_static=true",
        "algorithm.mtp.loss=advantage",
        "algorithm.mtp.eval_prompts=4",
        "stages=[{type: mtp_warmup, overrides: {train.steps: 2}}, rlvr]",
    )
    warm = [r for r in rows if r.get("stage") == "mtp_warmup" and "mtp/loss" in r]
    assert [r["step"] for r in warm] == [1, 2]
    assert warm[-1]["mtp/heldout_accept_len"] >= 1.0
    # The warm-up samples with plain steps; only its held-out evaluation drafts.
    assert "spec/verify_steps" not in warm[0]
    rl = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in rl] == [1, 2]
    for r in rl:
        assert r["spec/accept_len_mean"] >= 1.0 and r["spec/verify_steps"] > 0
        assert r["mtp/loss"] > 0 and "mtp/acc_d2" in r
        assert r["actor/entropy"] > 0 and not [k for k in r if "_sum_" in k]
    run_dir = os.path.join(tmp_path, "runs", "e2e")
    ckpt = os.path.join(run_dir, "checkpoints", "1_rlvr", "step_2", "model")
    assert os.path.isfile(os.path.join(ckpt, "mtp.safetensors"))
    assert os.path.isfile(os.path.join(run_dir, "report", "speculative.png"))
