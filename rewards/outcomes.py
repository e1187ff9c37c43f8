"""What one `score` call found: a score per sample, and each failure counted under its kind."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .results import MAX_EXTRAS, Result, cap_text

# The kinds of failure, each counted as `<kind>_count` in the metrics.
KINDS = ("error", "crash", "timeout", "limit", "invalid")


@dataclass
class ScoreResult:
    scores: list[float]
    # Per sample: the verifier's extra dict fields (numbers as floats, strings kept).
    extras: list[dict[str, Any]]
    # Per sample: "ok", or the kind of its failure (one of KINDS).
    kinds: list[str] = field(default_factory=list)
    n_errors: int = 0
    n_timeouts: int = 0
    n_invalid: int = 0
    n_crashes: int = 0
    n_limits: int = 0
    # "sample i: ..." for the failure of the lowest sample index, and per kind.
    first_error: str | None = None
    first_errors: dict[str, str] = field(default_factory=dict)
    # Bytes the verifier wrote to stdout/stderr (captured by the workers, never printed).
    output_bytes: int = 0
    # score_mean, <kind>_count for each kind, time_s, and `<extra>_mean` for each numeric
    # extra field (averaged over the samples that returned it).
    metrics: dict[str, float] = field(default_factory=dict)


class Outcomes:
    def __init__(self, n: int) -> None:
        self.result = ScoreResult(scores=[0.0] * n, extras=[{} for _ in range(n)], kinds=["ok"] * n)
        self.counts = dict.fromkeys(KINDS, 0)
        # The failure of the lowest sample index (overall and per kind), whatever order the
        # workers finish in.
        self._first: dict[str | None, tuple[int, str]] = {}

    def ok(self, indices: list[int], results: list[Result]) -> None:
        for i, (value, extras, reason) in zip(indices, results, strict=True):
            if value is None:
                self.fail([i], "invalid", f"invalid result: {reason}")
            else:
                self.result.scores[i] = value
                self.result.extras[i] = extras

    def fail(self, indices: list[int], kind: str, message: str) -> None:
        self.counts[kind] += len(indices)
        for i in indices:
            self.result.kinds[i] = kind
        for key in (None, kind):
            if key not in self._first or indices[0] < self._first[key][0]:
                self._first[key] = (indices[0], message)

    def finish(self, elapsed_s: float) -> ScoreResult:
        r = self.result
        c = self.counts
        r.n_errors, r.n_crashes, r.n_timeouts = c["error"], c["crash"], c["timeout"]
        r.n_limits, r.n_invalid = c["limit"], c["invalid"]
        for key, (index, message) in self._first.items():
            text = cap_text(f"sample {index}: {message}")
            if key is None:
                r.first_error = text
            else:
                r.first_errors[key] = text
        n = len(r.scores)
        r.metrics = {"score_mean": sum(r.scores) / n if n else 0.0}
        r.metrics.update({f"{kind}_count": float(c[kind]) for kind in KINDS})
        r.metrics["time_s"] = elapsed_s
        numeric: dict[str, list[float]] = {}
        for extras in r.extras:
            for key, value in extras.items():
                if isinstance(value, float):
                    numeric.setdefault(key, []).append(value)
        for key, values in numeric.items():
            r.metrics[f"{key}_mean"] = sum(values) / len(values)
        return r


def check_results(payload: Any, n: int) -> list[Result]:
    """A worker's results, checked and bounded again here (they come from the verifier's process)."""
    if not isinstance(payload, list) or len(payload) != n:
        raise ValueError(f"expected {n} results")
    results: list[Result] = []
    for value, extras, reason in payload:
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
            raise ValueError(f"a score that is not a finite number: {str(value)[:40]!r}")
        if not isinstance(extras, dict):
            raise ValueError("extras that are not a dict")
        clean = {
            cap_text(str(k), 100): (cap_text(v) if isinstance(v, str) else v)
            for k, v in list(extras.items())[:MAX_EXTRAS]
            if v is None or isinstance(v, str) or (type(v) is float and math.isfinite(v))
        }
        text = None if reason is None else cap_text(str(reason))
        results.append((None if value is None else float(value), clean, text))
    return results
