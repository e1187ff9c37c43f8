"""JudgeRLVR's pure parts: prompt template, verdict parser, reward, item selection, balance."""

import random

import pytest

from rlkit.data import judge as J


def test_default_template_renders_problem_and_solution():
    text = J.render_prompt(None, "What is 2 + 2?", "  4 \n")
    assert "What is 2 + 2?" in text and "\n4\n" in text
    assert "Verdict: correct" in text and "Verdict: incorrect" in text
    assert "{problem}" not in text and "{solution}" not in text


def test_custom_template_braces_are_literal():
    template = "P={problem} S={solution} json={'a': 1}"
    text = J.render_prompt(template, "x {solution} y", r"\frac{1}{2}")
    # The problem's own "{solution}" is not substituted again; other braces stay as written.
    assert text == r"P=x {solution} y S=\frac{1}{2} json={'a': 1}"


def test_template_without_placeholders_is_rejected():
    with pytest.raises(ValueError, match=r"\{solution\}"):
        J.render_prompt("Problem: {problem}", "p", "s")
    with pytest.raises(ValueError, match=r"\{problem\}"):
        J.check_template("{solution}")


def test_problem_text_of_chat_and_string_prompts():
    chat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 1+1?"}]
    assert J.problem_text(chat) == "What is 1+1?"
    assert J.problem_text("plain") == "plain"


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("The sum is right.\nVerdict: correct", True),
        ("Verdict: incorrect", False),
        ("**Verdict:** Correct.", True),
        ("VERDICT: INCORRECT!", False),
        ("verdict - not correct", False),
        ("Verdict = wrong", False),
        ("verdict:right", True),
        ("Verdict: correct\nOn reflection... Verdict: incorrect", False),  # the last one wins
        ("37 + 48 is 85, so the answer is wrong.\n\nIncorrect.", False),  # bare last line
        ("**Correct**", True),
        ("It looks correct to me", None),
        ("Verdict: maybe", None),
        ("Verdict: correctly computed", None),
        ("", None),
    ],
)
def test_parse_verdict(text, verdict):
    assert J.parse_verdict(text) is verdict


def test_judge_reward():
    assert J.judge_reward("Verdict: correct", True) == (1.0, True)
    assert J.judge_reward("Verdict: correct", False) == (0.0, True)
    assert J.judge_reward("Verdict: incorrect", False) == (1.0, False)
    assert J.judge_reward("no idea", True) == (0.0, None)
    assert J.judge_reward("no idea", False) == (0.0, None)


def cand(problem, solution, label):
    return {
        "problem_index": problem,
        "solution": solution,
        "label": label,
        "problem": f"p{problem}",
    }


def test_select_pairs_prefers_mixed_problems_and_balances_each():
    cands = (
        # problem 0: 2 correct (one duplicate), 4 distinct wrong -> mixed, 1 distinct positive
        [cand(0, "85", True), cand(0, " 85", True)]
        + [cand(0, f"{x}", False) for x in (84, 86, 87, 88)]
        # problem 1: 4 distinct correct phrasings, 4 wrong -> mixed, 2 + 2
        + [cand(1, f"It is 10{'!' * k}", True) for k in range(4)]
        + [cand(1, f"{x}", False) for x in (9, 11, 12, 13)]
        # problem 2: all correct; problem 3: all wrong -> uniform
        + [cand(2, "5", True)] * 4
        + [cand(3, f"{x}", False) for x in (1, 2)]
    )
    pairs = J.select_pairs(cands, pairs_per_problem=4, min_pairs=0, rng=random.Random(0))
    by_problem = {}
    for p in pairs:
        by_problem.setdefault(p["problem_index"], []).append(p["label"])
    assert sorted(by_problem) == [0, 1]  # mixed problems only, min_pairs is met
    assert sorted(by_problem[0]) == [False, True]  # one distinct positive -> 1 + 1
    assert sorted(by_problem[1]) == [False, False, True, True]
    assert all(p["mixed"] and 0 < p["pass_rate"] < 1 for p in pairs)
    assert pairs[0]["pass_rate"] == pytest.approx(2 / 6)
    assert all(p["problem"] == f"p{p['problem_index']}" for p in pairs)  # extra keys kept


def test_select_pairs_fills_from_uniform_problems_keeping_balance():
    cands = [cand(0, "1", True), cand(0, "2", False)]
    cands += [cand(10 + i, "ok", True) for i in range(5)]  # all-correct problems
    cands += [cand(20 + i, "bad", False) for i in range(2)]  # all-wrong problems
    pairs = J.select_pairs(cands, pairs_per_problem=4, min_pairs=6, rng=random.Random(1))
    assert len(pairs) == 6
    labels = [p["label"] for p in pairs]
    assert labels.count(True) == 3 and labels.count(False) == 3
    uniform = [p for p in pairs if not p["mixed"]]
    assert len({p["problem_index"] for p in uniform}) == len(uniform) == 4  # one per problem
    # Not enough all-wrong problems: the rest is filled with the other label.
    more = J.select_pairs(cands, pairs_per_problem=4, min_pairs=9, rng=random.Random(1))
    assert len(more) == 9 and sum(p["label"] for p in more) == 6


def test_select_pairs_is_deterministic_given_the_rng():
    cands = [cand(i % 5, str(i), i % 3 == 0) for i in range(40)]
    a = J.select_pairs(cands, 4, 10, random.Random(3))
    b = J.select_pairs(cands, 4, 10, random.Random(3))
    assert a == b


def test_balance_subset():
    pairs = [{"i": i, "label": i < 8} for i in range(10)]  # 8 positives, 2 negatives
    out = J.balance_subset(pairs, 6, random.Random(0))
    assert len(out) == 4 and sum(p["label"] for p in out) == 2  # both negatives, 2 positives
    assert [p["i"] for p in out] == sorted(p["i"] for p in out)  # original order
    even = [{"i": i, "label": i % 2 == 0} for i in range(20)]
    out = J.balance_subset(even, 9, random.Random(0))
    assert len(out) == 8 and sum(p["label"] for p in out) == 4
    assert J.balance_subset(even, 50, random.Random(0)) == even


def test_pair_stats_and_verdict_metrics():
    cands = [cand(0, "a", True), cand(0, "b", False), cand(1, "c", True), cand(2, "d", False)]
    pairs = J.select_pairs(cands, 2, 0, random.Random(0))
    stats = J.pair_stats(pairs, cands)
    assert stats["num_pairs"] == 2 and stats["pos_frac"] == 0.5
    assert stats["problems_mixed_frac"] == pytest.approx(1 / 3)
    assert stats["candidate_accuracy"] == 0.5 and stats["pairs_from_mixed_frac"] == 1.0
    m = J.verdict_metrics([True, False, None, True], [1.0, 0.0, 0.0, 1.0])
    assert m == {"accuracy": 0.5, "parse_fail_frac": 0.25, "says_correct_frac": 0.5}
