"""SAM drafts' text matchers in C (`kernels/sam.c`) for a batch of sequences.

    m = Matchers(latest=False)           only where `available()`; latest: drafts continue the
                                         match's most recent occurrence, else its first
    m.add(seq, tokens)                   a matcher over a sequence's text so far
    m.extend(seqs, tokens, num)          row b of tokens [B, T] (its first num[b]) joins seqs[b]'s
    m.draft(seqs, room, min_match, k)    -> tokens [B, k], num [B] (numpy int64)
    m.remove(seqs)

The Python reference is `rlkit.rollout.sam.TextMatcher` (without its static automaton; its
batched set `TextMatchers` has this class's interface, and the drafter takes either): the
same automaton, cursor and drafts; tests/rollout/test_sam.py compares the two token by token.
The C matchers exist for the GPU host's sake: a speculative step waits for the device, then
the host observes every row's new tokens and drafts again before it can launch the next step,
and the Python matcher's ~7 us a token (`benchmarks/bench_sam.py`) is time the GPU waits.

The library is compiled on first use like the CPU kernels (`rlkit.kernels.cpu`: `$CC`, the
kernel cache, RLKIT_CPU_KERNELS=0 turns it off), with no instruction-set flags: it is plain C.
Where it cannot be built `available()` is False and the drafter keeps the Python matchers.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading

import numpy as np
import torch
from rlkit.kernels import cpu

_BUILD = cpu._Build("generic", "sam.c", ("-O2", "-shared", "-fPIC"), torch.int64, "sam")
_lock = threading.Lock()
_lib: list[ctypes.CDLL | None] = []  # filled once: the library, or None
_why: list[str] = []


def _load() -> ctypes.CDLL | None:
    if _lib:
        return _lib[0]
    with _lock:
        if not _lib:
            lib, why = _open()
            _lib.append(lib)
            _why.append(why or "")
    return _lib[0]


def _open() -> tuple[ctypes.CDLL | None, str | None]:
    why = missing_prerequisite()
    if why is not None:
        return None, why
    try:
        lib = ctypes.CDLL(str(cpu._build(_BUILD)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, f"could not build or load sam.c: {exc}"
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.rlkit_sam_new.argtypes = [i64]
    lib.rlkit_sam_new.restype = ptr
    lib.rlkit_sam_free.argtypes = [ptr]
    lib.rlkit_sam_free.restype = None
    lib.rlkit_sam_extend_batch.argtypes = [ptr, ptr, i64, ptr, i64]
    lib.rlkit_sam_extend_batch.restype = i32
    lib.rlkit_sam_draft_batch.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64]
    lib.rlkit_sam_draft_batch.restype = i32
    lib.rlkit_sam_match.argtypes = [ptr]
    lib.rlkit_sam_match.restype = i64
    return lib, None


def missing_prerequisite() -> str | None:
    """What this machine lacks to build the library (`cpu.toolchain_missing`: disabled, or no
    C compiler), found without building it. Where this is None and `available()` is False,
    the build or load failed: a bug, not a property of the machine."""
    return cpu.toolchain_missing()


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str | None:
    return None if available() else _why[0]


def _int64(a: np.ndarray | list[int], name: str) -> np.ndarray:
    out = np.ascontiguousarray(a, dtype=np.int64)
    if out.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {out.shape}")
    return out


class Matchers:
    """C matchers by sequence id (module docstring). Frees them when removed or collected."""

    def __init__(self, latest: bool = False) -> None:
        self.latest = latest
        lib = _load()
        if lib is None:
            raise RuntimeError(f"the C SAM matchers are unavailable: {unavailable_reason()}")
        self._lib = lib
        self._ptr: dict[int, int] = {}

    def _ptrs(self, seqs: list[int]) -> ctypes.Array:
        try:
            return (ctypes.c_void_p * len(seqs))(*[self._ptr[s] for s in seqs])
        except KeyError as e:
            raise KeyError(f"no matcher for sequence {e.args[0]}") from None

    def add(self, seq: int, tokens: list[int] | np.ndarray) -> None:
        if seq in self._ptr:
            raise ValueError(f"sequence {seq} already has a matcher")
        p = self._lib.rlkit_sam_new(int(self.latest))
        if not p:
            raise MemoryError("rlkit_sam_new: allocation failed")
        self._ptr[seq] = p
        toks = _int64(tokens, "tokens").reshape(1, -1)
        self.extend([seq], toks, np.array([toks.shape[1]], dtype=np.int64))

    def extend(self, seqs: list[int], tokens: np.ndarray, num: np.ndarray) -> None:
        toks, n = _int64(tokens, "tokens"), _int64(num, "num")
        if toks.ndim != 2 or toks.shape[0] != len(seqs) or n.shape != (len(seqs),):
            raise ValueError(
                f"tokens must be [{len(seqs)}, T] and num [{len(seqs)}], got {toks.shape}, "
                f"{n.shape}"
            )
        if len(seqs) and (int(n.min()) < 0 or int(n.max()) > toks.shape[1]):
            raise ValueError(f"num must be in [0, {toks.shape[1]}], got {n.tolist()}")
        if self._lib.rlkit_sam_extend_batch(
            self._ptrs(seqs), toks.ctypes.data, toks.shape[1], n.ctypes.data, len(seqs)
        ):
            raise MemoryError("rlkit_sam_extend_batch: allocation failed")

    def draft(
        self, seqs: list[int], room: np.ndarray, min_match: int, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        r = _int64(room, "room")
        if r.shape != (len(seqs),):
            raise ValueError(f"room must be [{len(seqs)}], got {r.shape}")
        tokens = np.zeros((len(seqs), k), dtype=np.int64)
        num = np.zeros(len(seqs), dtype=np.int64)
        self._lib.rlkit_sam_draft_batch(
            self._ptrs(seqs), r.ctypes.data, min_match, k, tokens.ctypes.data, num.ctypes.data,
            len(seqs),
        )  # fmt: skip
        return tokens, num

    def match(self, seq: int) -> int:
        """The matched length of sequence seq's cursor (TextMatcher.match)."""
        return int(self._lib.rlkit_sam_match(self._ptr[seq]))

    def remove(self, seqs: list[int]) -> None:
        for s in seqs:
            p = self._ptr.pop(s, None)
            if p is not None:
                self._lib.rlkit_sam_free(p)

    def __len__(self) -> int:
        return len(self._ptr)

    def __del__(self) -> None:
        lib = getattr(self, "_lib", None)
        for p in getattr(self, "_ptr", {}).values():
            if lib is not None:
                lib.rlkit_sam_free(p)
        if hasattr(self, "_ptr"):
            self._ptr.clear()
