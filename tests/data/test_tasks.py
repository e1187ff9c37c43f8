import json
import re

import pytest
from rlkit.rewards import get_verifier

from rlkit.data.tasks import get_task, in_eval_split, list_tasks, register_task


def keys(samples):
    return {s["prompt"][0]["content"] for s in samples}


def test_registry():
    assert {"arithmetic", "countdown"} <= set(list_tasks())
    assert get_task("arithmetic").default_verifier == "arithmetic"
    assert get_task("countdown").default_verifier == "countdown"
    with pytest.raises(ValueError, match="arithmetic.*countdown"):
        get_task("gsm9k")
    with pytest.raises(ValueError, match="already registered"):
        register_task("arithmetic", default_verifier="arithmetic", reference=str)(
            lambda split, n, seed: []
        )


def test_arithmetic_prompt_format_and_truth():
    samples = get_task("arithmetic").build("train", 50, seed=0)
    for s in samples:
        assert s["data_source"] == "arithmetic"
        assert len(s["prompt"]) == 1 and s["prompt"][0]["role"] == "user"
        match = re.fullmatch(
            r"What is (\d{2}) \+ (\d{2})\? Answer with just the number\.", s["prompt"][0]["content"]
        )
        assert match, s["prompt"]
        assert s["ground_truth"] == str(int(match[1]) + int(match[2]))


@pytest.mark.parametrize(
    "task, args",
    [
        ("arithmetic", {}),
        ("arithmetic", {"ops": ["+", "-", "*"]}),
        ("countdown", {}),
        ("counting", {}),
    ],
)
def test_splits_are_disjoint_whatever_the_seeds(task, args):
    build = get_task(task).build
    evals = keys(build("eval", 200, seed=0, **args)) | keys(build("eval", 200, seed=1, **args))
    train = keys(build("train", 3000, seed=0, **args)) | keys(build("train", 3000, seed=7, **args))
    assert len(evals) > 200 and len(train) > 2000
    assert not evals & train


def test_arithmetic_eval_is_a_seeded_tenth_of_the_8100_problems():
    build = get_task("arithmetic").build
    held_out = keys(build("eval", 700, seed=0))
    # 20000 draws cover the ~7290 remaining problems; together the splits are all 8100.
    train = keys(build("train", 20000, seed=0))
    assert not held_out & train
    assert 7000 < len(train) < 7600
    with pytest.raises(ValueError, match="eval split holds"):
        build("eval", 5000, seed=0)


@pytest.mark.parametrize("task", ["arithmetic", "arithmetic_set", "countdown", "counting"])
def test_deterministic_per_seed(task):
    build = get_task(task).build
    assert build("train", 100, seed=3) == build("train", 100, seed=3)
    assert build("eval", 50, seed=3) == build("eval", 50, seed=3)
    assert build("train", 100, seed=3) != build("train", 100, seed=4)


def test_arithmetic_ops_and_digits():
    samples = get_task("arithmetic").build("train", 300, seed=0, digits=3, ops=["-", "*"])
    ops = set()
    for s in samples:
        a, op, b = re.match(r"What is (\d+) (.) (\d+)\?", s["prompt"][0]["content"]).groups()
        assert len(a) == len(b) == 3
        assert s["ground_truth"] == str(int(a) - int(b) if op == "-" else int(a) * int(b))
        ops.add(op)
    assert ops == {"-", "*"}
    with pytest.raises(ValueError, match="ops"):
        get_task("arithmetic").build("train", 1, seed=0, ops="/")
    with pytest.raises(ValueError, match="unknown task_args.*digts"):
        get_task("arithmetic").build("train", 1, seed=0, digts=3)


def test_reference_answers_pass_the_task_verifier():
    for name in ["arithmetic", "arithmetic_set", "countdown", "counting"]:
        task = get_task(name)
        verifier = get_verifier(task.default_verifier)
        for s in task.build("eval", 100, seed=0):
            result = verifier(task.reference(s), s)
            assert (result["score"] if isinstance(result, dict) else result) == 1.0


def test_countdown_problems_are_solvable_with_every_number_once():
    verifier = get_verifier("countdown")
    samples = get_task("countdown").build("train", 500, seed=0)
    sizes = set()
    for s in samples:
        truth = json.loads(s["ground_truth"])
        sizes.add(len(truth["numbers"]))
        assert s["data_source"] == "countdown"
        assert s["prompt"][0]["content"] == (
            f"Using the numbers {truth['numbers']}, create an equation that equals {truth['target']}. "
            "You can use + - * / and each number once. Put the final equation after ####."
        )
        assert 1 <= truth["target"] <= 200
        solution = s["extra_info"]["solution"]
        assert verifier(f"#### {solution}", s, require_all=True)["score"] == 1.0
        assert verifier(f"#### {solution} + 1", s)["score"] == 0.0
    assert sizes == {3, 4}


