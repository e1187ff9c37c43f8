"""Verifiers: registry, built-ins, adapters for verl / TRL reward functions, and a process pool."""

from . import builtin, countdown  # noqa: F401  (importing registers the built-in verifiers)
from .adapters import BatchVerifier, resolve_verifier
from .outcomes import ScoreResult
from .registry import get_verifier, list_verifiers, register_verifier
from .runner import VerifierPool, score
from .sandbox import Sandbox

__all__ = [
    "BatchVerifier",
    "Sandbox",
    "ScoreResult",
    "VerifierPool",
    "get_verifier",
    "list_verifiers",
    "register_verifier",
    "resolve_verifier",
    "score",
]
