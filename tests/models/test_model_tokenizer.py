import json

import pytest

from rlkit.models import apply_chat, eos_token_ids, load_tokenizer
from rlkit.models.tiny import tiny_args, tiny_tokenizer


def test_string_prompt_is_one_user_message():
    tok = tiny_tokenizer()
    as_string = apply_chat(tok, "2+3?")
    as_messages = apply_chat(tok, [{"role": "user", "content": "2+3?"}])
    assert as_string == as_messages
    text = tok.decode(as_string)
    assert text == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    # Special tokens are single ids, written once by the template.
    assert as_string.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2


def test_messages_keep_roles_and_order():
    tok = tiny_tokenizer()
    ids = apply_chat(tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert tok.decode(ids).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU")


def test_without_chat_template():
    tok = tiny_tokenizer()
    tok.chat_template = None
    assert apply_chat(tok, "abc") == tok.encode("abc")
    with pytest.raises(ValueError, match="chat template"):
        apply_chat(tok, [{"role": "user", "content": "abc"}])


def test_eos_ids_gather_config_tokenizer_and_generation_config(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(str(tmp_path))
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [7, 8]}, f)
    loaded = load_tokenizer(str(tmp_path))
    ids = eos_token_ids(loaded, tiny_args(eos_token_ids=[5]))
    im_end = loaded.convert_tokens_to_ids("<|im_end|>")
    assert {5, 7, 8, im_end} <= ids
