"""rlkit.kernels.sparse_decode_attention.rope_decode_attention: RoPE, the cache append and the
decode attention of one new token per row in one launch, against its reference (rope_append,
then the attention), for ragged rows, several splits (the new entry lands in the last one),
strided cache views, a query ring, and a head_dim below the kernel's 16-wide tiles.

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as
tests/kernels/test_sparse_decode_attention.py explains; on a CUDA machine the `gpu` test runs
the compiled kernel.
"""

from __future__ import annotations

import json

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import sparse_decode_attention as sda

# name: (B, H, KVH, D, L, dtype, num_splits, ring, strided cache views)
CASES: dict[str, tuple] = {
    "b3-h8-kv2-d64-bf16-ring": (3, 8, 2, 64, 48, torch.bfloat16, 1, True, False),
    "b3-h6-kv2-d32-fp32-split3-strided": (3, 6, 2, 32, 70, torch.float32, 3, False, True),
    "b2-h4-kv1-d16-bf16-split2-ring-strided": (2, 4, 1, 16, 40, torch.bfloat16, 2, True, True),
    "b4-h4-kv4-d8-fp32": (4, 4, 4, 8, 20, torch.float32, 1, False, False),
}
ATOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def make_inputs(case: tuple, seed: int, device: str = "cpu"):
    B, H, KVH, D, L, dtype, _, ring, strided = case
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    # The fused q/k/v projection's views: [B, 1, H + 2 KVH, D] split by heads.
    qkv = randn(B, 1, H + 2 * KVH, D)
    q, k, v = qkv[:, :, :H], qkv[:, :, H : H + KVH], qkv[:, :, H + KVH :]
    angles = torch.rand(B, 1, 1, D // 2, generator=g) * 6
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype).to(device)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype).to(device)
    if strided:  # views of a bigger cache [layers, slots, KVH, max_len, D]
        store_k, store_v = randn(2, B + 2, KVH, L + 9, D), randn(2, B + 2, KVH, L + 9, D)
        k_cache, v_cache = store_k[1, 1 : B + 1, :, :L], store_v[1, :B, :, :L]
    else:
        k_cache, v_cache = randn(B, KVH, L, D), randn(B, KVH, L, D)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0], lengths[-1] = L, 1
    for b in range(B):  # stale entries from the new one on: leaked, they would dominate
        k_cache[b, :, int(lengths[b]) - 1 :] = 1e4
        v_cache[b, :, int(lengths[b]) - 1 :] = -1e4
    ring_store = ring_idx = None
    if ring:
        ring_store = randn(B + 1, H, 8, D)
        ring_idx = torch.randint(0, 8, (B, 1), generator=g).to(device)
    return q, k, v, cos, sin, k_cache, v_cache, lengths.to(device), ring_store, ring_idx


def run_cases(device: str) -> dict[str, dict]:
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        got_in = make_inputs(case, seed=i, device=device)
        want_in = make_inputs(case, seed=i, device=device)
        want = sda.rope_decode_attention_reference(*want_in, cpu_kernel=False)
        try:
            got = sda.rope_decode_attention_triton(*got_in, num_splits=case[6])
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ring_err = 0.0
        if got_in[8] is not None:
            ring_err = (got_in[8].float() - want_in[8].float()).abs().max().item()
        dispatch_err = 0.0
        if device == "cuda":  # the dispatcher's own configuration (blocks, stages)
            again = make_inputs(case, seed=i, device=device)
            dispatched = sda.rope_decode_attention(*again)
            dispatch_err = (dispatched.float() - want.float()).abs().max().item()
        results[name] = {
            "dispatch_err": dispatch_err,
            "out_err": (got.float() - want.float()).abs().max().item(),
            "k_err": (got_in[5].float() - want_in[5].float()).abs().max().item(),
            "v_equal": bool(torch.equal(got_in[6], want_in[6])),
            "ring_err": ring_err,
            "shape_ok": got.shape == want.shape,
        }
    return results


def _check(name: str, res: dict) -> None:
    assert "error" not in res, res.get("error")
    dtype = CASES[name][5]
    assert res["shape_ok"] and res["out_err"] <= ATOL[dtype], (name, res)
    assert res["dispatch_err"] <= ATOL[dtype], (name, res)
    # The stored key and the ring's queries: RoPE in float32, one rounding (a bf16 ulp at most
    # from the reference's own rounding order).
    tol = 2e-5 if dtype == torch.float32 else 0.0625
    assert res["k_err"] <= tol and res["ring_err"] <= tol and res["v_equal"], (name, res)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(name, interpreted_results):
    _check(name, interpreted_results[name])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_gpu_matches_reference():
    for name, res in run_cases("cuda").items():
        _check(name, res)


