"""Suffix automata for SAM decoding (ALGORITHMS.md section 5): model-free drafts.

`SuffixAutomaton` is the classic online construction (Blumer et al. 1985): one state per class
of substrings with the same end positions, built token by token in O(1) amortised time (clone
states included). Each state remembers where its strings first end (`first_end`), which is
what a draft needs: the tokens that followed that earlier occurrence.

`TextMatcher` is one sequence's drafter state: the automaton of its text (prompt + tokens so
far) and a cursor on the longest suffix of the text that also occurs earlier in it (matched
against the automaton before the newest token is added, so the occurrence found is an earlier
one and has a continuation). Optionally a second cursor walks a shared static automaton (e.g.
over the train split's reference answers), whose match is discounted by `STATIC_LEN_BIAS`.
`draft(n, min_match)` returns up to n tokens that followed the longer match, or nothing when
neither reaches min_match.

Which occurrence of the text's match a draft continues (`latest`, `rollout.speculative.
sam_match`): its first one, or its most recent. Generated text that loops repeats its latest
version, not its first (a list written again with its newest numbers): on SmolLM2's
`arithmetic_set` rollouts the most recent occurrence cut the verify steps of the longest
sequence by 7-13% (`benchmarks/sam_offline.py`). The latest end of a state is the largest of
its end positions: each new token's position joins every state on its suffix-link chain, so
the automaton keeps `last_end` by walking that chain (O(chain) a token instead of O(1)
amortised; only automata built with `track_last`). The static automaton's match continues
its first occurrence: a corpus has no recency.

Facts from the authors' implementation (hyx1999/SAM-Decoding): the dynamic automaton covers
prompt + generated tokens, the static one a corpus, the static match length is penalised by 4,
the longer wins, drafts need a match of at least 4 tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# A static automaton's match counts this many tokens less than a dynamic one of equal length.
STATIC_LEN_BIAS = 4


class SuffixAutomaton:
    """Online suffix automaton of a token sequence (`tokens`), extended one token at a time."""

    def __init__(self, tokens: Iterable[int] = (), track_last: bool = False) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        # Index in `tokens` where the state's strings first end (-1 for the root), and with
        # track_last where they last end.
        self.first_end: list[int] = [-1]
        self.track_last = track_last
        self.last_end: list[int] = [-1]
        self.tokens: list[int] = []
        self.last = 0
        for t in tokens:
            self.extend(t)

    def _new(self, length: int, first_end: int, nxt: dict[int, int], link: int) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.first_end.append(first_end)
        self.last_end.append(first_end)
        return len(self.length) - 1

    def extend(self, token: int) -> None:
        """Append one token (the standard construction, with clone states)."""
        end = len(self.tokens)
        self.tokens.append(token)
        cur = self._new(self.length[self.last] + 1, end, {}, 0)
        p = self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p != -1:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                # The clone keeps q's first end: its strings are suffixes of q's, same ends.
                clone = self._new(
                    self.length[p] + 1, self.first_end[q], dict(self.next[q]), self.link[q]
                )
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
        self.last = cur
        if self.track_last:
            # The new end is every suffix's: the states on cur's suffix-link chain.
            s = cur
            while s > 0:
                self.last_end[s] = end
                s = self.link[s]

    def advance(self, state: int, length: int, token: int) -> tuple[int, int]:
        """The cursor (state, matched length) of the longest suffix of (matched text + token)
        that occurs in the automaton's text; (0, 0) when not even the token does."""
        while state != 0 and token not in self.next[state]:
            state = self.link[state]
            length = self.length[state]
        if token in self.next[state]:
            return self.next[state][token], length + 1
        return 0, 0

    def normalise(self, state: int, length: int) -> int:
        """The state whose strings include the matched one of `length` (a clone made since the
        cursor moved may now hold it)."""
        while state > 0 and self.length[self.link[state]] >= length:
            state = self.link[state]
        return state

    def continuation(self, state: int, n: int) -> list[int]:
        """Up to n tokens that followed the first occurrence of the state's strings."""
        end = self.first_end[state]
        return self.tokens[end + 1 : end + 1 + n] if state > 0 else []

    def after(self, end: int, n: int) -> list[int]:
        """Up to n tokens that followed position `end`."""
        return self.tokens[end + 1 : end + 1 + n]


