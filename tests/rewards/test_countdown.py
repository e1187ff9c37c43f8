import json

import pytest
from rlkit.rewards import get_verifier
from rlkit.rewards.countdown import evaluate_equation, extract_equation

TRUTH = json.dumps({"numbers": [25, 5, 3, 7], "target": 60})


def score(completion, truth=TRUTH, **kwargs):
    return get_verifier("countdown")(completion, {"ground_truth": truth}, **kwargs)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Let me think.\n#### (25 - 5) * 3", 1.0),
        ("#### (25 - 5) * 3 = 60", 1.0),
        ("#### 60 = (25 - 5) × 3.", 1.0),
        ("blah\n(25 - 5) * 3\n", 1.0),
        ("#### (25 - 5) * 3 + 7 - 7", 0.0),
        ("#### 25 + 25 + 5 + 5", 0.0),
        ("#### 20 * 3", 0.0),
        ("#### 25 * 3 - 5 - 7", 0.0),
        ("#### 25 / (5 - 5)", 0.0),
        ("#### __import__('os').system('true')", 0.0),
        ("#### 2 ** 6", 0.0),
        ("#### -(-25 - 5) * 3", 0.0),
        ("#### 25.0 + 35", 0.0),
        ("", 0.0),
    ],
)
def test_countdown_scores(completion, expected):
    assert score(completion)["score"] == expected


def test_countdown_exact_division_and_dict_truth():
    truth = {"numbers": [7, 2, 4], "target": 14}
    assert score("#### 7 / 2 * 4", truth)["score"] == 1.0


def test_countdown_require_all():
    assert score("#### (25 - 5) * 3", require_all=False)["score"] == 1.0
    assert score("#### (25 - 5) * 3", require_all=True)["score"] == 0.0
    assert score("#### (25 - 5) * 3 + 7 - 7", require_all=True)["score"] == 0.0
    assert score("#### (25 - 5) * 3 * 7 / 7", require_all=True)["score"] == 0.0
    truth = json.dumps({"numbers": [25, 5, 3, 7], "target": 67})
    assert score("#### (25 - 5) * 3 + 7", truth, require_all=True)["score"] == 1.0


def test_format_ok_separates_unparseable_from_wrong():
    assert score("#### 25 + 5")["format_ok"] == 1.0
    assert score("#### twenty five")["format_ok"] == 0.0


def test_evaluate_equation_rejects_code():
    for bad in ["abs(-3)", "[1, 2]", "x + 1", "1 if 1 else 2", "(1)" * 80]:
        with pytest.raises(ValueError):
            evaluate_equation(bad)
    assert extract_equation("#### $3 \\times 4$") == "3 * 4"
