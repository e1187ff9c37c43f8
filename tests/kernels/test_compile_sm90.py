"""The Triton kernels that are new since the last GPU run compile for an H100/H200 (sm_90)
on a machine without a GPU: `triton.compile` to a cubin with the wheel's own ptxas. Under
TRITON_INTERPRET=1 the kernels run as NumPy, which does not check what the compiler does
(a loop-carried variable whose shape changes, for one, passes the interpreter and fails
here)."""

from __future__ import annotations

import pytest
from rlkit.kernels import sam_device
from rlkit.kernels import top_p as tp

triton = pytest.importorskip("triton", reason="needs triton")


def _compile(fn, signature: dict, constexprs: dict) -> bytes:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    return kernel.asm["cubin"]


@pytest.mark.parametrize("ways, block", [(2, 2048), (16, 512), (32, 512)])
@pytest.mark.parametrize("has_need", [False, True])
def test_top_p_floor_kernel_compiles(ways, block, has_need):
    sig = {
        "X": "*fp32", "Out": "*fp32", "Need": "*i1" if has_need else "*fp32", "stride_x": "i32",
        "V": "i32", "top_p": "fp32",
    }  # fmt: skip
    consts = {"HAS_NEED": has_need, "BLOCK": block, "WAYS": ways}
    assert _compile(tp._top_p_floor_kernel, sig, consts)


def test_sam_extend_kernel_compiles():
    sig = {
        "Hist": "*i64", "Mat": "*i32", "Hlen": "*i64", "Tokens": "*i64", "Num": "*i64",
        "stride_h": "i32", "stride_m": "i32", "stride_t": "i32", "L": "i32", "T": "i32",
    }  # fmt: skip
    assert _compile(sam_device._extend_kernel, sig, {"BLOCK": 1024})
