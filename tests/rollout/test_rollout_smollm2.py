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
