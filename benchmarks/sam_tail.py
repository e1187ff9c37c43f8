"""Per-sequence SAM acceptance in one speculative rollout on the CPU: which sequences set the
rollout phase's length, and how many tokens a verify step gives each.

    python benchmarks/sam_tail.py [--prompts 2] [--samples 4] [--max-new-tokens 1536]

SmolLM2-135M-Instruct (bf16 where the CPU has AVX-512 BF16), the first `--prompts`
`arithmetic_set` train prompts (26 problems) x `--samples`, T = 1, top-p 0.7, SAM k = 3, min
match 2: the GPU recipe's rollout settings (`benchmarks/gpu/spec_rollout.sh`). Prints each
sequence's length, verify steps, drafted and accepted tokens and tokens per step, and the end
of each one that reached the cap.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
import torch

from rlkit.bench import _task_prompts
from rlkit.config.schema import SpeculativeConfig
from rlkit.models.loading import load_model, resolve_model_dir
from rlkit.rollout import drafters
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=1536)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    model_dir = resolve_model_dir("smollm2-135m-instruct")
    model, tok = load_model(model_dir, dtype=torch.bfloat16)
    spec = SpeculativeConfig(drafter="sam", num_draft_tokens=3, sam_min_match=2)
    engine = Engine(
        model, tok, max_batch_size=a.prompts * a.samples, dtype=torch.bfloat16, speculative=spec
    )
    prompts = _task_prompts(
        "arithmetic_set", a.prompts, 0, model_dir, {"problems": 26, "digits": [2, 1]}
    )
    # Per sequence id: verify steps, drafted, accepted; from the drafter's two calls a step.
    per: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    drafted: dict[int, int] = {}
    propose, observed = drafters.SAMDrafter.propose, drafters.SAMDrafter.observed

    def spy_propose(self, run, room):
        d = propose(self, run, room)
        drafted.clear()
        drafted.update(zip(run.seq, np.asarray(d.num).tolist(), strict=True))
        return d

    def spy_observed(self, run, hidden, emitted, num, emitted_host=None):
        for b, s in enumerate(run.seq):
            if s in drafted:
                per[s][0] += 1
                per[s][1] += drafted[s]
                per[s][2] += int(num[b]) - 1
        return observed(self, run, hidden, emitted, num, emitted_host)

    drafters.SAMDrafter.propose = spy_propose
    drafters.SAMDrafter.observed = spy_observed
    sp = SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=a.max_new_tokens, seed=a.seed)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp, n=a.samples)
    print(
        f"{time.perf_counter() - t0:.1f} s, accepted length "
        f"{engine.stats['spec/accept_len_mean']:.2f} over all rows and steps"
    )
    for s, c in enumerate(outs):
        steps, d, acc = per[s]
        n = len(c.token_ids)
        print(
            f"seq {s}: {n} tokens ({c.finish_reason}), {steps} decode steps, drafted {d}, "
            f"accepted {acc}, {n / max(steps, 1):.2f} tokens a step"
        )
        if c.finish_reason == "length":
            print("   ...", repr(c.text[-300:]))


if __name__ == "__main__":
    main()