class TextMatcher:
    """One sequence's SAM drafter: its text's automaton and longest-earlier-suffix cursor,
    and a cursor on a shared static automaton (or None). latest: drafts continue the match's
    most recent earlier occurrence (module docstring), else its first."""

    def __init__(
        self, tokens: Iterable[int], static: SuffixAutomaton | None = None, latest: bool = False
    ) -> None:
        self.sam = SuffixAutomaton(track_last=latest)
        self.state = self.match = 0
        self.latest = latest
        self.end = -1  # with latest: where the match last ended before the newest token
        self.static = static
        self.s_state = self.s_match = 0
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        sam = self.sam
        for t in tokens:
            # Matched against the text before t, so the match's first end is an earlier
            # position with at least t after it.
            self.state, self.match = sam.advance(self.state, self.match, t)
            if self.latest:
                # Before t joins: the state's last end is the latest earlier one.
                self.end = sam.last_end[self.state] if self.match else -1
            sam.extend(t)
            self.state = sam.normalise(self.state, self.match)
            if self.static is not None:
                self.s_state, self.s_match = self.static.advance(self.s_state, self.s_match, t)

    def draft(self, n: int, min_match: int) -> list[int]:
        """Up to n tokens that followed the longer of the two matches, if it reaches
        min_match (the static one counted STATIC_LEN_BIAS shorter; ties go to the text)."""
        if n <= 0:
            return []
        static = self.s_match - STATIC_LEN_BIAS if self.static is not None else -1
        if max(self.match, static) < min_match:
            return []
        if self.match >= static:
            if self.latest:
                return self.sam.after(self.end, n) if self.match else []
            return self.sam.continuation(self.state, n)
        assert self.static is not None
        return self.static.continuation(self.s_state, n)


class TextMatchers:
    """`TextMatcher`s by sequence id with the batched interface of the C matchers
    (`rlkit.kernels.sam_matchers.Matchers`: add, extend, draft, remove), which the SAM drafter
    takes where that library builds; this one also takes a static automaton."""

    def __init__(self, static: SuffixAutomaton | None = None, latest: bool = False) -> None:
        self.static, self.latest = static, latest
        self.text: dict[int, TextMatcher] = {}

    def add(self, seq: int, tokens: list[int]) -> None:
        self.text[seq] = TextMatcher(tokens, self.static, self.latest)

    def extend(self, seqs: list[int], tokens: np.ndarray, num: np.ndarray) -> None:
        """Row b of tokens [B, T] (its first num[b]) joins sequence seqs[b]'s text."""
        rows = tokens.tolist()
        for b, s in enumerate(seqs):
            self.text[s].extend(rows[b][: num[b]])

    def draft(
        self, seqs: list[int], room: np.ndarray, min_match: int, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [B, k] and counts [B]: each sequence's draft of up to room[b] tokens."""
        tokens = np.zeros((len(seqs), k), dtype=np.int64)
        num = np.zeros(len(seqs), dtype=np.int64)
        for b, s in enumerate(seqs):
            d = self.text[s].draft(int(room[b]), min_match)
            tokens[b, : len(d)] = d
            num[b] = len(d)
        return tokens, num

    def remove(self, seqs: list[int]) -> None:
        for s in seqs:
            self.text.pop(s, None)


def corpus_automaton(texts: Iterable[list[int]], separator: int) -> SuffixAutomaton:
    """A static automaton over token lists, each ended by `separator` (e.g. EOS), so that a
    continuation stops at the end of its text."""
    sam = SuffixAutomaton()
    for text in texts:
        for t in text:
            sam.extend(t)
        if not text or text[-1] != separator:
            sam.extend(separator)
    return sam
