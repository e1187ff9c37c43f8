"""Model hyper-parameters, read from and written to a Hugging Face `config.json` dict."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# model_type -> the Hugging Face class that loads it.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass
class ModelArgs:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Hugging Face rope parameters beyond theta ({"rope_type": "llama3", "factor": 8.0, ...});
    # None is plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    # Qwen2 has biases on q/k/v only; Llama and Qwen3 `attention_bias` covers o_proj too.
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: RMSNorm over head_dim on each query and key head, before RoPE.
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelArgs:
        arch = _detect_arch(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        if cfg.get("use_sliding_window", False):
            raise ValueError("sliding-window attention (use_sliding_window: true) is not supported")
        heads = cfg["num_attention_heads"]
        theta, scaling = _parse_rope(cfg)
        attention_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "qwen2" or attention_bias,
            o_bias=arch != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=arch == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        )

    def to_hf(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        ids = self.eos_token_ids
        eos: int | list[int] | None = ids[0] if len(ids) == 1 else (list(ids) or None)
        cfg: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            # Both spellings: transformers 5 reads rope_parameters (rope_scaling first when
            # present), transformers 4 reads rope_theta / rope_scaling.
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = dict(rope)
        if self.arch != "qwen2":
            cfg["attention_bias"] = self.qkv_bias
        if self.arch == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        if self.arch == "qwen2":
            cfg["use_sliding_window"] = False
        return cfg


def _detect_arch(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if model_type in ARCHITECTURES:
        return model_type
    for name in cfg.get("architectures") or []:
        for arch, cls_name in ARCHITECTURES.items():
            if name == cls_name:
                return arch
    raise ValueError(
        f"unsupported architecture (model_type={model_type!r}, "
        f"architectures={cfg.get('architectures')!r}); supported model types: {sorted(ARCHITECTURES)}"
    )


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 4 keeps theta at the top level and scaling in rope_scaling; transformers 5
    # folds both into rope_parameters (and still prefers rope_scaling when both are present).
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return theta, scaling


def rope_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale, as Hugging Face computes them.

    "dynamic" (NTK) rescales only past max_position_embeddings, which a KV cache of rotated keys
    cannot follow; within the trained length it equals plain RoPE, which is what this returns.
    """
    dim = args.head_dim
    base = args.rope_theta
    inv_freq = 1.0 / (
        base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    s = args.rope_scaling or {"rope_type": "default"}
    kind = s["rope_type"]
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        return _llama3(inv_freq, s), 1.0
    return _yarn(dim, base, s, args.max_position_embeddings)


def _llama3(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def _yarn(dim: int, base: float, s: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    # High-frequency dims extrapolate (keep), low-frequency dims interpolate (divide by factor).
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn)
