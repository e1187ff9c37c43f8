"""Built-in verifiable tasks, registered by name.

A task builds samples: `build(split, n, seed, **task_args) -> list[sample]`, where a sample is
`{"prompt", "ground_truth", "data_source", "extra_info"}`. Splits are disjoint by construction:
every problem is assigned to train or eval by a stable hash of its canonical key (salted with
`split_seed`), so held-out problems never appear in train whatever `n` and `seed` the two
splits are built with; `seed` only picks which problems of the split are drawn.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SPLITS = ("train", "eval")

ARITHMETIC_PROMPT = "What is {a} {op} {b}? Answer with just the number."
COUNTDOWN_PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. "
    "You can use + - * / and each number once. Put the final equation after ####."
)
# `steps: true`: the model reasons before answering (long responses, e.g. for MTP-RL).
ARITHMETIC_STEPS_PROMPT = (
    "What is {a} {op} {b}? Work it out step by step, then write the final answer after ####."
)
COUNTDOWN_STEPS_PROMPT = (
    "Using the numbers {numbers}, create an equation that equals {target}. "
    "You can use + - * / and each number once. Think step by step, trying combinations, "
    "then put the final equation after ####."
)
# `arithmetic_set`: additions labelled A) B) ... in one prompt, answered line by line and then
# checked in a second pass (a long response whose every answer needs its problem from the
# prompt). Letters keep a label apart from the operands' digits: numbered labels ("1.")
# measured lower on SmolLM2-135M-Instruct.
ARITHMETIC_SET_PROMPT = (
    "Solve these {n} addition problems. Copy each line and write the sum after the = sign. "
    "Then check your answers: write the whole list again, fixing any mistakes.\n\n{lines}"
)
# `counting`: a long single-pass response. Of the templates tried on SmolLM2-135M-Instruct (8
# prompts x 2 at T = 1, top-p 0.7, 2026-11-30) this one drew the most counting (mean score 0.32
# against 0.08 and 0.26 for "Count from A to B. Write each number on its own line and nothing
# else." and "List every number from A up to B, one number per line, with no other text.").
COUNTING_PROMPT = "Write all the whole numbers from {a} to {b} in order, one per line."
# Problem spaces up to this size are enumerated; larger ones are sampled.
_ENUMERATE_LIMIT = 200_000


@dataclass(frozen=True)
class Task:
    name: str
    fn: Callable[..., list[dict]]
    # Name of the verifier that scores this task's samples (see rlkit.rewards).
    default_verifier: str
    # A correct response for a sample, for the SFT warm start.
    reference: Callable[[dict], str]

    def build(self, split: str, n: int, seed: int, **task_args: Any) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"task {self.name!r}: split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"task {self.name!r}: n must be >= 0, got {n}")
        params = list(inspect.signature(self.fn).parameters)[3:]
        unknown = sorted(set(task_args) - set(params))
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise ValueError(
                f"task {self.name!r}: unknown task_args {unknown[:5]}{more}; valid: {params}"
            )
        return self.fn(split, n, seed, **task_args)


_TASKS: dict[str, Task] = {}


def register_task(name: str, default_verifier: str, reference: Callable[[dict], str]) -> Callable:
    def decorator(fn: Callable[..., list[dict]]) -> Callable[..., list[dict]]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = Task(
            name=name, fn=fn, default_verifier=default_verifier, reference=reference
        )
        return fn

    return decorator


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(list_tasks())}")
    return _TASKS[name]


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def in_eval_split(key: str, eval_fraction: float, split_seed: int = 0) -> bool:
    """Stable (process- and platform-independent) assignment of a problem to the eval split."""
    digest = hashlib.blake2b(f"{split_seed}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def _int_arg(task: str, name: str, value: Any, low: int, high: int) -> int:
    """A task argument that must be an integer in [low, high] (bounded so a build stays small)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(
            f"task {task!r}: {name} must be an integer in [{low}, {high}], got {value!r}"
        )
    return value


def _bool_arg(task: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"task {task!r}: {name} must be true or false, got {value!r}")
    return value


