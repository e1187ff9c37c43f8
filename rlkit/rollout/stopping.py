"""Stop strings: find where a completion's text first contains one."""

from __future__ import annotations

from typing import Any

import torch

# Tokens decoded before the unchecked ones, so that a stop string straddling the last check
# (and multi-byte characters split across tokens) is still seen whole.
_MARGIN = 8


class StopChecker:
    """Per-sequence incremental search for stop strings in decoded completions.

    Each check decodes only the tokens since the previous check plus a margin; a hit is then
    located exactly (the shortest token prefix whose text contains a stop string).
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.active = bool(self.stops)
        self.margin = _MARGIN + max((len(s) for s in self.stops), default=0)
        self._checked: dict[int, int] = {}

    def reset(self, seq: int) -> None:
        self._checked[seq] = 0

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _hit(self, text: str) -> bool:
        return any(s in text for s in self.stops)

    def check(self, seq: int, row: torch.Tensor) -> int | None:
        """Number of tokens to keep if the text of `row` (the sequence's tokens so far)
        contains a stop string, else None."""
        if not self.active:
            return None
        checked = self._checked.get(seq, 0)
        start = max(0, checked - self.margin)
        tail = row[start:].tolist()
        if not self._hit(self._text(tail)):
            self._checked[seq] = len(row)
            return None
        tokens = row.tolist()
        for keep in range(max(1, start + 1), len(tokens) + 1):
            if self._hit(self._text(tokens[:keep])):
                return keep
        # The tail's text had a stop the whole text has not (a token boundary artefact).
        self._checked[seq] = len(row)
        return None

    def truncate(self, text: str) -> str:
        """`text` up to the end of its earliest stop string (kept)."""
        ends = [text.find(s) + len(s) for s in self.stops if s in text]
        return text[: min(ends)] if ends else text
