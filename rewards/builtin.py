"""Built-in verifiers: answer correctness and format checks. Each returns a score in [0, 1]."""

from __future__ import annotations

import bisect
import json
import logging
import re
from fractions import Fraction
from typing import Any

from .answers import (
    extract_after_hash,
    extract_boxed,
    extract_final_answer,
    extract_last_number,
    find_numbers,
    normalize_text,
    numbers_equal,
    parse_number,
)
from .registry import register_verifier


@register_verifier("arithmetic")
def arithmetic(completion: str, sample: dict) -> float:
    """The number after `####` if present, else the last number in the text, equals the integer."""
    after_hash = extract_after_hash(completion)
    if after_hash is not None:
        numbers = find_numbers(after_hash)
        answer = numbers[0] if numbers else None
    else:
        answer = extract_last_number(completion)
    value = parse_number(answer) if answer is not None else None
    return float(value is not None and value == Fraction(int(str(sample["ground_truth"]).strip())))


# A line that answers a labelled problem: "C) 37 + 8 = 45", "**c:** 45", "Q3. 45", "3) 45".
_LABEL_RE = re.compile(r"[\s*#>`-]*([a-z]{1,3}|[a-z]?\d{1,3})\s*[.:)]")


@register_verifier("arithmetic_set")
def arithmetic_set(completion: str, sample: dict, passes: int = 1) -> dict[str, float]:
    """Partial credit over a set of labelled problems: score is the fraction answered right.

    `ground_truth` maps each label to its answer (JSON object, e.g. {"A": 45, "B": 91}). A
    line that starts with a label (any case, then `)`, `:` or `.`) answers that problem: the
    first number after the line's first `=` ("= 85 (7 + 8 = 15)" is 85), else the line's last
    number. A label's last such line counts (a checking pass may correct the first), so
    writing several answers to a problem gains nothing; labels the set does not have are
    ignored. `passes`: a problem counts only when at least this many lines answer it (2: the
    prompt's checking pass is graded too). `answered`: the fraction of problems given an
    answer line; `checked`: the fraction answered on at least two lines.
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"arithmetic_set: passes must be an integer >= 1, got {passes!r}")
    truth = sample["ground_truth"]
    answers = json.loads(truth) if isinstance(truth, str) else truth
    expected = {str(label).lower(): Fraction(int(value)) for label, value in answers.items()}
    if not expected:
        raise ValueError("arithmetic_set: ground_truth holds no problems")
    given: dict[str, Fraction | None] = {}
    lines: dict[str, int] = {}
    for line in completion.splitlines():
        match = _LABEL_RE.match(line.lower())
        if match is None or match[1] not in expected:
            continue
        rest = line[match.end() :]
        numbers = find_numbers(rest.split("=", 1)[1]) if "=" in rest else find_numbers(rest)[-1:]
        given[match[1]] = parse_number(numbers[0]) if numbers else None
        lines[match[1]] = lines.get(match[1], 0) + 1
    right = sum(
        value is not None and value == expected[label] and lines[label] >= passes
        for label, value in given.items()
    )
    n = len(expected)
    checked = sum(count >= 2 for count in lines.values())
    return {"score": right / n, "answered": len(given) / n, "checked": checked / n}


@register_verifier("counting")
def counting(completion: str, sample: dict) -> dict[str, float]:
    """Partial credit for writing every whole number from `start` to `end` in order.

    `ground_truth` is {"start": a, "end": b} (JSON or a dict). The response's integers (runs of
    digits, in order, whatever separates them) are read; the score is the longest strictly
    increasing run of them inside [a, b] (a subsequence: a skipped or repeated number costs only
    itself) over the larger of the range's size and the count of integers written, so numbers
    past the end, out of order or out of range lower it, and a response can reach 1 only by
    writing exactly a, a + 1, ..., b (`exact`). `past_end`: 1 when any number above b was
    written (the sample did not stop).
    """
    truth = sample["ground_truth"]
    bounds = json.loads(truth) if isinstance(truth, str) else truth
    start, end = int(bounds["start"]), int(bounds["end"])
    if end < start:
        raise ValueError(f"counting: ground_truth's end {end} is below its start {start}")
    values = [int(v) for v in _DIGITS_RE.findall(completion)]
    tails: list[int] = []  # tails[i]: the least last value of an increasing run of i + 1
    for v in values:
        if start <= v <= end:
            i = bisect.bisect_left(tails, v)
            tails[i : i + 1] = [v]
    size = end - start + 1
    return {
        "score": len(tails) / max(size, len(values)),
        "exact": float(values == list(range(start, end + 1))),
        "past_end": float(any(v > end for v in values)),
    }


_DIGITS_RE = re.compile(r"\d+")


@register_verifier("numeric")
def numeric(completion: str, sample: dict, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> float:
    """The marked final answer (else the last number) equals the ground truth within tolerance."""
    answer = extract_final_answer(completion)
    if answer is not None and parse_number(answer) is None:
        # "The answer is 42 apples": the marked answer's last number.
        answer = extract_last_number(answer)
    elif answer is None:
        answer = extract_last_number(completion)
    if answer is None:
        return 0.0
    return float(
        numbers_equal(answer, str(sample["ground_truth"]), rel_tol=rel_tol, abs_tol=abs_tol)
    )


@register_verifier("math_verify")
def math_verify(completion: str, sample: dict, float_rounding: int = 6) -> float:
    """Mathematical equivalence (`\\frac{1}{2}` == `0.5`, `(x+1)^2` == `x^2+2x+1`) by math-verify."""
    import math_verify as mv

    # math-verify's own timeouts use SIGALRM, which fails outside the main thread; they are
    # disabled here and the process pool (`runner.VerifierPool`) enforces the time limit.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    after_hash = extract_after_hash(completion)
    pred_text = f"${after_hash}$" if after_hash is not None else completion
    truth = str(sample["ground_truth"])
    gold = mv.parse(
        truth if "$" in truth or "\\boxed" in truth else f"${truth}$", parsing_timeout=None
    )
    pred = mv.parse(pred_text, parsing_timeout=None)
    if not gold or not pred:
        return 0.0
    return float(mv.verify(gold, pred, float_rounding=float_rounding, timeout_seconds=None))


@register_verifier("boxed")
def boxed(completion: str, sample: dict, rel_tol: float = 1e-6) -> float:
    """The last `\\boxed{}` holds the ground truth (numerically, else as normalised text)."""
    answer = extract_boxed(completion)
    if answer is None:
        return 0.0
    return float(_same_answer(answer, str(sample["ground_truth"]), rel_tol))


@register_verifier("format_hash")
def format_hash(completion: str, sample: dict) -> float:
    """A non-empty answer follows `####`."""
    return float(extract_after_hash(completion) is not None)


@register_verifier("format_boxed")
def format_boxed(completion: str, sample: dict) -> float:
    """A complete `\\boxed{...}` is present."""
    return float(extract_boxed(completion) is not None)


@register_verifier("format_regex")
def format_regex(
    completion: str, sample: dict, pattern: str = r"####\s*\S", full: bool = False
) -> float:
    """The completion matches `pattern` (anywhere, or as a whole with `full=True`; DOTALL)."""
    match = re.fullmatch if full else re.search
    return float(match(pattern, completion, flags=re.DOTALL) is not None)


def _same_answer(answer: str, truth: Any, rel_tol: float) -> bool:
    if parse_number(answer) is not None and parse_number(truth) is not None:
        return numbers_equal(answer, truth, rel_tol=rel_tol)
    return normalize_text(answer) == normalize_text(truth)
