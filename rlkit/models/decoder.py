"""Decoder-only transformer of the Llama / Qwen2 / Qwen3 family.

Parameter names follow Hugging Face (`model.layers.N.self_attn.q_proj.weight`, ...), so a
checkpoint's safetensors load 1:1. Two entry points share every weight and every op but
attention:

- `forward(input_ids, attention_mask)`: full causal attention over a right-padded batch
  (training, scoring);
- `forward_cached(input_ids, positions, cache)`: the new tokens' keys and values go to `cache`,
  which also computes their attention (`cache.attend`), so a KV cache decides where keys live
  (dense slots, a compressed subset, pages) without the decoder knowing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlkit.kernels import cpu as cpu_kernels
from rlkit.kernels import decode_gemm, fused_norm
from rlkit.models.config import ModelArgs, rope_frequencies

# A linear's (weight, bias): plain or oneDNN-prepacked weight with its bias, or the AVX2 GEMM's
# packed layer (which holds its bias) and None.
Weights = tuple[torch.Tensor | cpu_kernels.PackedLinear, torch.Tensor | None]

# Packed-weight layouts for inference on CPU (`Decoder.prepack_weights`): "avx2", the float32
# GEMM of the AVX2 C kernels (`cpu_kernels.pack_linear`), and "onednn" (`prepack`).
PACK_LAYOUTS = ("avx2", "onednn")


def can_pack(layout: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights packed in `layout` (one of PACK_LAYOUTS) compute on this device and
    dtype: "avx2" for float32 on a CPU where the float32 C kernels run, "onednn" where
    `can_prepack`."""
    if layout == "avx2":
        return device.type == "cpu" and dtype == torch.float32 and cpu_kernels.available(dtype)
    if layout == "onednn":
        return can_prepack(device, dtype)
    raise ValueError(f"unknown packed-weight layout {layout!r}: expected one of {PACK_LAYOUTS}")


def default_pack_layout(device: torch.device, dtype: torch.dtype) -> str | None:
    """The layout the rollout engine packs its weights in by default: "avx2" for a float32
    model on a CPU whose instruction set in use is AVX2 (there it streams the weights at
    close to the FMA peak, where oneDNN's GEMM reached about two thirds of it), "onednn"
    elsewhere that oneDNN prepacks (bf16 engines; float32 on an AVX-512 CPU, where oneDNN's
    GEMM has twice the vector width), None where neither runs (GPU, aarch64 without oneDNN)."""
    if cpu_kernels.isa() == "avx2" and can_pack("avx2", device, dtype):
        return "avx2"
    return "onednn" if can_prepack(device, dtype) else None


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN-prepacked linear weights are available for this device and dtype."""
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float32)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


def prepack(weight: torch.Tensor, batch_hint: int) -> torch.Tensor:
    """weight [out, in] reordered into oneDNN's blocked layout for GEMMs of about
    `batch_hint` rows: the layout change is done once instead of at every call."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)


def linear(
    x: torch.Tensor, weight: torch.Tensor | cpu_kernels.PackedLinear, bias: torch.Tensor | None
) -> torch.Tensor:
    """F.linear for a plain, a oneDNN-prepacked (`prepack`: the same oneDNN GEMM, identical
    results) or an AVX2-packed weight (`cpu_kernels.pack_linear`, which holds the bias: its
    own GEMM, equal up to float32 summation order)."""
    if isinstance(weight, cpu_kernels.PackedLinear):
        assert bias is None, "a PackedLinear holds its bias"
        return cpu_kernels.linear(x, weight)
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# An inference projection: x [..., K] with a layer's fused weights (`linear`'s arguments).
Projection = Callable[
    [torch.Tensor, "torch.Tensor | cpu_kernels.PackedLinear", "torch.Tensor | None"], torch.Tensor
]


