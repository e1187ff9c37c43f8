import os

import pytest

from rlkit.models.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "llama"), arch="llama", seed=0)


def _tiny_recipe(path: str, model_dir: str, run_dir: str, steps: int = 3, extra: str = "") -> str:
    """A recipe that runs the whole RLVR loop on a tiny random model in seconds."""
    text = f"""# Run: rlkit train {os.path.basename(path)}
model:
  path: {model_dir}
  compute_dtype: none
data:
  task: arithmetic
  num_train: 64
  num_eval: 8
rollout:
  n: 4
  temperature: 1.0
  max_new_tokens: 6
  dtype: float32
algorithm:
  advantage: grpo
optim:
  lr: 1.0e-3
train:
  steps: {steps}
  prompts_per_step: 4
  micro_batch_size: 8
eval:
  max_new_tokens: 6
run:
  name: e2e
  dir: {run_dir}
  wandb: disabled
  progress_bar: false
ray:
  num_cpus: 2
  object_store_memory_mb: 128
{extra}"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture
def tiny_recipe():
    return _tiny_recipe


PARITY_VERIFIER = '''
def parity(completion, sample):
    """Half the completions of a random model score 1: enough signal to move the learner."""
    return float(sum(map(ord, completion)) % 2)
'''


@pytest.fixture
def parity_verifier(tmp_path) -> str:
    path = tmp_path / "my_verifier.py"
    path.write_text(PARITY_VERIFIER)
    return f"{path}:parity"
