"""CPU kernels for the rollout engine's bf16 decode step: a small C library (`cpu.c`, x86-64
with AVX-512 BF16), each entry point beside the PyTorch code it replaces (its reference).

- `decode_attention(q, k, v, lengths, scale)`: `sparse_decode_attention`'s contract (q
  [B, H, D], k/v [B, KVH, L, D] with any strides but a unit stride along D, lengths [B]).
  ATen's CPU flash-attention kernel handles one query row per kv head poorly; this reads each
  K/V row once for all G query heads of its group and keeps the step a streaming read of the
  cache.
- `rope_append_attend(qkv, cos, sin, k, v, lengths, num_heads, scale, q_ring, ring_pos)`: the
  attention block of a decode step after the fused qkv GEMM: RoPE on q and k
  (`rlkit.models.decoder.rotate`), the new k and v written into the cache at `lengths - 1`,
  and attention over each sequence's entries (optionally the rotated query stored in a ring
  of recent queries). One pass instead of split, transposes, two RoPEs, two index_puts and
  SDPA.
- `add_rms_norm(x, delta, weight, eps)`: x += delta in place (the residual stream), then
  RMSNorm (`rlkit.models.decoder.RMSNorm`); `delta=None` skips the add.
- `silu_mul(gate_up)`: silu(gate) * up of the fused gate/up GEMM's output.
- `sample_rows(logits, temperature, u)`: `rlkit.rollout.sampling.sample` without top-k /
  top-p: the inverse-CDF draw of one given uniform per row and the drawn tokens' log-probs,
  in three streaming passes over the bf16 logits instead of float32 copies of [N, V]
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

Rounding follows the PyTorch code step for step (bf16 wherever PyTorch materialises a bf16
tensor, float32 in between); only summation orders differ (benchmarks/NOTES.md, "CPU decode
kernels").

The C file is compiled on first use with the system C compiler (`$CC`, default `gcc`) into
`$RLKIT_KERNEL_CACHE` (default `~/.cache/rlkit/kernels`), keyed by a hash of the source and
flags, and loaded with ctypes. It links the OpenMP runtime (libgomp) that PyTorch loaded, so
it shares PyTorch's threads. Nothing here is required: without a compiler, on a CPU without
AVX-512 BF16, or with `RLKIT_CPU_KERNELS=0`, `available()` is False and callers use PyTorch;
`unavailable_reason()` says why, and `missing_prerequisite()` tells a machine that lacks
something apart from a build that failed.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "add_rms_norm",
    "available",
    "compact_rows",
    "decode_attention",
    "keep_top",
    "missing_prerequisite",
    "redundancy",
    "rope_append_attend",
    "sample_rows",
    "silu_mul",
    "supports",
    "unavailable_reason",
    "window_scores",
]

_SOURCE = Path(__file__).with_name("cpu.c")
_FLAGS = [
    "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
    "-fopenmp", "-shared", "-fPIC",
]  # fmt: skip
_MAX_D, _MAX_G = 256, 16  # cpu.c's MAX_D, MAX_G
# /proc/cpuinfo names of what _FLAGS compile for.
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False


def _cache_dir() -> Path:
    root = os.environ.get("RLKIT_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlkit" / "kernels"


def _build() -> Path:
    """Compile the C source once per (source, flags, compiler); return the library's path."""
    cc = os.environ.get("CC", "gcc")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"rlkit_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: processes compiling at once never load half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {_SOURCE.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def missing_prerequisite() -> str | None:
    """What this machine lacks for the kernels, found without building them (None: nothing):
    they are disabled (RLKIT_CPU_KERNELS=0), there is no C compiler, or the CPU lacks the
    AVX-512 features they use. Where this is None and `available()` is False, the build or
    load failed: a bug, not a property of the machine (the tests fail then, not skip)."""
    if os.environ.get("RLKIT_CPU_KERNELS", "1") == "0":
        return "disabled by RLKIT_CPU_KERNELS=0"
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        return f"no C compiler: {cc!r} is not on PATH"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(
                (line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []
            )
    except OSError:
        return "cannot read the CPU's features (/proc/cpuinfo)"
    missing = [flag for flag in _CPU_FLAGS if flag not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _load() -> ctypes.CDLL | None:
    global _lib, _reason, _loaded
    if _loaded:  # every kernel call asks: no lock once loaded
        return _lib
    with _lock:
        if not _loaded:
            _lib, _reason = _open()
            _loaded = True  # last: a thread that sees it sees _lib and _reason set
    return _lib


def _open() -> tuple[ctypes.CDLL | None, str | None]:
    """Build and load the library: (it, None), or (None, why not)."""
    if os.environ.get("RLKIT_CPU_KERNELS", "1") == "0":
        return None, "disabled by RLKIT_CPU_KERNELS=0"
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"could not build or load the C kernel: {exc}"
    if not lib.rlkit_cpu_supported():
        return None, "this CPU lacks AVX-512 BF16"
    i64, ptr, i32, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.rlkit_decode_attention_bf16.argtypes = [
        ptr, i64, i64,  # q, its batch and head strides
        ptr, i64, i64, i64,  # k and strides
        ptr, i64, i64, i64,  # v and strides
        ptr, ptr,  # lengths, out
        i32, i32, i32, i32, i32,  # B H KVH L D
        f32,
    ]  # fmt: skip
    lib.rlkit_decode_attention_bf16.restype = i32
    lib.rlkit_rope_append_attend_bf16.argtypes = [
        ptr, i64, ptr, ptr, i64,  # qkv, its row stride, cos, sin, their row stride
        ptr, i64, i64, i64,  # k store and strides
        ptr, i64, i64, i64,  # v store and strides
        i64, ptr, ptr,  # capacity, lengths, out
        i32, i32, i32, i32, f32,  # B H KVH D scale
        ptr, i64, i64, i64, ptr,  # q ring, its strides, ring positions
    ]  # fmt: skip
    lib.rlkit_rope_append_attend_bf16.restype = i32
    lib.rlkit_add_rms_norm_bf16.argtypes = [
        ptr, i64, ptr, i64, ptr, f32, ptr, i64, i64, i64
    ]  # fmt: skip
    lib.rlkit_add_rms_norm_bf16.restype = None
    lib.rlkit_silu_mul_bf16.argtypes = [ptr, i64, ptr, i64, i64, i64]
    lib.rlkit_silu_mul_bf16.restype = None
    lib.rlkit_sample_rows_bf16.argtypes = [ptr, i64, i64, i64, f32, ptr, ptr, ptr]
    lib.rlkit_sample_rows_bf16.restype = None
    lib.rlkit_window_scores_bf16.argtypes = [
        ptr, i64, i64, i64,  # queries and strides
        ptr, i64, i64, i64,  # keys and strides
        ptr, ptr,  # lengths, out
        i64, i32, i32, i32, i64, i32, f32,  # R H KVH W L D scale
    ]  # fmt: skip
    lib.rlkit_window_scores_bf16.restype = i32
    lib.rlkit_redundancy_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, i32, i64, i32, f32]
    lib.rlkit_redundancy_bf16.restype = i32
    lib.rlkit_keep_top_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, i64, i64, ptr]
    lib.rlkit_keep_top_f32.restype = i32
    lib.rlkit_compact_rows.argtypes = [
        ptr, i64, i64, i64, i64,  # store, its byte strides (slot, head, entry), bytes per entry
        ptr, i64, i64,  # rows, R, heads
        ptr, i64, i64, i64, i64,  # idx, its strides (row, head), budget, L
    ]  # fmt: skip
    lib.rlkit_compact_rows.restype = i32
    return lib, None