def _fraction_arg(task: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"task {task!r}: {name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _rng(task: str, split: str, seed: int) -> random.Random:
    return random.Random(f"{task}/{split}/{seed}")


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@register_task(
    "arithmetic", default_verifier="arithmetic", reference=lambda sample: sample["ground_truth"]
)
def arithmetic(
    split: str,
    n: int,
    seed: int,
    digits: int = 2,
    ops: str | list[str] = "+",
    eval_fraction: float = 0.1,
    split_seed: int = 0,
    steps: bool = False,
) -> list[dict]:
    """`What is 37 + 48? Answer with just the number.` over `digits`-digit operands; with
    `steps`, the prompt asks for step-by-step work and the answer after ####."""
    op_list = [ops] if isinstance(ops, str) else list(ops) if isinstance(ops, list) else []
    if not op_list or any(op not in ("+", "-", "*") for op in op_list):
        raise ValueError(f"task 'arithmetic': ops must be drawn from '+', '-', '*', got {ops!r}")
    _int_arg("arithmetic", "digits", digits, 1, 18)
    _fraction_arg("arithmetic", "eval_fraction", eval_fraction)
    _int_arg("arithmetic", "split_seed", split_seed, 0, 2**31 - 1)
    _bool_arg("arithmetic", "steps", steps)
    template = ARITHMETIC_STEPS_PROMPT if steps else ARITHMETIC_PROMPT
    low, high = (1 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    want_eval = split == "eval"
    rng = _rng("arithmetic", split, seed)
    space = (high - low + 1) ** 2 * len(op_list)
    if space <= _ENUMERATE_LIMIT:
        pool = [
            (a, op, b)
            for op in op_list
            for a in range(low, high + 1)
            for b in range(low, high + 1)
            if in_eval_split(f"{a}{op}{b}", eval_fraction, split_seed) == want_eval
        ]
        problems = _draw_from_pool(pool, n, rng, distinct=want_eval, what="arithmetic")
    else:

        def draw() -> tuple[int, str, int] | None:
            a, op, b = rng.randint(low, high), rng.choice(op_list), rng.randint(low, high)
            return (
                (a, op, b)
                if in_eval_split(f"{a}{op}{b}", eval_fraction, split_seed) == want_eval
                else None
            )

        problems = _draw_by_rejection(draw, n, what="arithmetic")
    return [
        {
            "prompt": _chat(template.format(a=a, op=op, b=b)),
            "ground_truth": str(_apply(a, op, b)),
            "data_source": "arithmetic",
            "extra_info": {"split": split, "index": i, "a": a, "op": op, "b": b},
        }
        for i, (a, op, b) in enumerate(problems)
    ]


def _set_reference(sample: dict) -> str:
    return "\n".join(
        f"{chr(65 + i)}) {a} + {b} = {a + b}"
        for i, (a, b) in enumerate(sample["extra_info"]["problems"])
    )


@register_task("arithmetic_set", default_verifier="arithmetic_set", reference=_set_reference)
def arithmetic_set(
    split: str,
    n: int,
    seed: int,
    problems: int = 26,
    digits: int | tuple[int, int] | list[int] = (2, 1),
    eval_fraction: float = 0.2,
    split_seed: int = 0,
) -> list[dict]:
    """`problems` additions in one prompt, a line each ("C) 37 + 8 ="), scored by the fraction
    answered right (verifier `arithmetic_set`). `digits`: the operands' digit counts, [first,
    second], or one count for both. Each addition is assigned to a split by the arithmetic
    task's key, so no held-out addition appears in a train prompt; a set draws distinct
    additions of its split."""
    widths = (
        [digits, digits] if isinstance(digits, int) and not isinstance(digits, bool)
        else list(digits) if isinstance(digits, (list, tuple))
        else []
    )  # fmt: skip
    if len(widths) != 2 or not all(type(d) is int and 1 <= d <= 4 for d in widths):
        raise ValueError(
            "task 'arithmetic_set': digits must be an integer in [1, 4] or [first, second] of "
            f"them, got {digits!r}"
        )
    _int_arg("arithmetic_set", "problems", problems, 1, 26)
    _fraction_arg("arithmetic_set", "eval_fraction", eval_fraction)
    _int_arg("arithmetic_set", "split_seed", split_seed, 0, 2**31 - 1)
    ranges = [range(1 if d == 1 else 10 ** (d - 1), 10**d) for d in widths]
    want_eval = split == "eval"
    pool = [
        (a, b)
        for a in ranges[0]
        for b in ranges[1]
        if in_eval_split(f"{a}+{b}", eval_fraction, split_seed) == want_eval
    ]
    if len(pool) < problems:
        raise ValueError(
            f"task 'arithmetic_set': the {split} split holds {len(pool)} additions, fewer than "
            f"problems={problems}; lower problems or raise digits"
        )
    rng = _rng("arithmetic_set", split, seed)
    sets = _draw_by_rejection(
        lambda: rng.sample(pool, problems), n, what="arithmetic_set", key=lambda s: str(sorted(s))
    )
    return [
        {
            "prompt": _chat(
                ARITHMETIC_SET_PROMPT.format(
                    n=problems,
                    lines="\n".join(f"{chr(65 + i)}) {a} + {b} =" for i, (a, b) in enumerate(s)),
                )
            ),
            "ground_truth": json.dumps({chr(65 + i): a + b for i, (a, b) in enumerate(s)}),
            "data_source": "arithmetic_set",
            "extra_info": {"split": split, "index": i, "problems": [list(p) for p in s]},
        }
        for i, s in enumerate(sets)
    ]


def _counting_reference(sample: dict) -> str:
    info = sample["extra_info"]
    return "\n".join(str(v) for v in range(info["start"], info["end"] + 1))


@register_task("counting", default_verifier="counting", reference=_counting_reference)
def counting(
    split: str,
    n: int,
    seed: int,
    start: int | tuple[int, int] | list[int] = (100, 799),
    length: int | tuple[int, int] | list[int] = (100, 200),
    eval_fraction: float = 0.1,
    split_seed: int = 0,
) -> list[dict]:
    """Write every whole number from a start to an end, one a line (verifier `counting`): a
    long single-pass response (each 3-digit number and its newline is 4-5 tokens on
    SmolLM2's digit-split vocabulary, so 100-200 numbers are ~500-1,000 tokens) whose every
    step is easy but whose end is only in the prompt. SmolLM2-135M-Instruct counts but does not
    stop (most base samples run to the cap), so the reward is learning to stop at the prompt's
    end, which a compressed cache must keep. `start`: the first number's range [min, max];
    `length`: how many numbers, [min, max] (both inclusive; an integer fixes it). A (start,
    length) pair belongs to one split."""

    def bounds(name: str, value: Any, low: int, high: int) -> tuple[int, int]:
        pair = (
            [value, value] if isinstance(value, int) and not isinstance(value, bool)
            else list(value) if isinstance(value, (list, tuple))
            else []
        )  # fmt: skip
        if (
            len(pair) != 2
            or not all(type(v) is int and low <= v <= high for v in pair)
            or pair[0] > pair[1]
        ):
            raise ValueError(
                f"task 'counting': {name} must be an integer in [{low}, {high}] or [min, max] "
                f"of them, got {value!r}"
            )
        return pair[0], pair[1]

    starts = bounds("start", start, 0, 10**6)
    lengths = bounds("length", length, 1, 2000)
    _fraction_arg("counting", "eval_fraction", eval_fraction)
    _int_arg("counting", "split_seed", split_seed, 0, 2**31 - 1)
    want_eval = split == "eval"
    rng = _rng("counting", split, seed)

    def draw() -> tuple[int, int] | None:
        a, k = rng.randint(*starts), rng.randint(*lengths)
        return (a, k) if in_eval_split(f"{a}+{k}", eval_fraction, split_seed) == want_eval else None

    problems = _draw_by_rejection(draw, n, what="counting")
    return [
        {
            "prompt": _chat(COUNTING_PROMPT.format(a=a, b=a + k - 1)),
            "ground_truth": json.dumps({"start": a, "end": a + k - 1}),
            "data_source": "counting",
            "extra_info": {"split": split, "index": i, "start": a, "end": a + k - 1},
        }
        for i, (a, k) in enumerate(problems)
    ]


@register_task(
    "countdown",
    default_verifier="countdown",
    reference=lambda sample: f"#### {sample['extra_info']['solution']}",
)
def countdown(
    split: str,
    n: int,
    seed: int,
    num_numbers: int | tuple[int, int] | list[int] = (3, 4),
    max_number: int = 50,
    max_target: int = 200,
    eval_fraction: float = 0.1,
    split_seed: int = 0,
    steps: bool = False,
) -> list[dict]:
    """Reach a target with + - * / over 3-4 numbers; every problem is solvable by construction.
    With `steps`, the prompt asks for step-by-step search before the final equation."""
    counts = (
        [num_numbers] if isinstance(num_numbers, int)
        else list(num_numbers) if isinstance(num_numbers, (list, tuple))
        else []
    )  # fmt: skip
    if len(counts) not in (1, 2) or not all(type(c) is int and 2 <= c <= 8 for c in counts):
        raise ValueError(
            "task 'countdown': num_numbers must be an integer in [2, 8] or [min, max] of them, "
            f"got {num_numbers!r}"
        )
    _int_arg("countdown", "max_number", max_number, 1, 10**6)
    _int_arg("countdown", "max_target", max_target, 1, 10**9)
    _fraction_arg("countdown", "eval_fraction", eval_fraction)
    _int_arg("countdown", "split_seed", split_seed, 0, 2**31 - 1)
    _bool_arg("countdown", "steps", steps)
    template = COUNTDOWN_STEPS_PROMPT if steps else COUNTDOWN_PROMPT
    want_eval = split == "eval"
    rng = _rng("countdown", split, seed)

    def draw() -> tuple[list[int], int, str] | None:
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(min(counts), max(counts)))]
        target, solution = _random_equation(numbers, rng)
        if not 1 <= target <= max_target:
            return None
        rng.shuffle(numbers)
        key = f"{sorted(numbers)}|{target}"
        return (
            (numbers, target, solution)
            if in_eval_split(key, eval_fraction, split_seed) == want_eval
            else None
        )

    problems = _draw_by_rejection(draw, n, what="countdown", key=lambda p: f"{sorted(p[0])}|{p[1]}")
    return [
        {
            "prompt": _chat(template.format(numbers=numbers, target=target)),
            "ground_truth": json.dumps({"numbers": numbers, "target": target}),
            "data_source": "countdown",
            "extra_info": {"split": split, "index": i, "solution": solution},
        }
        for i, (numbers, target, solution) in enumerate(problems)
    ]


