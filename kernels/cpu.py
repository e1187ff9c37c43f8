"""CPU kernels for the rollout engine's decode step: small C libraries, one per instruction
set, each entry point beside the PyTorch code it replaces (its reference).

Two builds, chosen by the engine's dtype:

- bf16 (`cpu.c`, x86-64 with AVX-512 BF16): bf16 weights and KV cache, products in bf16 with
  float32 accumulation, rounded to bf16 wherever PyTorch materialises a bf16 tensor;
- float32 (`cpu_avx2.c`, x86-64 with AVX2 and FMA): float32 weights and KV cache, float32
  arithmetic. This is what a CPU without native bf16 runs (`rlkit.device`): there bf16 GEMMs
  are emulated and several times slower than float32 ones.

Both share plain C (`cpu_common.h`). Everything else (another dtype, another CPU, aarch64, no
compiler) runs the PyTorch references.

The instruction set in use is the machine's, capped by `RLKIT_CPU_ISA` (`avx512_bf16`,
`avx2` or `generic`): `RLKIT_CPU_ISA=avx2` on an AVX-512 BF16 machine runs exactly what an
AVX2-only machine runs (float32 engine, AVX2 kernels), `generic` what a machine without
either runs (PyTorch ops), so each path is tested on the richer machine too.
`RLKIT_CPU_KERNELS=0` disables the libraries alone.

Entry points (`dtype` below is the build's: bf16 or float32):

- `decode_attention(q, k, v, lengths, scale)`: `sparse_decode_attention`'s contract (q
  [B, H, D], k/v [B, KVH, L, D] with any strides but a unit stride along D, lengths [B]).
  ATen's CPU flash-attention kernel handles one query row per kv head poorly; this reads each
  K/V row once for all G query heads of its group and keeps the step a streaming read of the
  cache.
- `rope_append_attend(qkv, cos, sin, k, v, lengths, num_heads, scale, q_ring, ring_pos,
  tokens_per_row)`: the attention block of a decode step of T tokens per sequence (1, or a
  speculative verify step's k + 1) after the fused qkv GEMM: RoPE on q and k
  (`rlkit.models.decoder.rotate`), the new k and v written into the cache at
  `lengths - T .. lengths - 1`, and attention of each token over its sequence's entries up to
  its own (optionally the rotated queries stored in a ring of recent queries). One pass
  instead of split, transposes, two RoPEs, two index_puts and SDPA.
- `add_rms_norm(x, delta, weight, eps)`: x += delta in place (the residual stream), then
  RMSNorm (`rlkit.models.decoder.RMSNorm`); `delta=None` skips the add.
- `silu_mul(gate_up)`: silu(gate) * up of the fused gate/up GEMM's output.
- `sample_rows(logits, temperature, u)`: `rlkit.rollout.sampling.sample` without top-k /
  top-p: the inverse-CDF draw of one given uniform per row and the drawn tokens' log-probs,
  in three streaming passes over the logits instead of float32 copies of [N, V]
  (scale, log-softmax, exp, float64 cumsum, searchsorted, gather).

KV compression (Sparse-RL, `rlkit.rollout.kv_cache.CompressedKVCache.compress`), where
PyTorch spends its time in gathers, index copies and a stable sort of every row:
- `window_scores(queries, keys, lengths)`: SnapKV's window attention
  (`rlkit.rollout.compression.window_attention`), reading the cache store in place.
- `redundancy(keys, lengths, threshold)`: R-KV's mean thresholded cosine similarity of each
  key to the other keys (`rlkit.rollout.compression.redundancy`), one row of similarities at
  a time instead of [L, L] blocks through five elementwise passes.
- `keep_top(scores, lengths, budget, window)`: `rlkit.rollout.compression.keep_top`, the
  budget-th largest score found bit by bit instead of a sort, ties to the earlier entry.
- `compact_rows(store, rows, idx)`: the kept entries moved to the front of their rows in
  place, instead of gather + index_put through copies.
  (These two take any dtype; they come from whichever build loads.)

The float32 build also holds the decode step's GEMM (reference: `F.linear`):
- `pack_linear(weight, bias)` -> `PackedLinear`: a weight [N, K] rearranged once into panels
  of 24 output columns, each [K, 24] contiguous (like oneDNN's prepacking, but a layout of
  our own); `linear(x, packed)`: x [..., K] @ W^T + bias. At a decode batch of 32 rows each
  weight of the model is read once per step from DRAM, so the GEMM is a stream of panels:
  oneDNN's prepacked GEMM ran the step's GEMMs at about 87 GFLOP/s on two Zen 3 cores with
  the weights streaming, this one at 178-192 GFLOP/s (SmolLM2's shapes at 32 rows and at a
  2048-row prefill; the two cores' FMA peak is about 195; `benchmarks/bench_gemm.py`).
- `prepare_decode_layers(layers, final_norm)` -> `DecodeLayers` (the weights of every layer,
  checked once) and `decode_layers(x, cos, sin, layers, targets, num_heads, eps, scale, T)`:
  every layer of a decode step in one call and one OpenMP region, the kernels above in
  `Decoder.forward_decode_fused`'s order (same code, same results) with a barrier between
  phases, instead of some 240 ctypes calls a step (SmolLM2) whose Python wrappers, small
  serial row ops and thread wake-ups cost about 5 ms of a 62 ms step at batch 32.

Rounding follows the PyTorch code step for step (bf16 build: bf16 wherever PyTorch
materialises a bf16 tensor, float32 in between); only summation orders (and, in the float32
build, fused multiply-adds) differ (benchmarks/NOTES.md, "CPU decode kernels").

A C file is compiled on first use with the system C compiler (`$CC`, default `gcc`) into
`$RLKIT_KERNEL_CACHE` (default `~/.cache/rlkit/kernels`), keyed by a hash of its source, the
shared header and the flags, and loaded with ctypes. It links the OpenMP runtime (libgomp)
that PyTorch loaded, so it shares PyTorch's threads. Nothing here is required: where a build
cannot run, `available(dtype)` is False and callers use PyTorch; `unavailable_reason(dtype)`
says why, and `missing_prerequisite(dtype)` tells a machine that lacks something apart from
a build that failed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

__all__ = [
    "ISAS",
    "add_rms_norm",
    "available",
    "compact_rows",
    "decode_attention",
    "decode_layers",
    "DecodeLayers",
    "isa",
    "keep_top",
    "linear",
    "machine_isa",
    "missing_prerequisite",
    "pack_linear",
    "PackedLinear",
    "prepare_decode_layers",
    "redundancy",
    "rope_append_attend",
    "sample_rows",
    "silu_mul",
    "supports",
    "unavailable_reason",
    "window_scores",
]

_DIR = Path(__file__).parent
_COMMON = _DIR / "cpu_common.h"
_MAX_D, _MAX_G = 256, 16  # the C files' MAX_D, MAX_G
_GEMM_NR = 24  # cpu_avx2.c's GEMM_NR: output columns per packed panel

# Instruction-set levels, poorest first. Each x86 level includes the one before it.
ISAS = ("generic", "avx2", "avx512_bf16")
# /proc/cpuinfo flags each level needs.
_ISA_FLAGS = {
    "generic": (),
    "avx2": ("avx2", "fma"),
    "avx512_bf16": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"),
}


@dataclass(frozen=True)
class _Build:
    isa: str  # the level it needs
    source: str
    flags: tuple[str, ...]
    dtype: torch.dtype  # of weights, cache and activations it takes
    suffix: str  # of its entry points' names


_BUILDS = {
    torch.bfloat16: _Build(
        "avx512_bf16",
        "cpu.c",
        tuple("-O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma".split())
        + ("-fopenmp", "-shared", "-fPIC"),
        torch.bfloat16,
        "bf16",
    ),
    torch.float32: _Build(
        "avx2",
        "cpu_avx2.c",
        ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"),
        torch.float32,
        "f32",
    ),
}

_lock = threading.Lock()
# Per build dtype: (library or None, why not). Filled once per process (`_load`).
_libs: dict[torch.dtype, tuple[ctypes.CDLL | None, str | None]] = {}


@cache
def _cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None: not readable, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return frozenset()


def machine_isa() -> str:
    """The richest level of `ISAS` this machine runs (x86-64 only; "generic" elsewhere)."""
    flags = _cpu_flags()
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    return max((lvl for lvl in ISAS if all(f in flags for f in _ISA_FLAGS[lvl])), key=ISAS.index)


@cache
def isa() -> str:
    """The level in use: the machine's, capped by `RLKIT_CPU_ISA` (which can only lower it:
    asking for more than the CPU has gives the CPU's). Read once per process, like the
    libraries it decides."""
    forced = os.environ.get("RLKIT_CPU_ISA", "").strip().lower()
    have = machine_isa()
    if not forced:
        return have
    if forced not in ISAS:
        raise ValueError(f"RLKIT_CPU_ISA={forced!r}: expected one of {', '.join(ISAS)}")
    return min(forced, have, key=ISAS.index)


def _cache_dir() -> Path:
    root = os.environ.get("RLKIT_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlkit" / "kernels"


def _build(b: _Build) -> Path:
    """Compile a build's source once per (source, header, flags, compiler); its path."""
    cc = os.environ.get("CC", "gcc")
    source = _DIR / b.source
    text = source.read_bytes() + _COMMON.read_bytes()
    key = hashlib.sha256(text + " ".join([cc, *b.flags]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"rlkit_cpu_{b.suffix}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: processes compiling at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *b.flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def toolchain_missing() -> str | None:
    """Why no C library of rlkit's can be built here at all (None: one can): they are
    disabled (RLKIT_CPU_KERNELS=0), or there is no C compiler."""
    if os.environ.get("RLKIT_CPU_KERNELS", "1") == "0":
        return "disabled by RLKIT_CPU_KERNELS=0"
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        return f"no C compiler: {cc!r} is not on PATH"
    return None


def missing_prerequisite(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """What this machine lacks for the kernels of `dtype`, found without building them (None:
    nothing): there are none for that dtype, they are disabled (RLKIT_CPU_KERNELS=0), there is
    no C compiler, or the instruction set in use (`isa`) lacks the build's. Where this is None
    and `available(dtype)` is False, the build or load failed: a bug, not a property of the
    machine (the tests fail then, not skip)."""
    b = _BUILDS.get(dtype)
    if b is None:
        return f"no CPU kernels for {dtype}"
    why = toolchain_missing()
    if why is not None:
        return why
    level = isa()
    if ISAS.index(level) >= ISAS.index(b.isa):
        return None
    if machine_isa() != level:
        return f"RLKIT_CPU_ISA={level} leaves out the {b.isa} kernels"
    flags = _cpu_flags() or frozenset()
    missing = [f for f in _ISA_FLAGS[b.isa] if f not in flags]
    what = ", ".join(missing) if missing else f"{b.isa} (not an x86-64 CPU)"
    return f"this CPU lacks {what}"


def _load(dtype: torch.dtype) -> ctypes.CDLL | None:
    found = _libs.get(dtype)  # every kernel call asks: no lock once loaded
    if found is None:
        with _lock:
            found = _libs.get(dtype)
            if found is None:
                found = _open(dtype)
                _libs[dtype] = found
    return found[0]


def _open(dtype: torch.dtype) -> tuple[ctypes.CDLL | None, str | None]:
    """Build and load the library of `dtype`: (it, None), or (None, why not)."""
    why = missing_prerequisite(dtype)
    if why is not None:
        return None, why
    b = _BUILDS[dtype]
    try:
        lib = ctypes.CDLL(str(_build(b)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"could not build or load the {b.isa} C kernels: {exc}"
    if not lib.rlkit_cpu_supported():
        return None, f"this CPU lacks {b.isa}"
    _declare(lib, b.suffix)
    return lib, None


def _declare(lib: ctypes.CDLL, s: str) -> None:
    """Argument and return types of a build's entry points (both builds share them)."""
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    fn = getattr(lib, f"rlkit_decode_attention_{s}")
    fn.argtypes = [
        ptr, i64, i64,  # q, its batch and head strides
        ptr, i64, i64, i64,  # k and strides
        ptr, i64, i64, i64,  # v and strides
        ptr, ptr,  # lengths, out
        i32, i32, i32, i32, i32,  # B H KVH L D
        f32,
    ]  # fmt: skip
    fn.restype = i32
    fn = getattr(lib, f"rlkit_rope_append_attend_{s}")
    fn.argtypes = [
        ptr, i64, ptr, ptr, i64,  # qkv, its row stride, cos, sin, their row stride
        ptr, i64, i64, i64,  # k store and strides
        ptr, i64, i64, i64,  # v store and strides
        i64, ptr, ptr,  # capacity, lengths, out
        i32, i32, i32, i32, f32,  # B H KVH D scale
        ptr, i64, i64, i64, ptr,  # q ring, its strides, ring positions
        i32,  # tokens per sequence
    ]  # fmt: skip
    fn.restype = i32
    fn = getattr(lib, f"rlkit_add_rms_norm_{s}")
    fn.argtypes = [ptr, i64, ptr, i64, ptr, f32, ptr, i64, i64, i64]
    fn.restype = None
    fn = getattr(lib, f"rlkit_silu_mul_{s}")
    fn.argtypes = [ptr, i64, ptr, i64, i64, i64]
    fn.restype = None
    fn = getattr(lib, f"rlkit_sample_rows_{s}")
    fn.argtypes = [ptr, i64, i64, i64, f32, ptr, ptr, ptr]
    fn.restype = None
    fn = getattr(lib, f"rlkit_window_scores_{s}")
    fn.argtypes = [
        ptr, i64, i64, i64,  # queries and strides
        ptr, i64, i64, i64,  # keys and strides
        ptr, ptr,  # lengths, out
        i64, i32, i32, i32, i64, i32, f32,  # R H KVH W L D scale
    ]  # fmt: skip
    fn.restype = i32
    fn = getattr(lib, f"rlkit_redundancy_{s}")
    fn.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i32, i64, i32, f32]
    fn.restype = i32
    lib.rlkit_keep_top_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, i64, i64, ptr]
    lib.rlkit_keep_top_f32.restype = i32
    lib.rlkit_compact_rows.argtypes = [
        ptr, i64, i64, i64, i64,  # store, its byte strides (slot, head, entry), bytes per entry
        ptr, i64, i64,  # rows, R, heads
        ptr, i64, i64, i64, i64,  # idx, its strides (row, head), budget, L
    ]  # fmt: skip
    lib.rlkit_compact_rows.restype = i32
    if s == "f32":  # the GEMM and the fused layers are in the float32 build only
        lib.rlkit_linear_f32.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64]
        lib.rlkit_linear_f32.restype = None
        lib.rlkit_decode_layers_f32.argtypes = [
            ptr, i32, ptr, ptr, ptr, i64, ptr,  # plan, layers, x, cos, sin, their stride, norm
            ptr, ptr, ptr, ptr, ptr, ptr,  # scratch qkv, att, tmp, gu, act; out h
            i32, i32, i32, i32, i32, i64, i64, f32, f32,  # B T H KVH D hidden inter eps scale
        ]  # fmt: skip
        lib.rlkit_decode_layers_f32.restype = i32


def available(dtype: torch.dtype | None = None) -> bool:
    """True when the kernels of `dtype` are built and this CPU runs them (dtype None: those of
    any dtype, for the dtype-free kernels keep_top and compact_rows)."""
    if dtype is None:
        return any(_load(d) is not None for d in _BUILDS)
    return dtype in _BUILDS and _load(dtype) is not None


def unavailable_reason(dtype: torch.dtype = torch.bfloat16) -> str | None:
    """Why `available(dtype)` is False (None when it is True)."""
    if dtype not in _BUILDS:
        return f"no CPU kernels for {dtype}"
    _load(dtype)
    return _libs[dtype][1]


def describe() -> str:
    """What runs here, for start-up logs: e.g. "C kernels avx2 (float32)"."""
    ready = [f"{_BUILDS[d].isa} ({str(d).removeprefix('torch.')})" for d in _BUILDS if available(d)]
    if ready:
        return "C kernels " + ", ".join(ready)
    return f"PyTorch ops (no C kernels: {unavailable_reason(torch.float32)})"


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` takes these (already validated) arguments: q, k, v of one
    dtype whose kernels run here (`available`), on CPU, a head layout `supports_heads` takes,
    unit stride along D."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and supports_heads(q.shape[1], k.shape[1], q.shape[-1], q.dtype)
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and available(q.dtype)
    )


def supports_heads(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.bfloat16
) -> bool:
    """Whether the attention kernels take this head layout: head_dim a multiple of 32 (bf16)
    or 8 (float32) up to 256, at most 16 query heads per kv head."""
    block = 32 if dtype == torch.bfloat16 else 8
    return (
        head_dim % block == 0
        and head_dim <= _MAX_D
        and num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= _MAX_G
    )


def _lib_for(dtype: torch.dtype, kernel: str) -> tuple[ctypes.CDLL, str]:
    """The library that runs `kernel` for tensors of `dtype`, and its entry points' suffix."""
    if dtype not in _BUILDS:
        raise ValueError(f"{kernel}: no CPU kernel for {dtype} (bf16 or float32)")
    lib = _load(dtype)
    if lib is None:
        raise RuntimeError(f"rlkit CPU kernels unavailable: {unavailable_reason(dtype)}")
    return lib, _BUILDS[dtype].suffix


def _any_lib() -> ctypes.CDLL:
    """A loaded library, for the dtype-free kernels (keep_top, compact_rows)."""
    for d in _BUILDS:
        lib = _load(d)
        if lib is not None:
            return lib
    raise RuntimeError(f"rlkit CPU kernels unavailable: {unavailable_reason(torch.float32)}")


def _check_status(status: int, kernel: str, bad_arguments: Callable[[], str] = lambda: "") -> None:
    """The C entry points return 0, 1 when a scratch allocation failed, 2 when an argument
    is out of range (`bad_arguments()` says which and how; built only then: the decode step
    calls some kernels once per layer)."""
    if status == 2:
        raise ValueError(bad_arguments())
    if status:
        raise MemoryError(f"{kernel}: scratch allocation failed")


def _rows(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
        what = "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")
        raise ValueError(
            f"{name} must be a 2-D {what} CPU tensor with unit stride along rows, got "
            f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}"
        )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Run the attention kernel on arguments that `supports` accepted; [B, H, D] in q's dtype."""
    lib, s = _lib_for(q.dtype, "decode_attention")
    B, H, D = q.shape
    kvh, L = k.shape[1], k.shape[2]
    lens = lengths.to(torch.int64).contiguous()
    out = torch.empty((B, H, D), dtype=q.dtype)
    failed = getattr(lib, f"rlkit_decode_attention_{s}")(
        q.data_ptr(), q.stride(0), q.stride(1),
        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        lens.data_ptr(), out.data_ptr(), B, H, kvh, L, D, scale,
    )  # fmt: skip
    _check_status(failed, "decode_attention")
    return out


def rope_append_attend(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    num_heads: int,
    scale: float,
    q_ring: torch.Tensor | None = None,
    ring_pos: torch.Tensor | None = None,
    tokens_per_row: int = 1,
) -> torch.Tensor:
    """T = tokens_per_row new tokens per sequence: qkv [B * T, (H + 2 KVH) * D] (the fused
    projection's rows; token t of sequence b at row b * T + t), cos/sin [B * T, D] at each
    token's true position, cache stores k/v [B, KVH, cap, D] (views with a unit stride along
    D), lengths [B] int64 = entries after the T tokens (token t's k/v are written at
    lengths[b] - T + t; its query attends to the entries up to there). q_ring [B, H, W, D]
    and ring_pos [B * T]: also store each rotated query at its ring slot. All of qkv's dtype
    (bf16 or float32). Returns attention [B * T, H * D]."""
    dtype = qkv.dtype
    lib, s = _lib_for(dtype, "rope_append_attend")
    B, kvh, cap, D = k.shape
    T = tokens_per_row
    if not supports_heads(num_heads, kvh, D, dtype):
        raise ValueError(f"unsupported heads: H={num_heads} KVH={kvh} D={D}")
    _rows(qkv, "qkv", dtype)
    _rows(cos, "cos", dtype)
    _rows(sin, "sin", dtype)
    rows = B * T
    if (
        T < 1
        or qkv.shape != (rows, (num_heads + 2 * kvh) * D)
        or cos.shape != (rows, D)
        or sin.shape != cos.shape
    ):
        raise ValueError(
            f"shapes: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)} for B={B} T={T} "
            f"H={num_heads} KVH={kvh} D={D}"
        )
    if cos.stride(0) != sin.stride(0):
        raise ValueError("cos and sin must share a row stride")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != dtype or t.stride(-1) != 1 or t.shape != k.shape:
            raise ValueError(f"{name} store must be {dtype} [B, KVH, cap, D] with unit stride in D")
    lens = lengths.to(torch.int64).contiguous()
    ring_args: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    if q_ring is not None:
        assert ring_pos is not None
        if (
            q_ring.shape[:2] != (B, num_heads)
            or q_ring.shape[3] != D
            or q_ring.stride(3) != 1
            or q_ring.dtype != dtype
        ):
            raise ValueError(f"q_ring must be {dtype} [B, H, W, D], got {tuple(q_ring.shape)}")
        pos = ring_pos.to(torch.int64).contiguous()
        ring_args = (q_ring.data_ptr(), q_ring.stride(0), q_ring.stride(1), q_ring.stride(2),
                     pos.data_ptr())  # fmt: skip
        if pos.shape != (rows,):
            raise ValueError(f"ring_pos must be [{rows}], got {tuple(pos.shape)}")
    if lens.shape != (B,):
        raise ValueError(f"lengths must be [{B}], got {tuple(lens.shape)}")
    out = torch.empty((rows, num_heads * D), dtype=dtype)
    status = getattr(lib, f"rlkit_rope_append_attend_{s}")(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0),
        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        cap, lens.data_ptr(), out.data_ptr(), B, num_heads, kvh, D, scale, *ring_args, T,
    )  # fmt: skip
    _check_status(
        status,
        "rope_append_attend",
        lambda: (
            f"lengths must be in [{T}, {cap}] (tokens per row, the cache's capacity), "
            f"got {lens.tolist()}"
        ),
    )
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x [N, dim] (updated in place to x + delta when delta is given), weight [dim], all of
    x's dtype (bf16 or float32): RMSNorm(x) as a new [N, dim] tensor."""
    dtype = x.dtype
    lib, s = _lib_for(dtype, "add_rms_norm")
    _rows(x, "x", dtype)
    if delta is not None:
        _rows(delta, "delta", dtype)
        if delta.shape != x.shape:
            raise ValueError(f"delta {tuple(delta.shape)} differs from x {tuple(x.shape)}")
    if weight.dtype != dtype or weight.shape != (x.shape[1],) or weight.stride(0) != 1:
        raise ValueError(
            f"weight must be {dtype} [{x.shape[1]}], got {weight.dtype} {tuple(weight.shape)}"
        )
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    getattr(lib, f"rlkit_add_rms_norm_{s}")(
        x.data_ptr(), x.stride(0),
        None if delta is None else delta.data_ptr(), 0 if delta is None else delta.stride(0),
        weight.data_ptr(), eps, out.data_ptr(), out.stride(0), x.shape[0], x.shape[1],
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2 * inter] (gate then up; bf16 or float32): silu(gate) * up, [N, inter]."""
    dtype = gate_up.dtype
    lib, s = _lib_for(dtype, "silu_mul")
    _rows(gate_up, "gate_up", dtype)
    n, two = gate_up.shape
    if two % 2:
        raise ValueError(f"gate_up's width must be even, got {two}")
    out = torch.empty((n, two // 2), dtype=dtype)
    getattr(lib, f"rlkit_silu_mul_{s}")(
        gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), n, two // 2
    )
    return out


def sample_rows(
    logits: torch.Tensor, temperature: float, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] (bf16 or float32, unit stride along V), temperature > 0, u [N] float64
    uniforms in [0, 1): tokens [N] int64 and their log-probs [N] float32 under
    softmax(logits / T)."""
    lib, s = _lib_for(logits.dtype, "sample_rows")
    _rows(logits, "logits", logits.dtype)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, vocab = logits.shape
    u = u.to(torch.float64).contiguous()
    if u.shape != (n,):
        raise ValueError(f"u must be [{n}], got {tuple(u.shape)}")
    tokens = torch.empty(n, dtype=torch.int64)
    logprobs = torch.empty(n, dtype=torch.float32)
    getattr(lib, f"rlkit_sample_rows_{s}")(
        logits.data_ptr(), logits.stride(0), n, vocab, 1.0 / temperature, u.data_ptr(),
        tokens.data_ptr(), logprobs.data_ptr(),
    )  # fmt: skip
    return tokens, logprobs


def _unit_d(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or t.stride(-1) != 1:
        what = "bf16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")
        raise ValueError(f"{name} must be a {what} CPU tensor with unit stride along its last dim")


def window_scores(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """queries [R, H, W, D] (oldest first), keys [R, KVH, L, D] (bf16 or float32, one dtype,
    any strides but unit along D), lengths [R] in [W, L]: float32 [R, KVH, L], the window
    attention each entry gets, averaged over the queries and the heads of its kv head's group."""
    dtype = keys.dtype
    lib, s = _lib_for(dtype, "window_scores")
    R, H, W, D = queries.shape
    kvh, L = keys.shape[1], keys.shape[2]
    _unit_d(queries, "queries", dtype)
    _unit_d(keys, "keys", dtype)
    if W < 1 or keys.shape[0] != R or keys.shape[3] != D or not supports_heads(H, kvh, D, dtype):
        raise ValueError(f"queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)}")
    lens = lengths.to(torch.int64).contiguous()
    out = torch.empty((R, kvh, L), dtype=torch.float32)
    status = getattr(lib, f"rlkit_window_scores_{s}")(
        queries.data_ptr(), queries.stride(0), queries.stride(1), queries.stride(2),
        keys.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
        lens.data_ptr(), out.data_ptr(), R, H, kvh, W, L, D, 1.0 / D**0.5,
    )  # fmt: skip
    _check_status(
        status,
        "window_scores",
        lambda: f"lengths must be in [{W}, {L}] (window, keys), got {lens.tolist()}",
    )
    return out


def redundancy(keys: torch.Tensor, lengths: torch.Tensor, threshold: float) -> torch.Tensor:
    """keys [R, KVH, L, D] (bf16: D a multiple of 16; float32: of 8; unit stride along D),
    lengths [R] in [0, L]: float32 [R, KVH, L], each valid key's summed cosine similarity
    (those >= threshold) to the other valid keys over (length - 1); 0 past a row's length."""
    dtype = keys.dtype
    lib, s = _lib_for(dtype, "redundancy")
    _unit_d(keys, "keys", dtype)
    R, kvh, L, D = keys.shape
    block = 16 if dtype == torch.bfloat16 else 8
    if D % block or D > _MAX_D:
        raise ValueError(f"head_dim must be a multiple of {block} up to {_MAX_D}, got {D}")
    lens = lengths.to(torch.int64).contiguous()
    out = torch.empty((R, kvh, L), dtype=torch.float32)
    status = getattr(lib, f"rlkit_redundancy_{s}")(
        keys.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2), lens.data_ptr(),
        out.data_ptr(), R, kvh, L, D, threshold,
    )  # fmt: skip
    _check_status(status, "redundancy", lambda: f"lengths must be in [0, {L}], got {lens.tolist()}")
    return out


def keep_top(scores: torch.Tensor, lengths: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """scores [R, X, L] float32 (unit stride along L), lengths [R], budget <= L: int64
    [R, X, budget], ascending: the last `window` valid entries and the highest-scored others,
    ties to the earlier entry."""
    lib = _any_lib()
    if scores.dtype != torch.float32 or scores.device.type != "cpu" or scores.stride(-1) != 1:
        raise ValueError("scores must be a float32 CPU tensor with unit stride along entries")
    R, X, L = scores.shape
    if not 0 < budget <= L:
        raise ValueError(f"budget must be in [1, {L}] (the entries), got {budget}")
    lens = lengths.to(torch.int64).contiguous()
    out = torch.empty((R, X, budget), dtype=torch.int64)
    failed = lib.rlkit_keep_top_f32(
        scores.data_ptr(), scores.stride(0), scores.stride(1), lens.data_ptr(), R, X, L,
        budget, window, out.data_ptr(),
    )  # fmt: skip
    _check_status(failed, "keep_top")
    return out


def compact_rows(store: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> None:
    """In place: for each r, head h and j < budget, store[rows[r], h, j] = store[rows[r], h,
    idx[r, h, j]] (old values). store [S, heads, L, ...] (the trailing dims of an entry
    contiguous), rows [R], idx [R, heads or 1, budget] int64, each row strictly ascending in
    [0, L): the kept entries of a compression moved to the front of their rows."""
    lib = _any_lib()
    if store.device.type != "cpu" or store.dim() < 3:
        raise ValueError(f"store must be a CPU tensor [S, heads, L, ...], got {tuple(store.shape)}")
    entry = store[0, 0, 0] if store.dim() > 3 else None
    if entry is not None and not entry.is_contiguous():
        raise ValueError("an entry of the store (its trailing dims) must be contiguous")
    S, heads, L = store.shape[:3]
    R = rows.shape[0]
    if (
        idx.dtype != torch.int64
        or idx.dim() != 3
        or idx.shape[0] != R
        or idx.shape[1] not in (1, heads)
    ):
        raise ValueError(f"idx must be int64 [{R}, {heads} or 1, budget], got {tuple(idx.shape)}")
    rows = rows.to(torch.int64).contiguous()
    if R and (int(rows.min()) < 0 or int(rows.max()) >= S):
        raise ValueError(f"rows must be in [0, {S}), got {rows.tolist()}")
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    size = store.element_size()
    row_bytes = size * (entry.numel() if entry is not None else 1)
    status = lib.rlkit_compact_rows(
        store.data_ptr(), store.stride(0) * size, store.stride(1) * size, store.stride(2) * size,
        row_bytes, rows.data_ptr(), R, heads, idx.data_ptr(), idx.stride(0),
        idx.stride(1) if idx.shape[1] == heads else 0, idx.shape[2], L,
    )  # fmt: skip
    if status:
        raise ValueError(f"idx rows must be strictly ascending within [0, {L})")


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """A float32 linear layer in `linear`'s layout (built by `pack_linear`): the weight
    W [N, K] as ceil(N / 24) panels of 24 output columns, panels[p, k, j] = W[24 p + j, k]
    (the last panel zero-padded), and the bias [N] (or None) as given."""

    panels: torch.Tensor  # [P, K, 24]
    bias: torch.Tensor | None  # [N]
    out_features: int  # N
    in_features: int  # K


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    """weight [N, K] and bias [N] (or None), float32 on CPU: the layer in `linear`'s layout.
    The weight is copied (rearranged); a contiguous bias is kept as it is, not copied, so an
    in-place update of it (a weight sync into the model's parameters) reaches `linear`."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D float32 CPU tensor [out, in], got {weight.dtype} "
            f"{tuple(weight.shape)} on {weight.device}"
        )
    N, K = weight.shape
    if N == 0 or K == 0:
        raise ValueError(f"weight must not be empty, got {tuple(weight.shape)}")
    if bias is not None:
        if bias.dtype != torch.float32 or bias.device.type != "cpu" or bias.shape != (N,):
            raise ValueError(
                f"bias must be a float32 CPU tensor [{N}] (the weight's out features), got "
                f"{bias.dtype} {tuple(bias.shape)} on {bias.device}"
            )
        bias = bias.detach().contiguous()
    P = -(-N // _GEMM_NR)
    w = weight.detach()
    if P * _GEMM_NR != N:
        w = torch.cat([w, w.new_zeros(P * _GEMM_NR - N, K)])  # [P * 24, K]
    panels = w.reshape(P, _GEMM_NR, K).transpose(1, 2).contiguous()  # [P, K, 24]
    return PackedLinear(panels, bias, N, K)


def linear(x: torch.Tensor, packed: PackedLinear) -> torch.Tensor:
    """F.linear(x, weight, bias) for a layer packed by `pack_linear` (float32 build): x
    [..., K] float32 on CPU -> [..., N]. Rows are read in place where x's layout allows (unit
    stride along K, one stride between rows), otherwise from a contiguous copy. Inference
    only: no autograd."""
    lib, _ = _lib_for(torch.float32, "linear")
    if not isinstance(packed, PackedLinear):
        raise ValueError(f"packed must be a PackedLinear (pack_linear), got {type(packed)}")
    K, N = packed.in_features, packed.out_features
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(
            f"x must be a float32 CPU tensor [..., {K}] (the layer's in features), got "
            f"{x.dtype} {tuple(x.shape)} on {x.device}"
        )
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear has no backward: call it under torch.no_grad or inference_mode")
    # [M, K]: x itself or a view of it where its layout allows (the decode step calls this
    # some 120 times a step, so the common case costs no reshapes)
    rows = x if x.dim() == 2 else x.reshape(-1, K)
    if K > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]
    out = torch.empty((M, N), dtype=torch.float32)
    if M:
        bias = packed.bias
        lib.rlkit_linear_f32(
            rows.data_ptr(), rows.stride(0), packed.panels.data_ptr(),
            None if bias is None else bias.data_ptr(), out.data_ptr(), N, M, N, K,
        )  # fmt: skip
    return out if x.dim() == 2 else out.view(*x.shape[:-1], N)


# Slots of a layer in rlkit_decode_layers_f32's plan (cpu_avx2.c's DL_* enum): 10 of weights,
# then 15 of the KV cache, filled per step.
_DL_WEIGHTS, _DL_SLOTS = 10, 25


@dataclass(frozen=True, eq=False)
class DecodeLayers:
    """A model's layers for `decode_layers` (built by `prepare_decode_layers`): the weight
    slots of the C plan, one row per layer, and the tensors they point into (kept alive)."""

    plan: torch.Tensor  # [layers, 25] int64, the 10 weight slots filled
    keep: tuple[object, ...]
    final_norm: torch.Tensor  # [hidden]
    hidden: int
    inter: int
    qkv_out: int  # (H + 2 KVH) D
    attn_in: int  # H D (o_proj's in features)


# One layer for `prepare_decode_layers`: input norm weight, packed fused q/k/v, packed o_proj,
# post-attention norm weight, packed fused gate/up, packed down_proj.
LayerWeights = tuple[
    torch.Tensor, PackedLinear, PackedLinear, torch.Tensor, PackedLinear, PackedLinear
]


def prepare_decode_layers(layers: list[LayerWeights], final_norm: torch.Tensor) -> DecodeLayers:
    """The weights of every layer of a float32 model packed by `pack_linear`, checked once for
    `decode_layers`. Norm weights are referenced, not copied (an in-place update of them, a
    weight sync, reaches the step); a new `pack_linear` of a layer needs a new preparation."""
    if not layers:
        raise ValueError("prepare_decode_layers: no layers")
    hidden = layers[0][0].shape[0] if layers[0][0].dim() == 1 else -1
    rows: list[list[int]] = []
    keep: list[object] = [final_norm]
    inter = qkv_out = attn_in = -1
    for i, (n_in, qkv, o, n_post, gate_up, down) in enumerate(layers):
        norms = [("input norm", n_in), ("post-attention norm", n_post)]
        if i == len(layers) - 1:
            norms.append(("final norm", final_norm))
        for name, w in norms:
            if (
                w.dtype != torch.float32
                or w.device.type != "cpu"
                or w.shape != (hidden,)
                or w.stride(0) != 1
            ):
                raise ValueError(
                    f"layer {i}: {name} weight must be a contiguous float32 CPU tensor "
                    f"[{hidden}] (layer 0's input norm), got {w.dtype} {tuple(w.shape)}"
                )
        packed = (("qkv", qkv), ("o", o), ("gate_up", gate_up), ("down", down))
        for name, lin in packed:
            if not isinstance(lin, PackedLinear):
                raise ValueError(f"layer {i}: {name} must be a PackedLinear, got {type(lin)}")
        if i == 0:
            qkv_out, attn_in, inter = qkv.out_features, o.in_features, gate_up.out_features // 2
        want = {
            "qkv": (qkv_out, hidden),
            "o": (hidden, attn_in),
            "gate_up": (2 * inter, hidden),
            "down": (hidden, inter),
        }
        for name, lin in packed:
            if (lin.out_features, lin.in_features) != want[name] or want[name][0] <= 0:
                raise ValueError(
                    f"layer {i}: {name} is [{lin.out_features}, {lin.in_features}], expected "
                    f"{list(want[name])} (layer 0's shapes, hidden {hidden})"
                )
        row = [n_in.data_ptr()]
        for _, lin in packed:
            row += [lin.panels.data_ptr(), 0 if lin.bias is None else lin.bias.data_ptr()]
        row.insert(5, n_post.data_ptr())  # after qkv and o: the slot order of the C plan
        rows.append(row + [0] * (_DL_SLOTS - _DL_WEIGHTS))
        keep += [n_in, n_post, *(lin for _, lin in packed)]
    plan = torch.tensor(rows, dtype=torch.int64)
    return DecodeLayers(plan, tuple(keep), final_norm, hidden, inter, qkv_out, attn_in)


def decode_layers(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layers: DecodeLayers,
    targets: list[
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
    ],
    num_heads: int,
    eps: float,
    scale: float,
    tokens_per_row: int = 1,
) -> torch.Tensor:
    """Every layer of a float32 decode step in one call (float32 build): what
    `add_rms_norm`, `linear`, `rope_append_attend` and `silu_mul` compute one by one in
    `Decoder.forward_decode_fused`, in one OpenMP region. x [B * T, hidden] contiguous: the
    embedded tokens, the residual stream (updated in place); cos/sin [B * T, D] as for
    `rope_append_attend`; targets: per layer its (k store, v store, lengths, q_ring,
    ring_pos), `rope_append_attend`'s arguments. Returns the final-norm hidden states
    [B * T, hidden]."""
    lib, _ = _lib_for(torch.float32, "decode_layers")
    T, hidden = tokens_per_row, layers.hidden
    if len(targets) != layers.plan.shape[0]:
        raise ValueError(f"{len(targets)} cache targets for {layers.plan.shape[0]} layers")
    k0 = targets[0][0]
    B, kvh, _, D = k0.shape
    rows = B * T
    if (
        not supports_heads(num_heads, kvh, D, torch.float32)
        or layers.qkv_out != (num_heads + 2 * kvh) * D
        or layers.attn_in != num_heads * D
    ):
        raise ValueError(
            f"heads H={num_heads} KVH={kvh} D={D} do not fit the layers (qkv out "
            f"{layers.qkv_out}, o in {layers.attn_in})"
        )
    if x.dtype != torch.float32 or not x.is_contiguous() or x.shape != (rows, hidden):
        raise ValueError(
            f"x must be a contiguous float32 [{rows}, {hidden}], got {x.dtype} {tuple(x.shape)}"
        )
    _rows(cos, "cos", torch.float32)
    _rows(sin, "sin", torch.float32)
    if T < 1 or cos.shape != (rows, D) or sin.shape != cos.shape or cos.stride(0) != sin.stride(0):
        raise ValueError(
            f"cos/sin must be [{rows}, {D}] with one row stride, got {tuple(cos.shape)}"
        )
    plan = layers.plan.clone()
    cache_slots: list[list[int]] = []
    keep: list[torch.Tensor] = []
    for i, (k, v, lengths, ring, ring_pos) in enumerate(targets):
        for name, t in (("k", k), ("v", v)):
            if (
                t.dtype != torch.float32
                or t.stride(-1) != 1
                or t.shape != k.shape
                or k.shape[:2] != (B, kvh)
                or k.shape[3] != D
            ):
                raise ValueError(
                    f"layer {i}: {name} store must be float32 [{B}, {kvh}, cap, {D}] with unit "
                    f"stride in D, got {t.dtype} {tuple(t.shape)}"
                )
        lens = lengths.to(torch.int64).contiguous()
        if lens.shape != (B,):
            raise ValueError(f"layer {i}: lengths must be [{B}], got {tuple(lens.shape)}")
        keep.append(lens)
        row = [
            k.data_ptr(),
            *k.stride()[:3],
            v.data_ptr(),
            *v.stride()[:3],
            k.shape[2],
            lens.data_ptr(),
        ]
        if ring is None:
            row += [0, 0, 0, 0, 0]
        else:
            assert ring_pos is not None
            pos = ring_pos.to(torch.int64).contiguous()
            if (
                ring.shape[:2] != (B, num_heads)
                or ring.shape[3] != D
                or ring.stride(3) != 1
                or ring.dtype != torch.float32
                or pos.shape != (rows,)
            ):
                raise ValueError(
                    f"layer {i}: q_ring must be float32 [{B}, {num_heads}, W, {D}] and ring_pos "
                    f"[{rows}], got {tuple(ring.shape)} and {tuple(pos.shape)}"
                )
            keep.append(pos)
            row += [ring.data_ptr(), *ring.stride()[:3], pos.data_ptr()]
        cache_slots.append(row)
    plan[:, _DL_WEIGHTS:] = torch.tensor(cache_slots, dtype=torch.int64)
    new = lambda n: torch.empty((rows, n), dtype=torch.float32)  # noqa: E731
    qkv, att, tmp = new(layers.qkv_out), new(layers.attn_in), new(hidden)
    gu, act, h = new(2 * layers.inter), new(layers.inter), new(hidden)
    status = lib.rlkit_decode_layers_f32(
        plan.data_ptr(), plan.shape[0], x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        cos.stride(0), layers.final_norm.data_ptr(), qkv.data_ptr(), att.data_ptr(),
        tmp.data_ptr(), gu.data_ptr(), act.data_ptr(), h.data_ptr(), B, T, num_heads, kvh, D,
        hidden, layers.inter, eps, scale,
    )  # fmt: skip
    if status >= 2:
        i = status - 2
        raise ValueError(
            f"layer {i}: lengths must be in [{T}, {targets[i][0].shape[2]}] (tokens per row, the "
            f"cache's capacity), got {targets[i][2].tolist()}"
        )
    _check_status(status, "decode_layers")
    return h
