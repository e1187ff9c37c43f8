import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from rlkit.models.tiny import tiny_tokenizer

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# name -> Hugging Face config of a tiny checkpoint (the names are the test ids).
CONFIGS = {
    "llama-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama-untied-mha": lambda: LlamaConfig(
        **{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=False
    ),
    "llama3-rope": lambda: LlamaConfig(
        **SMALL,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "llama-linear-rope": lambda: LlamaConfig(
        **SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
    "qwen2": lambda: Qwen2Config(**SMALL, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**SMALL, head_dim=24, tie_word_embeddings=True),
    "qwen3-yarn-bias": lambda: Qwen3Config(
        **SMALL,
        head_dim=16,
        attention_bias=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ),
}


def make_hf_checkpoint(name: str, out_dir) -> AutoModelForCausalLM:
    """A random Hugging Face checkpoint with weights large enough that a wrong op shows."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # Norm weights around 1, everything else O(0.1): logits of order 1-10.
            noise = torch.randn_like(p)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    hf.save_pretrained(str(out_dir))
    tiny_tokenizer().save_pretrained(str(out_dir))
    return hf


@pytest.fixture(params=sorted(CONFIGS))
def hf_checkpoint(request, tmp_path):
    hf = make_hf_checkpoint(request.param, tmp_path)
    return request.param, hf, str(tmp_path)


@pytest.fixture
def checkpoint(tmp_path):
    """checkpoint(name) -> directory of a fresh tiny Hugging Face checkpoint."""

    def make(name: str) -> str:
        out = tmp_path / name
        make_hf_checkpoint(name, out)
        return str(out)

    return make
