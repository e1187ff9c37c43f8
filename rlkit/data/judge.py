"""JudgeRLVR's judge data, pure: the judge prompt, the verdict parser, the judge reward, and
which sampled candidate solutions become judge items (ALGORITHMS.md section 2).

A judge item ("pair") is a problem plus one candidate solution, labelled correct or incorrect by
the task's verifier. The policy is asked for a short critique and a verdict; its reward is 1 when
the verdict matches the label. No Ray, no files: `rlkit.trainer.judge` does the sampling,
scoring and caching around these functions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

DEFAULT_TEMPLATE = (
    "Here is a problem and a proposed solution.\n\n"
    "Problem:\n{problem}\n\n"
    "Proposed solution:\n{solution}\n\n"
    "Is the proposed solution's final answer correct? Check it in one or two short sentences, "
    "then write your verdict on the last line, exactly as `Verdict: correct` or "
    "`Verdict: incorrect`."
)
PLACEHOLDERS = ("{problem}", "{solution}")

# "Verdict: correct", "**Verdict:** Incorrect.", "verdict - NOT correct", "VERDICT = wrong!"
_VERDICT_RE = re.compile(
    r"verdict\W{0,6}(not\s+correct|incorrect|correct|wrong|right)\b", re.IGNORECASE
)
# A last line that is only a verdict word: "Incorrect." / "**Correct**"
_BARE_RE = re.compile(r"^\W*(not\s+correct|incorrect|correct|wrong|right)\W*$", re.IGNORECASE)
_WORDS = {"correct": True, "right": True, "incorrect": False, "wrong": False}


def check_template(template: str) -> None:
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise ValueError(f"the judge template lacks the placeholder(s) {', '.join(missing)}")


def render_prompt(template: str | None, problem: str, solution: str) -> str:
    """The judge's user message. Placeholders are replaced literally (no str.format), so braces
    in problems, solutions or the template (LaTeX, JSON) need no escaping."""
    text = DEFAULT_TEMPLATE if template is None else template
    check_template(text)
    # One pass over the template, so a "{solution}" inside the problem text stays as written.
    parts = re.split(r"(\{problem\}|\{solution\})", text)
    values = {"{problem}": problem.strip(), "{solution}": solution.strip()}
    return "".join(values.get(part, part) for part in parts)


def problem_text(prompt: str | Sequence[dict[str, Any]]) -> str:
    """The problem as plain text: a string prompt, or the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    if users:
        return str(users[-1])
    return "\n".join(str(m.get("content", "")) for m in prompt)


def parse_verdict(text: str) -> bool | None:
    """True for a "correct" verdict, False for "incorrect", None when there is none.

    The last `Verdict: ...` wins (case, markdown and punctuation around it are ignored); without
    one, a last non-empty line holding only a verdict word counts.
    """
    matches = list(_VERDICT_RE.finditer(text))
    if matches:
        return _meaning(matches[-1].group(1))
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines:
        bare = _BARE_RE.match(lines[-1])
        if bare:
            return _meaning(bare.group(1))
    return None


def _meaning(word: str) -> bool:
    word = " ".join(word.lower().split())
    return False if word == "not correct" else _WORDS[word]


def judge_reward(text: str, label: bool) -> tuple[float, bool | None]:
    """(reward, parsed verdict): 1 when the verdict matches the label; 0 when it does not or
    when no verdict can be parsed."""
    verdict = parse_verdict(text)
    return (1.0 if verdict is not None and verdict == bool(label) else 0.0), verdict


