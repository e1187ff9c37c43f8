"""Training on a CUDA device (run on the lent GPU; skipped on CPU-only machines): the learner's
step on the GPU against the same step on the CPU, the colocated worker's phases and its
in-process weight sync, and the whole RL loop through the CLI with device=cuda."""

import json
import os
import subprocess
import sys

import pytest
import torch

from rlkit.algorithms import ADVANTAGES
from rlkit.config import load_recipe
from rlkit.data.batch import RolloutBatch
from rlkit.models.tiny import save_tiny_model
from rlkit.rollout.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(
        str(tmp_path_factory.mktemp("tiny") / "m"), "qwen2", seed=1, tie_word_embeddings=False
    )


def _batch(outs, prompts, rewards):
    batch = RolloutBatch.from_sequences(
        [prompts[o["prompt_index"]] for o in outs],
        [o["token_ids"] for o in outs],
        [o["logprobs"] for o in outs],
        rewards,
        [o["prompt_index"] for o in outs],
    )
    batch.advantages = ADVANTAGES.get("grpo")(batch.rewards, batch.group_ids, batch.response_mask)
    return batch


def test_learner_step_on_cuda_matches_the_cpu_step(model_dir):
    from rlkit.workers.learner import Learner

    cfg = load_recipe(
        None, ["optim.lr=1e-3", "model.compute_dtype=none", "train.micro_batch_size=4"]
    )
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (6,), generator=g).tolist() for _ in range(2)]
    outs = [
        {"prompt_index": i // 4, "token_ids": torch.randint(0, 250, (5,), generator=g).tolist(),
         "logprobs": [-3.0] * 5}
        for i in range(8)
    ]  # fmt: skip
    rewards = [float(i % 2) for i in range(8)]
    steps = {}
    for device in ("cpu", "cuda"):
        learner = Learner(model_dir, cfg, num_threads=1, device=device)
        metrics = learner.train_step(_batch(outs, prompts, rewards))
        steps[device] = (learner.model.state_dict(), metrics)
    cpu, gpu = steps["cpu"], steps["cuda"]
    assert gpu[1]["memory/learner_peak_allocated_gb"] > 0
    assert gpu[1]["actor/grad_norm"] == pytest.approx(cpu[1]["actor/grad_norm"], rel=1e-3)
    for k, v in cpu[0].items():
        torch.testing.assert_close(gpu[0][k].cpu(), v, rtol=1e-3, atol=1e-5, msg=k)


def test_bf16_learner_keeps_float32_master_weights_on_the_gpu(model_dir):
    from rlkit.workers.learner import Learner

    learner = Learner(model_dir, load_recipe(None, []), num_threads=1, device="cuda")
    assert learner.master is not None  # auto: bf16 compute on a GPU
    assert next(learner.model.parameters()).dtype == torch.bfloat16
    assert all(m.is_cuda and m.dtype == torch.float32 for m in learner.master.parameters())


def test_learner_step_waits_for_the_gpu_a_few_times_whatever_its_micro_batches(model_dir):
    """The learner's step is bound by the host's launches on a small model: each read of a
    device value drains the queue and idles the GPU. Index bookkeeping, counts and decisions
    read the batch's CPU copy; what must come back (the loss and policy metrics, TIS's, the
    finite check, the gradient norm) is a handful of syncs per step, and the only syncs per
    micro-batch are its two metric reads. Counted under CUDA's sync debug mode "warn"."""
    import warnings

    from rlkit.workers.learner import Learner

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (6,), generator=g).tolist() for _ in range(4)]
    outs = [
        {"prompt_index": i // 4, "token_ids": torch.randint(0, 250, (3 + i % 5,), generator=g).tolist(),
         "logprobs": [-3.0] * (3 + i % 5)}
        for i in range(16)
    ]  # fmt: skip
    batch = _batch(outs, prompts, [float(i % 2) for i in range(16)])
    counts = {}
    for micro in (16, 4):
        cfg = load_recipe(None, ["optim.lr=1e-3", f"train.micro_batch_size={micro}"])
        learner = Learner(model_dir, cfg, num_threads=1, device="cuda")
        learner.train_step(batch)  # first-use allocations
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                learner.train_step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[micro] = sum("synchroniz" in str(w.message).lower() for w in caught)
    print(f"syncs per learner step: {counts}")
    assert counts[16] <= 8, counts
    assert counts[4] - counts[16] <= 3 * 2, counts


