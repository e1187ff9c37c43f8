"""One `Engine.generate` call's bookkeeping: which sequences run, where their tokens go, when
they finish (nano-vllm's Scheduler; the tensors of a decode step live in `steps.py`).

Sequences have ids (prompt i, sample j -> i * n + j) and run in slots 0..B-1 of the KV cache.
A loop of `execute`: admit waiting sequences into free slots (prefill: one forward per distinct
prompt, its keys/values written into the slots of its n samples, and the first token sampled),
run decode steps (each emits one or more tokens per running sequence: `DecodeStep`) until a
retire is due (`Run._decode`: a sequence at its token limit, or `sync_every` steps when a
sequence can stop before it), then retire: read the new tokens on the host, finish sequences
(EOS, stop ids, stop strings, length), compact the survivors into slots 0..B'-1 and free the
rest.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from rlkit.config.schema import KVCompressionConfig
from rlkit.device import synchronize
from rlkit.kernels import sample_rows as row_sampler
from rlkit.rollout.sampling import SamplingParams, make_generator, plain_rows, sample
from rlkit.rollout.stopping import StopChecker

if TYPE_CHECKING:
    from rlkit.rollout.engine import Engine

# Rows of the LM head and sampler per chunk on a CPU: keeps every [rows, V] temporary under
# glibc's mmap threshold (see engine._reuse_freed_memory) and in cache.
SAMPLE_ROWS = 64
# On a GPU, chunks of up to this many bytes per [rows, V] float32 temporary: one LM-head GEMM
# and one sampler launch for a whole batch of hundreds of rows (each chunk reads the head's
# weights again).
GPU_SAMPLE_BYTES = 256 << 20


def sample_rows_per_chunk(device: torch.device, vocab: int) -> int:
    """Rows of the LM head and the sampler per chunk (`Run.sample`)."""
    if device.type == "cpu":
        return SAMPLE_ROWS
    return max(SAMPLE_ROWS, GPU_SAMPLE_BYTES // (4 * vocab))


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]
    # Log-probability of each token under the sampling distribution (float32 math).
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"
    text: str


class DecodeStep(Protocol):
    """Advances every running sequence by at least one token (`steps.PlainStep`, one token;
    `steps.SpecStep`, draft and verify). The hooks keep per-slot state in step with the run."""

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        """Sequences `seqs` now run in slots first.. (prefilled; first token in `run.last`);
        hidden [m, H]: the final state of each one's last prompt position."""
        ...

    def step(self, run: Run) -> None: ...

    def moved(self, src: list[int], dst: list[int]) -> None:
        """Compaction copied slots src[i] -> dst[i]."""
        ...

    def finished(self, seqs: list[int]) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def kind(self, rows: int) -> str:
        """What the next `step` at this many rows is (the step timeline's label, e.g.
        "plain", "spec k3", "spec k6 c4")."""
        ...

    # True when the host knows every row's count after each step (`Run.count`); False for a
    # step that advances rows by counts only the device knows until `sync`
    # (`steps.SyncFreeSpecStep`): `Run.count` is then a lower bound (one token a step).
    exact_counts: bool

    def begin(self, run: Run) -> None:
        """Before a stretch of steps (after admission or a retire changed the batch)."""
        ...

    def sync(self, run: Run) -> None:
        """After a stretch, before the retire: the host's copies brought up to date."""
        ...


