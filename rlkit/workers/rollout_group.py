"""N rollout workers behind the interface of one: split, gather, merge, broadcast, restart.

`rollout.num_workers: N` starts N `RolloutWorker` actors. A generate call splits the prompts
into N contiguous shares of whole prompts (all n samples of a prompt on one worker, so a GRPO
group never straddles two), gathers the completions back in prompt-major order, and merges the
engines' stats. A weight sync sends one object-store ref to every worker.

Sampling is a function of (seed, prompts, N): share k, prompts [start, stop), is sampled with
`share_seed(seed, start)`, and the engine's samples are a function of its prompts and seed. A
share whose worker dies (`kill -9`, OOM) is generated again, with the same seed, by a new
worker holding the same weights, so the run's samples equal an undisturbed run's. They are not
independent of N: the engine draws every row of a batch from one generator, so a prompt's
samples depend on which prompts share its worker (N=1 is exactly the single-worker engine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError

from rlkit.exit_codes import RunFailed
from rlkit.rollout.sampling import SamplingParams
from rlkit.workers.restarting import died_starting, first_line

# Seed mixing constants (Knuth's MMIX LCG): distinct shares get unrelated generator states.
_MUL, _INC = 6364136223846793005, 1442695040888963407


def split(num_prompts: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous shares [start, stop) of whole prompts, sizes differing by at most one;
    empty shares are left out (fewer prompts than workers)."""
    q, r = divmod(num_prompts, num_workers)
    bounds, start = [], 0
    for k in range(num_workers):
        stop = start + q + (k < r)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


def share_seed(seed: int | None, start: int) -> int | None:
    """The seed of the share that starts at prompt `start`; the share at 0 keeps the call's."""
    if seed is None or start == 0:
        return seed
    return (seed * _MUL + start * _INC) % 2**63


# Engine stats that are ratios of two per-sequence means: recomputed from the merged means.
_RATIOS = {"kv_retained_frac": ("kv_bytes_retained_per_seq", "kv_bytes_dense_per_seq")}


