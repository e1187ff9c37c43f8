"""Host time of SAM drafting per decode step: Python's matchers against the C ones.

    python benchmarks/bench_sam.py [--batch 64] [--prompt 330] [--steps 400] [--k 3] [--json F]

What a speculative step does on the host for its drafter between the device's sync and its
next launch: every row observes its 1..k+1 new tokens (`observed`), then drafts up to k
(`propose`). The text is what `arithmetic_set` makes SAM see: a prompt of `--prompt` tokens
over a small vocabulary, and steps that copy runs of earlier text 70% of the time. Both
matcher sets take the same token stream in one process, timed alternately per step; the
drafts are compared (they must agree).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
from rlkit.kernels import sam_matchers

from rlkit.rollout.sam import TextMatcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=330)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--min-match", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rng = random.Random(0)
    B, k = a.batch, a.k
    seqs = list(range(B))
    texts = [[rng.randrange(300) for _ in range(a.prompt)] for _ in range(B)]
    t0 = time.perf_counter()
    py = [TextMatcher(t) for t in texts]
    py_admit = time.perf_counter() - t0
    c = sam_matchers.Matchers()
    t0 = time.perf_counter()
    for s, t in zip(seqs, texts, strict=True):
        c.add(s, t)
    c_admit = time.perf_counter() - t0
    room = np.full(B, k, dtype=np.int64)
    py_s = c_s = 0.0
    for _ in range(a.steps):
        rows = np.zeros((B, k + 1), dtype=np.int64)
        num = np.zeros(B, dtype=np.int64)
        for b in range(B):
            n = rng.randint(1, k + 1)
            if rng.random() < 0.7:
                start = rng.randrange(len(texts[b]) - n)
                chunk = texts[b][start : start + n]
            else:
                chunk = [rng.randrange(300) for _ in range(n)]
            rows[b, :n], num[b] = chunk, n
            texts[b].extend(chunk)
        t0 = time.perf_counter()
        host = rows.tolist()
        for b, m in enumerate(py):
            m.extend(host[b][: num[b]])
        want = [m.draft(k, a.min_match) for m in py]
        t1 = time.perf_counter()
        c.extend(seqs, rows, num)
        got, got_n = c.draft(seqs, room, a.min_match, k)
        t2 = time.perf_counter()
        py_s += t1 - t0
        c_s += t2 - t1
        assert all(got[b, : got_n[b]].tolist() == want[b] for b in range(B))
    row = {
        "batch": B,
        "prompt": a.prompt,
        "k": k,
        "steps": a.steps,
        "python_us_per_step": 1e6 * py_s / a.steps,
        "c_us_per_step": 1e6 * c_s / a.steps,
        "ratio": py_s / c_s,
        "python_admit_ms": 1e3 * py_admit,
        "c_admit_ms": 1e3 * c_admit,
    }
    print(json.dumps(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
