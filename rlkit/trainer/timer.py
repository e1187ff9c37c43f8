"""Named phase timers: each phase of a step runs inside `timer.phase(name)`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._active: list[str] = []
        # The innermost phase an error escaped from (a failed run says where it failed).
        self.failed_in: str | None = None

    @property
    def current(self) -> str | None:
        """The innermost phase running now (an interrupted run says where it stopped)."""
        return self._active[-1] if self._active else None

    @contextmanager
    def phase(self, name: str, timed: bool = True) -> Iterator[None]:
        """timed=False: only marks the phase as running (no `timing/<name>` in the row)."""
        start = time.perf_counter()
        self._active.append(name)
        try:
            yield
        except BaseException:
            if self.failed_in is None:
                self.failed_in = name
            raise
        finally:
            self._active.pop()
            if timed:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """Return `timing/<phase>` metrics and reset for the next step."""
        out = {f"timing/{k}": v for k, v in self.seconds.items()}
        out["timing/step"] = sum(self.seconds.values())
        self.seconds = {}
        return out
