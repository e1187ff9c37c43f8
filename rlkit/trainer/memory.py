"""Peak resident memory of the whole run: this process and every descendant (Ray's GCS,
raylet and worker processes are children of the driver when Ray is started locally)."""

from __future__ import annotations

import threading

import psutil


def tree_rss_bytes(root: psutil.Process | None = None) -> int:
    root = root or psutil.Process()
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class PeakMemoryMonitor:
    """Samples the process tree's summed RSS in a daemon thread; `peak_bytes` is the maximum."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlkit-mem", daemon=True)

    def start(self) -> PeakMemoryMonitor:
        self._thread.start()
        return self

    def sample(self) -> int:
        now = tree_rss_bytes()
        self.peak_bytes = max(self.peak_bytes, now)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sample()
