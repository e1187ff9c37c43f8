import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlkit.models import Decoder, ModelArgs, load_model, resolve_model_dir
from rlkit.models.loading import load_weights, read_state_dict


def _ids(vocab, shape, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(hf_checkpoint):
    name, hf, path = hf_checkpoint
    model, _ = load_model(path)
    # 60 positions: past the 16/32-token original context of the llama3 / yarn cases.
    ids = _ids(model.args.vocab_size, (2, 60))
    with torch.no_grad():
        ours = model.logits(model(ids))
        ref = hf(ids).logits
    assert ref.abs().max() > 1.0, "weights too small for the comparison to mean anything"
    assert (ours - ref).abs().max().item() <= 1e-4, name


@pytest.mark.parametrize("name", ["llama3-rope", "qwen3-yarn-bias", "llama-linear-rope"])
def test_rope_scaling_is_exercised(name, checkpoint):
    path = checkpoint(name)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    scaled = ModelArgs.from_hf(cfg)
    assert scaled.rope_scaling is not None and scaled.rope_scaling["rope_type"] in name
    plain = ModelArgs(**{**scaled.__dict__, "rope_scaling": None})
    state = read_state_dict(path)
    a, b = Decoder(scaled), Decoder(plain)
    load_weights(a, state)
    load_weights(b, state)
    ids = _ids(scaled.vocab_size, (1, 60))
    with torch.no_grad():
        assert (a.logits(a(ids)) - b.logits(b(ids))).abs().max() > 1e-3


def test_right_padding_matches_unpadded(checkpoint):
    model, _ = load_model(checkpoint("qwen3"))
    lengths = [5, 12, 9]
    seqs = [_ids(model.args.vocab_size, (n,), seed=n) for n in lengths]
    ids = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    with torch.no_grad():
        batch = model(ids, mask)
        for i, s in enumerate(seqs):
            single = model(s[None])[0]
            torch.testing.assert_close(batch[i, : len(s)], single, atol=1e-5, rtol=1e-5)
            assert torch.isfinite(batch[i]).all()


def test_left_padding_is_rejected(checkpoint):
    model, _ = load_model(checkpoint("llama-tied"))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        model(torch.zeros(2, 3, dtype=torch.long), mask)


def test_gradient_checkpointing_gives_same_gradients(checkpoint):
    model, _ = load_model(checkpoint("qwen2"))
    model.train()
    ids = _ids(model.args.vocab_size, (2, 10))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model.logits(model(ids)).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1)


@pytest.mark.slow
def test_smollm2_logits_match_transformers():
    # The converted default checkpoint against transformers reading the same directory;
    # GGUF dequantisation itself is transformers' own (it runs once, at conversion).
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))
    model, tok = load_model(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("What is 37 + 48? Answer with just the number.")])
    with torch.no_grad():
        ours = model.logits(model(ids))
        ref = hf(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    assert model.args.arch == "llama" and model.args.tie_word_embeddings


def test_fused_projections_keep_logits_and_follow_weight_loads(checkpoint):
    model, _ = load_model(checkpoint("qwen2"))  # q/k/v biases are fused too
    ids = _ids(model.args.vocab_size, (2, 9))
    with torch.no_grad():
        before = model.logits(model(ids))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.fuse_projections()
        torch.testing.assert_close(model.logits(model(ids)), before, atol=1e-5, rtol=1e-5)
        # Loading through the HF names must reach the fused matrices.
        state["model.layers.0.self_attn.k_proj.weight"].mul_(-1)
        state[
            "model.layers.1.mlp.up_proj.bias"
            if model.args.mlp_bias
            else "model.layers.1.mlp.up_proj.weight"
        ].mul_(2)
        load_weights(model, state)
        fresh = Decoder(model.args)
        load_weights(fresh, state)
        torch.testing.assert_close(
            model.logits(model(ids)), fresh.logits(fresh(ids)), atol=1e-5, rtol=1e-5
        )