def merge_stats(stats: Sequence[dict[str, float]], counts: Sequence[int]) -> dict[str, float]:
    """One engine's figures from several: peaks and maxima max, minima min, event counts sum,
    other values (per-sequence means) averaged weighted by each worker's completion count."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for st in stats for k in st):
        pairs = [(st[key], c) for st, c in zip(stats, counts, strict=True) if key in st]
        vals = [v for v, _ in pairs]
        if key.endswith(("_peak", "_max")):
            out[key] = max(vals)
        elif key.endswith("_min"):
            out[key] = min(vals)
        elif key.endswith(("_events", "_count")):
            out[key] = sum(vals)
        else:
            out[key] = sum(v * c for v, c in pairs) / max(1, sum(c for _, c in pairs))
    for key, (num, den) in _RATIOS.items():
        if key in out and num in out and den in out:
            out[key] = out[num] / out[den] if out[den] else 1.0
    return out


class RolloutGroup:
    """The driver's handle on the rollout workers; `make_worker()` starts one actor.

    `on_restart(k, error)` is told of each restart. A worker that dies is replaced and given
    the current weights: those of the last `load_weights` ref (kept until the next sync), or,
    after `sync_from(learner)`, the learner's weights asked for again (they are what the
    workers hold until the learner's next update, and generate never overlaps one).
    """

    def __init__(
        self,
        make_worker: Callable[[], Any],
        num_workers: int,
        on_restart: Callable[[int, BaseException], None] | None = None,
        max_restarts: int = 3,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._make = make_worker
        self.workers = [make_worker() for _ in range(num_workers)]
        self._on_restart = on_restart
        self.max_restarts = max_restarts
        self._weights: Callable[[], Any] | None = None  # None: the model the workers loaded
        self._corpus: list[list[int]] | None = None  # SAM's static corpus, for restarts
        self._stats: dict[str, float] = {}
        self.restarts = 0
        # Keep the last synced weights' ref for restarts (`sync_from`).
        self.keep_weights = False

    def __len__(self) -> int:
        return len(self.workers)

    def ready(self) -> None:
        self._each(lambda k, w: w.__ray_ready__.remote(), range(len(self.workers)))

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int = 1,
        compress: bool = True,
        drafter: str | None = None,
    ) -> list[dict[str, Any]]:
        """n completions per prompt, prompt-major (result[i * n + j] is sample j of prompt i);
        drafter: this call's speculative drafter instead of rollout.speculative's."""
        if not prompts:
            raise ValueError("generate needs at least one prompt")
        shares = split(len(prompts), len(self.workers))

        def submit(k: int, worker: Any) -> Any:
            start, stop = shares[k]
            p = dataclasses.replace(params, seed=share_seed(params.seed, start))
            return worker.generate_with_stats.remote(prompts[start:stop], p, n, compress, drafter)

        results = self._each(submit, range(len(shares)))
        outs: list[dict[str, Any]] = []
        for k, (start, _) in enumerate(shares):
            for c in results[k]["completions"]:
                outs.append({**c, "prompt_index": c["prompt_index"] + start})
        self._stats = merge_stats(
            [results[k]["stats"] for k in range(len(shares))],
            [len(results[k]["completions"]) for k in range(len(shares))],
        )
        return outs

    def stats(self) -> dict[str, float]:
        """The engines' figures of the last generate, merged (`merge_stats`)."""
        return dict(self._stats)

    def weights_dtype(self) -> str:
        """The dtype the workers resolved `rollout.dtype` to (each on its own machine; weights
        travel in the first worker's)."""
        return str(ray.get(self.workers[0].weights_dtype.remote()))

    def load_weights(self, ref: Any) -> None:
        """Broadcast one object-store ref of weights packed by `weight_wire.pack` to every
        worker (kept for restarts)."""
        self._weights = lambda: ref
        self._broadcast(ref)

    def sync_from(self, learner: Any, dtype: str, only: str | None = None) -> None:
        """The learner's weights (a `LearnerGroup`), cast to `dtype`, through the object store
        to every worker (packed as numpy arrays: read in place on arrival); only="mtp": the
        MTP module's alone (a restarted worker still gets all of them).

        With `keep_weights` (one-step-off training, where the learner's next update runs
        while the workers generate) the ref of these weights is kept for restarts: asking the
        learner again could give the weights of an update the workers do not hold."""
        if self.keep_weights:
            ref = learner.packed_weights_ref(dtype)
            self._weights = lambda: ref
        else:
            self._weights = lambda: learner.packed_weights_ref(dtype)
        self._broadcast(learner.packed_weights_ref(dtype, only) if only else self._weights())

    def set_draft_corpus(self, texts: list[list[int]]) -> None:
        """SAM's static corpus (rollout.speculative.sam_static) into every worker."""
        self._corpus = texts
        self._each(lambda k, w: w.set_draft_corpus.remote(texts), range(len(self.workers)))

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)

    def _broadcast(self, ref: Any) -> None:
        # A restarted worker is given the current weights by `_restart`: nothing to resend.
        self._each(
            lambda k, w: w.load_packed_weights.remote(ref), range(len(self.workers)), redo=False
        )

    def _each(
        self, submit: Callable[[int, Any], Any], jobs: Sequence[int] | range, redo: bool = True
    ) -> dict[int, Any]:
        """Run `submit(k, worker k)` for every k; a worker that dies is restarted and (redo)
        its job submitted again. Results by k."""
        pending = {submit(k, self.workers[k]): k for k in jobs}
        results: dict[int, Any] = {}
        deaths: dict[int, int] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                k = pending.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except RayActorError as e:
                    if died_starting(e):
                        raise
                    deaths[k] = deaths.get(k, 0) + 1
                    if deaths[k] > self.max_restarts:
                        raise RunFailed(
                            f"rollout worker {k} died {deaths[k]} times in one call "
                            f"(last: {first_line(e)})"
                        ) from None
                    self._restart(k, e)
                    if redo:
                        pending[submit(k, self.workers[k])] = k
                    else:
                        results[k] = None
        return results

    def _restart(self, k: int, error: BaseException) -> None:
        try:
            ray.kill(self.workers[k], no_restart=True)
        except Exception:  # already gone
            pass
        self.restarts += 1
        if self._on_restart is not None:
            self._on_restart(k, error)
        for attempt in range(1, self.max_restarts + 1):
            worker = self._make()
            self.workers[k] = worker
            ref = self._weights() if self._weights is not None else None
            try:
                ray.get(
                    worker.load_packed_weights.remote(ref)
                    if ref is not None
                    else worker.__ray_ready__.remote()
                )
                if self._corpus is not None:
                    ray.get(worker.set_draft_corpus.remote(self._corpus))
                return
            except RayActorError as e:
                if died_starting(e) or attempt == self.max_restarts:
                    raise RunFailed(
                        f"rollout worker {k} could not be restarted: {first_line(e)}"
                    ) from None
