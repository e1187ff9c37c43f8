"""Peak resident memory of the whole run: this process and every descendant (Ray's GCS,
raylet and worker processes are children of the driver when Ray is started locally)."""

from __future__ import annotations

import threading

import psutil


def tree_rss(root: psutil.Process | None = None) -> dict[int, tuple[str, int, int]]:
    """pid -> (process title, RSS bytes, PSS bytes) for `root` and all its descendants.

    RSS counts a shared page (Ray's object store, shared libraries) once in every process that
    maps it; PSS divides it among them, so the PSS sum is the tree's real footprint.
    """
    root = root or psutil.Process()
    out: dict[int, tuple[str, int, int]] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline()[:1]) or proc.name()
            info = proc.memory_full_info()
            out[proc.pid] = (title[:60], info.rss, getattr(info, "pss", info.rss))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def tree_rss_bytes(root: psutil.Process | None = None) -> int:
    return sum(rss for _, rss, _ in tree_rss(root).values())


class PeakMemoryMonitor:
    """Samples the process tree's summed RSS in a daemon thread; `peak_bytes` is the maximum."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_pss_bytes = 0
        # The breakdown at the moment of the peak, largest first: where the memory went.
        self.peak_breakdown: list[tuple[str, int]] = []
        # Each process's own peak RSS (pid -> (title, bytes)), whenever it came.
        self.peak_by_pid: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlkit-mem", daemon=True)

    def start(self) -> PeakMemoryMonitor:
        self._thread.start()
        return self

    def sample(self) -> int:
        procs = tree_rss()
        for pid, (title, rss, _) in procs.items():
            if rss > self.peak_by_pid.get(pid, ("", 0))[1]:
                self.peak_by_pid[pid] = (title, rss)
        now = sum(rss for _, rss, _ in procs.values())
        self.peak_pss_bytes = max(self.peak_pss_bytes, sum(pss for _, _, pss in procs.values()))
        if now > self.peak_bytes:
            self.peak_bytes = now
            self.peak_breakdown = sorted(
                ((t, r) for t, r, _ in procs.values()), key=lambda x: -x[1]
            )
        return now

    def process_peaks(self) -> list[tuple[str, int]]:
        """(title, peak RSS bytes) of every process seen, largest first: e.g. the learner
        actor's own peak, which the tree's peak moment may not be."""
        return sorted(self.peak_by_pid.values(), key=lambda x: -x[1])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sample()
