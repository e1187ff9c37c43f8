"""Sampling parameters and the token sampler (temperature, top-k, top-p, greedy)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlkit.kernels import cpu as cpu_kernels
from rlkit.kernels import sample_rows as gpu_sampler
from rlkit.kernels import top_p as top_p_kernels


@dataclass
class SamplingParams:
    # 0 is greedy decoding.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    max_new_tokens: int = 256
    # Strings that end a completion; the stop string stays in the text.
    stop: list[str] = field(default_factory=list)
    # Token ids that end a completion like EOS does (kept in the token ids).
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # None: drawn from torch's global generator, so torch.manual_seed still reproduces a run.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


def sampling_logprobs(
    logits: torch.Tensor, params: SamplingParams, need: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probabilities [N, V] of the distribution tokens are drawn from.

    Temperature first, then top-k, then top-p (Hugging Face's order); masked tokens get -inf.
    Greedy decoding reports the temperature-1 distribution. need [N] bool: the rows the caller
    reads (None: all); the others skip top-p (`rlkit.kernels.top_p`: the nucleus search is
    most of the cost), so their values are not the distribution.
    """
    if params.temperature == 0:
        return torch.log_softmax(logits.float(), dim=-1)
    # One float32 copy, scaled in place: every pass over [N, V] counts at a 50k vocabulary.
    scaled = logits.to(torch.float32, copy=True).div_(params.temperature)  # [N, V]
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]  # [N, 1]
        scaled.masked_fill_(scaled < kth, float("-inf"))
    if params.top_p < 1:
        floor = _top_p_floor(scaled, params.top_p, need)
        scaled.masked_fill_(scaled < floor, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


# Candidates `_top_p_floor` ranks before it sorts a whole row, in tiers: a nucleus of a
# language model's next-token distribution is almost always far smaller, and a full sort of a
# 49k-token row cost ~3.8 ms on a 2-core CPU (AVX-512 BF16 EPYC) against ~0.3 for a top-1,024.
# Rows the first tier does not cover go to the next. On that CPU (2026-11-30, eleventh
# session) a top-64 of 8 such rows took 0.41 ms, a top-1,024 1.91 ms.
TOP_P_CANDIDATES = 1024
TOP_P_FIRST_TIER = 64


def _top_p_floor(
    scaled: torch.Tensor, top_p: float, need: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row of scaled logits [N, V] (-inf for masked tokens): the least logit the nucleus
    keeps, [N, 1]. The nucleus is the smallest set of most likely tokens whose mass reaches
    top_p (a token is dropped once the mass of those before it already does; the most likely
    always stays), widened to every token tied with its least likely one, so the set does not
    depend on how a sort orders ties. On a GPU: `rlkit.kernels.top_p` (a bisection over each
    row's values, no sort, no host sync). On a CPU, rows whose nucleus lies within the top
    TOP_P_CANDIDATES tokens never sort the whole row. Rows `need` leaves out get -inf."""
    if scaled.is_cuda:
        return top_p_kernels.top_p_floor(scaled, top_p, need)
    V = scaled.shape[-1]
    floor = torch.full((scaled.shape[0], 1), float("-inf"), dtype=scaled.dtype)
    # The rows wanted (a host read is free on a CPU), then those each tier leaves open.
    rows = torch.arange(scaled.shape[0]) if need is None else need.nonzero()[:, 0]
    probs = torch.softmax(scaled[rows], dim=-1)
    for k in dict.fromkeys(min(t, V) for t in (TOP_P_FIRST_TIER, TOP_P_CANDIDATES, V)):
        if not len(rows):
            break
        if k < V:
            top, idx = torch.topk(probs, k, dim=-1)  # descending
        else:
            top, idx = torch.sort(probs, dim=-1, descending=True)
        floor[rows] = top_p_kernels.floor_of_sorted(scaled[rows].gather(-1, idx), top, top_p)
        # The nucleus reaches past these candidates: the next tier.
        wide = top.sum(dim=-1) < top_p if k < V else torch.zeros(len(rows), dtype=torch.bool)
        rows, probs = rows[wide], probs[wide]
    return floor


def plain_rows(logits: torch.Tensor, params: SamplingParams) -> bool:
    """Whether `params` draw from softmax(logits / T) itself (temperature > 0, no top-k or
    top-p) over 2-D bf16 / float32 rows of unit column stride: what the one-kernel samplers
    take."""
    return (
        params.temperature > 0
        and params.top_p >= 1
        and not 0 < params.top_k < logits.shape[-1]
        and logits.dtype in (torch.bfloat16, torch.float32)
        and logits.dim() == 2
        and logits.stride(-1) == 1
    )


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens [N] and their log-probabilities [N] (float32) under the sampling distribution.

    Plain temperature sampling (no top-k / top-p) of 2-D bf16 or float32 logits takes one
    kernel without materialising [N, V] float tensors: on CPU the C kernel
    (`rlkit.kernels.cpu.sample_rows`) where it is built, on CUDA the Triton kernel
    (`rlkit.kernels.sample_rows`). Both draw the same uniform per row from `generator` as
    `draw` does and apply the same inverse-CDF rule, so a seed gives the same tokens on every
    path (up to float32 rounding at a boundary between two tokens' shares)."""
    plain = plain_rows(logits, params)
    if plain and logits.device.type == "cpu" and cpu_kernels.available(logits.dtype):
        u = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64)
        return cpu_kernels.sample_rows(logits, params.temperature, u[:, 0])
    if plain and logits.is_cuda and gpu_sampler.HAS_TRITON:
        u = torch.rand(
            logits.shape[0], 1, generator=generator, dtype=torch.float64, device=logits.device
        )
        return gpu_sampler.sample_rows_triton(logits, params.temperature, u[:, 0])
    logp = sampling_logprobs(logits, params)  # [N, V]
    tokens = logits.argmax(dim=-1) if params.temperature == 0 else draw(logp, generator)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def draw(logp: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row [N] from log-probabilities logp [N, V] by an inverse-CDF draw: one
    uniform per row (torch's per-element exponential / multinomial sampling costs ~20x more on
    CPU at a 50k vocabulary). The CDF is summed in float64 so that tail tokens keep their
    probability once most of the mass is behind them."""
    u = torch.rand(logp.shape[0], generator=generator, dtype=torch.float64, device=logp.device)
    return draw_with(logp, u)


def draw_with(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`draw` with the rows' uniforms u [N] (float64) given: capturable in a CUDA graph. On
    CUDA with Triton the draw is the plain sampler's kernel (`sample_rows`, the same rule, each
    row split over chunks) on logp at temperature 1: torch's float64 cumulative sum took 80 us
    for 16 rows of SmolLM2's 49,152 tokens on the H200, 7% of a plain decode step."""
    if logp.is_cuda and gpu_sampler.HAS_TRITON:
        return gpu_sampler.sample_rows_triton(logp, 1.0, u)[0]
    cdf = logp.exp().cumsum(dim=-1, dtype=torch.float64)  # [N, V]
    tokens = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
    return tokens.clamp_max_(cdf.shape[-1] - 1)
