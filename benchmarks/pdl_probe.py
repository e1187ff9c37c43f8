"""Does programmatic dependent launch (PDL) shorten a chain of small Triton kernels inside a
CUDA graph on this GPU, and does the graph keep the kernels' order? (issue 16: a decode step
is ~170 launches, each paying an inter-kernel gap and a ramp.)

    python benchmarks/pdl_probe.py [--n 1048576] [--pairs 96] [--repeats 20] [--json FILE]

A producer kernel writes x = y + step over n floats; a consumer reads x and writes z = 2 x.
`pairs` producer/consumer pairs run back to back (each producer reads the last consumer's
output), captured in one CUDA graph, three ways: plain launches; `launch_pdl=True` with the
consumer waiting (`gdc_wait`) before its loads; and the same with the producer releasing its
dependents (`gdc_launch_dependents`) before its stores. The last z must be the same in all
three (a kernel that ran before its input was written would change it). Prints us per pair
of each, and the ratios against plain, measured in one run.
"""

from __future__ import annotations

import argparse
import json

import torch
from rlkit.kernels.triton_support import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _produce(Y, X, n, step, RELEASE: tl.constexpr, WAIT: tl.constexpr, BLOCK: tl.constexpr):
        if WAIT:
            tl.extra.cuda.gdc_wait()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        y = tl.load(Y + offs, mask=m)
        if RELEASE:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(X + offs, y + step, mask=m)

    @triton.jit
    def _consume(X, Z, n, RELEASE: tl.constexpr, WAIT: tl.constexpr, BLOCK: tl.constexpr):
        if WAIT:
            tl.extra.cuda.gdc_wait()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(X + offs, mask=m)
        if RELEASE:
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(Z + offs, 2 * x, mask=m)


def chain(y, x, z, pairs: int, pdl: bool, release: bool) -> None:
    n, block = y.numel(), 1024
    grid = (triton.cdiv(n, block),)
    kw = {"launch_pdl": True} if pdl else {}
    for i in range(pairs):
        src = y if i == 0 else z
        _produce[grid](src, x, n, float(i + 1), RELEASE=release, WAIT=pdl, BLOCK=block, **kw)
        _consume[grid](x, z, n, RELEASE=release, WAIT=pdl, BLOCK=block, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=1 << 20)
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    y = torch.rand(a.n, device="cuda")
    results: dict = {"device": torch.cuda.get_device_name(), "n": a.n, "pairs": a.pairs}
    outs = {}
    for name, pdl, release in (("plain", False, False), ("pdl_wait", True, False),
                               ("pdl_release", True, True)):  # fmt: skip
        x, z = torch.empty_like(y), torch.empty_like(y)
        try:
            chain(y, x, z, a.pairs, pdl, release)  # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                chain(y, x, z, a.pairs, pdl, release)
        except Exception as e:  # Triton or the driver refusing PDL: named, not fatal
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            results[name] = f"{type(e).__name__}: {e}"
            continue
        z.zero_()
        g.replay()
        torch.cuda.synchronize()
        outs[name] = z.clone()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(a.repeats):
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1000 / a.pairs)
        times.sort()
        results[name] = {"us_per_pair": times[len(times) // 2]}
        print(f"{name}: {results[name]['us_per_pair']:.2f} us a pair", flush=True)
    expect = y.clone()
    for i in range(a.pairs):
        expect = 2 * (expect + float(i + 1))
    for name, z in outs.items():
        ok = torch.allclose(z, expect, rtol=1e-5)
        results[name]["correct"] = ok
        print(f"{name}: result {'matches' if ok else 'DIFFERS from'} the serial one", flush=True)
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
