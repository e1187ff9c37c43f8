"""One-step-off training's look-ahead: the next step's rollouts in a driver thread.

The thread runs the rollout and reward rounds of step t+1 (`rlvr._collect`) while the main
thread waits for the learner's update of step t; both only submit Ray calls and wait, so the
rollout workers generate while the learner ranks train. The thread keeps its own phase timer
(its seconds overlap the learner's, so they are reported apart from the step's timings).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rlkit.trainer.timer import PhaseTimer


class Prefetch:
    def __init__(self, collect: Callable[[PhaseTimer], Any], version: int) -> None:
        """collect(timer): the rounds and metrics of the next step; version: the policy
        version (updates so far) of the weights the rollout workers sample it with."""
        self.version = version
        self.timer = PhaseTimer()
        self._result: Any = None
        self._error: BaseException | None = None
        self._collect = collect
        # A daemon thread: an interrupted run exits without waiting for it.
        self._thread = threading.Thread(target=self._run, name="rlkit-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._collect(self.timer)
        except BaseException as e:  # re-raised in the main thread by result()
            self._error = e

    def result(self) -> Any:
        """Wait for the rollouts; their result (or their error, raised here)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result
