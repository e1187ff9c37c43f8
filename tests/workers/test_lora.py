"""LoRA through PEFT (`model.lora`) on a tiny model, without Ray: updates follow the
advantages and touch only the adapters; the saved adapter loads in PEFT on the Hugging Face
model and gives the logits of rlkit's merged model; a checkpoint resumes the adapters."""

import json
import os

import pytest
import torch

from rlkit.algorithms import ADVANTAGES
from rlkit.config import load_recipe
from rlkit.config.errors import ConfigError
from rlkit.data.batch import RolloutBatch
from rlkit.models.loading import load_model, read_state_dict
from rlkit.models.tiny import save_tiny_model
from rlkit.workers.learner import Learner

LORA = [
    "model.compute_dtype=none",
    "model.lora.r=4",
    "model.lora.alpha=8",
    "model.lora.target_modules=[q_proj,v_proj,gate_proj,down_proj]",
    "optim.lr=1e-2",
    "train.micro_batch_size=3",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "m"), seed=2)


def _batch():
    g = torch.Generator().manual_seed(0)
    group_prompts = [torch.randint(0, 250, (5,), generator=g).tolist() for _ in range(2)]
    prompts = [group_prompts[i // 2] for i in range(4)]
    responses = [torch.randint(0, 250, (4,), generator=g).tolist() for _ in range(4)]
    b = RolloutBatch.from_sequences(
        prompts, responses, [[-5.0] * 4] * 4, [1.0, 0.0, 0.0, 1.0], [0, 0, 1, 1]
    )
    b.advantages = ADVANTAGES.get("grpo")(b.rewards, b.group_ids, b.response_mask)
    return b


def test_lora_update_follows_the_advantage_and_trains_only_the_adapters(model_dir, tmp_path):
    learner = Learner(model_dir, load_recipe(None, [*LORA, "model.lora.save_merged=true"]))
    base = read_state_dict(model_dir)
    trainable = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    batch = _batch()
    before, _ = learner.response_logprobs(learner.model, batch)
    metrics = learner.train_step(batch)
    after, _ = learner.response_logprobs(learner.model, batch)
    delta = ((after - before) * batch.response_mask).sum(1)  # [4]
    assert metrics["actor/grad_norm"] > 0
    # Rewarded samples (0 and 3) gain log-probability, the others lose it.
    assert delta[0] > 0 and delta[3] > 0 and delta[1] < 0 and delta[2] < 0
    # The synced weights are merged: the adapted layers moved, nothing else did.
    merged = learner.weights("float32")
    assert set(merged) - {"lm_head.weight"} == set(base)  # tied to the embedding
    for name, value in base.items():
        adapted = any(f".{m}." in name for m in ("q_proj", "v_proj", "gate_proj", "down_proj"))
        assert torch.equal(merged[name], value) != adapted, name
    learner.save(str(tmp_path))
    assert {"adapter", "model", "learner.pt"} <= set(os.listdir(tmp_path))
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert config["r"] == 4 and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == os.path.abspath(model_dir)
    # The merged checkpoint is the synced model; a fresh learner resumes the adapters.
    for name, value in read_state_dict(str(tmp_path / "model")).items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=0)
    other = Learner(model_dir, load_recipe(None, LORA))
    other.load(str(tmp_path))
    torch.testing.assert_close(other.response_logprobs(other.model, batch)[0], after)
    # The optimizer's state came back too: the next steps are the same.
    m1, m2 = learner.train_step(_batch()), other.train_step(_batch())
    assert m1["actor/loss"] == pytest.approx(m2["actor/loss"], rel=1e-6)


def test_saved_adapter_loads_in_peft_with_the_merged_models_logits(model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    learner = Learner(model_dir, load_recipe(None, LORA))
    learner.train_step(_batch())
    learner.train_step(_batch())
    learner.save(str(tmp_path))
    assert not os.path.exists(tmp_path / "model")  # merged only with model.lora.save_merged
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    peft = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ours, _ = load_model(model_dir, dtype=torch.float32)
    ours_base, _ = load_model(model_dir, dtype=torch.float32)
    ours.load_state_dict(learner.weights("float32"))
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
        mine = ours.logits(ours(ids))
        base = ours_base.logits(ours_base(ids))
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    with peft.disable_adapter(), torch.no_grad():
        plain = peft(input_ids=ids).logits
    assert (plain - theirs).abs().max() > 1e-3  # the adapters do change the model
    # PEFT with its adapters switched off is the base model.
    torch.testing.assert_close(plain, base, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, key, words",
    [
        (["model.lora.save_merged=true"], "model.lora.save_merged", "needs model.lora.r > 0"),
        (["model.lora.r=4", "model.lora.target_modules=[lm_head]"], "model.lora.target_modules[0]", "must be one of"),
        (["train.shard=true"], "train.shard", "needs train.num_learners >= 2"),
        (["train.num_learners=2", "train.shard=true", "model.lora.r=4"], "train.shard", "model.lora"),
        (["train.num_learners=2", "train.shard=true", "algorithm.kl_coef=0.1"], "train.shard", "kl_coef"),
        (["train.async_mode=one_step_off", "algorithm.tis_cap=null"], "train.async_mode", "tis_cap"),
    ],
)  # fmt: skip
def test_what_cannot_work_is_refused_at_its_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, overrides)
    assert e.value.key == key and words in str(e.value)
