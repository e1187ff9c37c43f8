"""An actor that is started again when its process dies (the reward pool's handle).

A verifier pool holds no state that a batch depends on (the verifier is loaded from its spec),
so when its actor's process dies mid-batch (`kill -9`, OOM) a new one is started and the whole
batch is scored again: no sample is scored twice, none is lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

from rlkit.exit_codes import RunFailed


def died_starting(error: RayActorError) -> bool:
    """Whether the actor failed in its constructor: an error to report, not to retry."""
    return bool(getattr(error, "actor_init_failed", False))


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class RestartingActor:
    """`call(name, *args)` runs the actor's method; if the process dies, `make()` starts a new
    actor (`on_restart(error)` is told) and the call runs again, at most `max_restarts` times
    in a row."""

    def __init__(
        self,
        make: Callable[[], Any],
        on_restart: Callable[[BaseException], None] | None = None,
        max_restarts: int = 3,
        role: str = "reward pool",
    ) -> None:
        self._make = make
        self.actor = make()
        self._on_restart = on_restart
        self.max_restarts = max_restarts
        self.role = role
        self.restarts = 0

    def ready(self) -> None:
        self.call("__ray_ready__")

    def call(self, method: str, *args: Any) -> Any:
        for attempt in range(self.max_restarts + 1):
            try:
                return ray.get(getattr(self.actor, method).remote(*args))
            except RayActorError as e:
                if died_starting(e):
                    raise
                if attempt == self.max_restarts:
                    raise RunFailed(
                        f"the {self.role} process died {attempt + 1} times in a row "
                        f"(last: {first_line(e)})"
                    ) from None
                self._restart(e)
        raise AssertionError("unreachable")

    def _restart(self, error: BaseException) -> None:
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:  # already gone
            pass
        self.restarts += 1
        if self._on_restart is not None:
            self._on_restart(error)
        self.actor = self._make()

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)
