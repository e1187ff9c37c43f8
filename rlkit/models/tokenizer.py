"""Tokenizer helpers: loading, chat formatting, end-of-sequence ids."""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoTokenizer

from rlkit.models.config import ModelArgs

# Turn and document terminators of common chat templates (ChatML, Llama 3); added to the
# end-of-sequence set when the vocabulary has them.
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")

Prompt = str | list[dict[str, str]]


def load_tokenizer(model_dir: str) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def apply_chat(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt ready for generation (the assistant turn is opened).

    A string becomes one user message when the tokenizer has a chat template; without a
    template a string is encoded as plain text (with the tokenizer's BOS, if any).
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if isinstance(prompt, str) and not has_template:
        return list(tokenizer.encode(prompt))
    if not has_template:
        raise ValueError("chat messages need a tokenizer with a chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes its special tokens itself; adding them again would double the BOS.
    return list(tokenizer.encode(text, add_special_tokens=False))


def eos_token_ids(tokenizer: Any, model_args: ModelArgs | None = None) -> set[int]:
    """Every id that ends a completion: config.json's and generation_config.json's eos ids,
    the tokenizer's eos, and the chat terminators the vocabulary has."""
    ids: set[int] = set(model_args.eos_token_ids if model_args is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_TOKENS if t in vocab)
    gen_path = os.path.join(str(getattr(tokenizer, "name_or_path", "")), "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids
