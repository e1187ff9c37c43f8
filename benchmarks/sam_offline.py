"""How many verify steps SAM drafting needs on fixed rollout texts, for drafter variants.

    python benchmarks/sam_offline.py --texts FILE [--generate P,N,SEED] [--ks 3,6]
        [--min-match 2] [--tail 16:10] [--json OUT]

With `--generate`, first samples the texts: SmolLM2-135M-Instruct (bf16), the first P
`arithmetic_set` train prompts (26 problems) x N samples, T = 1, top-p 0.7, up to 1,536 tokens,
stop at EOS (the GPU speculative recipe's rollout, `benchmarks/gpu/spec_rollout.sh`), saved to
--texts; else reads them. --task, --task-args, --top-p and --max-new-tokens sample another
recipe's rollouts (e.g. `recipes/mtp_arithmetic.yaml`'s: --task arithmetic --task-args
'{"digits": 2, "ops": ["+"], "steps": true}' --top-p 1 --max-new-tokens 256).

Why fixed texts measure speculative decoding exactly: with a deterministic draft d (SAM's: q is
one-hot) the rule accepts d with probability p(d) and otherwise emits a token drawn from p
without d, renormalised. Couple it with a text sampled from p: accept exactly when d is the
text's next token. The acceptance probability is p(d) and a rejection's token is distributed as
the rule's, so the emitted text is the sampled one and the count of verify steps is what the
engine's speculative decoding of that text takes. Drafter variants can then be compared on
one set of texts, without the noise of separate samples.

All sequences start together, as in a rollout; each step every unfinished one drafts (up to k,
or the tail's k once at most `tail_rows` run) and advances by its accepted drafts + 1. Per
variant: the verify steps of the longest-running sequence (what sets the rollout phase), the
mean over sequences, the tokens a step, and the steps the whole batch runs, against the dense
steps (the longest text's length).

Variants of the match SAM drafts from (the longest suffix of the text that occurred earlier):
- first: the continuation of its first occurrence (`rlkit.rollout.sam.TextMatcher`,
  `kernels/sam_device.py`);
- latest: of its most recent occurrence;
- first-wrap, latest-wrap: the same, but a continuation that reaches the text's end goes on
  copying itself (the occurrence o tokens back continues as the text did o tokens back), so a
  short period still drafts k tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np


class Matcher:
    """A text with M[o]: the match length of (end - o, end) for each offset o (the state of
    `kernels/sam_device.py`), updated per appended token."""

    def __init__(self, capacity: int):
        self.h = np.zeros(capacity, dtype=np.int64)
        self.M = np.zeros(capacity, dtype=np.int32)
        self.n = 0

    def append(self, t: int) -> None:
        n = self.n  # the new token's position: offsets 1..n look back at h[n - o]
        if n:
            back = self.h[n - 1 :: -1][:n]  # h[n - o] for o = 1..n
            self.M[1 : n + 1] = np.where(back == t, self.M[1 : n + 1] + 1, 0)
        self.h[n] = t
        self.n = n + 1

    def draft(self, k: int, min_match: int, which: str) -> np.ndarray:
        end = self.n - 1
        if end < 1 or k == 0:
            return self.h[:0]
        m = self.M[1 : end + 1]
        length = int(m.max())
        if length < max(min_match, 1):
            return self.h[:0]
        hits = np.nonzero(m == length)[0] + 1  # offsets, ascending
        if which.startswith("second"):  # the second-latest occurrence, if any
            if len(hits) < 2:
                return self.h[:0]
            o = int(hits[1])
        else:
            o = int(hits[-1] if which.startswith("first") else hits[0])
        start = self.n - o  # j* + 1
        if which.endswith("wrap"):
            # Past the text's end the continuation copies itself (period o).
            return self.h[start + np.arange(k) % o]
        return self.h[start : start + min(k, o)]


def passed(draft: np.ndarray, comp: list[int], at: int) -> int:
    """Drafts accepted: the leading ones that are the text's tokens from `at` on."""
    n = 0
    while n < len(draft) and draft[n] == comp[at + n]:
        n += 1
    return n


Drafter = Callable[[int, Matcher, int, int], np.ndarray]


