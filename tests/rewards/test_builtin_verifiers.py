import threading

import pytest
from rlkit.rewards import get_verifier, list_verifiers, register_verifier


def sample(truth):
    return {"prompt": "q", "ground_truth": truth, "data_source": "test", "extra_info": {}}


def test_required_verifiers_are_registered():
    names = ["arithmetic", "arithmetic_set", "numeric", "math_verify", "boxed", "format_hash"]
    for name in [*names, "countdown"]:
        assert name in list_verifiers()


@pytest.mark.parametrize(
    "completion, score",
    [
        ("85", 1.0),
        ("37 + 48 = 85", 1.0),
        ("The answer is 85.", 1.0),
        ("85.0", 1.0),
        ("#### 85", 1.0),
        ("I think 85, wait no\n#### 84", 0.0),
        ("#### 85\nbut also 12", 1.0),
        ("84", 0.0),
        ("8 5", 0.0),
        ("no number", 0.0),
        ("", 0.0),
    ],
)
def test_arithmetic(completion, score):
    assert get_verifier("arithmetic")(completion, sample("85")) == score


def test_arithmetic_negative_and_thousands():
    assert get_verifier("arithmetic")("37 - 48 = -11", sample("-11")) == 1.0
    assert get_verifier("arithmetic")("37-48 = 11", sample("-11")) == 0.0
    assert get_verifier("arithmetic")("It is 1,776", sample("1776")) == 1.0


@pytest.mark.parametrize(
    "completion, truth, score",
    [
        ("#### 1,234", "1234", 1.0),
        (r"\boxed{\frac{3}{4}}", "0.75", 1.0),
        ("The answer is 42 apples.", "42", 1.0),
        ("so we get 7 and then 3.5", "3.5", 1.0),
        ("#### -2", "2", 0.0),
        ("#### none", "2", 0.0),
        ("nothing", "2", 0.0),
    ],
)
def test_numeric(completion, truth, score):
    assert get_verifier("numeric")(completion, sample(truth)) == score


def test_numeric_tolerance_kwarg():
    verifier = get_verifier("numeric")
    assert verifier("#### 3.14", sample("3.14159")) == 0.0
    assert verifier("#### 3.14", sample("3.14159"), rel_tol=1e-3) == 1.0


