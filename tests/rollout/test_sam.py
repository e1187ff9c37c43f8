"""The suffix automata of SAM decoding against brute-force searches."""

import random

import numpy as np
import pytest

from rlkit.rollout.sam import STATIC_LEN_BIAS, SuffixAutomaton, TextMatcher, corpus_automaton


def _longest_earlier_suffix(text: list[int], latest: bool = False) -> tuple[int, int]:
    """(length, first end) of the longest suffix of text that occurs in text[:-1], by search;
    with latest its last end there."""
    earlier = tuple(text[:-1])
    for length in range(len(text) - 1, 0, -1):
        suffix = tuple(text[-length:])
        ends = range(length - 1, len(earlier))
        for end in reversed(ends) if latest else ends:
            if earlier[end - length + 1 : end + 1] == suffix:
                return length, end
    return 0, -1


@pytest.mark.parametrize("latest", [False, True], ids=["first", "latest"])
@pytest.mark.parametrize("alphabet, n, seed", [(2, 120, 0), (3, 120, 1), (8, 120, 2), (40, 80, 3)])
def test_matcher_finds_the_longest_earlier_suffix_and_its_end(alphabet, n, seed, latest):
    rng = random.Random(seed)
    text: list[int] = []
    matcher = TextMatcher([], latest=latest)
    for _ in range(n):
        # Runs of repeated material, as generated text has, among random tokens.
        if text and rng.random() < 0.3:
            start = rng.randrange(len(text))
            chunk = text[start : start + rng.randint(1, 8)]
        else:
            chunk = [rng.randrange(alphabet)]
        for t in chunk:
            text.append(t)
            matcher.extend([t])
            length, end = _longest_earlier_suffix(text, latest)
            assert matcher.match == length, (text, matcher.match, length)
            if length:
                got = matcher.end if latest else matcher.sam.first_end[matcher.state]
                assert got == end
                want = text[end + 1 : end + 1 + 5]
                assert matcher.draft(5, 1) == want


def test_automaton_accepts_exactly_the_substrings():
    rng = random.Random(7)
    text = [rng.randrange(3) for _ in range(60)]
    sam = SuffixAutomaton(text)
    subs = {tuple(text[i:j]) for i in range(len(text)) for j in range(i + 1, len(text) + 1)}
    for length in range(1, 7):
        for _ in range(200):
            probe = tuple(rng.randrange(3) for _ in range(length))
            state, ok = 0, True
            for t in probe:
                if t not in sam.next[state]:
                    ok = False
                    break
                state = sam.next[state][t]
            assert ok == (probe in subs)
    # At most 2n - 1 states: the construction's bound.
    assert len(sam.length) <= 2 * len(text)


def test_draft_threshold_room_and_static_corpus():
    matcher = TextMatcher([1, 2, 3, 4, 5, 6, 9, 1, 2, 3])
    assert matcher.match == 3
    assert matcher.draft(2, min_match=3) == [4, 5]
    assert matcher.draft(8, min_match=4) == []  # match too short
    assert matcher.draft(0, min_match=1) == []
    corpus = corpus_automaton([[7, 7, 1, 2, 3, 8, 8, 8, 8, 8, 8, 8]], separator=0)
    both = TextMatcher([5, 1, 2, 3], static=corpus)
    # The text's suffix 1 2 3 occurs in the corpus (3 tokens) but not earlier in the text.
    assert both.s_match == 3 and both.match == 0
    assert both.draft(3, min_match=1) == []  # 3 - bias < 1
    long = TextMatcher([7, 7, 1, 2, 3], static=corpus)
    assert long.s_match == 5 and long.s_match - STATIC_LEN_BIAS == 1
    assert long.draft(3, min_match=1) == [8, 8, 8]


def _c_matchers(latest: bool = False):
    from rlkit.kernels import sam_matchers

    why = sam_matchers.missing_prerequisite()
    if why is not None:
        pytest.skip(f"the C matchers cannot be built here: {why}")
    assert sam_matchers.available(), (
        f"the C matchers failed to build: {sam_matchers.unavailable_reason()}"
    )
    return sam_matchers.Matchers(latest)


@pytest.mark.parametrize("latest", [False, True], ids=["first", "latest"])
@pytest.mark.parametrize("alphabet, n, seed", [(2, 300, 0), (3, 300, 1), (8, 400, 2), (50, 400, 3)])
def test_c_matchers_draft_what_the_python_matcher_drafts(alphabet, n, seed, latest):
    """Four sequences through the C matchers, batched as the drafter calls them (a prompt,
    then 1..4 tokens a step, rows of ragged counts), against one Python TextMatcher each: the
    same matched length and the same drafts at every step, for every room and threshold."""
    rng = random.Random(seed)
    c = _c_matchers(latest)
    seqs = [3, 11, 5, 8]
    texts = {s: [rng.randrange(alphabet) for _ in range(rng.randint(0, 20))] for s in seqs}
    py = {s: TextMatcher(texts[s], latest=latest) for s in seqs}
    for s in seqs:
        c.add(s, texts[s])
    made = 0
    while made < n:
        rows, num = [], []
        for s in seqs:
            t = texts[s]
            if t and rng.random() < 0.5:  # repeated material
                start = rng.randrange(len(t))
                chunk = t[start : start + rng.randint(1, 4)]
            else:
                chunk = [rng.randrange(alphabet) for _ in range(rng.randint(1, 4))]
            rows.append(chunk + [0] * (4 - len(chunk)))
            num.append(len(chunk))
        c.extend(seqs, np.array(rows), np.array(num))
        for s, row, k in zip(seqs, rows, num, strict=True):
            texts[s].extend(row[:k])
            py[s].extend(row[:k])
            made += k
        for s in seqs:
            assert c.match(s) == py[s].match
        room = np.array([rng.randint(0, 5) for _ in seqs])
        for min_match in (1, 2, 4):
            tokens, got = c.draft(seqs, room, min_match, 5)
            for b, s in enumerate(seqs):
                want = py[s].draft(int(room[b]), min_match)
                assert tokens[b, : got[b]].tolist() == want, (s, min_match)
    c.remove(seqs[:2])
    assert len(c) == 2
    with pytest.raises(KeyError, match="no matcher for sequence 3"):
        c.draft([3], np.array([2]), 1, 2)


def test_c_matchers_reject_bad_shapes():
    c = _c_matchers()
    c.add(1, [1, 2, 3])
    with pytest.raises(ValueError, match=r"tokens must be \[1, T\]"):
        c.extend([1], np.zeros((2, 3)), np.array([1]))
    with pytest.raises(ValueError, match=r"num must be in \[0, 3\]"):
        c.extend([1], np.zeros((1, 3)), np.array([4]))
    with pytest.raises(ValueError, match="already has a matcher"):
        c.add(1, [1])
