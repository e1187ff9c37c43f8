"""A verifier's raw output made into plain, bounded data: scores, extras and error texts.

Everything here runs inside the process that called the verifier, so a hostile `__float__`,
`__repr__` or `__str__` costs that call (its timeout covers it), and what leaves the process is
small: texts are capped at MAX_TEXT characters and a sample keeps at most MAX_EXTRAS fields.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

# Characters kept of any error text, reason or string extra.
MAX_TEXT = 500
# Extra dict fields kept per sample.
MAX_EXTRAS = 32
# Characters of a call's captured stdout/stderr quoted in its error text.
OUTPUT_EXCERPT = 160

# (score, extras, None) for a valid result; (None, {}, reason) for an invalid one.
Result = tuple[float | None, dict[str, Any], str | None]

_DROP = object()
_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60


def cap_text(text: str, limit: int = MAX_TEXT) -> str:
    if len(text) <= limit:
        return text
    tail = f"... [{len(text)} chars]"
    return text[: limit - len(tail)] + tail


def short_repr(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def describe_exception(e: BaseException) -> str:
    try:
        message = str(e)
    except Exception:
        message = "<unprintable message>"
    name = type(e).__name__
    if len(message) > MAX_TEXT:
        # Cut before formatting: a 10 MB message is never copied again.
        message = f"{message[:MAX_TEXT]}... [{len(message)} chars]"
    return cap_text(f"{name}: {message}")


def output_excerpt(tail: bytes) -> str:
    """The end of a call's captured output as one printable line (bytes that are not UTF-8 become ?)."""
    text = tail.decode("utf-8", errors="replace").replace("\ufffd", "?")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text[-OUTPUT_EXCERPT:]


def normalize_result(raw: Any) -> Result:
    """A float or bool, or a dict with a numeric `score`; anything else (None, NaN, text) is invalid."""
    try:
        return _normalize(raw)
    except Exception as e:
        return None, {}, f"unreadable result: {describe_exception(e)}"


def _normalize(raw: Any) -> Result:
    extras: dict[str, Any] = {}
    score = raw
    if isinstance(raw, dict):
        if "score" not in raw:
            keys = ", ".join(short_repr(k) for k in list(raw)[:8])
            return None, {}, cap_text(f"dict result without 'score' (keys: {keys})")
        score = raw["score"]
        for key, value in raw.items():
            plain = _plain(value)
            if key != "score" and plain is not _DROP and len(extras) < MAX_EXTRAS:
                extras[cap_text(str(key), 100)] = plain
    if score is None or isinstance(score, (str, bytes)) or not hasattr(score, "__float__"):
        return None, {}, f"non-numeric score {short_repr(score)}"
    try:
        value = float(score)
    except Exception as e:
        return (
            None,
            {},
            cap_text(
                f"score {short_repr(score)} does not convert to float: {describe_exception(e)}"
            ),
        )
    if not math.isfinite(value):
        return None, {}, f"non-finite score {value}"
    return value, extras, None


def _plain(value: Any) -> Any:
    """Finite numbers become floats; strings (capped) and None stay; other values are dropped."""
    if value is None:
        return value
    if isinstance(value, str):
        return cap_text(value)
    if hasattr(value, "__float__") and not isinstance(value, bytes):
        try:
            number = float(value)
        except Exception:
            return _DROP
        # A NaN or inf extra would turn its `<key>_mean` metric into nonsense.
        return number if math.isfinite(number) else _DROP
    return _DROP
