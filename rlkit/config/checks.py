"""The words of the rule table (`rules.py`): small checks of one value, and the checks that
look outside the recipe (files, registered names, a verifier's signature).

A check takes a value and returns nothing, or raises `Invalid` saying what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from rlkit.config.schema import DEFAULT_MODEL

Check = Callable[[Any], None]


class Invalid(Exception):
    """A rule failed. `key` names the offending key for a rule over several keys; `suffix`
    narrows a one-key rule to an item (`[2]`) or a sub-key (`.digits`)."""

    def __init__(self, problem: str, key: str | None = None, suffix: str = ""):
        super().__init__(problem)
        self.problem, self.key, self.suffix = problem, key, suffix


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def positive(value: float) -> None:
    # Written as `not x > 0` so that NaN fails too.
    if not value > 0:
        raise Invalid(f"must be positive, got {show(value)}")


def at_least(low: float) -> Check:
    def check(value: float) -> None:
        if not value >= low:
            raise Invalid(f"must be >= {low}, got {show(value)}")

    return check


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Check:
    """low <= value <= high; `*_open` excludes that end: in_range(0, 1, low_open=True) is (0, 1]."""
    text = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(value: float) -> None:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise Invalid(f"must be in {text}, got {show(value)}")

    return check


def auto_or(check: Check) -> Check:
    """The string "auto" passes; anything else must pass `check`."""

    def run(value: Any) -> None:
        if value != "auto":
            check(value)

    return run


def optional(check: Check) -> Check:
    """null passes; anything else must pass `check`."""

    def run(value: Any) -> None:
        if value is not None:
            check(value)

    return run


def each(check: Check) -> Check:
    """Every item of a list passes `check`; a failure names the item."""

    def run(values: Sequence[Any]) -> None:
        for i, value in enumerate(values):
            try:
                check(value)
            except Invalid as e:
                raise Invalid(e.problem, suffix=f"[{i}]") from None

    return run


def one_of(choices: Sequence[str]) -> Check:
    def check(value: str) -> None:
        if value not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}; got {show(value)}")

    return check


def actor_resources(value: dict[str, Any]) -> None:
    """{role: {resource: amount}}: roles learner, rollout, reward; amounts positive numbers."""
    for role, wants in value.items():
        if role not in ("learner", "rollout", "reward"):
            raise Invalid(f"roles are learner, rollout and reward; got {show(role)}")
        if not isinstance(wants, dict):
            raise Invalid(
                f"expected a mapping of resource names to amounts, got {show(wants)}",
                suffix=f".{role}",
            )
        for name, amount in wants.items():
            if (
                name in ("CPU", "GPU", "memory")
                or not isinstance(amount, (int, float))
                or isinstance(amount, bool)
                or not amount > 0
            ):
                raise Invalid(
                    f"expected a custom resource name and a positive amount, got {show(name)}: "
                    f"{show(amount)} (CPUs and GPUs are placement's)",
                    suffix=f".{role}",
                )


def all_of(*checks: Check) -> Check:
    def run(value: Any) -> None:
        for check in checks:
            check(value)

    return run


def non_empty_list(value: Sequence[Any]) -> None:
    if not value:
        raise Invalid("must hold at least one item")


def non_empty(value: str) -> None:
    if not value.strip():
        raise Invalid("must not be empty")


def plain_name(value: str) -> None:
    """A name that is one path component: a run or stage name becomes a folder name."""
    if not value.strip():
        raise Invalid("must not be empty")
    if value in (".", "..") or "/" in value or "\\" in value:
        raise Invalid(f"must be a plain name, not a path: got {show(value)}")
    if value != value.strip() or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise Invalid(f"must not hold control characters or surrounding spaces: {show(value)}")
    if len(value.encode()) > 200:
        raise Invalid("must be at most 200 bytes long (it names a folder)")


def no_empty_strings(values: Sequence[str]) -> None:
    if "" in values:
        raise Invalid("an empty stop string would stop every sequence at once")


def unit_betas(values: Sequence[float]) -> None:
    if len(values) != 2 or not all(0 <= b < 1 for b in values):
        raise Invalid(f"must be two numbers in [0, 1), got {show(list(values))}")


# --- checks that look outside the recipe -------------------------------------------------


def model_path(value: str) -> None:
    if value == DEFAULT_MODEL:
        return
    if value.endswith(".gguf"):
        if not os.path.isfile(value):
            raise Invalid(f"GGUF file not found: {value}")
        return
    if not os.path.isfile(os.path.join(value, "config.json")):
        adapter = os.path.join(os.path.dirname(os.path.normpath(value)), "adapter")
        if os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise Invalid(
                f"{value!r} does not exist: the checkpoint holds a LoRA adapter ({adapter}) "
                "without the merged model (write it with model.lora.save_merged=true)"
            )
        raise Invalid(
            f"{value!r} is neither a Hugging Face model directory (no config.json), "
            f"a .gguf file, nor {DEFAULT_MODEL!r}"
        )


def data_file(value: str) -> None:
    if not value.endswith((".jsonl", ".parquet")):
        raise Invalid(f"{show(value)}: unsupported file type; expected .jsonl or .parquet")
    if not os.path.isfile(value):
        raise Invalid(f"{value}: no such file")


def existing_path(value: str) -> None:
    if value != DEFAULT_MODEL and not os.path.exists(value):
        raise Invalid(f"{value} does not exist")


def executable(value: str) -> None:
    if not (os.path.isfile(value) and os.access(value, os.X_OK)):
        raise Invalid(f"{value} is not an executable file")


def registered_task(value: str) -> None:
    from rlkit.data.tasks import list_tasks

    if value not in list_tasks():
        raise Invalid(f"unknown task {value!r}; built-in tasks: {', '.join(list_tasks())}")


def judge_template(value: str) -> None:
    from rlkit.data.judge import check_template

    try:
        check_template(value)
    except ValueError as e:
        raise Invalid(str(e)) from None


def not_a_file(value: str) -> None:
    if os.path.exists(value) and not os.path.isdir(value):
        raise Invalid(f"{value} exists and is not a directory")


def cuda_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU, found without importing torch (so `rlkit
    check` stays fast): a device node, and CUDA_VISIBLE_DEVICES not hiding every device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(os.path.exists(f"/dev/nvidia{i}") for i in range(16))
