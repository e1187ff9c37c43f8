"""LoRA adapters through PEFT (`model.lora`): attach, merge for the rollout engine, save and
load in PEFT's own format.

PEFT wraps the decoder's `nn.Linear` layers in place (`lora.Linear`: the frozen base layer
plus A [r, in] and B [out, r]); the learner keeps calling the same `Decoder`. Every weight but
the adapters is frozen, so gradients and AdamW states exist for the adapters alone. The
adapters stay float32 whatever the compute dtype (PEFT casts a layer's input to them), so
they are their own master weights.

The rollout engine gets merged weights: for each wrapped layer W + (alpha / r) B @ A
(`LoraLayer.get_delta_weight`, PEFT's own), under the plain Hugging Face names, so the engine
and every checkpoint reader see an ordinary model. Checkpoints hold `adapter/`
(`adapter_model.safetensors` + `adapter_config.json`, which `PeftModel.from_pretrained(
AutoModelForCausalLM.from_pretrained(base), adapter_dir)` loads) and, with `save_merged`, the
merged model in `model/`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from rlkit.config.schema import LoRAConfig
from rlkit.models.decoder import Decoder

ADAPTER = "default"  # PEFT's adapter name; its saved files carry no name


def attach(model: Decoder, cfg: LoRAConfig, base_dir: str) -> Any:
    """Wrap `cfg.target_modules` of `model` with LoRA adapters (in place) and freeze the rest;
    returns the PeftModel (for saving: the model to train is still `model`). B starts at zero
    (PEFT's initialisation), so the merged model starts as the base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # typed int; a float scales the same
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER)
    # What a reader of the saved adapter needs: the base it applies to, and that it is a
    # causal LM (our Decoder is not a transformers model, so PEFT could not tell).
    saved = peft_model.peft_config[ADAPTER]
    saved.base_model_name_or_path = os.path.abspath(base_dir)
    saved.task_type = "CAUSAL_LM"
    return peft_model


def _lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with each adapter merged in (W + (alpha / r) B @ A), under the plain
    names (`...q_proj.weight`): what the rollout engine and a merged checkpoint hold. The
    model itself is not changed."""
    layers = _lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        layer_name, _, rest = key.partition(".base_layer.")
        if rest:
            if rest == "weight":
                base = layers[layer_name].base_layer.weight
                delta = layers[layer_name].get_delta_weight(ADAPTER)  # [out, in]
                value = base + delta.to(base.dtype)
            out[f"{layer_name}.{rest}"] = value
        else:
            out[key] = value
    return out


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapters' tensors as PEFT saves them (`base_model.model.<name>.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, adapter_name=ADAPTER)


def save_adapter(peft_model: Any, out_dir: str) -> None:
    peft_model.save_pretrained(out_dir, selected_adapters=[ADAPTER])


def load_adapter(peft_model: Any, adapter_dir: str) -> None:
    """The adapters of a saved `adapter/` folder into `peft_model` (same r and targets)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state, adapter_name=ADAPTER)
    # torch's load_state_dict result (peft types it as a bare namedtuple)
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise ValueError(
            f"{adapter_dir}: the adapter does not match model.lora "
            f"(missing {missing[:2]}, unexpected {unexpected[:2]})"
        )


def trainable_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