class Run:
    """State of one `generate` call. Per-slot arrays cover slots 0..B-1 (the running batch)."""

    def __init__(
        self,
        engine: Engine,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        compression: KVCompressionConfig | None,
        lookahead: int = 0,
    ):
        self.e, self.prompts, self.params, self.n = engine, prompts, params, n
        self.model = engine.model
        dev = self.device = engine.device
        total = len(prompts) * n
        length = min(engine.max_seq_len, max(len(p) for p in prompts) + params.max_new_tokens)
        # Sequences decoded at once: max_batch_size, or what the KV memory budget holds. A
        # reused cache may have more slots than that; the run uses only these.
        admitted = engine.admitted(total, length, compression, lookahead)
        self.cache = engine._cache_for(admitted, length, compression, lookahead)
        self.slots = min(self.cache.num_slots, admitted)
        self.concurrent = 0
        self.graphs = engine._decode_graphs(self.cache)
        self.gen = make_generator(params, dev)
        self.sample_rows = sample_rows_per_chunk(dev, self.model.args.vocab_size)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else engine.eos_ids)
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
        self.checker = StopChecker(engine.tokenizer, params.stop)
        # Outputs indexed by sequence id (prompt i, sample j -> i * n + j): compaction never
        # moves them. `lookahead` + 1 spare columns: a verify step writes all its T positions
        # (no boolean-mask indexing, which would wait for the GPU); a row's entries past its
        # count are scratch that its next step overwrites, and nothing reads them.
        # Row `total` is scratch: where a step that runs rows with nothing to emit (padding,
        # rows at their limit: `steps.SyncFreeSpecStep`) writes them.
        width = params.max_new_tokens + lookahead + 1
        self.scratch_row = total
        self.out_tokens = torch.zeros(total + 1, width, dtype=torch.long, device=dev)
        self.out_logprobs = torch.zeros(total + 1, width, dtype=torch.float32, device=dev)
        # Device state of the running slots.
        # The token to feed next and the tokens generated: with the decode graphs when there
        # are some (a captured step may advance them itself), else the run's own.
        if self.graphs is not None:
            self.last, self.count_dev = self.graphs.slot_state(self.slots)
        else:
            self.last = torch.zeros(self.slots, dtype=torch.long, device=dev)
            self.count_dev = torch.zeros(self.slots, dtype=torch.long, device=dev)
        self.done = torch.zeros(self.slots, dtype=torch.bool, device=dev)  # stop id sampled
        self.seq_dev = torch.zeros(self.slots, dtype=torch.long, device=dev)
        # On a GPU the sampler writes what `emit_one` writes itself (`sample_emit`).
        self.fused_emit = dev.type == "cuda" and row_sampler.HAS_TRITON
        self._emit_to = row_sampler.Emit(
            self.out_tokens, self.out_logprobs, self.seq_dev, self.count_dev, self.last,
            self.done, self.stop_ids,
        )  # fmt: skip
        # Host mirror: sequence id, tokens generated, token limit, per running slot.
        self.seq: list[int] = []
        self.count = np.zeros(0, dtype=np.int64)
        self.limit = np.zeros(0, dtype=np.int64)
        self.waiting = deque(range(total))
        self.results: list[Completion | None] = [None] * total
        # Compression; per sequence the entries held at its finish and its true length then.
        self.compression = compression
        self.events0 = getattr(self.cache, "events", 0)
        self.held = np.zeros(total, dtype=np.int64)
        self.true_len = np.zeros(total, dtype=np.int64)
        self.rounds = 0  # admit / decode / retire rounds (the host reads the device in each)
        self.seconds: dict[str, float] = {}
        # Engine(time_steps=True): (step kind, rows) -> [steps, seconds].
        self.step_times: dict[tuple[str, int], list[float]] = {}

    def execute(self, step: DecodeStep) -> list[Completion]:
        # Wall seconds by part (`time_*_s` in `Engine.stats`): on a GPU the decode loop only
        # launches, so its time lands where the host waits: the sync that ends each stretch.
        clock, t = time.perf_counter, [0.0, 0.0, 0.0]
        start = clock()
        while self.waiting or self.seq:
            t0 = clock()
            self._admit(step)
            t1 = clock()
            self._decode(step)
            t2 = clock()
            self._retire(step)
            t[0], t[1], t[2] = t[0] + t1 - t0, t[1] + t2 - t1, t[2] + clock() - t2
            self.rounds += 1
        self.seconds = {"total": clock() - start, "admit": t[0], "decode": t[1], "retire": t[2]}
        self._record_stats(step)
        return [r for r in self.results if r is not None]

    def _decode(self, step: DecodeStep) -> None:
        """Decode steps until a retire is due: a sequence at its token limit (the host counts
        tokens), or `sync_every` steps when a sequence can stop before its limit (stop ids,
        EOS, stop strings). When none can (ignore_eos and no stops: benchmarks, fixed-length
        rollouts) the device is read only at the limit, so a GPU never idles for a retire
        that could finish nothing."""
        can_stop = self.checker.active or len(self.stop_ids) > 0
        # Counts only the device knows: read every `sync_every` steps whatever can stop.
        bounded = can_stop or not step.exact_counts
        steps = 0
        if len(self.seq):
            step.begin(self)
        # The host knows every count (or a lower bound: then a row that reaches its limit
        # before the host sees it emits nothing more): no sequence goes past its limit.
        timed = self.e.time_steps
        while len(self.seq) and int((self.limit - self.count).min()) > 0:
            if timed:
                rows = len(self.seq)
                key = (step.kind(rows), rows)
                synchronize(self.device)
                t0 = time.perf_counter()
            step.step(self)
            self.cache.compress_due(len(self.seq))
            if timed:
                synchronize(self.device)
                cell = self.step_times.setdefault(key, [0.0, 0.0])
                cell[0] += 1
                cell[1] += time.perf_counter() - t0
            steps += 1
            if bounded and steps >= self.e.sync_every:
                break
        if len(self.seq):
            step.sync(self)

    def _record_stats(self, step: DecodeStep) -> None:
        c = self.cache
        dense = float(self.true_len.mean()) * c.bytes_per_token
        retained = float(self.held.mean()) * c.bytes_per_entry
        self.e.stats = {
            "kv_bytes_peak": float(c.allocated_bytes),
            "kv_bytes_retained_per_seq": retained,
            "kv_bytes_dense_per_seq": dense,
            "kv_retained_frac": retained / dense if dense else 1.0,
            # The least-compressed sequence: 1 - this is what every sequence lost at least.
            "kv_retained_frac_max": float(
                (
                    self.held * c.bytes_per_entry / np.maximum(self.true_len * c.bytes_per_token, 1)
                ).max()
            )
            if len(self.held)
            else 1.0,
            "compression_events": float(getattr(c, "events", 0) - self.events0),
            "seqs_admitted_peak": float(self.slots),
            "concurrent_seqs_max": float(self.concurrent),
            # Where the call's wall time went: admission (prefill), decode stretches (each
            # ending in the host's read of the device), retires (stops, compaction).
            **{f"time_{k}_s": v for k, v in self.seconds.items()},
            "decode_rounds": float(self.rounds),
            **step.stats(),
            # The step timeline: mean milliseconds and count of each kind at each row count.
            **{
                f"step_ms/{kind}/rows{rows}": 1000 * sec / n
                for (kind, rows), (n, sec) in self.step_times.items()
            },
            **{f"step_n/{kind}/rows{rows}": n for (kind, rows), (n, _) in self.step_times.items()},
        }

    # -- admission -------------------------------------------------------------------------

    def _admit(self, step: DecodeStep) -> None:
        """Prefill waiting sequences into free slots, one forward per distinct prompt."""
        free = self.slots - len(self.seq)
        if not self.waiting or free == 0:
            return
        new = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        prompt_ids = sorted({s // self.n for s in new})
        # Chunks of prompts within the padded-token budget.
        chunk: list[int] = []
        for p in prompt_ids:
            width = max([len(self.prompts[q]) for q in chunk] + [len(self.prompts[p])])
            if chunk and width * (len(chunk) + 1) > self.e.max_prefill_tokens:
                self._prefill(chunk, [s for s in new if s // self.n in chunk], step)
                chunk = []
            chunk.append(p)
        self._prefill(chunk, [s for s in new if s // self.n in chunk], step)

    def _prefill(self, prompt_ids: list[int], seqs: list[int], step: DecodeStep) -> None:
        dev = self.device
        lengths = [len(self.prompts[p]) for p in prompt_ids]
        tokens = torch.zeros(len(prompt_ids), max(lengths), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            tokens[i, : lengths[i]] = torch.tensor(self.prompts[p])
        tokens = tokens.to(dev)
        row_of = {p: i for i, p in enumerate(prompt_ids)}
        first = len(self.seq)
        slots = torch.arange(first, first + len(seqs))
        rows = torch.tensor([row_of[s // self.n] for s in seqs])
        self.cache.begin_prefill(slots, rows, lengths)
        positions = torch.arange(tokens.shape[1], device=dev).expand_as(tokens)
        if self.e.fused_prefill:
            hidden = self.model.forward_decode_fused(tokens, positions, self.cache)
        else:
            hidden = self.model.forward_cached(tokens, positions, self.cache)  # [P, T, hidden]
        last = hidden[torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev) - 1]
        # The LM head sees one row per sequence, never the prompt's other positions.
        per_seq = last[rows.to(dev)]  # [m, hidden]
        tok, logp = self.sample(per_seq)  # [m]
        seq_t = torch.tensor(seqs, device=dev)
        self.out_tokens[seq_t, 0] = tok
        self.out_logprobs[seq_t, 0] = logp
        end = first + len(seqs)
        self.last[first:end] = tok
        self.done[first:end] = torch.isin(tok, self.stop_ids)
        self.seq_dev[first:end] = seq_t
        self.count_dev[first:end] = 1
        self.seq.extend(seqs)
        self.concurrent = max(self.concurrent, len(self.seq))
        prompt_len = np.array([len(self.prompts[s // self.n]) for s in seqs], dtype=np.int64)
        limit = np.minimum(self.params.max_new_tokens, self.cache.capacity - prompt_len)
        self.count = np.concatenate([self.count, np.ones(len(seqs), dtype=np.int64)])
        self.limit = np.concatenate([self.limit, limit])
        for s in seqs:
            self.checker.reset(s)
        step.admitted(self, first, seqs, per_seq)

    # -- emission --------------------------------------------------------------------------

    def sample(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [N] and sampler log-probs [N] from final hidden states [N, hidden]."""
        rows = self.sample_rows
        outs = [
            sample(self.model.logits(hidden[i : i + rows]), self.params, self.gen)
            for i in range(0, hidden.shape[0], rows)
        ]
        if len(outs) == 1:
            return outs[0]
        return torch.cat([t for t, _ in outs]), torch.cat([lp for _, lp in outs])

    def sample_emit(self, hidden: torch.Tensor) -> None:
        """Sample and emit one token per running slot from final hidden states [B, hidden].
        With `fused_emit` (a GPU), plain temperature sampling and the batch in one chunk, the
        sampler's kernels write the emission themselves (`rlkit.kernels.sample_rows.Emit`):
        the same uniforms, tokens and log-probs as `emit_one(*sample(hidden))`, and `emit_one`'s
        six launches saved."""
        B = hidden.shape[0]
        if self.fused_emit and B <= self.sample_rows:
            logits = self.model.logits(hidden)
            if plain_rows(logits, self.params):
                u = torch.rand(B, 1, generator=self.gen, dtype=torch.float64, device=self.device)
                row_sampler.sample_rows(logits, self.params.temperature, u[:, 0], self._emit_to)
                self.count += 1
                return
            self.emit_one(*sample(logits, self.params, self.gen))
            return
        self.emit_one(*self.sample(hidden))

    def emit_one(self, tok: torch.Tensor, logp: torch.Tensor) -> None:
        """One new token per running slot: tok, logp [B] (no host sync): the ops the GPU's
        sampler runs itself (`sample_emit`)."""
        row_sampler.emit_reference(self._emit_to, tok, logp)
        self.count += 1

    def emit(
        self, tokens: torch.Tensor, logp: torch.Tensor, num: torch.Tensor, num_host: np.ndarray
    ) -> None:
        """num[b] >= 1 new tokens per running slot: the first num[b] of tokens[b], logp[b]
        [B, T]; num_host is num on the host. No host sync: every position is written (past
        num[b] into the scratch columns beyond the row's count)."""
        B = tokens.shape[0]
        self.write_out(tokens, logp, num, self.seq_dev[:B], self.count_dev[:B])
        self.last[:B] = tokens.gather(1, (num - 1)[:, None])[:, 0]
        self.count_dev[:B] += num
        self.count += num_host

    def write_out(
        self,
        tokens: torch.Tensor,
        logp: torch.Tensor,
        num: torch.Tensor,
        seqs: torch.Tensor,
        start: torch.Tensor,
    ) -> None:
        """Row b's tokens and log-probs [B, T] into sequence seqs[b]'s outputs from column
        start[b], all T of them (past num[b]: scratch the row's next step overwrites), and
        `done` for a stop id among its first num[b]. No host sync."""
        B, T = tokens.shape
        steps = torch.arange(T, device=self.device)
        cols = start[:, None] + steps  # [B, T]
        rows = seqs[:, None].expand(B, T)
        self.out_tokens[rows, cols] = tokens
        self.out_logprobs[rows, cols] = logp
        valid = steps[None, :] < num[:, None]
        self.done[:B] |= (torch.isin(tokens, self.stop_ids) & valid).any(dim=1)

    # -- retirement ------------------------------------------------------------------------

    def _retire(self, step: DecodeStep) -> None:
        """Finish sequences that stopped or hit their limit; compact; free their slots."""
        B = len(self.seq)
        if not B:
            return
        done = self.done[:B].cpu().numpy()  # the retire's wait for the device
        due = done | (self.count >= self.limit)
        candidates = range(B) if self.checker.active else np.nonzero(due)[0].tolist()
        finished: list[int] = []
        for b in candidates:
            s, count = self.seq[b], int(self.count[b])
            stop_at = None
            if done[b] or self.checker.active:
                stop_at = self._stop_index(s, self.out_tokens[s, :count], bool(done[b]))
            if stop_at is not None:
                self._finish(s, stop_at, "stop")
            elif count >= self.limit[b]:
                self._finish(s, count, "length")
            else:
                continue
            self.held[s] = self.cache.entries_held(b)
            self.true_len[s] = self.cache.positions[b]
            finished.append(b)
        if finished:
            step.finished([self.seq[b] for b in finished])
            self._compact(finished, step)

    def _stop_index(self, s: int, row: torch.Tensor, has_stop_id: bool) -> int | None:
        """Tokens to keep if sequence s has stopped (through its stop token or stop string)."""
        cut = None
        if has_stop_id:
            # First stop id; tokens sampled after it (before this sync) are dropped.
            cut = int(torch.isin(row, self.stop_ids).nonzero()[0, 0]) + 1
            row = row[:cut]
        text_cut = self.checker.check(s, row)
        return text_cut if text_cut is not None else cut

    def _finish(self, s: int, keep: int, reason: str) -> None:
        tokens = self.out_tokens[s, :keep].tolist()
        text = self.e.tokenizer.decode(tokens, skip_special_tokens=True)
        if reason == "stop":
            text = self.checker.truncate(text)
        self.results[s] = Completion(
            s // self.n, tokens, self.out_logprobs[s, :keep].tolist(), reason, text
        )

    def _compact(self, finished: list[int], step: DecodeStep) -> None:
        B = len(self.seq)
        keep_n = B - len(finished)
        holes = [b for b in finished if b < keep_n]
        gone = set(finished)
        movers = [b for b in range(keep_n, B) if b not in gone]
        self.cache.move(movers, holes)
        step.moved(movers, holes)
        if holes:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for t in (self.last, self.done, self.seq_dev, self.count_dev):
                t[dst] = t[src]
        for m, h in zip(movers, holes, strict=True):
            self.seq[h], self.count[h], self.limit[h] = self.seq[m], self.count[m], self.limit[m]
        del self.seq[keep_n:]
        self.count, self.limit = self.count[:keep_n], self.limit[:keep_n]
