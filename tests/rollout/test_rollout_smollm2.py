import pytest
import torch

from rlkit.models import apply_chat, load_model, resolve_model_dir
from rlkit.rollout import Engine, SamplingParams


@pytest.mark.slow
def test_greedy_matches_transformers_generate_on_smollm2():
    from transformers import AutoModelForCausalLM

    model, tok = load_model("smollm2-135m-instruct")
    questions = [
        "What is 37 + 48? Answer with just the number.",
        "Name a colour.",
        "Write the first three prime numbers, separated by commas.",
        "Hi",
    ]
    prompts = [apply_chat(tok, q) for q in questions]
    assert len({len(p) for p in prompts}) == 4
    engine = Engine(model, tok, dtype=torch.float32)
    out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=16))
    hf = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir("smollm2-135m-instruct"), dtype=torch.float32
    ).eval()
    # One left-padded batch (transformers' convention for batched generation).
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        ref = hf.generate(
            **batch, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id
        )
    width = batch["input_ids"].shape[1]
    for c, row in zip(out, ref[:, width:].tolist(), strict=True):
        # transformers pads finished rows after EOS; the engine stops at EOS.
        ref_new = row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row
        assert c.token_ids == ref_new, (c.text, tok.decode(ref_new))
        assert c.finish_reason == ("stop" if ref_new[-1] in engine.eos_ids else "length")


@pytest.mark.slow
def test_greedy_speculative_equals_dense_on_smollm2():
    """Lossless on the real model: each drafter (an untrained MTP module, SAM, SAM + MTP)
    decodes exactly the dense greedy tokens for mixed-length prompts, through the verify
    step's multi-token forward (the fused C step where this CPU has the kernels)."""
    from rlkit.config.schema import SpeculativeConfig
    from rlkit.models.mtp import init_mtp

    model, tok = load_model("smollm2-135m-instruct")
    questions = [
        "Count from 1 to 30, separated by commas, please.",
        "What is 37 + 48? Answer with just the number.",
        "Write the word 'apple' ten times, one per line.",
        "Hi",
    ]
    prompts = [apply_chat(tok, q) for q in questions]
    assert len({len(p) for p in prompts}) == 4
    spec = SpeculativeConfig(drafter="sam+mtp", num_draft_tokens=3, sam_min_match=3)
    engine = Engine(
        model, tok, dtype=torch.float32, speculative=spec, mtp=init_mtp(model.args, seed=0)
    )
    sp = SamplingParams(temperature=0.0, max_new_tokens=32)
    dense = engine.generate(prompts, sp, drafter="none")
    for drafter in ("mtp", "sam", "sam+mtp"):
        out = engine.generate(prompts, sp, drafter=drafter)
        for c, ref in zip(out, dense, strict=True):
            assert c.token_ids == ref.token_ids, (drafter, c.text, ref.text)
            assert c.finish_reason == ref.finish_reason
            torch.testing.assert_close(c.logprobs, ref.logprobs, atol=2e-3, rtol=0)
        if "sam" in drafter:  # counting and repeating: the automaton's drafts pass
            assert engine.stats["spec/accept_len_mean"] > 1.1, (drafter, engine.stats)
