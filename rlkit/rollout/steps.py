"""Decode steps: the tensors of one step of every running sequence (the scheduler's runner).

- `PlainStep`: one token per sequence, sampled from the policy.
- `SpecStep`: a drafter (`drafters.py`) proposes up to k tokens per sequence, one forward of
  the policy scores the last token and the drafts (T = 1 + drafts per row), and the
  verification rule (`rlkit.kernels.spec_verify`) keeps a per-row prefix of the drafts plus
  one token, so that the emitted tokens follow the policy's sampling distribution exactly.
  The cache rewinds the rejected entries.

Both run the policy's forward through `forward_tokens`, which takes T >= 1 tokens per row the
same three ways: a padded step replayed from a CUDA graph (`cuda_graphs.py`), the fused CPU
step on the C kernels (`Decoder.forward_decode_fused`), or PyTorch ops. Under CUDA graphs a
verify step replays its whole device part as one graph: the forward, the LM head, the
sampling distribution, the verification and the emitted tokens (`verify_rows`), with the
step's uniforms drawn into a fixed buffer first (a graph cannot draw from the run's own
generator); launched one by one, those ops cost more than the forward on a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlkit.device import to_device
from rlkit.kernels.spec_verify import verify_chains, verify_drafts
from rlkit.rollout.cuda_graphs import StepGraphs
from rlkit.rollout.sampling import SamplingParams, sampling_logprobs

if TYPE_CHECKING:
    from rlkit.models.decoder import Decoder
    from rlkit.rollout.drafters import DeviceDrafter, Drafter
    from rlkit.rollout.scheduler import Run


def forward_tokens(run: Run, tokens: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, hidden] of tokens [B, T] fed to slots 0..B-1."""
    B, T = tokens.shape
    if run.graphs is not None:
        return run.graphs.step(B, tokens)
    positions = run.cache.begin_decode(B, T)  # [B, T]
    if run.e.fused_decode:
        return run.model.forward_decode_fused(tokens, positions, run.cache)
    return run.model.forward_cached(tokens, positions, run.cache)