def available() -> bool:
    """True when the C kernel is built and this CPU runs it."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True)."""
    _load()
    return _reason


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` takes these (already validated) arguments: bf16 on CPU, D a
    multiple of 32 up to 256, at most 16 query heads per kv head, unit stride along D."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and supports_heads(q.shape[1], k.shape[1], q.shape[-1])
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and available()
    )


def supports_heads(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the attention kernels take this head layout (bf16 on CPU assumed)."""
    return (
        head_dim % 32 == 0
        and head_dim <= _MAX_D
        and num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= _MAX_G
    )


def _lib_or_raise() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"rlkit CPU kernels unavailable: {unavailable_reason()}")
    return lib


def _check_status(status: int, kernel: str, bad_arguments: Callable[[], str] = lambda: "") -> None:
    """The C entry points return 0, 1 when a scratch allocation failed, 2 when an argument
    is out of range (`bad_arguments()` says which and how; built only then: the decode step
    calls some kernels once per layer)."""
    if status == 2:
        raise ValueError(bad_arguments())
    if status:
        raise MemoryError(f"{kernel}: scratch allocation failed")


def _rows(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != 2 or t.stride(1) != 1:
        raise ValueError(
            f"{name} must be a 2-D bf16 CPU tensor with unit stride along rows, got "
            f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}"
        )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    """Run the attention kernel on arguments that `supports` accepted; [B, H, D] bf16."""
    lib = _lib_or_raise()
    B, H, D = q.shape
    kvh, L = k.shape[1], k.shape[2]
    lens = lengths.to(torch.int64).contiguous()
    out = torch.empty((B, H, D), dtype=q.dtype)
    failed = lib.rlkit_decode_attention_bf16(
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
) -> torch.Tensor:
    """One decode token per sequence: qkv [B, (H + 2 KVH) * D] (the fused projection's rows),
    cos/sin [B, D] at each token's true position, cache stores k/v [B, KVH, cap, D] (views
    with a unit stride along D), lengths [B] int64 = entries after this token (each new k/v
    is written at lengths[b] - 1). q_ring [B, H, W, D] and ring_pos [B]: also store each
    rotated query at ring_pos[b]. Returns attention [B, H * D] bf16."""
    lib = _lib_or_raise()
    B, kvh, cap, D = k.shape
    if not supports_heads(num_heads, kvh, D):
        raise ValueError(f"unsupported heads: H={num_heads} KVH={kvh} D={D}")
    _rows(qkv, "qkv")
    _rows(cos, "cos")
    _rows(sin, "sin")
    if qkv.shape != (B, (num_heads + 2 * kvh) * D) or cos.shape != (B, D) or sin.shape != cos.shape:
        raise ValueError(
            f"shapes: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)} for B={B} "
            f"H={num_heads} KVH={kvh} D={D}"
        )
    if cos.stride(0) != sin.stride(0):
        raise ValueError("cos and sin must share a row stride")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != torch.bfloat16 or t.stride(-1) != 1 or t.shape != k.shape:
            raise ValueError(f"{name} store must be bf16 [B, KVH, cap, D] with unit stride in D")
    lens = lengths.to(torch.int64).contiguous()
    ring_args: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    if q_ring is not None:
        assert ring_pos is not None
        if q_ring.shape[:2] != (B, num_heads) or q_ring.shape[3] != D or q_ring.stride(3) != 1:
            raise ValueError(f"q_ring must be [B, H, W, D], got {tuple(q_ring.shape)}")
        pos = ring_pos.to(torch.int64).contiguous()
        ring_args = (q_ring.data_ptr(), q_ring.stride(0), q_ring.stride(1), q_ring.stride(2),
                     pos.data_ptr())  # fmt: skip
    out = torch.empty((B, num_heads * D), dtype=torch.bfloat16)
    status = lib.rlkit_rope_append_attend_bf16(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0),
        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
        cap, lens.data_ptr(), out.data_ptr(), B, num_heads, kvh, D, scale, *ring_args,
    )  # fmt: skip
    _check_status(
        status,
        "rope_append_attend",
        lambda: f"lengths must be in [1, {cap}] (the cache's capacity), got {lens.tolist()}",
    )
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """x [N, dim] bf16 (updated in place to x + delta when delta is given), weight [dim] bf16:
    RMSNorm(x) as a new [N, dim] tensor."""
    lib = _lib_or_raise()
    _rows(x, "x")
    if delta is not None:
        _rows(delta, "delta")
        if delta.shape != x.shape:
            raise ValueError(f"delta {tuple(delta.shape)} differs from x {tuple(x.shape)}")
    if weight.dtype != torch.bfloat16 or weight.shape != (x.shape[1],) or weight.stride(0) != 1:
        raise ValueError(
            f"weight must be bf16 [{x.shape[1]}], got {weight.dtype} {tuple(weight.shape)}"
        )
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.rlkit_add_rms_norm_bf16(
        x.data_ptr(), x.stride(0),
        None if delta is None else delta.data_ptr(), 0 if delta is None else delta.stride(0),
        weight.data_ptr(), eps, out.data_ptr(), out.stride(0), x.shape[0], x.shape[1],
    )  # fmt: skip
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2 * inter] bf16 (gate then up): silu(gate) * up, [N, inter]."""
    lib = _lib_or_raise()
    _rows(gate_up, "gate_up")
    n, two = gate_up.shape
    if two % 2:
        raise ValueError(f"gate_up's width must be even, got {two}")
    out = torch.empty((n, two // 2), dtype=torch.bfloat16)
    lib.rlkit_silu_mul_bf16(
        gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0), n, two // 2
    )
    return out


def sample_rows(
    logits: torch.Tensor, temperature: float, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] bf16 (unit stride along V), temperature > 0, u [N] float64 uniforms in
    [0, 1): tokens [N] int64 and their log-probs [N] float32 under softmax(logits / T)."""
    lib = _lib_or_raise()
    _rows(logits, "logits")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, vocab = logits.shape
    u = u.to(torch.float64).contiguous()
    if u.shape != (n,):
        raise ValueError(f"u must be [{n}], got {tuple(u.shape)}")
    tokens = torch.empty(n, dtype=torch.int64)
    logprobs = torch.empty(n, dtype=torch.float32)
    lib.rlkit_sample_rows_bf16(
        logits.data_ptr(), logits.stride(0), n, vocab, 1.0 / temperature, u.data_ptr(),
        tokens.data_ptr(), logprobs.data_ptr(),
    )  # fmt: skip
    return tokens, logprobs


def _bf16_d(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.stride(-1) != 1:
        raise ValueError(f"{name} must be a bf16 CPU tensor with unit stride along its last dim")


def window_scores(queries: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """queries [R, H, W, D] (oldest first), keys [R, KVH, L, D] (bf16, any strides but unit
    along D), lengths [R] in [W, L]: float32 [R, KVH, L], the window attention each entry
    gets, averaged over the queries and the heads of its kv head's group."""
    lib = _lib_or_raise()
    R, H, W, D = queries.shape
    kvh, L = keys.shape[1], keys.shape[2]
    _bf16_d(queries, "queries")
    _bf16_d(keys, "keys")
    if W < 1 or keys.shape[0] != R or keys.shape[3] != D or not supports_heads(H, kvh, D):
        raise ValueError(f"queries {tuple(queries.shape)} do not fit keys {tuple(keys.shape)}")
    lens = lengths.to(torch.int64).contiguous()
    out = torch.empty((R, kvh, L), dtype=torch.float32)
    status = lib.rlkit_window_scores_bf16(
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
    """keys [R, KVH, L, D] bf16 (unit stride along D, D a multiple of 16), lengths [R] in
    [0, L]: float32 [R, KVH, L], each valid key's summed cosine similarity (those >=
    threshold) to the other valid keys over (length - 1); 0 past a row's length."""
    lib = _lib_or_raise()
    _bf16_d(keys, "keys")
    R, kvh, L, D = keys.shape
    if D % 16 or D > _MAX_D:
        raise ValueError(f"head_dim must be a multiple of 16 up to {_MAX_D}, got {D}")
    lens = lengths.to(torch.int64).contiguous()
    out = torch.empty((R, kvh, L), dtype=torch.float32)
    status = lib.rlkit_redundancy_bf16(
        keys.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2), lens.data_ptr(),
        out.data_ptr(), R, kvh, L, D, threshold,
    )  # fmt: skip
    _check_status(status, "redundancy", lambda: f"lengths must be in [0, {L}], got {lens.tolist()}")
    return out


def keep_top(scores: torch.Tensor, lengths: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """scores [R, X, L] float32 (unit stride along L), lengths [R], budget <= L: int64
    [R, X, budget], ascending: the last `window` valid entries and the highest-scored others,
    ties to the earlier entry."""
    lib = _lib_or_raise()
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
    lib = _lib_or_raise()
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
