"""The Triton kernels that are new since the last GPU run compile for an H100/H200 (sm_90)
on a machine without a GPU: `triton.compile` to a cubin with the wheel's own ptxas. Under
TRITON_INTERPRET=1 the kernels run as NumPy, which does not check what the compiler does
(a loop-carried variable whose shape changes, for one, passes the interpreter and fails
here)."""

from __future__ import annotations

import pytest
from rlkit.kernels import fused_norm as fn
from rlkit.kernels import kv_compress as kc
from rlkit.kernels import sam_device
from rlkit.kernels import spec_verify as sv
from rlkit.kernels import top_p as tp

triton = pytest.importorskip("triton", reason="needs triton")


def _compile(fn, signature: dict, constexprs: dict) -> bytes:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    return kernel.asm["cubin"]


@pytest.mark.parametrize("by_value, block", [(True, 2048), (True, 1024), (False, 2048)])
@pytest.mark.parametrize("has_need", [False, True])
def test_top_p_floor_kernel_compiles(by_value, block, has_need):
    sig = {
        "X": "*fp32", "Out": "*fp32", "Need": "*i1" if has_need else "*fp32", "stride_x": "i32",
        "V": "i32", "top_p": "fp32", "span": "fp32",
    }  # fmt: skip
    consts = {"HAS_NEED": has_need, "BLOCK": block, "BY_VALUE": by_value}
    assert _compile(tp._top_p_floor_kernel, sig, consts)


@pytest.mark.parametrize("has_q", [False, True])
def test_chunked_verify_kernels_compile(has_q):
    rows = {
        "P": "*fp32", "Q": "*fp32", "Drafts": "*i64", "NumDrafts": "*i64", "U": "*fp64",
        "Accepted": "*i64", "SumR": "*fp64", "SumP": "*fp64",
    }  # fmt: skip
    strides = {
        "V": "i32", "chunk": "i32", "stride_pb": "i32", "stride_pt": "i32", "stride_qb": "i32",
        "stride_qt": "i32", "stride_db": "i32", "stride_ub": "i32",
    }  # fmt: skip
    meta = {"K": 3, "BLOCK_V": 1024, "HAS_Q": has_q, "CHUNKS": 16}
    assert _compile(sv._verify_sums_kernel, {**rows, **strides}, {**meta, "K_PAD": 4})
    assert _compile(sv._verify_draw_kernel, {**rows, "Token": "*i64", **strides}, meta)


def test_sam_extend_kernel_compiles():
    sig = {
        "Hist": "*i64", "Mat": "*i32", "Hlen": "*i64", "Tokens": "*i64", "Num": "*i64",
        "stride_h": "i32", "stride_m": "i32", "stride_t": "i32", "L": "i32", "T": "i32",
    }  # fmt: skip
    assert _compile(sam_device._extend_kernel, sig, {"BLOCK": 1024})


def test_greedy_verify_kernel_compiles():
    sig = {
        "P": "*fp32", "Drafts": "*i64", "NumDrafts": "*i64", "Accepted": "*i64",
        "Token": "*i64", "V": "i32", "stride_pb": "i32", "stride_pt": "i32", "stride_db": "i32",
    }  # fmt: skip
    assert _compile(sv._verify_greedy_kernel, sig, {"K": 3, "K_PAD": 4, "BLOCK_V": 1024})


@pytest.mark.parametrize("parts, pdl", [(1, False), (2, False), (1, True)])
def test_add_rms_norm_kernel_compiles(parts, pdl):
    sig = {
        "X": "*bf16", "Y": "*bf16", "W": "*bf16", "H": "*bf16", "C": "i32", "sx": "i32",
        "sy": "i32", "sparts": "i32", "sh": "i32", "eps": "fp32",
    }  # fmt: skip
    cubin = _compile(fn._add_rms_norm_kernel, sig, {"PARTS": parts, "BLOCK": 2048, "PDL": pdl})
    assert cubin


def test_pdl_wait_compiles_into_the_kernel():
    """With PDL the kernel's first instruction waits on its predecessor (`griddepcontrol.wait`
    in the PTX); without, no such instruction."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"GU": "*bf16", "A": "*bf16", "inner": "i32", "sg": "i32", "sa": "i32"}
    ptx = {}
    for on in (False, True):
        consts = {"BLOCK": 1024, "PDL": on}
        src = ASTSource(
            fn=fn._silu_mul_kernel,
            signature={**sig, **{k: "constexpr" for k in consts}},
            constexprs=consts,
        )
        ptx[on] = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert "griddepcontrol.wait" in ptx[True]
    assert "griddepcontrol.wait" not in ptx[False]


def test_fill_kernel_compiles():
    sig = {
        "Store": "*bf16", "Rows": "*i64", "Src": "*i64", "Dst": "*i64", "n_moves": "i32",
        "stride_s0": "i32", "stride_sh": "i32", "stride_sl": "i32", "stride_sd": "i32",
        "stride_mb": "i32", "stride_mh": "i32", "stride_ml": "i32",
    }  # fmt: skip
    assert _compile(kc._fill_kernel, sig, {"D": 128, "BLOCK_P": 16, "BLOCK_D": 128})


def test_fill_plan_kernel_compiles():
    sig = {
        "Kept": "*i64", "Src": "*i64", "Dst": "*i64", "Head": "*i64", "Scratch": "*i32",
        "budget": "i32", "n_moves": "i32", "stride_kb": "i32", "stride_kh": "i32",
        "stride_kl": "i32", "stride_mb": "i32", "stride_mh": "i32", "stride_ml": "i32",
    }  # fmt: skip
    assert _compile(kc._fill_plan_kernel, sig, {"BLOCK_B": 512, "BLOCK_M": 64})