def linear_partials(
    x: torch.Tensor, weight: torch.Tensor | cpu_kernels.PackedLinear, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., K] @ weight^T as partial sums [S, M, N] (M = x's rows): a split-K GEMM where
    `decode_gemm.split_k` takes it (a GPU decode step's narrow projections), else `linear`'s
    result as the one partial [1, M, N]. `fused_norm.add_rms_norm` sums them."""
    x2 = x.reshape(-1, x.shape[-1])
    splits = decode_gemm.split_k(x2, weight, bias)
    if splits:
        assert isinstance(weight, torch.Tensor)
        return decode_gemm.linear_partials(x2, weight, splits)
    return linear(x2, weight, bias)[None]


class AttentionCache(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' k/v [B, KVH, T, D] and return attention of q [B, H, T, D]
        (RoPE already applied to q and k) over everything cached: [B, H, T, D]."""
        ...


class FusedDecodeCache(AttentionCache, Protocol):
    def fused_target(self, layer: int) -> FusedTarget | None:
        """For a decode step of T tokens per sequence: where `layer`'s new k/v go and what it
        attends over, for `cpu_kernels.rope_append_attend`; None when the layer needs `attend`
        (e.g. a policy that reads the attention probabilities)."""
        ...


# k store, v store [B, KVH, cap, D], lengths [B] after the T tokens, query ring [B, H, W, D]
# and the tokens' ring slots [B * T] (or None, None).
FusedTarget = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None
]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            # One fused kernel each way (float32 statistics, one rounding at the end) instead
            # of eight launches forward and more backward: on a GPU a small model's learner
            # step is bound by launches.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in float32, multiply in the input dtype (as Hugging Face does).
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout: x [B, heads, T, D], cos/sin [B, 1, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = args.num_heads
        self.num_kv_heads = args.num_kv_heads
        self.head_dim = args.head_dim
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, args.num_heads * d, bias=args.qkv_bias)
        self.k_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.v_proj = nn.Linear(h, args.num_kv_heads * d, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * d, h, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(d, args.rms_norm_eps)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        # Inference only: fused q/k/v and the output projection (plain or prepacked weights).
        self.qkv: Weights | None = None
        self.o: Weights | None = None

    def fuse(self) -> None:
        """Inference only: one GEMM for q, k and v. The three weights become views of the
        fused matrix, so `load_state_dict` into them updates it."""
        self.qkv = _fuse((self.q_proj, self.k_proj, self.v_proj))
        self.o = (self.o_proj.weight, self.o_proj.bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,  # [B, 1, T, D]
        sin: torch.Tensor,
        cache: AttentionCache | None,
        project: Projection = linear,
    ) -> torch.Tensor:
        """[B, T, hidden]; with the fused weights (`fuse`) the output projection is
        project(out, *self.o) (`_run_glued` passes `linear_partials`: [S, B * T, hidden])."""
        B, T, _ = x.shape
        if self.qkv is not None:
            return self.attend_projected(linear(x, *self.qkv), cos, sin, cache, project)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        return self._attend(q, k, v, cos, sin, cache)

    def attend_projected(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: AttentionCache | None,
        project: Projection = linear,
    ) -> torch.Tensor:
        """The rest of `forward` after the fused q/k/v projection qkv [B, T, (H + 2 KVH) D]."""
        B, T = qkv.shape[:2]
        qkv = qkv.view(B, T, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        return self._attend(q, k, v, cos, sin, cache, project)

    def _attend(self, q, k, v, cos, sin, cache, project: Projection = linear):
        B, T = q.shape[:2]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # A cache may rotate and store in one kernel (`KVCache.attend_rope`, a GPU decode step).
        fused = getattr(cache, "attend_rope", None)
        out = None if fused is None else fused(self.layer, q, k, v, cos, sin)
        if out is not None:
            out = out.transpose(1, 2).reshape(B, T, -1)
            return project(out, *self.o) if self.o is not None else self.o_proj(out)
        q = rotate(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = rotate(k.transpose(1, 2), cos, sin)  # [B, KVH, T, D]
        v = v.transpose(1, 2)
        if cache is None:
            # Right padding: with a causal mask no real token ever sees a pad token.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = cache.attend(self.layer, q, k, v)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return project(out, *self.o) if self.o is not None else self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=args.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=args.mlp_bias)
        # Inference only: fused gate/up and the down projection (plain or prepacked weights).
        self.gate_up: Weights | None = None
        self.down: Weights | None = None

    def fuse(self) -> None:
        """Inference only: one GEMM for gate and up (weights become views of it)."""
        self.gate_up = _fuse((self.gate_proj, self.up_proj))
        self.down = (self.down_proj.weight, self.down_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and self.down is not None:
            gate, up = linear(x, *self.gate_up).chunk(2, dim=-1)
            return linear(F.silu(gate) * up, *self.down)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fuse(linears: tuple[nn.Linear, ...]) -> Weights:
    """Concatenate the linears' weights (and biases) along the output dim; each linear's
    parameters become views of the result."""

    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(m, name) for m in linears]
        if parts[0] is None:
            return None
        fused = torch.cat([p.detach() for p in parts])  # [sum(out), ...]
        start = 0
        for m, p in zip(linears, parts, strict=True):
            setattr(m, name, nn.Parameter(fused[start : start + p.shape[0]], requires_grad=False))
            start += p.shape[0]
        return fused

    weight = cat("weight")
    assert weight is not None
    return weight, cat("bias")


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """The `model.` prefix of Hugging Face names."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


@dataclass(frozen=True)
class FusedLayer:
    """One decoder layer's weights as the CPU decode kernels take them: fused q/k/v and
    gate/up (`fuse`), plain or packed (`Decoder.pack_weights`)."""

    in_norm: torch.Tensor
    qkv: Weights
    o: Weights
    post_norm: torch.Tensor
    gate_up: Weights
    down: Weights

    @staticmethod
    def of(layer: DecoderLayer) -> FusedLayer:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.qkv is not None and attn.o is not None
        assert mlp.gate_up is not None and mlp.down is not None
        norms = (layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight)
        return FusedLayer(norms[0], attn.qkv, attn.o, norms[1].detach(), mlp.gate_up, mlp.down)


def one_call_layers(layers: list[FusedLayer], final_norm: torch.Tensor) -> cpu_kernels.DecodeLayers:
    """`layers` (AVX2-packed float32 weights) and the final norm for `cpu_kernels.
    decode_layers`."""
    weights: list[cpu_kernels.LayerWeights] = []
    for lay in layers:
        packed = (lay.qkv[0], lay.o[0], lay.gate_up[0], lay.down[0])
        assert all(isinstance(w, cpu_kernels.PackedLinear) for w in packed)
        qkv, o, gate_up, down = cast(tuple[cpu_kernels.PackedLinear, ...], packed)
        weights.append((lay.in_norm, qkv, o, lay.post_norm, gate_up, down))
    return cpu_kernels.prepare_decode_layers(weights, final_norm)


def fused_layers(
    x: torch.Tensor,
    cos4: torch.Tensor,
    sin4: torch.Tensor,
    layers: list[FusedLayer],
    final_norm: torch.Tensor,
    targets: list[FusedTarget | None],
    args: ModelArgs,
    one_call: cpu_kernels.DecodeLayers | None = None,
    attend: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A stack of decoder layers over T new tokens per row on the CPU kernels: per layer four
    GEMMs over the B * T rows and three kernel calls (residual add + RMSNorm, RoPE + cache
    append + causal attention, SiLU * up) instead of some twenty PyTorch ops; with `one_call`
    (`one_call_layers`: AVX2-packed float32 weights, every target fused) all of them in one C
    call (`cpu_kernels.decode_layers`: the same kernels without a Python round trip between
    them). Same rounding points as the PyTorch path (bf16), or float32 throughout.

    x [B * T, hidden]: a fresh tensor, the residual stream, updated in place (it ends as the
    last layer's output); cos4/sin4 [B, 1, T, D]; targets[i]: where layer i's new k/v go and
    what it attends over, or None where `attend(i, qkv [B, T, -])` must (the output
    projection included). Returns `final_norm`(x) [B * T, hidden]."""
    B, T = cos4.shape[0], cos4.shape[2]
    cos, sin = cos4.reshape(B * T, -1), sin4.reshape(B * T, -1)
    scale, eps = args.head_dim**-0.5, args.rms_norm_eps
    if one_call is not None:
        full = cast(list[FusedTarget], targets)
        return cpu_kernels.decode_layers(x, cos, sin, one_call, full, args.num_heads, eps, scale, T)
    h = cpu_kernels.add_rms_norm(x, None, layers[0].in_norm, eps)
    for i, lay in enumerate(layers):
        qkv = linear(h, *lay.qkv)  # [B * T, (H + 2 KVH) D]
        target = targets[i]
        if target is None:
            assert attend is not None, f"layer {i} has no fused attention target"
            out = attend(i, qkv)
        else:
            k, v, lengths, ring, ring_pos = target
            att = cpu_kernels.rope_append_attend(
                qkv, cos, sin, k, v, lengths, args.num_heads, scale, ring, ring_pos, T
            )
            out = linear(att, *lay.o)
        h = cpu_kernels.add_rms_norm(x, out, lay.post_norm, eps)
        down = linear(cpu_kernels.silu_mul(linear(h, *lay.gate_up)), *lay.down)
        norm = layers[i + 1].in_norm if i + 1 < len(layers) else final_norm
        h = cpu_kernels.add_rms_norm(x, down, norm, eps)
    return h


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Trunk(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        # Not a buffer: `.to(bfloat16)` would round the frequencies and shift every position.
        self._inv_freq, self._rope_scale = rope_frequencies(args)
        self.gradient_checkpointing = False
        # Set by `prepack_weights` (inference on CPU).
        self._batch_hint = 1
        self._pack_layout: str | None = None
        self._lm_head_packed: torch.Tensor | cpu_kernels.PackedLinear | None = None
        # The layers for `cpu_kernels.decode_layers` (AVX2-packed float32 weights), built on
        # the first fused decode step after each packing.
        self._decode_layers: cpu_kernels.DecodeLayers | None = None
        # The layers' weights as the CPU kernels take them, built on the first fused decode
        # step after each fusing or packing (`FusedLayer`).
        self._fused: list[FusedLayer] | None = None

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Inference only (the rollout engine): fuse q/k/v and gate/up into one GEMM each.
        Parameters keep their names and stay loadable; they no longer train. A packed
        model's projections are fused already (packing released the plain weights)."""
        if self._pack_layout is not None:
            return
        for layer in self.model.layers:
            cast(DecoderLayer, layer).self_attn.fuse()
            cast(DecoderLayer, layer).mlp.fuse()
        self._decode_layers = self._fused = None

    # Per layer: (module, fused tuple attribute, parameter names it is made of).
    _PACKED = (
        ("self_attn", "qkv", ("q_proj", "k_proj", "v_proj")),
        ("self_attn", "o", ("o_proj",)),
        ("mlp", "gate_up", ("gate_proj", "up_proj")),
        ("mlp", "down", ("down_proj",)),
    )

    @property
    def prepacked(self) -> bool:
        return self._pack_layout is not None

    @property
    def pack_layout(self) -> str | None:
        """The layout of the packed weights (`PACK_LAYOUTS`), None when not packed."""
        return self._pack_layout

    def _packed_groups(self) -> list[tuple[nn.Module, str, tuple[str, ...], list[str]]]:
        """(module, fused attribute, its linears, their weights' state-dict names) per layer."""
        return [
            (
                getattr(layer, part),
                attr,
                names,
                [f"model.layers.{i}.{part}.{n}.weight" for n in names],
            )
            for i, layer in enumerate(self.model.layers)
            for part, attr, names in self._PACKED
        ]

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Weights:
        """One linear's weight [out, in] (and bias) in the model's packed layout."""
        if self._pack_layout == "avx2":
            return cpu_kernels.pack_linear(weight, bias), None
        return prepack(weight, self._batch_hint), bias

    @staticmethod
    def _bias(weights: Weights) -> torch.Tensor | None:
        weight, bias = weights
        return weight.bias if isinstance(weight, cpu_kernels.PackedLinear) else bias

    def prepack_weights(self, batch_hint: int, layout: str = "onednn") -> None:
        """Inference on CPU, after `fuse_projections`: every linear of the layers and the LM
        head compute with weights packed once in `layout` (`PACK_LAYOUTS`, `can_pack`)
        instead of at every call: "onednn" reorders them for oneDNN GEMMs of about
        `batch_hint` rows (outputs identical to the unpacked model's: the same GEMM reads a
        different layout), "avx2" packs them for the float32 GEMM of the AVX2 C kernels
        (`cpu_kernels.pack_linear`; outputs equal up to float32 summation order). The
        layers' plain weights are released (no second copy of the model), so their
        parameters become empty and new weights load through `load_weights` (which calls
        `load_prepacked`). Biases stay the model's parameters (packed linears share them)."""
        if self._pack_layout == layout:
            return  # packed already (a second engine on the same model): the layout stands
        if self._pack_layout is not None:
            raise ValueError(
                f"the model's weights are packed in the {self._pack_layout!r} layout already "
                f"(its plain weights were released); load the model again for {layout!r}"
            )
        w = self.model.norm.weight
        if not can_pack(layout, w.device, w.dtype):
            raise ValueError(f"{layout} packed weights do not run for {w.dtype} on {w.device}")
        self._batch_hint = batch_hint
        self._pack_layout = layout
        self._decode_layers = self._fused = None
        for module, attr, names, _ in self._packed_groups():
            weight, bias = getattr(module, attr)
            setattr(module, attr, self._pack(weight, bias))
            for name in names:
                lin = getattr(module, name)
                lin.weight = nn.Parameter(lin.weight.new_empty(0), requires_grad=False)
        self._lm_head_packed = self._pack(self.lm_head.weight.detach(), None)[0]

    def load_prepacked(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load a Hugging Face state dict into a prepacked model: the layers' linear weights
        are fused, cast and packed (in the model's layout) from `state`; everything else is
        copied in place. Returns what does not match (missing or unexpected names); then
        nothing was loaded."""
        dtype = self.model.norm.weight.dtype
        groups = self._packed_groups()
        packed_keys = {k for *_, keys in groups for k in keys}
        rest = {k: v for k, v in state.items() if k not in packed_keys}
        own = {k for k, v in self.state_dict().items() if v.numel()}  # packed ones are empty
        if self.args.tie_word_embeddings:
            own.discard("lm_head.weight")
        problems = sorted((packed_keys - set(state)) | (own - set(rest)))
        problems += [f"(unexpected) {k}" for k in sorted(set(rest) - own)]
        if problems:
            return problems
        self._decode_layers = self._fused = None
        for module, attr, _, keys in groups:
            parts = [state[k].to(dtype) for k in keys]
            fused = parts[0] if len(parts) == 1 else torch.cat(parts)
            # The fused bias is the linears' bias parameters (views of it), which the
            # load_state_dict below updates in place.
            setattr(module, attr, self._pack(fused, self._bias(getattr(module, attr))))
        self.load_state_dict(rest, strict=False)
        self.tie_weights()
        self._lm_head_packed = self._pack(self.lm_head.weight.detach(), None)[0]
        return []

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight  # [V, hidden]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._lm_head_packed is not None:
            return linear(hidden, self._lm_head_packed, None)
        return F.linear(hidden, self.lm_head.weight)  # [..., V]

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, D] for true token positions [B, T]."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos, sin = emb.cos() * self._rope_scale, emb.sin() * self._rope_scale
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] of a right-padded batch.

        attention_mask [B, T] (1 = real token) must be right padding: each row is ones then
        zeros. Hidden states at pad positions are finite and meaningless.
        """
        B, T = input_ids.shape
        if attention_mask is not None and bool(
            (attention_mask[:, 1:] > attention_mask[:, :-1]).any()
        ):
            raise ValueError("attention_mask must be right-padded (ones, then zeros, in each row)")
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return self._run(input_ids, positions, None)

    def forward_cached(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: AttentionCache
    ) -> torch.Tensor:
        """Hidden states [B, T, hidden] of T new tokens per sequence at true positions [B, T];
        `cache` stores their keys/values and attends over the sequence's cached ones."""
        return self._run(input_ids, positions, cache)

    def can_fuse_decode(self) -> bool:
        """Whether `forward_decode_fused` runs for this model as it is now: on CPU, fused
        projections, the C kernels of its dtype (bf16 or float32) built for this CPU and taking
        its head layout, no q/k norm."""
        a, w = self.args, self.model.norm.weight
        return (
            w.device.type == "cpu"
            and not a.qk_norm
            and all(cast(DecoderLayer, lay).self_attn.qkv is not None for lay in self.model.layers)
            and cpu_kernels.supports_heads(a.num_heads, a.num_kv_heads, a.head_dim, w.dtype)
            and cpu_kernels.available(w.dtype)
        )

    def forward_decode_fused(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: FusedDecodeCache
    ) -> torch.Tensor:
        """`forward_cached` for T new tokens per sequence (input_ids, positions [B, T]: one
        token, or a verify step's last token and drafts) on the CPU kernels
        (`can_fuse_decode`; `fused_layers` runs them). Returns [B, T, hidden]."""
        B, T = input_ids.shape
        layers = [cast(DecoderLayer, lay) for lay in self.model.layers]
        # [B * T, hidden]: a fresh tensor, the residual stream the kernels update in place.
        x = self.model.embed_tokens(input_ids.reshape(-1))
        cos4, sin4 = self.rope(positions, x.dtype)  # [B, 1, T, D]
        targets = [cache.fused_target(i) for i in range(len(layers))]

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            out = layers[i].self_attn.attend_projected(qkv.view(B, T, -1), cos4, sin4, cache)
            return out.reshape(B * T, -1)

        fused = self._fused_layers()
        h = fused_layers(
            x, cos4, sin4, fused, self.model.norm.weight, targets, self.args,
            self._one_call_layers(targets), attend,
        )  # fmt: skip
        return h.view(B, T, -1)

    def pack_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Weights:
        """A linear's weight [out, in] (and bias) in this model's packed layout, for modules
        that compute beside it (the MTP drafter); unchanged when the model is not packed."""
        if self._pack_layout is None:
            return weight, bias
        return self._pack(weight.detach(), bias)

    def _one_call_layers(
        self, targets: list[FusedTarget | None]
    ) -> cpu_kernels.DecodeLayers | None:
        """The layers for `cpu_kernels.decode_layers` (the whole decode step's layers in one C
        call) when it runs: AVX2-packed float32 weights and every layer's attention fused (no
        None target); None otherwise (then the step calls the kernels layer by layer)."""
        if self._pack_layout != "avx2" or any(t is None for t in targets):
            return None
        if self._decode_layers is None:
            self._decode_layers = one_call_layers(
                self._fused_layers(), self.model.norm.weight.detach()
            )
        return self._decode_layers

    def _fused_layers(self) -> list[FusedLayer]:
        """The trunk's layers as the fused step reads them (built once; reset with the
        weights' layout by fuse / pack / load)."""
        if self._fused is None:
            self._fused = [FusedLayer.of(cast(DecoderLayer, lay)) for lay in self.model.layers]
        return self._fused

    def _run(self, input_ids, positions, cache):
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        cos, sin = self.rope(positions, x.dtype)
        if cache is not None and self._glued(x):
            return self._run_glued(x, cos, sin, cache)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            # A cache may be recomputed when its attend() is a pure function of its inputs and
            # of tensors it only reads (the shared-prefix suffix pass); a KV cache that writes
            # is not.
            if use_ckpt and (cache is None or getattr(cache, "recomputable", False)):
                x = checkpoint(layer, x, cos, sin, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache)
        return self.model.norm(x)

    def _glued(self, x: torch.Tensor) -> bool:
        """Whether `_run_glued` takes this forward: inference (no autograd) of fused layers on
        a GPU where the Triton kernels run, the norms in the activations' dtype."""
        if not (x.is_cuda and fused_norm.HAS_TRITON) or torch.is_grad_enabled():
            return False
        first = cast(DecoderLayer, self.model.layers[0])
        return first.mlp.gate_up is not None and self.model.norm.weight.dtype == x.dtype

    def _run_glued(self, x, cos, sin, cache):
        """`_run` for inference on a GPU with the layers' glue in single launches
        (`rlkit.kernels.fused_norm`): each residual add fused with the RMSNorm after it (the
        next layer's input norm, or the final one), SiLU(gate) * up in one kernel, and the o
        and down projections as split-K partials that add sums (`linear_partials`). The
        residual stream x [B * T, hidden] is updated in place."""
        B, T, C = x.shape
        layers = [cast(DecoderLayer, lay) for lay in self.model.layers]
        x = x.reshape(B * T, C)
        eps = layers[0].input_layernorm.eps
        h = F.rms_norm(x, (C,), layers[0].input_layernorm.weight, eps)
        for i, lay in enumerate(layers):
            # o and down as split-K partial sums where that pays (`linear_partials`), summed in
            # the residual add that follows each.
            attn = lay.self_attn(h.view(B, T, C), cos, sin, cache, linear_partials)
            h = fused_norm.add_rms_norm(x, attn, lay.post_attention_layernorm.weight, eps)
            mlp = lay.mlp
            assert mlp.gate_up is not None and mlp.down is not None
            if decode_gemm.gate_up_applies(h, *mlp.gate_up):  # SiLU * up in the GEMM
                up = decode_gemm.decode_gate_up_silu_triton(
                    h, mlp.gate_up[0], **decode_gemm.GATE_UP_KNOBS
                )
            else:
                up = fused_norm.silu_mul(linear(h, *mlp.gate_up))
            down = linear_partials(up, *mlp.down)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h = fused_norm.add_rms_norm(x, down, norm.weight, eps)
        return h.view(B, T, C)