@pytest.mark.parametrize(
    "completion, truth, score",
    [
        ("The answer is 0.5", r"\frac{1}{2}", 1.0),
        (r"so $\boxed{\frac{1}{2}}$", "0.5", 1.0),
        (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
        ("#### 42", "42", 1.0),
        (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
        ("no math here", "3", 0.0),
    ],
)
def test_math_verify_equivalence(completion, truth, score):
    assert get_verifier("math_verify")(completion, sample(truth)) == score


def test_math_verify_runs_outside_the_main_thread():
    results = []
    thread = threading.Thread(
        target=lambda: results.append(
            get_verifier("math_verify")(r"\boxed{\frac{2}{4}}", sample("0.5"))
        )
    )
    thread.start()
    thread.join(timeout=30)
    assert results == [1.0]


def test_boxed_and_format_checks():
    assert get_verifier("boxed")(r"\boxed{1,234}", sample("1234")) == 1.0
    assert get_verifier("boxed")(r"\boxed{\text{Paris}}", sample("paris")) == 1.0
    assert get_verifier("boxed")("1234", sample("1234")) == 0.0
    assert get_verifier("format_hash")("work\n#### 5", sample("0")) == 1.0
    assert get_verifier("format_hash")("5", sample("0")) == 0.0
    assert get_verifier("format_boxed")(r"x \boxed{5}", sample("0")) == 1.0
    assert get_verifier("format_boxed")(r"x \boxed{5", sample("0")) == 0.0
    regex = get_verifier("format_regex")
    assert regex("<think>a</think> 5", sample("0"), pattern=r"<think>.*</think>") == 1.0
    assert regex("<think>a</think> 5", sample("0"), pattern=r"<think>.*</think>", full=True) == 0.0


SET_TRUTH = '{"A": 45, "B": 91, "C": 12, "D": 100}'


@pytest.mark.parametrize(
    "completion, score, answered",
    [
        ("A) 37 + 8 = 45\nB) 83 + 8 = 91\nC) 4 + 8 = 12\nD) 91 + 9 = 100", 1.0, 1.0),
        # Partial credit: two right, one wrong, one missing.
        ("A) 37 + 8 = 45\nB) 83 + 8 = 92\nD) 91 + 9 = 100", 0.5, 0.75),
        # Bare answers, other label punctuation, case, markdown and text before the list.
        ("Here you go:\na: 45\n**B)** 91\n  c. 12", 0.75, 0.75),
        # The first number after the first "=", whatever follows it.
        ("A) 37 + 8 = 45 (7 + 8 = 15)\nB) 83 + 8 = 91.", 0.5, 0.5),
        # An unanswered line is answered wrong; "C) 4 + 8" has no "=": its last number, 8.
        ("A) 37 + 8 =\nC) 4 + 8", 0.0, 0.5),
        # Duplicates: a label's last line counts (the checking pass), right or wrong.
        ("A) 37 + 8 = 44\nB) 83 + 8 = 91\nA) 37 + 8 = 45\nB) 83 + 8 = 90", 0.25, 0.5),
        # Labels outside the set, and lines without a label, are ignored.
        ("E) 45\nAB) 91\n1. 45\n37 + 8 = 45\nThe answer is 45", 0.0, 0.0),
        # Malformed: no separator after the label, a label glued to a word, no text at all.
        ("A 45\nBx) 91\nAnswer C: 12", 0.0, 0.0),
        ("", 0.0, 0.0),
    ],
)
def test_arithmetic_set_partial_credit(completion, score, answered):
    result = get_verifier("arithmetic_set")(completion, sample(SET_TRUTH))
    assert {k: result[k] for k in ("score", "answered")} == {"score": score, "answered": answered}


def test_arithmetic_set_takes_numbered_labels_and_a_dict_truth():
    verify = get_verifier("arithmetic_set")
    truth = {"Q1": 3, "Q2": 7, "3": 10}
    result = verify("Q1: 3\nq2) 8\n3. 10", sample(truth))
    assert result == {"score": 2 / 3, "answered": 1.0, "checked": 0.0}
    with pytest.raises(ValueError, match="no problems"):
        verify("A) 3", sample("{}"))


def test_arithmetic_set_passes_grades_the_checking_pass():
    """passes=2: a problem counts only when answered on two lines or more (the first pass and
    the check), its last answer right; `checked` reports the share answered twice."""
    verify = get_verifier("arithmetic_set")
    once = "A) 37 + 8 = 45\nB) 83 + 8 = 91\nC) 4 + 8 = 12\nD) 91 + 9 = 100"
    twice = once + "\nA) 37 + 8 = 45\nB) 83 + 8 = 91\nC) 4 + 8 = 13"
    assert verify(once, sample(SET_TRUTH))["score"] == 1.0
    assert verify(once, sample(SET_TRUTH), passes=2) == {
        "score": 0.0,
        "answered": 1.0,
        "checked": 0.0,
    }
    # A and B checked and right; C checked but wrong at the last line; D never checked.
    assert verify(twice, sample(SET_TRUTH), passes=2) == {
        "score": 0.5,
        "answered": 1.0,
        "checked": 0.75,
    }
    assert verify(twice, sample(SET_TRUTH))["score"] == 0.75
    for bad in (0, True, 1.5, "2"):
        with pytest.raises(ValueError, match="passes must be an integer >= 1"):
            verify(once, sample(SET_TRUTH), passes=bad)


def test_registry_rejects_duplicates_and_lists_names_on_a_miss():
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("arithmetic")(lambda completion, sample: 1.0)
    with pytest.raises(ValueError, match="arithmetic.*numeric"):
        get_verifier("no_such_verifier")


@pytest.mark.parametrize(
    "completion, score, exact, past_end",
    [
        ("5\n6\n7\n8\n9", 1.0, 1.0, 0.0),
        ("Here they are:\n5, 6, 7, 8, 9", 1.0, 1.0, 0.0),
        # Writing on past the end: 5 right of 7 written.
        ("5\n6\n7\n8\n9\n10\n11", 5 / 7, 0.0, 1.0),
        # A numbered list: every number is right, but so many numbers written halve it.
        ("1. 5\n2. 6\n3. 7\n4. 8\n5. 9", 0.5, 0.0, 0.0),
        # A skipped number costs only itself; a repeat costs itself as a number written.
        ("5\n7\n8\n9", 0.8, 0.0, 0.0),
        ("5\n6\n6\n7\n8\n9", 5 / 6, 0.0, 0.0),
        ("9\n8\n7\n6\n5", 0.2, 0.0, 0.0),
        ("I cannot count.", 0.0, 0.0, 0.0),
    ],
)
def test_counting_partial_credit(completion, score, exact, past_end):
    result = get_verifier("counting")(completion, sample('{"start": 5, "end": 9}'))
    assert result == pytest.approx({"score": score, "exact": exact, "past_end": past_end})


def test_counting_takes_a_dict_truth_and_refuses_an_empty_range():
    verify = get_verifier("counting")
    assert verify("3 4", sample({"start": 3, "end": 4}))["score"] == 1.0
    with pytest.raises(ValueError, match="end 2 is below its start 3"):
        verify("3", sample({"start": 3, "end": 2}))