def test_steps_prompts_ask_for_work_before_the_answer():
    from rlkit.data.tasks import get_task

    for name, args in (("arithmetic", {"ops": ["*"]}), ("countdown", {})):
        plain = get_task(name).build("train", 3, 0, **args)
        steps = get_task(name).build("train", 3, 0, steps=True, **args)
        assert [s["ground_truth"] for s in steps] == [s["ground_truth"] for s in plain]
        for s in steps:
            text = s["prompt"][0]["content"]
            assert "step by step" in text and "####" in text
        with pytest.raises(ValueError, match="steps must be true or false"):
            get_task(name).build("train", 1, 0, steps="yes")


def set_problems(sample):
    """(label, a, b) of each line of an arithmetic_set prompt."""
    return re.findall(r"^([A-Z])\) (\d+) \+ (\d+) =$", sample["prompt"][0]["content"], re.M)


def test_arithmetic_set_prompt_lists_every_problem_and_its_truth():
    samples = get_task("arithmetic_set").build("train", 20, seed=0)
    for s in samples:
        assert s["data_source"] == "arithmetic_set"
        text = s["prompt"][0]["content"]
        assert text.startswith("Solve these 26 addition problems. Copy each line")
        assert "write the whole list again" in text
        lines = set_problems(s)
        assert [label for label, _, _ in lines] == [chr(c) for c in range(65, 91)]
        # 2-digit + 1-digit by default, distinct within a set.
        assert all(10 <= int(a) <= 99 and 1 <= int(b) <= 9 for _, a, b in lines)
        assert len({(a, b) for _, a, b in lines}) == 26
        assert json.loads(s["ground_truth"]) == {label: int(a) + int(b) for label, a, b in lines}
        assert s["extra_info"]["problems"] == [[int(a), int(b)] for _, a, b in lines]


def test_arithmetic_set_held_out_additions_never_appear_in_train_prompts():
    build = get_task("arithmetic_set").build
    held_out = {(a, b) for s in build("eval", 64, seed=0) for _, a, b in set_problems(s)}
    train = {(a, b) for s in build("train", 200, seed=3) for _, a, b in set_problems(s)}
    # 810 additions, a fifth of them held out; 200 train sets of 26 cover their split.
    assert 120 < len(held_out) < 200 and 600 < len(train) < 700
    assert not held_out & train
    # The split is the arithmetic task's: the same key, the same hash.
    assert all(in_eval_split(f"{a}+{b}", 0.2) for a, b in held_out)


def test_arithmetic_set_args_are_checked():
    build = get_task("arithmetic_set").build
    lines = set_problems(build("eval", 1, seed=0, problems=5, digits=2)[0])
    assert len(lines) == 5 and all(int(b) >= 10 for _, _, b in lines)
    with pytest.raises(ValueError, match="digits must be"):
        build("train", 1, seed=0, digits=[2, 1, 1])
    with pytest.raises(ValueError, match="problems must be"):
        build("train", 1, seed=0, problems=27)
    # 81 one-digit additions, 8 of them held out at eval_fraction 0.1.
    with pytest.raises(ValueError, match="eval split holds 8 additions, fewer than problems=9"):
        build("eval", 1, seed=0, problems=9, digits=1, eval_fraction=0.1)


def test_counting_prompt_states_the_range_and_its_truth():
    samples = get_task("counting").build("train", 200, seed=0, start=[100, 799], length=[120, 220])
    for s in samples:
        a, b = map(int, re.fullmatch(
            r"Write all the whole numbers from (\d+) to (\d+) in order, one per line\.",
            s["prompt"][0]["content"],
        ).groups())  # fmt: skip
        assert 100 <= a <= 799 and 120 <= b - a + 1 <= 220
        assert json.loads(s["ground_truth"]) == {"start": a, "end": b}
        assert (s["extra_info"]["start"], s["extra_info"]["end"]) == (a, b)
    # A fixed start and length are integers; the held-out split is the hash of (start, length).
    fixed = get_task("counting").build("eval", 1, seed=0, start=9, length=3)[0]
    assert json.loads(fixed["ground_truth"]) == {"start": 9, "end": 11}
    assert in_eval_split("9+3", 0.1) and not in_eval_split("5+3", 0.1)


def test_counting_args_are_checked():
    build = get_task("counting").build
    with pytest.raises(ValueError, match="start must be"):
        build("train", 1, seed=0, start=[10, 5])
    with pytest.raises(ValueError, match="length must be"):
        build("train", 1, seed=0, length=0)
    with pytest.raises(ValueError, match="length must be"):
        build("train", 1, seed=0, length=[1, 2, 3])
    with pytest.raises(ValueError, match="found only"):
        build("train", 5, seed=0, start=5, length=3)
