"""Final-answer extraction and numeric equality, shared by the built-in verifiers."""

from __future__ import annotations

import math
import re
from fractions import Fraction

# A minus sign counts only where it cannot be a binary minus ("37-48" ends in 48, "= -11" in -11).
# Thousands groups ("1,234") are one number; so are decimals and simple fractions ("3/4").
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])[-−])?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
)
_ANSWER_PHRASE_RE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# Sentence end: a period not inside a decimal number.
_SENTENCE_END_RE = re.compile(r"\.(?!\d)")


def extract_after_hash(text: str) -> str | None:
    """The rest of the line after the last `####` marker (GSM8K style), or None."""
    pos = text.rfind("####")
    if pos < 0:
        return None
    answer = text[pos + 4 :].strip().split("\n", 1)[0]
    return _clean(answer) or None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    if not starts:
        return None
    rest = text[starts[-1] :].lstrip()
    if not rest.startswith("{"):
        # `\boxed 42`: the argument is the next token.
        token = re.match(r"[^\s$]+", rest)
        return token.group(0) if token else None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None


def extract_answer_phrase(text: str) -> str | None:
    """The answer stated as "The answer is 42." / "Final answer: 42" (the last such phrase)."""
    matches = list(_ANSWER_PHRASE_RE.finditer(text))
    if not matches:
        return None
    answer = text[matches[-1].end() :].split("\n", 1)[0]
    boxed = extract_boxed(answer)
    if boxed is not None:
        return boxed
    answer = _SENTENCE_END_RE.split(answer, maxsplit=1)[0]
    return _clean(answer) or None


def extract_final_answer(text: str) -> str | None:
    """The answer after a marker: `#### x`, then `\\boxed{x}`, then "the answer is x"."""
    for extract in (extract_after_hash, extract_boxed, extract_answer_phrase):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


def find_numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER_RE.finditer(text)]


def extract_last_number(text: str) -> str | None:
    numbers = find_numbers(text)
    return numbers[-1] if numbers else None


def parse_number(text: str) -> Fraction | None:
    """Exact value of "42", "-1,234.5", "3/4", "\\frac{3}{4}", "$12", "50%"; None if not a number."""
    s = _clean(text).replace("−", "-").replace("{,}", "").replace("\\!", "").replace("\\,", "")
    s = s.replace("\\%", "").rstrip("%").strip()
    s = _LATEX_FRAC_RE.sub(r"(\1)/(\2)", s)
    s = re.sub(r"\((-?[\d.]+)\)", r"\1", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"\s*/\s*", "/", s)
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(pred: str, truth: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    a, b = parse_number(pred), parse_number(truth)
    if a is None or b is None:
        return False
    return a == b or math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=abs_tol)


def normalize_text(text: str) -> str:
    """Loose string form for non-numeric answers: no `$`, `\\text{}`, spaces or case."""
    s = _clean(text)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).lower()


def _clean(text: str) -> str:
    """Strip the wrapping that models put around an answer: spaces, `$`, `**`, a final period."""
    s = text.strip()
    prev = None
    while s != prev:
        prev = s
        s = s.strip().strip("*").strip()
        if s.startswith("\\$"):
            s = s[2:]
        s = s.strip("$").strip()
        if s.endswith(".") and not s.endswith(".."):
            s = s[:-1]
    return s