def verify_rows(
    model: Decoder,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    num: torch.Tensor,
    u: torch.Tensor,
    q: torch.Tensor | None,
    params: SamplingParams,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The verification of a step that fed tokens [B, T] (each row's last token, then its
    drafts; row b's first num[b] drafts are real) and got final hidden states [B, T, H]:
    the sampling distribution at every position (the LM head over `rows` rows at a time), the
    rule (`verify_drafts`, uniforms u [B, T], draft distributions q [B, T - 1, V] or None),
    and the emitted tokens [B, T] (the kept drafts, then the verifier's token, then scratch),
    their log-probs [B, T] and the kept counts [B]. No host sync: a CUDA graph captures it."""
    B, T = tokens.shape
    # Positions past a row's drafts and the next are never read: no nucleus search there.
    need = (torch.arange(T, device=num.device) <= num[:, None]).reshape(-1)
    logp = _logprobs(model, hidden.reshape(B * T, -1), need, params, rows).view(B, T, -1)
    drafts = tokens[:, 1:]
    if params.temperature == 0:
        accepted, token = verify_drafts(logp, drafts, num, greedy=True)
    else:
        # Log-probabilities: on a CPU the rule exponentiates only what it reads.
        accepted, token = verify_drafts(logp, drafts, num, q, u, log=True)
    emitted = torch.cat([drafts, drafts.new_zeros(B, 1)], dim=1)  # [B, T]
    emitted.scatter_(1, accepted[:, None], token[:, None])
    emitted_logp = logp.gather(-1, emitted[:, :, None])[..., 0]  # [B, T]
    return emitted, emitted_logp, accepted


def _logprobs(
    model: Decoder, h: torch.Tensor, need: torch.Tensor, params: SamplingParams, rows: int
) -> torch.Tensor:
    """The sampling distribution's log-probabilities [N, V] at final hidden states h [N, H]:
    the LM head and `sampling_logprobs` `rows` rows at a time; rows not in need [N] skip the
    nucleus search (their values are never read)."""
    return torch.cat(
        [
            sampling_logprobs(model.logits(h[i : i + rows]), params, need[i : i + rows])
            for i in range(0, h.shape[0], rows)
        ]
    )


# Up to this many tree positions in a step (rows x (1 + C * k)), `verify_chain_rows` computes
# the sampling distribution at all of them in one pass; past it, only at the nodes the path
# reaches, a depth at a time. On the H200 (2026-11-30, thirteenth session; SmolLM2, top-p 0.7,
# C = 4, k = 3) the nucleus search's launches cost about the same for 16 rows as for 208:
# at 16 rows a pass a depth spent 91 ms of a profile on it against 63 for one pass over all
# positions; at 64 rows (832 positions) one pass spent 185 ms, the passes a depth 110.
CHAIN_ONE_PASS_ROWS = 256


def verify_chain_rows(
    model: Decoder,
    hidden: torch.Tensor,
    chains: torch.Tensor,
    num: torch.Tensor,
    u: torch.Tensor,
    params: SamplingParams,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`verify_rows` for a step that fed each row's last token and C deterministic draft
    chains (chains [B, C, k], num [B, C]; hidden [B, 1 + C * k, H]): the rule of
    `verify_chains` with uniforms u [B, k + 1]. The sampling distribution (the LM head and
    top-p, `rows` rows at a time) at every position a chain's drafts reach, in one pass, up to
    `CHAIN_ONE_PASS_ROWS` positions; past that only at the nodes the path reaches (k + 1
    passes of B rows: what one chain's step computes, whatever C). Returns the emitted tokens
    [B, k + 1], their log-probs, the kept counts [B] and the positions that emitted them
    [B, k + 1] (the accepted path). No host sync."""
    B, C, k = chains.shape
    T = 1 + C * k
    greedy = params.temperature == 0
    target: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if B * T <= CHAIN_ONE_PASS_ROWS:
        # A chain's positions past its drafts are never read: no nucleus search there.
        deep = torch.arange(k, device=num.device) < num[:, :, None]  # [B, C, k]
        need = torch.cat([deep.new_ones(B, 1), deep.reshape(B, C * k)], dim=1).reshape(-1)
        target = _logprobs(model, hidden.reshape(B * T, -1), need, params, rows).view(B, T, -1)
    else:
        at = torch.arange(B, device=hidden.device)
        target = lambda node, need: _logprobs(model, hidden[at, node], need, params, rows)  # noqa: E731
    accepted, emitted, node, logp = verify_chains(
        target, chains, num, None if greedy else u, greedy
    )
    return emitted, logp, accepted, node


def verify_graphs(run: Run, has_q: bool) -> StepGraphs:
    """The run's padded verify steps (`verify_rows` after the forward) for its sampling
    setting, kept with its decode graphs (`DecodeGraphs.extra`): captured once per cache,
    setting and bucket, not per `generate` call. Inputs: tokens [B, T], num [B], u [B, T]
    and, with has_q, q [B, T - 1, V]; outputs: hidden states, emitted, their log-probs, the
    kept counts."""
    graphs = run.graphs
    assert graphs is not None
    p = run.params
    key = ("verify", p.temperature, p.top_p, p.top_k, has_q)
    if key not in graphs.extra:
        # The setting alone (a later call's params differ in seed, limits, stops).
        params = SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        model, cache, rows = run.model, run.cache, run.sample_rows

        def fn(tokens: torch.Tensor, num: torch.Tensor, u: torch.Tensor, *rest: torch.Tensor):
            *q, positions = rest
            hidden = model.forward_cached(tokens, positions, cache)
            out = verify_rows(model, hidden, tokens, num, u, q[0] if q else None, params, rows)
            return (hidden, *out)

        graphs.extra[key] = StepGraphs(fn, cache, graphs.capture)
    return graphs.extra[key]


class PlainStep:
    """One sampled token per sequence."""

    exact_counts = True

    def begin(self, run: Run) -> None:
        pass

    def sync(self, run: Run) -> None:
        pass

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        pass

    def kind(self, rows: int) -> str:
        return "plain"

    def step(self, run: Run) -> None:
        B = len(run.seq)
        hidden = forward_tokens(run, run.last[:B, None])
        run.sample_emit(hidden[:, -1])

    def moved(self, src: list[int], dst: list[int]) -> None:
        pass

    def finished(self, seqs: list[int]) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}


class SpecStep:
    """Draft, verify, emit 1..k+1 tokens per sequence (module docstring).

    Each row drafts at most k tokens, fewer near its token limit and before the cache's next
    compression check (`KVCache.draft_room`); rows with fewer drafts than the step's widest
    are padded and their extra entries rewound with the rejected ones. Under CUDA graphs every
    step that drafts feeds k + 1 tokens, so one graph per batch bucket serves every such step.

    max_batch > 0: while more sequences run, no row drafts (room 0): the step feeds one token
    per row and draws it from the policy's distribution as a plain step does, and the drafter
    still observes every token (the MTP module runs its catch-up block over it), so drafting
    resumes where the batch has shrunk.

    num_draft_tokens: k, or a function of the rows running to k
    (`SpeculativeConfig.draft_tokens`: a longer draft in the tail); the drafter is sized for
    the largest.
    """

    exact_counts = True

    ADAPT_STEPS = 4  # steps (verify or plain) a round of the draft adapter

    def __init__(
        self,
        drafter: Drafter,
        num_draft_tokens: DraftLength,
        max_batch: int = 0,
        adaptive: bool = False,
    ):
        self.drafter, self.max_batch = drafter, max_batch
        self.k_for = _draft_length(num_draft_tokens)
        self.adapt = DraftAdapter(adaptive)
        self.plain_steps = 0
        self.steps = self.seq_steps = self.emitted = self.drafted = self.accepted = 0
        self.draft_seconds = 0.0

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        self.drafter.admitted(run, first, seqs, hidden)

    def moved(self, src: list[int], dst: list[int]) -> None:
        self.drafter.moved(src, dst)

    def finished(self, seqs: list[int]) -> None:
        self.drafter.finished(seqs)

    def begin(self, run: Run) -> None:
        pass

    def sync(self, run: Run) -> None:
        pass

    def kind(self, rows: int) -> str:
        # Over max_batch no row drafts: a plain step (so does a step where no row drafts, and
        # one where the draft adapter's length is 0).
        k = self.adapt.k(self.k_for(rows))
        if (self.max_batch and rows > self.max_batch) or k == 0:
            return "plain"
        return f"spec k{k}"

    def step(self, run: Run) -> None:
        B, dev, params = len(run.seq), run.device, run.params
        k = self.adapt.k(self.k_for(B))
        room = np.minimum(k, run.limit - run.count - 1)  # the last token is the verifier's
        bound = run.cache.draft_room(B)
        if bound is not None:
            room = np.minimum(room, bound)
        room = np.maximum(room, 0)
        if self.max_batch and B > self.max_batch:
            room = np.zeros_like(room)
        t0 = time.perf_counter()
        draft = self.drafter.propose(run, room)  # tokens [B, k], num [B] <= room
        self.draft_seconds += time.perf_counter() - t0
        width = int(draft.num.max())
        if not width:
            # No row drafts (a batch over max_batch, every row at its limit, or the draft
            # adapter's length 0): a plain step, which the drafter still observes.
            hidden = forward_tokens(run, run.last[:B, None])
            tok, tok_logp = run.sample(hidden[:, -1])
            run.emit_one(tok, tok_logp)
            one = np.ones(B, dtype=np.int64)
            self.drafter.observed(run, hidden, tok[:, None], one, tok[:, None].cpu().numpy())
            self.plain_steps += 1
            self._round()
            return
        if run.graphs is not None:
            width = k  # one graph per (bucket, k) serves every drafting step
        T = width + 1
        tokens = torch.cat([run.last[:B, None], draft.tokens[:, :width]], dim=1)  # [B, T]
        num = to_device(draft.num, dev)
        # k + 1 uniforms whatever the step's width (the last draws the final token): a padded
        # step and an eager one make the same decisions from the same seed. Greedy: unused.
        if params.temperature == 0:
            u = torch.zeros(B, T, dtype=torch.float64, device=dev)
        else:
            u = torch.rand(B, k + 1, generator=run.gen, dtype=torch.float64, device=dev)
            u = torch.cat([u[:, :width], u[:, k:]], dim=1)  # [B, T]
        q = None if draft.probs is None else draft.probs[:, :width]
        if run.graphs is not None:
            fed = (tokens, num, u) if q is None else (tokens, num, u, q)
            hidden, emitted, emitted_logp, accepted = verify_graphs(run, q is not None).step(
                B, *fed
            )
        else:
            hidden = forward_tokens(run, tokens)  # [B, T, H]
            emitted, emitted_logp, accepted = verify_rows(
                run.model, hidden, tokens, num, u, q, params, run.sample_rows
            )
        # The step's one host sync: the kept counts and the emitted tokens in one copy.
        host = torch.cat([accepted[:, None], emitted], dim=1).cpu().numpy()
        kept, emitted_host = host[:, 0], host[:, 1:]
        run.cache.rewind(T - 1 - kept)
        run.emit(emitted, emitted_logp, accepted + 1, kept + 1)
        self.drafter.observed(run, hidden, emitted, kept + 1, emitted_host)
        self.steps += 1
        self.seq_steps += B
        self.emitted += int(kept.sum()) + B
        self.drafted += int(draft.num.sum())
        self.accepted += int(kept.sum())
        self._round()

    def _round(self) -> None:
        """Every ADAPT_STEPS steps, verify or plain, the draft adapter's round ends."""
        if (self.steps + self.plain_steps) % self.ADAPT_STEPS == 0:
            self.adapt.observe(self.drafted, self.accepted)

    def stats(self) -> dict[str, float]:
        """spec/accept_len_mean: tokens emitted per sequence and verify step (accepted drafts
        + 1); spec/accept_rate: accepted / drafted tokens; spec/drafted_per_step: drafts per
        sequence and verify step; spec/draft_ms: the drafter's time per decode step, verify
        and plain (in a plain step it only catches up on the new token); spec/plain_steps:
        steps where no row drafted (over max_batch, every row at its limit, or the draft
        adapter's length 0)."""
        draft_ms = 1000 * self.draft_seconds / max(self.steps + self.plain_steps, 1)
        return _spec_stats(
            self.seq_steps, self.emitted, self.drafted, self.accepted, draft_ms, self.steps,
            self.plain_steps,
        )  # fmt: skip


DraftLength = int | Callable[[int], int]


def _draft_length(k: DraftLength) -> Callable[[int], int]:
    """The draft length as a function of the rows running."""
    if callable(k):
        return k
    return lambda rows: k


class DraftAdapter:
    """The draft length of the next rounds from the acceptance of the last one
    (`SpeculativeConfig.adaptive_draft`): a round whose drafts passed less than `LOW` of the
    time halves it, one at `HIGH` or more doubles it, up to the configured length
    (`k(full)`); in between it stays. Off, `k(full)` is `full`. The step feeds the running
    totals of drafted and accepted tokens (`observe`) once a round: a verify step over few
    rows costs more with every draft depth (the MTP module's block call, a wider
    verification) whether the drafts pass or not.

    Halved from 1 the length is 0: the rounds decode without drafts (a step that costs about
    a plain one; the drafter still observes every token). After `PROBE_WAIT` such rounds one
    round drafts a token again (a probe): if its drafts pass the length grows as above, if
    not it is 0 again and the wait before the next probe doubles, up to `PROBE_WAIT_MAX`
    rounds (a probe that passes resets it)."""

    LOW, HIGH = 0.3, 0.7
    PROBE_WAIT, PROBE_WAIT_MAX = 2, 16

    def __init__(self, on: bool):
        self.on = on
        self.cap: int | None = None  # None: the full length
        self.last_k = 0  # the length the round ran at
        self.seen = (0, 0)  # drafted, accepted totals at the last decision
        self.idle = 0  # rounds run at length 0 since the last probe
        self.wait = self.PROBE_WAIT  # rounds at length 0 before the next probe
        self.backoff = self.PROBE_WAIT  # the wait after the next fall to 0

    def k(self, full: int) -> int:
        k = full if not self.on or self.cap is None else max(0, min(full, self.cap))
        self.last_k = k
        return k

    def observe(self, drafted: int, accepted: int) -> None:
        """Totals so far (they only grow within a generate call); decides on the round since
        the last call."""
        d, a = drafted - self.seen[0], accepted - self.seen[1]
        self.seen = (drafted, accepted)
        if not self.on:
            return
        if self.cap == 0 and self.last_k == 0:  # a round without drafts
            self.idle += 1
            if self.idle >= self.wait:
                self.cap, self.idle = 1, 0  # the probe
            return
        if d <= 0 or self.last_k == 0:
            return
        rate = a / d
        if rate < self.LOW:
            self.cap = self.last_k // 2
            if self.cap == 0:  # wait, then probe; each fall waits twice as long
                self.idle, self.wait = 0, self.backoff
                self.backoff = min(2 * self.backoff, self.PROBE_WAIT_MAX)
        elif rate >= self.HIGH:
            self.cap = 2 * self.last_k
            self.backoff = self.PROBE_WAIT


def _spec_stats(
    rows: int, emitted: int, drafted: int, accepted: int, draft_ms: float, verify: int, plain: int
) -> dict[str, float]:
    """The spec/* metrics (`SpecStep.stats`) from row-steps, tokens emitted, drafted and
    accepted, the host's drafting ms a step, and the verify and plain steps."""
    return {
        "spec/accept_len_mean": emitted / max(rows, 1),
        "spec/accept_rate": accepted / max(drafted, 1),
        "spec/drafted_per_step": drafted / max(rows, 1),
        "spec/draft_ms": draft_ms,
        "spec/verify_steps": float(verify),
        "spec/plain_steps": float(plain),
    }


class SyncFreeSpecStep:
    """Draft, verify and emit with no host sync: `SpecStep` with the drafter on the device
    (`drafters.DeviceDrafter`: `DeviceSAM`, `DeviceMTP`, `DeviceSAMThenMTP`; sampled MTP
    drafts come with their q) and the cache's lengths on the device
    (`KVCache.device_lengths`), for padded steps (CUDA graphs; `capture=False` runs the same
    steps eagerly).

    Each step is one replay of a captured function over fixed tensors: the rows' room (their
    limit - count - 1, at most k; 0 for rows at their limit, padding rows, and every row while
    more than `max_batch` run), the drafter's drafts, the policy's forward over k + 1 tokens a
    row from the cache's device lengths, `verify_rows`, the rows' new counts, next tokens and
    lengths, and the drafter's update with the emitted tokens and the policy's states. Outside
    the graph, per step: the drafter's and the rule's uniforms drawn from the run's generator
    into fixed buffers (the rule's as `SpecStep` draws them),
    and the emitted tokens written to the run's outputs (a few launches, no sync). The host
    reads the counts and lengths every `sync_every` steps (`sync`): between reads `Run.count`
    is a lower bound (`exact_counts` False), and a row that reaches its limit emits nothing
    more until the retire.

    Rows that draft nothing still feed k + 1 tokens and keep only the verifier's token, which
    is the policy's own sample: the output distribution is the policy's as in `SpecStep`.
    Greedy output equals `SpecStep`'s with the same drafter token for token. With a draft
    length that depends on the rows running (`num_draft_tokens` a function, as `SpecStep`'s)
    there is one graph per (bucket, k).

    draft_chains C > 1 (an int, or a function of the rows running as num_draft_tokens): each
    row feeds its last token and C deterministic chains of k drafts, the first C of
    chain_kinds (`DeviceDrafter.propose_chains`), as a tree (`KVCache.begin_decode_device`
    with chain k); the rule of `verify_chains` keeps one path, and the cache keeps that
    path's entries (`keep_path`). One graph per (bucket, k, C).

    The state the graphs read and write lives with the cache's decode graphs (`state`, per
    sampling setting and drafter key): the run's `last` and `count_dev`
    (`DecodeGraphs.slot_state`), the cache's device lengths, the limits, the uniforms, the
    drafter's tensors and the step's counters.
    """

    exact_counts = False

    def __init__(
        self,
        run: Run,
        drafter: DeviceDrafter,
        num_draft_tokens: DraftLength,
        max_batch: int = 0,
        draft_chains: DraftLength = 1,
        chain_kinds: tuple[str, ...] = (),
        adaptive: bool = False,
    ):
        graphs = run.graphs
        assert graphs is not None and run.cache.device_lengths
        self.drafter, self.max_batch = drafter, max_batch
        self.k_for = _draft_length(num_draft_tokens)
        self.chains_for = _draft_length(draft_chains)
        self.chain_kinds = chain_kinds
        self.multi = False  # a step verified several chains
        p = run.params
        key = ("sync-free", p.temperature, p.top_p, p.top_k, max_batch, *drafter.key)
        if chain_kinds:  # several chains a row: which (one-chain keys stay as they were)
            key += (chain_kinds,)
        if key not in graphs.extra:
            graphs.extra[key] = _SyncFreeGraphs(graphs.capture, graphs.buckets)
        self.g: _SyncFreeGraphs = graphs.extra[key]
        slots, dev = run.cache.num_slots, run.device
        st = self.g.state
        if "limit" not in st:
            st["limit"] = torch.zeros(slots, dtype=torch.long, device=dev)
            st["nrows"] = torch.zeros(1, dtype=torch.long, device=dev)
            # Rows stepped, tokens emitted, drafted, accepted, and rows whose drafts passed
            # on a chain other than the first (several chains a row).
            st["counts"] = torch.zeros(5, dtype=torch.long, device=dev)
        drafter.bind(st, slots, run.cache.max_len, dev)
        st["counts"].zero_()
        # The run's `last` and `count_dev` are the first run.slots rows of these: a bucket
        # may pad past the run's slots, up to the cache's.
        self.last, self.count = graphs.slot_state_all()
        self.steps = 0
        self.undrafted = 0  # steps the draft adapter ran at length 0
        self.adapt = DraftAdapter(adaptive)

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        self.drafter.admitted(run, first, seqs, hidden)

    def moved(self, src: list[int], dst: list[int]) -> None:
        self.drafter.moved(src, dst)

    def finished(self, seqs: list[int]) -> None:
        pass

    def begin(self, run: Run) -> None:
        B, st = len(run.seq), self.g.state
        run.cache.lengths_to_device(B)
        st["limit"].zero_()
        st["limit"][:B].copy_(to_device(run.limit, run.device))
        st["nrows"].fill_(B)

    def _draft_shape(self, rows: int) -> tuple[int, int]:
        """(k, C): the draft length and chains of a step over `rows` rows. The draft
        adapter's length 0: one token a row, one chain, the drafter only catching up."""
        k = self.adapt.k(self.k_for(rows))
        return k, self.chains_for(rows) if k else 1

    def kind(self, rows: int) -> str:
        # Every step feeds k + 1 tokens a row (C chains: 1 + C k), drafts or not.
        k, C = self._draft_shape(rows)
        return f"spec k{k}" + (f" c{C}" if C > 1 else "")

    def step(self, run: Run) -> None:
        B, st = len(run.seq), self.g.state
        pad, (k, C) = self.g.bucket(B), self._draft_shape(B)
        u = f"u{k}"  # the step's uniforms [slots, k + 1]
        if u not in st:
            st[u] = torch.zeros(run.cache.num_slots, k + 1, dtype=torch.float64, device=run.device)
        self.drafter.before_step(run, B, k)
        if run.params.temperature > 0:
            # Drawn straight into the step's buffer: the draws `SpecStep` makes.
            torch.rand(B, k + 1, generator=run.gen, dtype=torch.float64, out=st[u][:B])
        # What the step advances (put back after a capture's warm-up run).
        self.g.restore = [
            self.count, self.last, run.cache.lengths_on_device(run.cache.num_slots), st["counts"],
            *self.drafter.mutated(),
        ]  # fmt: skip
        key = (pad, k) if C == 1 else (pad, k, C)
        self.multi |= C > 1
        emitted, logp, num, active = self.g.run(key, lambda: self._device_step(run, pad, k, C))
        # Into the run's outputs (per call, so outside the graph): rows with nothing to emit
        # write to the scratch row.
        # Only rows 0..B-1 can be active; the counts were advanced inside the step.
        emitted, logp, num, active = emitted[:B], logp[:B], num[:B], active[:B]
        seqs = torch.where(active, run.seq_dev[:B], run.scratch_row)
        start = torch.where(active, run.count_dev[:B] - num, 0)
        run.write_out(emitted, logp, num, seqs, start)
        run.count += 1  # a lower bound until `sync`
        self.steps += 1
        self.undrafted += k == 0

    def _device_step(self, run: Run, pad: int, k: int, C: int) -> tuple[torch.Tensor, ...]:
        """One step of slots 0..pad-1 drafting up to k tokens a row (in C chains) on the
        device (captured): returns the emitted tokens and log-probs [pad, k + 1], the counts
        emitted [pad] and which rows emitted [pad]."""
        st, cache = self.g.state, run.cache
        count, limit = self.count[:pad], st["limit"][:pad]
        active = count < limit
        room = torch.where(active, (limit - count - 1).clamp(min=0, max=k), 0)
        if self.max_batch:
            room = torch.where(st["nrows"] <= self.max_batch, room, 0)
        u = st[f"u{k}"][:pad]
        if C > 1:
            kinds = self.chain_kinds[:C]
            chains, cnum = self.drafter.propose_chains(pad, room, k, kinds)  # [pad, C, k]
            tokens = torch.cat([self.last[:pad, None], chains.reshape(pad, C * k)], dim=1)
            positions = cache.begin_decode_device(active, 1 + C * k, chain=k)
            hidden = run.model.forward_cached(tokens, positions, cache)
            emitted, logp, accepted, node = verify_chain_rows(
                run.model, hidden, chains, cnum, u, run.params, run.sample_rows
            )
            cache.keep_path(node[:, 1:], active)
            # The policy's states along the kept path, as a one-chain step's.
            hidden = hidden.gather(1, node[:, :, None].expand(-1, -1, hidden.shape[-1]))
            dnum = cnum.sum(1)
            other = active & (node[:, 1] > k)  # the path's first draft is past chain 0's
        else:
            drafts, dnum, q = self.drafter.propose(pad, room, k)  # [pad, k]
            tokens = torch.cat([self.last[:pad, None], drafts], dim=1)  # [pad, k + 1]
            positions = cache.begin_decode_device(active, k + 1)
            hidden = run.model.forward_cached(tokens, positions, cache)
            emitted, logp, accepted = verify_rows(
                run.model, hidden, tokens, dnum, u, q, run.params, run.sample_rows
            )
            other = torch.zeros_like(active)
        num = torch.where(active, accepted + 1, 0)
        cache.advance_device(num)
        last = emitted.gather(1, (num - 1).clamp(min=0)[:, None])[:, 0]
        self.last[:pad] = torch.where(active, last, self.last[:pad])
        self.count[:pad] += num
        self.drafter.extend(pad, emitted, num, hidden)
        if k:  # the counters cover verify steps, as `SpecStep`'s
            st["counts"] += torch.stack(
                [active.sum(), num.sum(), dnum.sum(), (num - 1).clamp(min=0).sum(), other.sum()]
            )
        return emitted, logp, num, active

    def sync(self, run: Run) -> None:
        """The host's counts and cache lengths from the device, in one copy."""
        B = len(run.seq)
        lens = run.cache.lengths_on_device(B)
        # The step's counters ride along (rows, emitted, drafted, accepted, other chains):
        # the draft adapter's round.
        counts = self.g.state["counts"]
        host = torch.cat([run.count_dev[:B], lens, counts]).cpu().numpy()
        run.count[:] = host[:B]
        n = B + lens.numel()
        run.cache.lengths_from_device(host[B:n])
        _, _, drafted, accepted, _ = host[n:].tolist()
        self.adapt.observe(drafted, accepted)

    def stats(self) -> dict[str, float]:
        """As `SpecStep.stats`; spec/draft_ms is the host's drafting time, 0 here: the drafts
        are made inside the step's graph."""
        rows, emitted, drafted, accepted, other = self.g.state["counts"].tolist()
        verify = self.steps - self.undrafted
        out = _spec_stats(rows, emitted, drafted, accepted, 0.0, verify, self.undrafted)
        if self.multi:
            # Several chains: spec/drafted_per_step counts every chain's drafts.
            out["spec/other_chain_rate"] = other / max(rows, 1)
        return out


class _SyncFreeGraphs:
    """`SyncFreeSpecStep`'s graphs (one per bucket) and state, kept with the cache's decode
    graphs per sampling setting and drafter."""

    def __init__(self, capture: bool, bucket_sizes: list[int]):
        self.capture, self.buckets = capture, bucket_sizes
        self.state: dict[str, Any] = {}
        # Per (bucket, k), or (bucket, k, chains) for several chains a row.
        self.graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, Any]] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.restore: list[torch.Tensor] = []
        self.steps: dict[tuple[int, ...], int] = {}  # steps run per graph key

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def run(self, key: tuple[int, ...], fn: Callable[[], Any]) -> Any:
        """fn() for key (bucket, k[, chains]): replayed from its graph (captured on first
        use), or eagerly."""
        self.steps[key] = self.steps.get(key, 0) + 1
        if not self.capture:
            return fn()
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def _capture(self, fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
        # The warm-up (lazy initialisation, Triton compilation) runs the step for real: the
        # state it advances is put back, so that the replay after the capture is the step.
        kept = [t.clone() for t in self.restore]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        for t, k in zip(self.restore, kept, strict=True):
            t.copy_(k)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out
