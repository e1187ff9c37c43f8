"""`heap.trim`: after a CPU phase only (a GPU phase's tensors were device memory)."""

import torch

from rlkit.workers import heap


class _Libc:
    def __init__(self):
        self.calls = 0

    def malloc_trim(self, pad):
        assert pad == 0
        self.calls += 1
        return 1


def test_trims_after_cpu_phases_only(monkeypatch):
    libc = _Libc()
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    heap.trim(torch.device("cpu"))
    heap.trim("cpu")
    assert libc.calls == 2
    heap.trim(torch.device("cuda"))
    heap.trim("cuda:1")
    assert libc.calls == 2