def test_reference_stores_the_new_token_then_attends():
    """The reference is rope_append at entry lengths - 1, then the attention: the new key is
    the rotated one, stored; the output is what attention over the stored cache gives."""
    q, k, v, cos, sin, kc, vc, lengths, rs, ri = make_inputs(CASES["b4-h4-kv4-d8-fp32"], 0)
    out = sda.rope_decode_attention_reference(q, k, v, cos, sin, kc, vc, lengths, rs, ri)
    half = 4
    k_rot = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin  # [B, 1, KVH, D]
    for b in range(4):
        at = int(lengths[b]) - 1
        torch.testing.assert_close(kc[b, :, at], k_rot[b, 0])
        torch.testing.assert_close(vc[b, :, at], v[b, 0])
    q_rot = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
    want = sda.sparse_decode_attention_reference(q_rot[:, 0], kc, vc, lengths)
    torch.testing.assert_close(out, want)


def test_the_fused_kernel_applies_only_in_its_measured_regime():
    """Short rows and few (sequence, kv head) programs per multiprocessor, on CUDA: a dense
    cache's long rows and a large batch take the two launches; the CPU never the kernel."""
    assert not sda.rope_decode_applies(torch.zeros(4, 1, 16, 128), 512, 8)
    if not (torch.cuda.is_available() and sda.HAS_TRITON):
        return
    sms = sda._sm_count(torch.device("cuda"))
    q = lambda b: torch.zeros(b, 1, 16, 128, device="cuda")  # noqa: E731
    assert sda.rope_decode_applies(q(64), 576, 8) == (64 * 8 <= 4 * sms)
    assert not sda.rope_decode_applies(q(8), sda.FUSED_MAX_LEN + 1, 8)
    assert not sda.rope_decode_applies(q(4 * sms), 576, 8)
    assert not sda.rope_decode_applies(torch.zeros(8, 1, 16, 96, device="cuda"), 576, 8)


def test_the_dispatcher_outside_the_regime_is_the_two_calls():
    """Where the fused kernel does not apply (here: the CPU), `rope_decode_attention` is
    rope_append then the attention: equal to the reference, the new entry stored."""
    case = CASES["b3-h8-kv2-d64-bf16-ring"]
    got_in, want_in = make_inputs(case, seed=5), make_inputs(case, seed=5)
    got = sda.rope_decode_attention(*got_in, cpu_kernel=False)
    want = sda.rope_decode_attention_reference(*want_in, cpu_kernel=False)
    torch.testing.assert_close(got, want)
    for i in (5, 6, 8):  # the caches and the query ring, written alike
        torch.testing.assert_close(got_in[i], want_in[i])


def test_the_fused_checks_compute_nothing_on_the_device():
    """The fused path's argument checks run in every captured decode step, once a layer: any
    tensor op they make is a launch of every step (a `lengths - 1` for the write indices' shape
    check was 24 launches of ~2 us a 64-row step on an H200). Views and metadata only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    views = {"slice", "unsqueeze", "select", "view", "alias", "expand", "as_strided", "t"}
    seen: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    args = make_inputs(CASES["b3-h8-kv2-d64-bf16-ring"], 0)
    with Record():
        sda._check_fused(*args)
    assert set(seen) <= views, f"the checks computed {sorted(set(seen) - views)}"


def test_bad_arguments_name_what_is_wrong():
    q, k, v, cos, sin, kc, vc, lengths, rs, ri = make_inputs(CASES["b4-h4-kv4-d8-fp32"], 0)
    with pytest.raises(ValueError, match="one new token a row"):
        sda.rope_decode_attention(q.expand(4, 2, 4, 8), k, v, cos, sin, kc, vc, lengths)
    with pytest.raises(ValueError, match="cos and sin must be"):
        sda.rope_decode_attention(q, k, v, cos[..., :4], sin, kc, vc, lengths)
    with pytest.raises(ValueError, match="ring_store and ring go together"):
        sda.rope_decode_attention(q, k, v, cos, sin, kc, vc, lengths, ring=lengths[:, None])


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_cases("cpu")))
