"""The offline replays of `benchmarks/sam_offline.py` and `benchmarks/mtp_offline.py` count
the verify steps speculative decoding takes on fixed texts: checked on texts whose answers
are known by hand."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from mtp_offline import replay  # noqa: E402


def _table(comp, kmax, right, runner_up=False):
    """MTP drafts at each row j for depths 1..kmax (the text's tokens where `right`, else -1),
    then the depth-1 runner-up (the text's token where `runner_up`, else -2)."""
    tab = np.full((len(comp), kmax + 1), -1, dtype=np.int64)
    tab[:, -1] = -2
    for j in range(len(comp)):
        for d in range(1, kmax + 1):
            if j + d < len(comp) and right:
                tab[j, d - 1] = comp[j + d]
        if j + 1 < len(comp) and runner_up:
            tab[j, -1] = comp[j + 1]
    return tab


def test_a_perfect_mtp_drafter_emits_k_plus_one_tokens_a_step():
    comp = list(range(100, 131))  # 31 tokens, no repeats: SAM never drafts
    texts = [([1, 2, 3], comp)]
    k = 3
    perfect = replay(texts, [_table(comp, k, True)], k, "mtp", 0)
    # The prefill emits token 0; each step then k + 1 tokens (the last step fewer).
    assert perfect["steps_longest"] == int(np.ceil((len(comp) - 1) / (k + 1)))
    assert perfect["accept_rate"] == 1.0
    wrong = replay(texts, [_table(comp, k, False)], k, "mtp", 0)
    assert wrong["steps_longest"] == len(comp) - 1 and wrong["accept_rate"] == 0.0
    # SAM has no match in a text without repeats: one token a step; sam+mtp then drafts MTP's.
    assert replay(texts, [_table(comp, k, False)], k, "sam", 2)["steps_longest"] == len(comp) - 1
    both = replay(texts, [_table(comp, k, True)], k, "sam+mtp", 2)
    assert both["steps_longest"] == perfect["steps_longest"] and both["sam_share"] == 0.0


def test_sam_drafts_a_repeated_text_and_the_oracle_takes_the_better_draft():
    period = [7, 8, 9, 10, 11]
    comp = period * 8  # after the first period SAM's match continues it
    texts = [([1, 2], comp)]
    k = 4
    wrong = [_table(comp, k, False)]
    sam = replay(texts, wrong, k, "sam", 2)
    mtp = replay(texts, wrong, k, "mtp", 0)
    assert sam["steps_longest"] < mtp["steps_longest"] == len(comp) - 1
    assert replay(texts, wrong, k, "oracle", 2)["steps_longest"] == sam["steps_longest"]
    # With the threshold above any match, sam+mtp drafts MTP's (wrong) tokens only.
    assert replay(texts, wrong, k, "sam+mtp", 99)["steps_longest"] == len(comp) - 1


def test_four_chains_take_the_runner_ups_chain_where_it_passes():
    comp = list(range(100, 131))
    texts = [([1, 2, 3], comp)]
    k = 3
    # Depth 1's argmax always wrong, its runner-up right; deeper depths right (teacher-forced).
    tab = _table(comp, k, True, runner_up=True)
    tab[:, 0] = -1
    assert replay(texts, [tab], k, "oracle", 2)["steps_longest"] == len(comp) - 1
    chains = replay(texts, [tab], k, "chains4", 2)
    assert chains["steps_longest"] == int(np.ceil((len(comp) - 1) / (k + 1)))
