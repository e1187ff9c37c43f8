"""rlkit.kernels.rope_append: the Triton kernel rotates the queries and writes the rotated keys,
the values and the query ring exactly where the reference (the decode step's former PyTorch
ops) does, on q/k/v views of one fused projection (as the model passes them), caches with more
slots and entries than the step touches, one and several tokens per row, bf16 and fp32.

On CPU the kernel runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as
tests/kernels/test_sparse_decode_attention.py explains; on a CUDA machine the `gpu` test runs the
compiled kernel.
"""

from __future__ import annotations

import json

import pytest
import torch
from interpreter import run_interpreted
from rlkit.kernels import rope_append as ra

# name: (B, T, H, KVH, D, dtype, ring)
CASES: dict[str, tuple] = {
    "B5-T1-H4-KV2-D16-fp32": (5, 1, 4, 2, 16, torch.float32, False),
    "B3-T4-H6-KV2-D32-bf16-ring": (3, 4, 6, 2, 32, torch.bfloat16, True),
    "B2-T1-H9-KV3-D64-bf16-ring": (2, 1, 9, 3, 64, torch.bfloat16, True),
}
SLOTS_EXTRA, LENGTH, RING = 2, 24, 8


def make_inputs(case: tuple, seed: int, device: str = "cpu") -> dict:
    B, T, H, KVH, D, dtype, ring = case
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, (H + 2 * KVH) * D, generator=g).to(dtype)
    pos = torch.randint(0, 1000, (B, T), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    start = torch.randint(0, LENGTH - T, (B,), generator=g)
    write = start[:, None] + torch.arange(T)
    S = B + SLOTS_EXTRA
    inputs = {
        "qkv": qkv,
        "cos": emb.cos().to(dtype),
        "sin": emb.sin().to(dtype),
        "write": write,
        "k_store": torch.randn(S, KVH, LENGTH, D, generator=g).to(dtype),
        "v_store": torch.randn(S, KVH, LENGTH, D, generator=g).to(dtype),
    }
    if ring:
        inputs["ring_store"] = torch.randn(S, H, RING, D, generator=g).to(dtype)
        inputs["ring"] = (write + 3) % RING
    return {k: x.to(device) for k, x in inputs.items()}


def _call(fn, case: tuple, inputs: dict) -> dict:
    B, T, H, KVH, D = case[:5]
    stores = {k: inputs[k].clone() for k in ("k_store", "v_store", "ring_store") if k in inputs}
    qkv = inputs["qkv"].view(B, T, H + 2 * KVH, D)
    q, k, v = qkv.split([H, KVH, KVH], dim=2)  # strided views, as the model's
    q_rot = fn(
        q, k, v, inputs["cos"], inputs["sin"], inputs["write"], stores["k_store"],
        stores["v_store"], stores.get("ring_store"), inputs.get("ring"),
    )  # fmt: skip
    return {"q_rot": q_rot, **stores}


def run_cases(device: str) -> dict[str, dict]:
    results = {}
    for i, (name, case) in enumerate(CASES.items()):
        inputs = make_inputs(case, seed=i, device=device)
        try:
            out = _call(ra.rope_append_triton, case, inputs)
        except Exception as e:  # reported per case by the parent
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ref = _call(ra.rope_append_reference, case, inputs)
        results[name] = {
            k: {"got": out[k].float().cpu().tolist(), "want": ref[k].float().cpu().tolist()}
            for k in out
        }
    return results


def _check_result(name: str, res: dict) -> None:
    assert "error" not in res, res.get("error")
    dtype = CASES[name][5]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for key, pair in res.items():
        got, want = torch.tensor(pair["got"]), torch.tensor(pair["want"])
        if key == "v_store":  # a copy: exact
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    return run_interpreted(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreted_matches_reference(name, interpreted_results):
    _check_result(name, interpreted_results[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_on_gpu_matches_reference():
    for name, res in run_cases("cuda").items():
        _check_result(name, res)


def test_reference_is_rotate_and_index_put():
    """The reference writes only the new entries, and what it writes is the model's RoPE."""
    from rlkit.models.decoder import rotate

    case = CASES["B3-T4-H6-KV2-D32-bf16-ring"]
    inputs = make_inputs(case, seed=5)
    before = inputs["k_store"].clone()
    out = _call(ra.rope_append_reference, case, inputs)
    B, T, H, KVH, D = case[:5]
    q, k, _ = inputs["qkv"].view(B, T, H + 2 * KVH, D).split([H, KVH, KVH], dim=2)
    assert torch.equal(out["q_rot"], rotate(q.transpose(1, 2), inputs["cos"], inputs["sin"]))
    k_rot = rotate(k.transpose(1, 2), inputs["cos"], inputs["sin"])
    written = torch.zeros_like(before, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            w = int(inputs["write"][b, t])
            assert torch.equal(out["k_store"][b, :, w], k_rot[b, :, t])
            written[b, :, w] = True
    assert torch.equal(out["k_store"][~written], before[~written])


def test_bad_arguments_name_what_is_wrong():
    case = CASES["B5-T1-H4-KV2-D16-fp32"]
    inputs = make_inputs(case, seed=0)
    B, T, H, KVH, D = case[:5]
    q, k, v = inputs["qkv"].view(B, T, H + 2 * KVH, D).split([H, KVH, KVH], dim=2)
    with pytest.raises(ValueError, match="write must be"):
        ra.rope_append(q, k, v, inputs["cos"], inputs["sin"], inputs["write"][:, :0],
                       inputs["k_store"], inputs["v_store"])  # fmt: skip
    with pytest.raises(ValueError, match="k_store must be"):
        ra.rope_append(q, k, v, inputs["cos"], inputs["sin"], inputs["write"],
                       inputs["k_store"][:2], inputs["v_store"])  # fmt: skip
    with pytest.raises(ValueError, match="ring_store and ring go together"):
        ra.rope_append(q, k, v, inputs["cos"], inputs["sin"], inputs["write"],
                       inputs["k_store"], inputs["v_store"], inputs["k_store"])  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(run_cases("cpu")))
