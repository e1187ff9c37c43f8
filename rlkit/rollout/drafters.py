"""Drafters for speculative rollouts, registered by name (`rollout.speculative.drafter`).

A drafter proposes up to `room[b]` tokens for each running slot (`propose`) and learns what
was emitted after verification (`observed`: the policy's hidden states at the fed positions
and the emitted tokens). It follows the scheduler's slots through `admitted`, `moved` and
`finished`.

- `mtp`: the MTP module (`rlkit.models.mtp`) drafts k tokens by recursion over its shared
  block, sampling each from its own processed distribution q (greedy: argmax). Its block keeps
  a one-layer KV cache per slot over the completion. Each step first catches up on the pairs
  (policy state h_i, emitted token) of the positions verified since the last one, which also
  gives depth 1; depths 2..k add one entry each, removed again after drafting. With
  `mtp_vocab` N, its LM head covers the N tokens the engine has seen most (`Engine.
  token_counts`, over prompts and outputs; this run's prompts are added first): q is zero
  elsewhere, so the rule stays exact, and a draft reads N rows of the head instead of V.
- `sam`: a suffix automaton per sequence over prompt + generated tokens (`sam.py`), plus an
  optional static one over the train split's reference answers; drafts are deterministic
  (q = one-hot) and continue the match's most recent earlier occurrence (`sam_latest`) or its
  first. Without a static automaton the matchers are C's (`kernels/sam_matchers.py`,
  one call a step for the batch) where that library builds, else `sam.TextMatchers`.
- `sam+mtp`: SAM's draft where its match reaches the threshold, else MTP's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from rlkit.algorithms.registry import Registry
from rlkit.device import to_device
from rlkit.kernels import cpu as cpu_kernels
from rlkit.kernels import sam_device, sam_matchers
from rlkit.models.decoder import FusedLayer, fused_layers, linear, one_call_layers
from rlkit.models.mtp import MTPModule
from rlkit.rollout.cuda_graphs import StepGraphs
from rlkit.rollout.kv_cache import KVCache
from rlkit.rollout.sam import SuffixAutomaton, TextMatchers
from rlkit.rollout.sampling import SamplingParams, draw_with, sampling_logprobs

if TYPE_CHECKING:
    from rlkit.rollout.scheduler import Run


@dataclass
class Draft:
    tokens: torch.Tensor  # [B, k] int64 on the device; entries at or past num[b] are padding
    num: np.ndarray  # [B] int64: drafts per row
    probs: torch.Tensor | None  # [B, k, V] float32: the q each draft was sampled from; None:
    # every draft deterministic (q = one-hot)


class Drafter(Protocol):
    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None: ...

    def propose(self, run: Run, room: np.ndarray) -> Draft: ...

    def observed(
        self,
        run: Run,
        hidden: torch.Tensor,
        emitted: torch.Tensor,
        num: np.ndarray,
        emitted_host: np.ndarray | None = None,
    ) -> None:
        """hidden [B, T, H]: the policy's states at the fed positions; emitted [B, T]: the
        tokens that followed them, the first num[b] valid; emitted_host: the same on the host
        where the step already has it (no second device-to-host wait)."""
        ...

    def moved(self, src: list[int], dst: list[int]) -> None: ...

    def finished(self, seqs: list[int]) -> None: ...


@dataclass
class DraftSettings:
    """What drafters are built from (the engine's side of `SpeculativeConfig`)."""

    num_draft_tokens: int = 3
    sam_min_match: int = 4
    mtp: MTPModule | None = None
    static: SuffixAutomaton | None = None
    mtp_vocab: int = 0
    # [V] float32 on the device: how often each token was seen (the engine's, kept across
    # calls); the MTP drafter's sub-vocabulary is its top `mtp_vocab`.
    token_counts: torch.Tensor | None = None
    # SAM continues the match's most recent earlier occurrence, else its first.
    sam_latest: bool = True
    # The MTP drafter drafts its argmax (deterministic drafts) even when sampling.
    mtp_argmax: bool = False


DRAFTERS: Registry[Callable[[Run, DraftSettings], Any]] = Registry("drafter")


class _FusedMTP:
    """The MTP module's block and input projection as the CPU decode kernels take them, packed
    in the trunk's layout once per `generate` call (the module's plain weights stay what weight
    syncs load into): a draft depth is then one C call for the block (AVX2-packed float32:
    `cpu_kernels.decode_layers`) or six kernel calls, instead of some twenty PyTorch ops."""

    def __init__(self, mtp: MTPModule, model: Any):
        blk, pack = mtp.block, model.pack_weights
        plain = FusedLayer.of(blk)
        self.layer = FusedLayer(
            plain.in_norm, pack(*plain.qkv), pack(*plain.o), plain.post_norm,
            pack(*plain.gate_up), pack(*plain.down),
        )  # fmt: skip
        self.proj = pack(mtp.proj.weight, None)
        self.hnorm, self.enorm = mtp.hnorm.weight.detach(), mtp.enorm.weight.detach()
        self.final_norm = mtp.norm.weight.detach()
        self.eps = mtp.args.rms_norm_eps
        self.one_call = (
            one_call_layers([self.layer], self.final_norm) if model.pack_layout == "avx2" else None
        )

    def input(self, h: torch.Tensor, tokens: torch.Tensor, model: Any) -> torch.Tensor:
        """`MTPModule.step_input` on the kernels: x [B, T, H] from states h [B, T, H] and
        tokens [B, T]."""
        B, T, H = h.shape
        e = F.embedding(tokens.reshape(-1), model.model.embed_tokens.weight)
        hn = cpu_kernels.add_rms_norm(h.reshape(B * T, H), None, self.hnorm, self.eps)
        en = cpu_kernels.add_rms_norm(e, None, self.enorm, self.eps)
        return linear(torch.cat([hn, en], dim=-1), *self.proj).view(B, T, H)


def _draft_depth(
    logits: torch.Tensor,
    params: SamplingParams,
    u: torch.Tensor | None,
    ids: torch.Tensor | None,
    probs: torch.Tensor | None,
    i: int,
) -> torch.Tensor:
    """One MTP depth's drafts [B] from the head's logits [B, V] (or [B, N] over the
    sub-vocabulary `ids`): the argmax when greedy (u None), else drawn with uniforms u [B]
    from the processed distribution q, written into probs[:, i] ([B, k, V], zero off `ids`)."""
    if u is None or probs is None:
        d = logits.argmax(dim=-1)
    else:
        logq = sampling_logprobs(logits, params)
        d = draw_with(logq, u)
        if ids is None:
            probs[:, i] = logq.exp()
        else:
            probs[:, i].index_copy_(1, ids, logq.exp())
    return d if ids is None else ids[d]


class MTPDrafter:
    def __init__(self, run: Run, cfg: DraftSettings):
        if cfg.mtp is None:
            raise ValueError("the mtp drafter needs an MTP module (Engine(mtp=...))")
        self.mtp, self.k, self.run = cfg.mtp, cfg.num_draft_tokens, run
        # The drafts' own sampling: the run's, or greedy (argmax drafts, no q).
        p = run.params
        self.params = SamplingParams(
            temperature=0.0 if cfg.mtp_argmax else p.temperature, top_p=p.top_p, top_k=p.top_k
        )
        a, dev = run.model.args, run.device
        self.built = False  # the host path's state, made at the first admission (`_build`)
        # The fused CPU step's packed block (never with padded steps, hence never on the
        # device path).
        self.fused = _FusedMTP(self.mtp, run.model) if run.e.fused_decode else None
        # The draft head: the whole LM head, or the rows of the most frequent tokens.
        self.counts, self.ids, self.head = cfg.token_counts, None, None
        if 0 < cfg.mtp_vocab < a.vocab_size and self.counts is not None:
            prompts = torch.tensor([t for p in run.prompts for t in p], device=dev)
            self.counts += torch.bincount(prompts, minlength=a.vocab_size).float()
            # Ties (unseen tokens) go to the lower id: counts are whole numbers, the
            # tie-breaker is under 1.
            rank = self.counts - torch.arange(a.vocab_size, device=dev) / a.vocab_size
            top = torch.topk(rank, cfg.mtp_vocab, sorted=False).indices
            self.ids = top.sort().values  # [N]
            head = run.model.lm_head.weight.detach()[self.ids].contiguous()  # [N, H]
            # Packed once per call in the trunk's layout (AVX2 GEMM, oneDNN), if it has one.
            self.head = run.model.pack_weights(head, None)[0]

    def _build(self, run: Run) -> None:
        """The host path's state (a run that drafts on the device never needs it): the block's
        one-layer cache, the pairs not yet in it, the block's graphs."""
        a, c, dev, dtype = run.model.args, run.cache, run.device, run.e.dtype
        self.cache = KVCache(
            1, c.num_slots, c.capacity, a.num_kv_heads, a.head_dim, dtype, dev, run.e.cpu_kernels,
            lookahead=self.k + 1,
        )  # fmt: skip
        # Pairs (policy state, the token after it) verified but not yet in the MTP cache.
        self.h = torch.zeros(c.num_slots, self.k + 1, a.hidden_size, dtype=dtype, device=dev)
        self.tok = torch.zeros(c.num_slots, self.k + 1, dtype=torch.long, device=dev)
        self.pending = np.zeros(c.num_slots, dtype=np.int64)
        # Where the policy's steps are padded CUDA-graph replays, so are the block's: the
        # catch-up over k + 1 pairs and each depth's one token, a graph per bucket each.
        self.graphs: StepGraphs | None = None
        if run.graphs is not None:
            self.graphs = StepGraphs(
                lambda h, tok, positions: self._block_at(run, self._input(run, h, tok), positions),
                self.cache,
                capture=run.graphs.capture,
            )
        self.built = True

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        if not self.built:
            self._build(run)
        m = len(seqs)
        self.h[first : first + m, 0] = hidden
        self.tok[first : first + m, 0] = run.last[first : first + m]
        self.pending[first : first + m] = 1
        # The block's first entry: the last prompt position.
        start = np.array([len(run.prompts[s // run.n]) - 1 for s in seqs], dtype=np.int64)
        self.cache.reset_slots(range(first, first + m), start)

    def _input(self, run: Run, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.fused is None:
            return self.mtp.step_input(h, tokens, run.model)
        return self.fused.input(h, tokens, run.model)

    def _block(self, run: Run, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared block on x [B, T, H] (appended to the block's cache): its states g and
        norm(g) (what the head reads), each [B, T, H]."""
        return self._block_at(run, x, self.cache.begin_decode(*x.shape[:2]))

    def _block_at(
        self, run: Run, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_block` once the cache has begun the step at `positions` [B, T]."""
        B, T = x.shape[:2]
        target = None if self.fused is None else self.cache.fused_target(0)
        if self.fused is None or target is None:
            g = self.mtp.run_block(x, positions, run.model, self.cache)
            return g, self.mtp.norm(g)
        f = self.fused
        cos4, sin4 = run.model.rope(positions, x.dtype)
        flat = x.reshape(B * T, -1)  # fresh from the projection: the residual, updated in place
        out = fused_layers(
            flat, cos4, sin4, [f.layer], f.final_norm, [target], run.model.args, f.one_call
        )
        return flat.view(B, T, -1), out.view(B, T, -1)

    def _step(
        self, run: Run, h: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on the inputs of states h [B, T, H] and tokens [B, T]: (g, norm(g))."""
        if self.graphs is not None:
            return self.graphs.step(h.shape[0], h, tokens)
        return self._block(run, self._input(run, h, tokens))

    def propose(self, run: Run, room: np.ndarray) -> Draft:
        B, model, params = len(run.seq), run.model, self.params
        n = self.pending[:B]
        # Under graphs every catch-up takes k + 1 pairs (one graph a bucket); the pairs past a
        # row's own are rewound with the rest.
        T = self.k + 1 if self.graphs is not None else int(n.max())
        # Catch up on the verified pairs; the last one's state is depth 1.
        g, out = self._step(run, self.h[:B, :T], self.tok[:B, :T])
        last = (torch.arange(B, device=g.device), to_device(n - 1, g.device))
        g, out = g[last], out[last]  # [B, H]
        self.cache.rewind(T - n)
        self.pending[:B] = 0
        depth = int(room.max()) if len(room) else 0
        tokens = torch.zeros(B, self.k, dtype=torch.long, device=run.device)
        probs = None
        if params.temperature > 0 and depth:
            vocab = model.args.vocab_size
            probs = torch.zeros(B, self.k, vocab, dtype=torch.float32, device=run.device)
        for i in range(depth):
            # [B, V], or [B, N] over the sub-vocabulary `ids`.
            logits = model.logits(out) if self.head is None else linear(out, self.head, None)
            u = None
            if probs is not None:  # `draw`'s uniforms
                u = torch.rand(B, generator=run.gen, dtype=torch.float64, device=run.device)
            tokens[:, i] = _draft_depth(logits, params, u, self.ids, probs, i)
            if i + 1 < depth:
                g, out = self._step(run, g[:, None], tokens[:, i : i + 1])
                g, out = g[:, 0], out[:, 0]
        if depth > 1:
            self.cache.rewind(np.full(B, depth - 1))
        return Draft(tokens, room.astype(np.int64), probs)

    def observed(
        self,
        run: Run,
        hidden: torch.Tensor,
        emitted: torch.Tensor,
        num: np.ndarray,
        emitted_host: np.ndarray | None = None,
    ) -> None:
        T = hidden.shape[1]
        self.h[: len(num), :T] = hidden
        self.tok[: len(num), :T] = emitted
        self.pending[: len(num)] = num
        if self.counts is not None:
            valid = torch.arange(T, device=emitted.device) < to_device(num, emitted.device)[:, None]
            # Every position added, weighted 1 or 0: no boolean-mask indexing (a host wait).
            self.counts.index_add_(0, emitted.reshape(-1), valid.reshape(-1).to(self.counts.dtype))

    def moved(self, src: list[int], dst: list[int]) -> None:
        if not src:
            return
        self.cache.move(src, dst)
        s, d = to_device(src, self.h.device), to_device(dst, self.h.device)
        self.h[d], self.tok[d] = self.h[s], self.tok[s]
        self.pending[dst] = self.pending[src]

    def finished(self, seqs: list[int]) -> None:
        pass

    def on_device(self) -> DeviceMTP:
        """The same drafts from device state (`steps.SyncFreeSpecStep`)."""
        return DeviceMTP(self, self.run)


class SAMDrafter:
    def __init__(self, run: Run, cfg: DraftSettings):
        self.k, self.min_match = cfg.num_draft_tokens, cfg.sam_min_match
        self.static, self.latest = cfg.static, cfg.sam_latest
        # By sequence id (compaction never moves them): the C matchers where they build and no
        # static automaton is asked for, else Python's.
        self.matchers: sam_matchers.Matchers | TextMatchers = (
            sam_matchers.Matchers(self.latest)
            if cfg.static is None and sam_matchers.available()
            else TextMatchers(cfg.static, self.latest)
        )

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        firsts = run.last[first : first + len(seqs)].tolist()
        for s, t in zip(seqs, firsts, strict=True):
            self.matchers.add(s, [*run.prompts[s // run.n], t])

    def propose(self, run: Run, room: np.ndarray) -> Draft:
        tokens, num = self.matchers.draft(run.seq, room, self.min_match, self.k)
        return Draft(to_device(tokens, run.device), num, None)

    def observed(
        self,
        run: Run,
        hidden: torch.Tensor,
        emitted: torch.Tensor,
        num: np.ndarray,
        emitted_host: np.ndarray | None = None,
    ) -> None:
        host = emitted.cpu().numpy() if emitted_host is None else emitted_host
        self.matchers.extend(run.seq, host, num)

    def moved(self, src: list[int], dst: list[int]) -> None:
        pass

    def finished(self, seqs: list[int]) -> None:
        self.matchers.remove(seqs)

    def on_device(self) -> DeviceSAM | None:
        """The same drafts from device state (`steps.SyncFreeSpecStep`); None with a static
        automaton, which has no device form."""
        if self.static is not None:
            return None
        return DeviceSAM(self.k, self.min_match, self.latest)


class DeviceDrafter(Protocol):
    """A drafter whose state lives on the device and whose drafting is capturable: it drafts
    and learns inside a verify step that never syncs (`steps.SyncFreeSpecStep`). Its state
    tensors live in `state`, kept with the cache's decode graphs, so that the steps captured
    over them serve every `generate` call."""

    # What the captured steps depend on besides the sampling setting.
    key: tuple[Any, ...]
    # The draft chains `propose_chains` makes (`SpeculativeConfig.chain_kinds`' names).
    chain_kinds: tuple[str, ...]

    def bind(self, state: dict[str, Any], slots: int, length: int, device: torch.device) -> None:
        """Use (allocating on first use) the state tensors in `state` for `slots` rows of
        texts up to `length` tokens."""
        ...

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None: ...

    def before_step(self, run: Run, rows: int, k: int) -> None:
        """On the host before each step's replay of a k-token draft (e.g. its uniforms drawn
        from the run's generator into a fixed buffer)."""
        ...

    def propose(
        self, rows: int, room: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Drafts [rows, k] (k <= the drafter's own, the step's draft length: each graph has
        its k), their counts [rows] <= room [rows] of slots 0..rows-1 and the distributions
        q [rows, k, V] they were sampled from (None: deterministic drafts) (capturable: no
        host reads)."""
        ...

    def propose_chains(
        self, rows: int, room: torch.Tensor, k: int, kinds: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic draft chains of these kinds (of `chain_kinds`), in that order, verified
        together (`steps.SyncFreeSpecStep`): tokens [rows, C, k] and counts [rows, C], each
        <= room (capturable)."""
        ...

    def extend(
        self, rows: int, tokens: torch.Tensor, num: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        """Slots 0..rows-1 emitted tokens[b, :num[b]] (capturable); hidden [rows, T, H]: the
        policy's states at the fed positions, tokens[b, t] the token after position t."""
        ...

    def moved(self, src: list[int], dst: list[int]) -> None: ...

    def mutated(self) -> list[torch.Tensor]:
        """The state tensors a step changes other than at scratch places (a capture's warm-up
        run restores them)."""
        ...


class DeviceSAM:
    """`sam` on the device (`rlkit.kernels.sam_device`): the same drafts as `SAMDrafter`'s
    automata, from a per-slot match-length state that each emitted token updates
    elementwise. Made by `SAMDrafter.on_device` where there is no static automaton."""

    # The match's chosen occurrence, and the other one.
    chain_kinds: tuple[str, ...] = ("sam", "sam_other")

    def __init__(self, k: int, min_match: int, latest: bool = False):
        self.k, self.min_match, self.latest = k, min_match, latest
        self.key = ("sam", k, min_match, latest)

    def bind(self, state: dict[str, Any], slots: int, length: int, device: torch.device) -> None:
        if "sam_hist" not in state or state["sam_hist"].shape[1] < length:
            dev = device
            state["sam_hist"] = torch.zeros(slots, length, dtype=torch.long, device=dev)
            state["sam_M"] = torch.zeros(slots, length, dtype=torch.int32, device=dev)
            state["sam_hlen"] = torch.zeros(slots, dtype=torch.long, device=dev)
        self.hist, self.M, self.hlen = state["sam_hist"], state["sam_M"], state["sam_hlen"]

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        m, dev = len(seqs), self.hist.device
        rows = slice(first, first + m)
        texts = [run.prompts[s // run.n] for s in seqs]
        lens = np.array([len(t) for t in texts], dtype=np.int64)
        host = np.zeros((m, int(lens.max()) + 1), dtype=np.int64)
        for i, t in enumerate(texts):
            host[i, : len(t)] = t
        tokens = to_device(host, dev)
        at = to_device(lens, dev)
        tokens[torch.arange(m, device=dev), at] = run.last[rows]  # the first sampled token
        self.M[rows] = 0
        self.hlen[rows] = 0
        sam_device.extend(self.hist[rows], self.M[rows], self.hlen[rows], tokens, at + 1)

    def before_step(self, run: Run, rows: int, k: int) -> None:
        pass

    def propose(
        self, rows: int, room: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        tokens, num = sam_device.draft(
            self.hist[:rows], self.M[:rows], self.hlen[:rows], room, self.min_match, k,
            self.latest,
        )  # fmt: skip
        return tokens, num, None

    def propose_chains(
        self, rows: int, room: torch.Tensor, k: int, kinds: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hist, M, hlen = self.hist[:rows], self.M[:rows], self.hlen[:rows]
        out = [
            sam_device.draft(hist, M, hlen, room, self.min_match, k, self.latest == (kind == "sam"))
            for kind in _kinds(self, kinds)
        ]
        return torch.stack([t for t, _ in out], 1), torch.stack([n for _, n in out], 1)

    def extend(
        self, rows: int, tokens: torch.Tensor, num: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        sam_device.extend(self.hist[:rows], self.M[:rows], self.hlen[:rows], tokens, num)

    def moved(self, src: list[int], dst: list[int]) -> None:
        if src:
            s, d = to_device(src, self.hist.device), to_device(dst, self.hist.device)
            for t in (self.hist, self.M, self.hlen):
                t[d] = t[s]

    def mutated(self) -> list[torch.Tensor]:
        return [self.M, self.hlen]


class DeviceMTP:
    """`mtp` on the device (`steps.SyncFreeSpecStep`): `MTPDrafter`'s drafts with its state in
    fixed tensors, every step captured with the verify step. Per slot the pairs (policy state,
    next token) verified since the last step (`extend` writes them inside the step) and the
    block's one-layer cache, whose lengths live on the device (`KVCache.begin_decode_device`).
    A step catches up over K + 1 pairs (K the longest draft, `num_draft_tokens` or the
    tail's; those past a row's own rewound), then runs the step's k depths (a head, a draw,
    the block; a graph per k: a tail's longer draft costs nothing before the tail) whatever
    the rows' room, and rewinds the depths' entries. Sampled drafts take uniforms drawn on
    the host before the replay (`before_step`), so a seed gives other samples than
    `MTPDrafter`'s, from the same q; with `mtp_draft: argmax` the drafts are the argmax
    and there is no q.
    With `mtp_vocab` the head covers the call's sub-vocabulary (the host drafter's `ids`),
    copied into a fixed buffer each call; the token counts grow inside the step."""

    chain_kinds: tuple[str, ...] = ("mtp", "mtp_runner_up")  # argmax; from depth 1's runner-up

    def __init__(self, host: MTPDrafter, run: Run):
        self.mtp, self.model, self.k = host.mtp, run.model, host.k
        self.params = host.params
        self.ids, self.counts = host.ids, host.counts
        self.n_vocab = 0 if host.ids is None else len(host.ids)
        # The drafts' temperature: 0 for argmax drafts (a step with no q) at any run's.
        self.key = ("mtp", self.k, self.n_vocab, self.counts is not None, self.params.temperature)

    def bind(self, state: dict[str, Any], slots: int, length: int, device: torch.device) -> None:
        a, k, dtype = self.model.args, self.k, self.model.lm_head.weight.dtype
        if "mtp_h" not in state:
            state["mtp_h"] = torch.zeros(slots, k + 1, a.hidden_size, dtype=dtype, device=device)
            state["mtp_tok"] = torch.zeros(slots, k + 1, dtype=torch.long, device=device)
            state["mtp_n"] = torch.zeros(slots, dtype=torch.long, device=device)
            state["mtp_u"] = torch.zeros(slots, k, dtype=torch.float64, device=device)
            # A step writes up to 2k entries past a row's length: the catch-up's k + 1, kept
            # n <= k + 1 of them, then k - 1 depths.
            state["mtp_cache"] = KVCache(
                1, slots, length, a.num_kv_heads, a.head_dim, dtype, device, False,
                lookahead=2 * k,
            )  # fmt: skip
            state["mtp_cache"].lengths_to_device(slots)
            if self.n_vocab:
                state["mtp_ids"] = torch.zeros(self.n_vocab, dtype=torch.long, device=device)
                state["mtp_head"] = torch.zeros(
                    self.n_vocab, a.hidden_size, dtype=dtype, device=device
                )
        self.h, self.tok, self.n = state["mtp_h"], state["mtp_tok"], state["mtp_n"]
        self.u, self.cache = state["mtp_u"], state["mtp_cache"]
        self.n.zero_()
        if self.n_vocab:
            assert self.ids is not None
            state["mtp_ids"].copy_(self.ids)
            state["mtp_head"].copy_(self.model.lm_head.weight.detach()[self.ids])
            self.head, self.sub = state["mtp_head"], state["mtp_ids"]
        else:
            self.head, self.sub = self.model.lm_head.weight, None

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        m = len(seqs)
        rows = slice(first, first + m)
        self.h[rows, 0] = hidden
        self.tok[rows, 0] = run.last[rows]
        self.n[rows] = 1
        # The block's first entry: the last prompt position.
        start = np.array([len(run.prompts[s // run.n]) - 1 for s in seqs], dtype=np.int64)
        self.cache.reset_slots(range(first, first + m), start)
        self.cache.lengths_to_device(first + m, first)

    def before_step(self, run: Run, rows: int, k: int) -> None:
        if self.params.temperature > 0:
            torch.rand(rows, k, generator=run.gen, dtype=torch.float64, out=self.u[:rows, :k])

    def _block(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        positions = self.cache.begin_decode_device(active, x.shape[1])
        return self.mtp.run_block(x, positions, self.model, self.cache)

    def propose(
        self, rows: int, room: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        tokens, probs = self._draft(rows, k, runner_up=False)
        return tokens[:, 0], room.clamp(min=0, max=k), probs

    def propose_chains(
        self, rows: int, room: torch.Tensor, k: int, kinds: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.params.temperature > 0:
            raise ValueError("several draft chains need argmax MTP drafts (mtp_draft: argmax)")
        kinds = _kinds(self, kinds)
        tokens, _ = self._draft(rows, k, runner_up="mtp_runner_up" in kinds)
        # Slices, not a list index: indexing by a host list copies it to the device, which a
        # CUDA-graph capture refuses.
        last = tokens.shape[1] - 1
        chains = [tokens[:, :1] if kind == "mtp" else tokens[:, last:] for kind in kinds]
        num = room.clamp(min=0, max=k)[:, None].expand(rows, len(kinds))
        return torch.cat(chains, 1), num

    def _draft(
        self, rows: int, k: int, runner_up: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [rows, 1 or 2, k]: the module's chain and, with runner_up, the chain that
        starts from depth 1's second most likely token (argmax after it); their q."""
        model, mtp, dev = self.model, self.mtp, self.h.device
        n = self.n[:rows]
        active = n > 0
        # Catch up on the verified pairs; the last one's state is depth 1.
        g = self._block(mtp.step_input(self.h[:rows], self.tok[:rows], model), active)
        g = g[torch.arange(rows, device=dev), (n - 1).clamp(min=0)]  # [rows, H]
        self.cache.advance_device(n)
        one = active.long()
        tokens = torch.zeros(rows, 1 + runner_up, k, dtype=torch.long, device=dev)
        probs = None
        if self.params.temperature > 0:
            vocab = model.args.vocab_size
            probs = torch.zeros(rows, k, vocab, dtype=torch.float32, device=dev)
        g1 = g
        for c in range(1 + runner_up):
            g = g1
            for i in range(k):
                logits = F.linear(mtp.norm(g), self.head)  # [rows, V] or [rows, N]
                if c == 1 and i == 0:
                    second = logits.topk(2, dim=-1).indices[:, 1]
                    tokens[:, c, i] = second if self.sub is None else self.sub[second]
                else:
                    u = None if probs is None else self.u[:rows, i]
                    tokens[:, c, i] = _draft_depth(logits, self.params, u, self.sub, probs, i)
                if i + 1 < k:
                    x = mtp.step_input(g[:, None], tokens[:, c, i : i + 1], model)
                    g = self._block(x, active)[:, 0]
                    self.cache.advance_device(one)
            # The depths' entries go: a second chain writes the same ones. (k = 0: the
            # catch-up alone, nothing to rewind.)
            self.cache.advance_device(-max(k - 1, 0) * one)
        return tokens, probs

    def extend(
        self, rows: int, tokens: torch.Tensor, num: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        T = tokens.shape[1]
        self.h[:rows, :T] = hidden
        self.tok[:rows, :T] = tokens
        self.n[:rows] = num
        if self.counts is not None:
            valid = torch.arange(T, device=tokens.device) < num[:, None]
            self.counts.index_add_(0, tokens.reshape(-1), valid.reshape(-1).to(self.counts.dtype))

    def moved(self, src: list[int], dst: list[int]) -> None:
        if src:
            self.cache.move_device(src, dst)
            s, d = to_device(src, self.h.device), to_device(dst, self.h.device)
            for t in (self.h, self.tok, self.n):
                t[d] = t[s]

    def mutated(self) -> list[torch.Tensor]:
        out = [self.h, self.tok, self.n, self.cache.lengths_on_device(self.cache.num_slots)]
        return out + ([self.counts] if self.counts is not None else [])


class DeviceSAMThenMTP:
    """`sam+mtp` on the device: SAM's draft where its match reaches the threshold, else the MTP
    module's (`SAMThenMTP`), both computed every step."""

    chain_kinds: tuple[str, ...] = ("sam", "mtp", "mtp_runner_up", "sam_other")

    def __init__(self, sam: DeviceSAM, mtp: DeviceMTP):
        self.sam, self.mtp = sam, mtp
        self.key = ("sam+mtp", *sam.key, *mtp.key)

    def bind(self, state: dict[str, Any], slots: int, length: int, device: torch.device) -> None:
        self.sam.bind(state, slots, length, device)
        self.mtp.bind(state, slots, length, device)

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        self.sam.admitted(run, first, seqs, hidden)
        self.mtp.admitted(run, first, seqs, hidden)

    def before_step(self, run: Run, rows: int, k: int) -> None:
        self.mtp.before_step(run, rows, k)

    def propose(
        self, rows: int, room: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        by_sam, n_sam, _ = self.sam.propose(rows, room, k)
        use = n_sam > 0
        by_mtp, n_mtp, q = self.mtp.propose(rows, torch.where(use, 0, room), k)
        tokens, q = _sam_where(use, by_sam, by_mtp, q)
        return tokens, torch.where(use, n_sam, n_mtp), q

    def propose_chains(
        self, rows: int, room: torch.Tensor, k: int, kinds: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's and MTP's chains of these kinds, in their order (the default order, SAM's,
        MTP's, MTP's runner-up, SAM's other occurrence, is the offline replay's ranking,
        `benchmarks/mtp_offline.py`)."""
        kinds = _kinds(self, kinds)
        made: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for part in (self.sam, self.mtp):
            mine = tuple(kind for kind in kinds if kind in part.chain_kinds)
            if mine:
                tokens, num = part.propose_chains(rows, room, k, mine)
                for i, kind in enumerate(mine):
                    made[kind] = tokens[:, i], num[:, i]
        tokens = torch.stack([made[kind][0] for kind in kinds], 1)
        return tokens, torch.stack([made[kind][1] for kind in kinds], 1)

    def extend(
        self, rows: int, tokens: torch.Tensor, num: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        self.sam.extend(rows, tokens, num, hidden)
        self.mtp.extend(rows, tokens, num, hidden)

    def moved(self, src: list[int], dst: list[int]) -> None:
        self.sam.moved(src, dst)
        self.mtp.moved(src, dst)

    def mutated(self) -> list[torch.Tensor]:
        return self.sam.mutated() + self.mtp.mutated()


def _kinds(drafter: DeviceDrafter, kinds: tuple[str, ...]) -> tuple[str, ...]:
    """kinds, checked against those the drafter makes."""
    other = [kind for kind in kinds if kind not in drafter.chain_kinds]
    if other or not kinds:
        raise ValueError(
            f"{type(drafter).__name__} makes draft chains {drafter.chain_kinds}, asked for {kinds}"
        )
    return kinds


def _sam_where(
    use: torch.Tensor, by_sam: torch.Tensor, by_mtp: torch.Tensor, q: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sam+mtp`'s drafts [B, k]: SAM's in rows `use` [B] (bool), MTP's elsewhere; and their
    q [B, k, V] (None: greedy), one-hot on SAM's deterministic drafts."""
    tokens = torch.where(use[:, None], by_sam, by_mtp)
    if q is not None:
        onehot = torch.zeros_like(q).scatter_(-1, by_sam[:, :, None], 1.0)
        q = torch.where(use[:, None, None], onehot, q)
    return tokens, q


class SAMThenMTP:
    """SAM's draft where it has one (its match reached the threshold), else MTP's. The MTP
    module catches up on every row each step, so it can take over at any step."""

    def __init__(self, run: Run, cfg: DraftSettings):
        self.sam, self.mtp = SAMDrafter(run, cfg), MTPDrafter(run, cfg)

    def admitted(self, run: Run, first: int, seqs: list[int], hidden: torch.Tensor) -> None:
        self.sam.admitted(run, first, seqs, hidden)
        self.mtp.admitted(run, first, seqs, hidden)

    def propose(self, run: Run, room: np.ndarray) -> Draft:
        by_sam = self.sam.propose(run, room)
        use_sam = by_sam.num > 0
        by_mtp = self.mtp.propose(run, np.where(use_sam, 0, room))
        pick = to_device(use_sam, run.device).bool()
        # With no SAM row, MTP's q as it is (no one-hot pass over [B, k, V]).
        probs = by_mtp.probs if use_sam.any() else None
        tokens, q = _sam_where(pick, by_sam.tokens, by_mtp.tokens, probs)
        return Draft(
            tokens, np.where(use_sam, by_sam.num, by_mtp.num), by_mtp.probs if q is None else q
        )

    def observed(
        self,
        run: Run,
        hidden: torch.Tensor,
        emitted: torch.Tensor,
        num: np.ndarray,
        emitted_host: np.ndarray | None = None,
    ) -> None:
        self.sam.observed(run, hidden, emitted, num, emitted_host)
        self.mtp.observed(run, hidden, emitted, num, emitted_host)

    def moved(self, src: list[int], dst: list[int]) -> None:
        self.mtp.moved(src, dst)

    def finished(self, seqs: list[int]) -> None:
        self.sam.finished(seqs)

    def on_device(self) -> DeviceSAMThenMTP | None:
        sam, mtp = self.sam.on_device(), self.mtp.on_device()
        return None if sam is None or mtp is None else DeviceSAMThenMTP(sam, mtp)


DRAFTERS.register("mtp")(MTPDrafter)
DRAFTERS.register("sam")(SAMDrafter)
DRAFTERS.register("sam+mtp")(SAMThenMTP)
