from fractions import Fraction

import pytest
from rlkit.rewards.answers import (
    extract_after_hash,
    extract_answer_phrase,
    extract_boxed,
    extract_final_answer,
    extract_last_number,
    numbers_equal,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("work\n#### 42", "42"),
        ("#### 1,234.", "1,234"),
        ("#### $-7$\nextra line", "-7"),
        ("first #### 1 then #### 2", "2"),
        ("no marker 42", None),
        ("#### ", None),
    ],
)
def test_extract_after_hash(text, expected):
    assert extract_after_hash(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{ {a}_{b} }", "{a}_{b}"),
        (r"\boxed 7 is it", "7"),
        (r"\fbox{x+1}", "x+1"),
        (r"\boxed{unbalanced", None),
        ("nothing", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So the answer is 42.", "42"),
        ("The answer is: **3.5**.", "3.5"),
        ("Final answer: $-12$", "-12"),
        (r"The final answer is $\boxed{7}$.", "7"),
        ("The answer is 1. The answer is 2.", "2"),
        ("no phrase here", None),
    ],
)
def test_extract_answer_phrase(text, expected):
    assert extract_answer_phrase(text) == expected


def test_final_answer_prefers_hash_then_boxed_then_phrase():
    assert extract_final_answer(r"The answer is 1. \boxed{2}" + "\n#### 3") == "3"
    assert extract_final_answer(r"The answer is 1. \boxed{2}") == "2"
    assert extract_final_answer("The answer is 1.") == "1"
    assert extract_final_answer("just 5") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("37 + 48 = 85", "85"),
        ("48-37=11", "11"),
        ("37 - 48 = -11", "-11"),
        ("costs 1,234 dollars", "1,234"),
        ("pi is 3.14.", "3.14"),
        ("half is 3/4", "3/4"),
        ("none", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", Fraction(42)),
        ("-1,234.5", Fraction(-24690, 20)),
        ("3/4", Fraction(3, 4)),
        ("-3 / 4", Fraction(-3, 4)),
        (r"\frac{3}{4}", Fraction(3, 4)),
        (r"-\dfrac{1}{2}", Fraction(-1, 2)),
        ("$12$", Fraction(12)),
        ("50%", Fraction(50)),
        ("0.50.", Fraction(1, 2)),
        ("1/0", None),
        ("x", None),
        ("12,34", None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_numbers_equal_exact_and_tolerance():
    assert numbers_equal("1,234", "1234")
    assert numbers_equal("0.75", "3/4")
    assert numbers_equal(r"\frac{1}{3}", "0.3333333333")
    assert not numbers_equal("0.333", "1/3")
    assert numbers_equal("0.333", "1/3", rel_tol=1e-2)
    assert not numbers_equal("-5", "5")
    assert not numbers_equal("five", "5")
