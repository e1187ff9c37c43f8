"""Speculative sampling is lossless: the first three emitted tokens of many samples follow
the policy's joint sampling distribution (temperature, top-k, top-p), by a chi-square test.

The drafter here is the policy itself at half its temperature, an overconfident drafter whose
q overlaps p: drafts are often accepted, often rejected, and the residual max(0, p - q) matters.
Tolerance: the joint distribution over (x1, x2, x3) is enumerated exactly with the policy;
cells expected at least 5 times are kept, the rest pooled into one cell; the test fails when the
chi-square statistic's p-value is below 1e-4 (with a fixed seed the outcome is deterministic).
`test_wrong_rules_fail_the_same_test` runs the same statistic on two wrong rules (accept every
draft; resample from p instead of the residual) and requires p-values below 1e-12: the test has
the power to tell.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rlkit.kernels.spec_verify import verify_drafts_reference

import rlkit.rollout.steps as steps_module
from rlkit.config.schema import SpeculativeConfig
from rlkit.models import load_model
from rlkit.models.mtp import init_mtp
from rlkit.rollout import Engine, SamplingParams, sampling_logprobs
from rlkit.rollout.drafters import DRAFTERS, Draft
from rlkit.rollout.sampling import draw

PROMPT = [5, 17, 99, 3]
SAMPLES = 5_000
# Logits of the random tiny model times this: a distribution of a few likely tokens.
SHARPEN_MODEL = 20.0


class _HalfTemperatureDrafter:
    """Drafts from the policy at half the sampling temperature (full forwards, no cache)."""

    def __init__(self, run, cfg):
        self.k = cfg.num_draft_tokens

    def admitted(self, run, first, seqs, hidden):
        pass

    def propose(self, run, room: np.ndarray) -> Draft:
        B, k, params = len(run.seq), self.k, run.params
        counts = run.count[:B]
        texts = [PROMPT + run.out_tokens[s, : counts[b]].tolist() for b, s in enumerate(run.seq)]
        width = max(len(t) for t in texts) + k
        ids = torch.zeros(B, width, dtype=torch.long)
        for b, t in enumerate(texts):
            ids[b, : len(t)] = torch.tensor(t)
        lens = torch.tensor([len(t) for t in texts])
        rows = torch.arange(B)
        tokens = torch.zeros(B, k, dtype=torch.long)
        probs = torch.zeros(B, k, run.model.args.vocab_size)
        for i in range(int(room.max())):
            logits = run.model.logits(run.model(ids)[rows, lens + i - 1])  # [B, V]
            logq = sampling_logprobs(logits * 2.0, params)
            d = draw(logq, run.gen)
            tokens[:, i], probs[:, i] = d, logq.exp()
            ids[rows, lens + i] = d
        return Draft(tokens, room.astype(np.int64), probs)

    def observed(self, run, hidden, emitted, num, emitted_host=None):
        pass

    def moved(self, src, dst):
        pass

    def finished(self, seqs):
        pass


if "half-temperature" not in DRAFTERS:
    DRAFTERS.register("half-temperature")(_HalfTemperatureDrafter)


def _chi_square_pvalue(stat: float, df: int) -> float:
    # chi2.sf(x, df) = Q(df / 2, x / 2), the regularised upper incomplete gamma function.
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def _exact_cells(
    model, params: SamplingParams, min_count: float, prompt: list[int] = PROMPT
) -> dict[tuple, float]:
    """Probabilities of every (x1, x2, x3) expected at least min_count times."""

    def dist(prefix: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model.logits(model(torch.tensor([prefix]))[0, -1:])
        return sampling_logprobs(logits, params).exp()[0].double()

    floor = min_count / SAMPLES
    cells: dict[tuple, float] = {}
    p1 = dist(prompt)
    for x1 in (p1 >= floor).nonzero()[:, 0].tolist():
        p2 = dist(prompt + [x1]) * p1[x1]
        for x2 in (p2 >= floor).nonzero()[:, 0].tolist():
            p3 = dist(prompt + [x1, x2]) * p2[x2]
            for x3 in (p3 >= floor).nonzero()[:, 0].tolist():
                cells[(x1, x2, x3)] = float(p3[x3])
    return cells


# The sync-free path's prompt: the policy's greedy continuation of PROMPT (95, 39, ...), then
# PROMPT and its first token again, so that SAM drafts where the sample repeats the text
# (about one row-step in five drafts; ~77% of drafts accepted at T = 1).
SAM_PROMPT = [5, 17, 99, 3, 95, 39, 255, 87, 62, 111, 66, 75, 5, 17, 99, 3, 95]


def _pvalue(
    tiny_dirs,
    params: SamplingParams,
    stats: dict | None = None,
    sync_free: bool = False,
    drafter: str = "sam",
) -> float:
    """sync_free: `drafter` (sam, mtp, sam+mtp: a seeded MTP module) drafting on the device
    through `SyncFreeSpecStep` (padded steps run eagerly on a CPU), on SAM_PROMPT; else the
    half-temperature drafter on PROMPT."""
    model, tok = load_model(tiny_dirs["llama"])
    with torch.no_grad():
        model.lm_head.weight.mul_(SHARPEN_MODEL)
    prompt = SAM_PROMPT if sync_free else PROMPT
    cells = _exact_cells(model, params, min_count=5, prompt=prompt)
    if sync_free:
        spec = SpeculativeConfig(drafter=drafter, num_draft_tokens=2, sam_min_match=1)
        graphs = dict(cuda_graphs=True, cpu_kernels=False)
        if "mtp" in drafter:
            graphs["mtp"] = init_mtp(model.args, seed=0)
    else:
        spec = SpeculativeConfig(drafter="half-temperature", num_draft_tokens=2)
        graphs = {}
    engine = Engine(
        model, tok, dtype=torch.float32, max_batch_size=SAMPLES, speculative=spec, **graphs
    )
    out = engine.generate([prompt], params, n=SAMPLES)
    if sync_free:
        assert any(
            isinstance(g, steps_module._SyncFreeGraphs) for g in engine._graphs.extra.values()
        )
    if stats is not None:
        stats.update(engine.stats)
    counts: dict[tuple, int] = {}
    for c in out:
        key = tuple(c.token_ids)
        counts[key] = counts.get(key, 0) + 1
    expected = np.array([*cells.values(), 1.0 - sum(cells.values())]) * SAMPLES
    observed = np.array([counts.pop(key, 0) for key in cells] + [sum(counts.values())])
    stat = float(((observed - expected) ** 2 / expected).sum())
    return _chi_square_pvalue(stat, len(expected) - 1)


PARAMS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
]


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7-k5", "t1.3-p0.8"])
def test_emitted_tokens_follow_the_policys_distribution(tiny_dirs, params):
    sp = SamplingParams(max_new_tokens=3, seed=11, ignore_eos=True, **params)
    stats: dict = {}
    pvalue = _pvalue(tiny_dirs, sp, stats)
    assert stats["spec/accept_len_mean"] > 1.3  # drafts were accepted...
    assert stats["spec/accept_rate"] < 0.95  # ... and rejected
    assert pvalue > 1e-4


@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t0.7-k5", "t1.3-p0.8"])
def test_sync_free_sam_steps_follow_the_policys_distribution(tiny_dirs, params):
    sp = SamplingParams(max_new_tokens=3, seed=11, ignore_eos=True, **params)
    stats: dict = {}
    pvalue = _pvalue(tiny_dirs, sp, stats, sync_free=True)
    assert stats["spec/drafted_per_step"] > 0.05  # drafts were made and accepted...
    assert stats["spec/accept_rate"] > 0.05
    if params == PARAMS[0]:
        assert stats["spec/accept_rate"] < 0.95  # ... and at T = 1 rejected (0.77)
    assert pvalue > 1e-4


@pytest.mark.parametrize("drafter", ["mtp", "sam+mtp"])
@pytest.mark.parametrize("params", [PARAMS[0], PARAMS[2]], ids=["t1", "t1.3-p0.8"])
def test_sync_free_mtp_steps_follow_the_policys_distribution(tiny_dirs, params, drafter):
    """`DeviceMTP`'s sampled drafts (q over the vocabulary, its uniforms drawn before the
    step) verified inside the step: the emitted tokens follow the policy's distribution.
    (Argmax drafts are deterministic, verified as SAM's are above.)"""
    sp = SamplingParams(max_new_tokens=3, seed=11, ignore_eos=True, **params)
    stats: dict = {}
    pvalue = _pvalue(tiny_dirs, sp, stats, sync_free=True, drafter=drafter)
    assert stats["spec/drafted_per_step"] > 0.5  # every row drafts...
    assert 0.02 < stats["spec/accept_rate"] < 0.95  # ... and some drafts pass, some fail
    assert pvalue > 1e-4


def _accept_every_draft(target, drafts, num, q=None, u=None, greedy=False, log=False):
    # Every draft passes (u = 0 < p(d) for any token p allows); then the bonus token.
    u = u.clone()
    u[:, :-1] = 0.0
    return verify_drafts_reference(target, drafts, num, q, u, greedy, log)


def _resample_from_p(target, drafts, num, q=None, u=None, greedy=False, log=False):
    accepted, _ = verify_drafts_reference(target, drafts, num, q, u, greedy, log)
    # The same decisions, then the token drawn from p at the first rejection, not p - q.
    return verify_drafts_reference(target, drafts, accepted, q, u, greedy, log)


@pytest.mark.parametrize("rule", [_accept_every_draft, _resample_from_p], ids=lambda f: f.__name__)
def test_wrong_rules_fail_the_same_test(tiny_dirs, monkeypatch, rule):
    monkeypatch.setattr(steps_module, "verify_drafts", rule)
    sp = SamplingParams(max_new_tokens=3, seed=11, ignore_eos=True, **PARAMS[0])
    pvalue = _pvalue(tiny_dirs, sp)
    assert pvalue < 1e-12


def test_a_wrong_rule_fails_the_sync_free_test(tiny_dirs, monkeypatch):
    # SAM's one-hot drafts make the residual p without the draft: resampling from p differs
    # little there (p-value 1e-3 here), accepting every draft a lot.
    monkeypatch.setattr(steps_module, "verify_drafts", _accept_every_draft)
    sp = SamplingParams(max_new_tokens=3, seed=11, ignore_eos=True, **PARAMS[0])
    assert _pvalue(tiny_dirs, sp, sync_free=True) < 1e-12