def _random_equation(numbers: list[int], rng: random.Random) -> tuple[int, str]:
    """Combine all numbers, in a random tree, into one positive integer; returns (value, equation)."""
    terms = [(n, str(n)) for n in numbers]
    while len(terms) > 1:
        (a, ea), (b, eb) = (
            terms.pop(rng.randrange(len(terms))),
            terms.pop(rng.randrange(len(terms))),
        )
        ops = ["+", "*"] + (["-"] if a != b else []) + (["/"] if b > 0 and a % b == 0 else [])
        op = rng.choice(ops)
        if op == "-" and a < b:
            (a, ea), (b, eb) = (b, eb), (a, ea)
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a // b
        terms.append((value, f"({ea} {op} {eb})"))
    value, equation = terms[0]
    # The outermost parentheses add nothing.
    return value, equation[1:-1] if equation.startswith("(") else equation


def _draw_from_pool(pool: list, n: int, rng: random.Random, distinct: bool, what: str) -> list:
    """Eval: n distinct problems. Train: whole reshuffled passes over the pool until n are drawn."""
    if distinct:
        if n > len(pool):
            raise ValueError(f"task {what!r}: eval split holds {len(pool)} problems, {n} requested")
        return rng.sample(pool, n)
    if not pool and n:
        raise ValueError(f"task {what!r}: the train split is empty")
    drawn: list = []
    while len(drawn) < n:
        drawn.extend(rng.sample(pool, len(pool)))
    return drawn[:n]


def _draw_by_rejection(
    draw: Callable[[], Any], n: int, what: str, key: Callable[[Any], str] = str
) -> list:
    """n distinct problems from `draw` (which returns None for a rejected candidate)."""
    seen: set[str] = set()
    problems: list = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 1000 + 200 * n:
            raise ValueError(
                f"task {what!r}: found only {len(problems)} of {n} distinct problems; widen the task_args"
            )
        problem = draw()
        if problem is not None and key(problem) not in seen:
            seen.add(key(problem))
            problems.append(problem)
    return problems