def replay(
    texts: list[tuple[list[int], list[int]]],
    k: int,
    draft: Drafter,
    tail: tuple[int, int] = (0, 0),
) -> dict:
    """Verify steps per sequence (module docstring), all sequences starting together: each
    step every unfinished sequence b drafts `draft(b, matcher, room, at)` (at most room
    tokens for completion positions at.., its matcher holding the text so far) and advances
    by its accepted drafts + 1. The counts every drafter variant reports."""
    B = len(texts)
    ms = []
    for prompt, comp in texts:
        m = Matcher(len(prompt) + len(comp) + 1)
        for t in prompt:
            m.append(t)
        m.append(comp[0])  # the prefill's token
        ms.append(m)
    pos = np.ones(B, dtype=np.int64)  # tokens of each completion emitted
    lens = np.array([len(c) for _, c in texts])
    steps = np.zeros(B, dtype=np.int64)
    drafted = accepted = batch_steps = 0
    while True:
        run = np.nonzero(pos < lens)[0]
        if not len(run):
            break
        batch_steps += 1
        kk = tail[1] if tail[0] and len(run) <= tail[0] else k
        for b in run:
            comp, m = texts[b][1], ms[b]
            room = min(kk, int(lens[b] - pos[b]) - 1)
            d = draft(int(b), m, room, int(pos[b])) if room > 0 else m.h[:0]
            n = passed(d, comp, pos[b])
            drafted += len(d)
            accepted += n
            for t in comp[pos[b] : pos[b] + n + 1]:
                m.append(int(t))
            pos[b] += n + 1
            steps[b] += 1
    longest = int(np.argmax(steps))
    return {
        "steps_longest": int(steps.max()),
        "its_tokens": int(lens[longest]),
        "steps_mean": float(steps.mean()),
        "steps_total": int(steps.sum()),
        "batch_steps": batch_steps,
        "dense_steps": int(lens.max()),
        "tokens_per_step": float(lens.sum() / steps.sum()),
        "accept_rate": accepted / max(drafted, 1),
    }


def simulate(
    texts: list[tuple[list[int], list[int]]],
    k: int,
    min_match: int,
    which: str,
    tail: tuple[int, int] = (0, 0),
) -> dict:
    """SAM's verify steps with the match variant `which` (module docstring)."""
    counts = replay(texts, k, lambda b, m, room, at: m.draft(room, min_match, which), tail)
    return {"k": k, "min_match": min_match, "match": which, "tail": list(tail), **counts}


def generate(
    path: str,
    prompts: int,
    samples: int,
    seed: int,
    task: str = "arithmetic_set",
    task_args: dict | None = None,
    top_p: float = 0.7,
    max_new_tokens: int = 1536,
) -> None:
    import torch

    from rlkit.bench import _task_prompts
    from rlkit.models.loading import load_model, resolve_model_dir
    from rlkit.rollout.engine import Engine
    from rlkit.rollout.sampling import SamplingParams

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    model, tok = load_model(model_dir, dtype=torch.bfloat16)
    engine = Engine(model, tok, max_batch_size=prompts * samples, dtype=torch.bfloat16)
    args = {"problems": 26, "digits": [2, 1]} if task_args is None else task_args
    ps = _task_prompts(task, prompts, 0, model_dir, args)
    sp = SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    outs = engine.generate(ps, sp, n=samples)
    with open(path, "w") as f:
        json.dump({"prompts": ps, "n": samples, "completions": [o.token_ids for o in outs]}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--texts", required=True, help="JSON of prompts, n and completions")
    ap.add_argument("--generate", default=None, help="P,N,SEED: sample the texts first")
    ap.add_argument("--task", default="arithmetic_set", help="--generate's built-in task")
    ap.add_argument("--task-args", default=None, help="its build arguments, JSON")
    ap.add_argument("--top-p", type=float, default=0.7, help="--generate's top-p (T = 1)")
    ap.add_argument("--max-new-tokens", type=int, default=1536)
    ap.add_argument("--ks", default="3,6")
    ap.add_argument("--min-match", type=int, default=2)
    ap.add_argument("--tail", default="0:0,16:10", help="tail_rows:tail_draft_tokens settings")
    ap.add_argument("--matches", default="first,latest", help="first, latest, *-wrap")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.generate:
        p, n, seed = map(int, a.generate.split(","))
        args = None if a.task_args is None else json.loads(a.task_args)
        generate(a.texts, p, n, seed, a.task, args, a.top_p, a.max_new_tokens)
    with open(a.texts) as f:
        data = json.load(f)
    n = data["n"]
    texts = [(data["prompts"][i // n], c) for i, c in enumerate(data["completions"])]
    print(f"{len(texts)} texts, {sum(len(c) for _, c in texts)} tokens, longest "
          f"{max(len(c) for _, c in texts)}")  # fmt: skip
    rows = []
    for k in map(int, a.ks.split(",")):
        for tail in a.tail.split(","):
            tr, tk = map(int, tail.split(":"))
            if tr and tk < k:
                continue
            for which in a.matches.split(","):
                t0 = time.perf_counter()
                r = simulate(texts, k, a.min_match, which, (tr, tk))
                r["seconds"] = time.perf_counter() - t0
                rows.append(r)
                print(json.dumps(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"texts": a.texts, "records": rows}, f, indent=1)


if __name__ == "__main__":
    main()