def test_colocated_worker_generates_learns_and_syncs_on_the_gpu(model_dir):
    from rlkit.workers.colocated import ColocatedWorker

    cfg = load_recipe(None, ["optim.lr=1e-2"])
    w = ColocatedWorker(model_dir, cfg, num_threads=1, device="cuda")
    assert w.rollout.engine.device.type == "cuda" and w.rollout.engine.cuda_graphs
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)
    outs = w.generate(prompts, params, n=4)
    stats = w.stats()
    assert stats["gpu_peak_allocated_gb"] > 0 and stats["kv_cache_released"] in (0.0, 1.0)
    w.train_step(_batch(outs, prompts, [float(i % 2) for i in range(8)]))
    ms = w.sync_engine()
    assert 0 <= ms < 1000
    engine = {k: v for k, v in w.rollout.engine.model.state_dict().items() if v.numel()}
    learner = w.learner.model.state_dict()
    for k, v in engine.items():
        assert v.is_cuda and torch.equal(v, learner[k].to(v.dtype)), k
    # The kept cache and its graphs decode with the new weights (copied in place).
    again = w.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.0), n=1)
    assert len(again) == 2


def test_rl_loop_through_the_cli_on_cuda(tmp_path, model_dir):
    pytest.importorskip("ray")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""# Run: rlkit train r.yaml
device: cuda
model: {{path: {model_dir}}}
data: {{task: arithmetic, num_train: 64, num_eval: 8}}
rollout: {{n: 4, max_new_tokens: 6}}
optim: {{lr: 1.0e-3}}
train: {{steps: 2, prompts_per_step: 4, micro_batch_size: 16}}
eval: {{max_new_tokens: 6}}
run: {{name: gpu, dir: {tmp_path / "runs"}, wandb: disabled, progress_bar: false}}
ray: {{num_cpus: 2, object_store_memory_mb: 128}}
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "rlkit.cli", "train", str(recipe)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rlkit: cuda (device=cuda" in proc.stdout + proc.stderr
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, "runs", "gpu", "metrics.jsonl"))]
    steps = [r for r in rows if r.get("step", 0) > 0 and "actor/grad_norm" in r]
    assert len(steps) == 2
    assert all(r["sync/ms"] >= 0 and r["memory/learner_peak_allocated_gb"] > 0 for r in steps)
    assert all(r["rollout/gpu_peak_allocated_gb"] > 0 for r in steps)


def test_lora_learner_on_the_gpu_trains_float32_adapters_over_a_bf16_base(model_dir):
    """model.lora on CUDA, compute dtype auto (bf16): the base is bf16, the adapters float32
    (their own master weights), the update follows the advantages, and the merged weights
    the engine receives move only where adapters are."""
    from rlkit.workers.colocated import ColocatedWorker

    cfg = load_recipe(None, ["optim.lr=1e-2", "model.lora.r=8", "model.lora.alpha=16"])
    w = ColocatedWorker(model_dir, cfg, num_threads=1, device="cuda")
    learner = w.learner
    assert learner.master is None and learner.peft is not None
    dtypes = {n: p.dtype for n, p in learner.model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if ".lora_" not in n)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    outs = w.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=0), n=4)
    batch = _batch(outs, prompts, [float(i % 2) for i in range(8)])
    before = w.weights("float32", "cuda")
    with torch.no_grad():
        lp0 = learner.response_logprobs(learner.model, batch.to("cuda"))[0]
    metrics = w.train_step(batch)
    with torch.no_grad():
        lp1 = learner.response_logprobs(learner.model, batch.to("cuda"))[0]
    delta = ((lp1 - lp0) * batch.response_mask.cuda()).sum(1)  # [8]
    adv = batch.advantages.cuda()[:, 0]
    assert metrics["actor/grad_norm"] > 0
    assert bool((delta[adv > 0] > 0).all()) and bool((delta[adv < 0] < 0).all())
    w.sync_engine()
    after = w.weights("float32", "cuda")
    for name, value in before.items():
        moved = not torch.equal(after[name], value)
        # LoRA adds B @ A to a target's weight; its bias (qwen2's q/k/v) stays.
        target = any(f".{m}." in name for m in cfg.model.lora.target_modules)
        assert moved == (target and name.endswith(".weight")), name