def select_pairs(
    candidates: Sequence[dict[str, Any]],
    pairs_per_problem: int,
    min_pairs: int,
    rng: random.Random,
) -> list[dict[str, Any]]:
    """Judge items from labelled candidates.

    `candidates`: dicts with at least `problem_index`, `solution` (text) and `label` (bool);
    other keys are kept. Identical solutions of one problem count once. Problems whose pass
    rate is strictly between 0 and 1 ("mixed") give up to `pairs_per_problem // 2` positives
    and as many negatives each (balanced per problem). Only when they give fewer than
    `min_pairs` items do all-correct / all-wrong problems fill in, one item per problem,
    taking the label that is short overall. Every item gets `pass_rate` and `mixed`.
    """
    by_problem: dict[int, list[dict[str, Any]]] = {}
    for c in candidates:
        by_problem.setdefault(int(c["problem_index"]), []).append(c)
    per_side = max(1, pairs_per_problem // 2)
    pairs: list[dict[str, Any]] = []
    uniform: dict[bool, list[list[dict[str, Any]]]] = {True: [], False: []}
    for index in sorted(by_problem):
        group = by_problem[index]
        pass_rate = sum(bool(c["label"]) for c in group) / len(group)
        mixed = 0.0 < pass_rate < 1.0
        distinct = _distinct(group)
        for c in distinct:
            c.update(pass_rate=pass_rate, mixed=mixed)
        if mixed:
            pos = [c for c in distinct if c["label"]]
            neg = [c for c in distinct if not c["label"]]
            rng.shuffle(pos)
            rng.shuffle(neg)
            m = min(per_side, len(pos), len(neg))
            pairs.extend(pos[:m] + neg[:m])
        else:
            uniform[bool(group[0]["label"])].append(distinct)
    for side in (True, False):
        rng.shuffle(uniform[side])
    counts = {True: sum(bool(p["label"]) for p in pairs), False: 0}
    counts[False] = len(pairs) - counts[True]
    while len(pairs) < min_pairs and (uniform[True] or uniform[False]):
        side = counts[True] <= counts[False]
        if not uniform[side]:
            side = not side
        pairs.append(rng.choice(uniform[side].pop()))
        counts[side] += 1
    return pairs


def _distinct(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[tuple[str, bool]] = set()
    out = []
    for c in group:
        key = (" ".join(str(c["solution"]).split()), bool(c["label"]))
        if key not in seen:
            seen.add(key)
            out.append(dict(c))
    return out


def balance_subset(
    pairs: Sequence[dict[str, Any]], limit: int, rng: random.Random
) -> list[dict[str, Any]]:
    """Equal numbers of positives and negatives, at most `limit` items in all, in their original
    order (held-out sets: a judge that always says the same verdict scores exactly 0.5)."""
    pos = [p for p in pairs if p["label"]]
    neg = [p for p in pairs if not p["label"]]
    rng.shuffle(pos)
    rng.shuffle(neg)
    k = min(len(pos), len(neg), limit // 2)
    chosen = {id(p) for p in pos[:k] + neg[:k]}
    return [p for p in pairs if id(p) in chosen]


def pair_stats(
    pairs: Sequence[dict[str, Any]], candidates: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """Balance of a judge set: its size, positive fraction, and how many sampled problems were
    mixed (pass rate strictly between 0 and 1); candidate_accuracy is the candidates' pass rate."""
    by_problem: dict[int, list[bool]] = {}
    for c in candidates:
        by_problem.setdefault(int(c["problem_index"]), []).append(bool(c["label"]))
    mixed = sum(1 for labels in by_problem.values() if 0 < sum(labels) < len(labels))
    n = len(pairs)
    return {
        "num_pairs": float(n),
        "pos_frac": sum(bool(p["label"]) for p in pairs) / n if n else 0.0,
        "problems_mixed_frac": mixed / len(by_problem) if by_problem else 0.0,
        "pairs_from_mixed_frac": sum(bool(p.get("mixed")) for p in pairs) / n if n else 0.0,
        "candidate_accuracy": (
            sum(bool(c["label"]) for c in candidates) / len(candidates) if candidates else 0.0
        ),
        "num_problems": float(len(by_problem)),
        "num_candidates": float(len(candidates)),
    }


def verdict_metrics(verdicts: Sequence[bool | None], rewards: Sequence[float]) -> dict[str, float]:
    """Accuracy, unparseable fraction and "says correct" fraction of a batch of verdicts."""
    n = max(1, len(verdicts))
    return {
        "accuracy": sum(rewards) / n,
        "parse_fail_frac": sum(v is None for v in verdicts) / n,
        "says_correct_frac": sum(v is True for v in verdicts) / n,
    }
