"""Verifiers registered by name.

A verifier is a pure function `fn(completion: str, sample: dict, **kwargs) -> float | dict`;
a dict result carries `score` and may carry extra numbers (e.g. `acc`, `format_ok`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Verifier = Callable[..., Any]

_VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    def decorator(fn: Verifier) -> Verifier:
        if name in _VERIFIERS:
            raise ValueError(f"verifier {name!r} is already registered")
        _VERIFIERS[name] = fn
        return fn

    return decorator


def get_verifier(name: str) -> Verifier:
    if name not in _VERIFIERS:
        raise ValueError(
            f"unknown verifier {name!r}; registered verifiers: {', '.join(list_verifiers())}"
        )
    return _VERIFIERS[name]


def list_verifiers() -> list[str]:
    return sorted(_VERIFIERS)
