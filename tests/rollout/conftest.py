import pytest
import torch

from rlkit.models import load_model
from rlkit.models.tiny import save_tiny_model
from rlkit.rollout import Engine


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """arch -> a random checkpoint with untied embeddings (tied tiny models just repeat the
    last token, which would make every comparison trivially pass)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        arch: save_tiny_model(str(root / arch), arch, seed=i, tie_word_embeddings=False)
        for i, arch in enumerate(["llama", "qwen2", "qwen3"])
    }


@pytest.fixture
def make_engine(tiny_dirs):
    def make(arch="qwen3", dtype=torch.float32, **kwargs):
        model, tok = load_model(tiny_dirs[arch])
        return Engine(model, tok, dtype=dtype, **kwargs)

    return make


@pytest.fixture
def reference(tiny_dirs):
    """arch -> a float32 model for full-sequence recomputation."""
    cache = {}

    def get(arch="qwen3"):
        if arch not in cache:
            cache[arch] = load_model(tiny_dirs[arch])[0].eval()
        return cache[arch]

    return get


@pytest.fixture
def prompts():
    """Mixed lengths, one of a single token."""
    return [[5, 17, 99, 3], [42], list(range(60, 90)), [7, 7, 7, 7, 7, 200, 31, 4, 9]]


def _greedy(model, prompt, steps):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            hidden = model(torch.tensor([ids]))
            ids.append(int(model.logits(hidden[0, -1]).argmax()))
    return ids[len(prompt) :]


@pytest.fixture
def greedy_reference():
    """greedy_reference(model, prompt, steps): argmax continuation by full forwards, no cache."""
    return _greedy
