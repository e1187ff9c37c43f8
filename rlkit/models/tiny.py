"""Tiny random checkpoints with a byte-level tokenizer, for tests that need a whole model
(engine, learner, trainer end to end) in milliseconds instead of SmolLM2's seconds."""

from __future__ import annotations

from typing import Any

import torch

from rlkit.models.config import ModelArgs
from rlkit.models.decoder import Decoder
from rlkit.models.loading import save_pretrained

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> Any:
    """Byte-level tokenizer without merges: 256 byte tokens, then SPECIAL_TOKENS (ids 256-258),
    ChatML template, eos `<|im_end|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    out.chat_template = CHATML
    return out


def tiny_args(arch: str = "llama", **overrides: Any) -> ModelArgs:
    base: dict[str, Any] = dict(
        arch=arch,
        vocab_size=256 + len(SPECIAL_TOKENS),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=None,
        eos_token_ids=[258],
        pad_token_id=256,
        max_position_embeddings=1024,
    )
    base.update(overrides)
    return ModelArgs(**base)


def save_tiny_model(out_dir: str, arch: str = "llama", seed: int = 0, **overrides: Any) -> str:
    """Write a random `arch` checkpoint (Hugging Face format) with the tiny tokenizer."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Decoder(tiny_args(arch, **overrides))
        # Hugging Face's initialisation (normal, std 0.02): PyTorch's default N(0, 1) embedding,
        # tied to the LM head, makes the next-token distribution a near one-hot.
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, tiny_tokenizer(), out_dir)
    return out_dir
