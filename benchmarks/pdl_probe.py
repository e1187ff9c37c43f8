"""Does programmatic dependent launch (PDL) shorten a chain of small Triton kernels inside a
CUDA graph on this GPU, and does the graph keep the kernels' order? (issue 16: a decode step
is ~170 launches, each paying an inter-kernel gap and a ramp.)

    python benchmarks/pdl_probe.py [--n 1048576] [--pairs 96] [--repeats 20] [--json FILE]

A producer kernel writes x = y + step over n floats; a consumer reads x and writes z = 2 x.
`pairs` producer/consumer pairs run back to back (each producer reads the last consumer's
output), captured in one CUDA graph (`rlkit.bench.time_cuda_graph`), three ways: plain
launches; `launch_pdl=True` with the consumer waiting (`gdc_wait`) before its loads; and the same with the producer releasing its
dependents (`gdc_launch_dependents`) before its stores. The last z must be the same in all
three (a kernel that ran before its input was written would change it). Prints us per pair
of each, and the ratios against plain, measured in one run.
"""

from __future__ import annotations

import argparse
import json

import torch
from rlkit.kernels.triton_support import HAS_TRITON, tl, triton

from rlkit.bench import time_cuda_graph

if HAS_TRITON:

    @triton.jit
    def _scale_add(Src, Dst, n, scale, add, RELEASE: tl.constexpr, WAIT: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
        """Dst = Src * scale + add: the producer (scale 1, add the step) and the consumer
        (scale 2, add 0) of a pair."""
        if WAIT:
            tl.extra.cuda.gdc_wait()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(Src + offs, mask=m)
        if RELEASE:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(Dst + offs, x * scale + add, mask=m)


def pair(i: int, y, x, z, pdl: bool, release: bool) -> None:
    """Pair i: x = (y if i == 0 else z) + i + 1, then z = 2 x."""
    n, block = y.numel(), 1024
    grid = (triton.cdiv(n, block),)
    kw = {"RELEASE": release, "WAIT": pdl, "BLOCK": block} | ({"launch_pdl": True} if pdl else {})
    _scale_add[grid](y if i == 0 else z, x, n, 1.0, float(i + 1), **kw)
    _scale_add[grid](x, z, n, 2.0, 0.0, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    y = torch.rand(a.n, device="cuda")
    expect = y.clone()
    for i in range(a.pairs):
        expect = 2 * (expect + float(i + 1))
    results: dict = {"device": torch.cuda.get_device_name(), "n": a.n, "pairs": a.pairs}
    for name, pdl, release in (("plain", False, False), ("pdl_wait", True, False),
                               ("pdl_release", True, True)):  # fmt: skip
        x, z = torch.empty_like(y), torch.empty_like(y)
        try:  # the graph's last replay leaves the whole chain's result in z
            t = time_cuda_graph(
                lambda i, x=x, z=z, p=pdl, r=release: pair(i, y, x, z, p, r), a.pairs, a.repeats
            )
        except Exception as e:  # Triton or the driver refusing PDL: named, not fatal
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            results[name] = f"{type(e).__name__}: {e}"
            continue
        ok = torch.allclose(z, expect, rtol=1e-5)
        results[name] = {"us_per_pair": t * 1e6, "correct": ok}
        print(f"{name}: {t * 1e6:.2f} us a pair, result "
              f"{'matches' if ok else 'DIFFERS from'} the serial one", flush=True)  # fmt: skip
    plain = results.get("plain")
    for name in ("pdl_wait", "pdl_release"):
        if isinstance(plain, dict) and isinstance(results.get(name), dict):
            r = plain["us_per_pair"] / results[name]["us_per_pair"]
            results[name]["speedup_vs_plain"] = r
            print(f"{name}: {r:.3f}x plain", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
