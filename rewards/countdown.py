"""Countdown: reach a target with + - * / over given numbers.

The equation is read from the line after the last `####` (else the completion's last non-empty
line) and evaluated by walking its `ast`: only integer literals, the four operators and
parentheses are accepted, so no code ever runs. Each given number may be used at most once;
`require_all=True` demands that every number is used exactly once (TinyZero's rule).
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from fractions import Fraction
from typing import Any

from .registry import register_verifier

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_SYMBOLS = {"×": "*", "\\times": "*", "\\cdot": "*", "÷": "/", "\\div": "/", "−": "-"}
# Far longer than any equation over four numbers; bounds the parser's work on garbage.
_MAX_EQUATION_CHARS = 200


def parse_countdown_truth(ground_truth: Any) -> tuple[list[int], int]:
    """(numbers, target) from a JSON string or dict with `numbers` and `target`."""
    truth = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    return [int(n) for n in truth["numbers"]], int(truth["target"])


def extract_equation(completion: str) -> str | None:
    pos = completion.rfind("####")
    if pos >= 0:
        lines = completion[pos + 4 :].strip().splitlines()
    else:
        lines = [line for line in completion.splitlines() if line.strip()][-1:]
    if not lines or not lines[0].strip():
        return None
    equation = lines[0].strip().strip("$").strip().rstrip(".")
    for symbol, op in _SYMBOLS.items():
        equation = equation.replace(symbol, op)
    # "(25 - 5) * 3 = 60": the side with operators is the equation; the other is its value.
    sides = [side.strip() for side in equation.split("=") if side.strip()]
    with_ops = [side for side in sides if any(op in side for op in "+-*/")]
    candidates = with_ops or sides
    return candidates[0] if candidates else None


def evaluate_equation(equation: str) -> tuple[Fraction, list[int]]:
    """Exact value of the equation and the integer literals it uses; ValueError if not allowed."""
    if len(equation) > _MAX_EQUATION_CHARS:
        raise ValueError(f"equation longer than {_MAX_EQUATION_CHARS} characters")
    try:
        tree = ast.parse(equation, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an equation: {equation!r}") from e
    used: list[int] = []
    return _eval(tree.body, used), used


def _eval(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left, used), _eval(node.right, used)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ValueError("division by zero")
        return left / right
    raise ValueError(
        f"only integers, + - * / and parentheses are allowed, got {type(node).__name__}"
    )


def numbers_allowed(used: list[int], numbers: list[int], require_all: bool = False) -> bool:
    if require_all:
        return Counter(used) == Counter(numbers)
    return not Counter(used) - Counter(numbers)


@register_verifier("countdown")
def countdown(completion: str, sample: dict, require_all: bool = False) -> dict[str, float]:
    numbers, target = parse_countdown_truth(sample["ground_truth"])
    equation = extract_equation(completion)
    if equation is None:
        return {"score": 0.0, "format_ok": 0.0}
    try:
        value, used = evaluate_equation(equation)
    except ValueError:
        return {"score": 0.0, "format_ok": 0.0}
    correct = numbers_allowed(used, numbers, require_all) and value == target
    return {"score": float(correct), "format_ok": 1.0}
