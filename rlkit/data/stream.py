"""Seeded, resumable order over the training prompts: reshuffled every epoch."""

from __future__ import annotations

import random
from typing import Any


class PromptStream:
    def __init__(self, size: int, seed: int) -> None:
        if size <= 0:
            raise ValueError("the training set is empty (after dropping over-long prompts)")
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.pos >= self.size:
                self.epoch += 1
                self.pos = 0
                self._order = self._shuffle(self.epoch)
            take = min(k - len(out), self.size - self.pos)
            out.extend(self._order[self.pos : self.pos + take])
            self.pos += take
        return out

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "size": self.size, "seed": self.seed}

    def load_state(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(
                f"the checkpoint's data cursor is for {state['size']} prompts with seed {state['seed']}, "
                f"but this run has {self.size} prompts with seed {self.seed}: the data changed since the checkpoint"
            )
        self.epoch = state["epoch"]
        self.pos = state["pos"]
        self._order = self._shuffle(self.epoch)
