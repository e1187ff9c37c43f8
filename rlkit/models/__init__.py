"""rlkit's decoder for the Llama / Qwen2 / Qwen3 family and its Hugging Face checkpoint I/O."""

from rlkit.models.config import ModelArgs
from rlkit.models.decoder import Decoder
from rlkit.models.loading import DEFAULT_MODEL, load_model, resolve_model_dir, save_pretrained
from rlkit.models.tokenizer import apply_chat, eos_token_ids, load_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "Decoder",
    "ModelArgs",
    "apply_chat",
    "eos_token_ids",
    "load_model",
    "load_tokenizer",
    "resolve_model_dir",
    "save_pretrained",
]
