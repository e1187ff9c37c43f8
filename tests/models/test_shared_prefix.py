"""Shared-prefix training forward == per-sample forward, values and gradients."""

import pytest
import torch

from rlkit.models.decoder import Decoder
from rlkit.models.shared_prefix import response_hidden
from rlkit.models.tiny import tiny_args


@pytest.mark.parametrize(
    "arch,ckpt", [("llama", False), ("qwen2", False), ("qwen3", False), ("llama", True)]
)
def test_matches_per_sample_forward(arch, ckpt):
    torch.manual_seed(0)
    model = Decoder(tiny_args(arch))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    # Gradient checkpointing re-runs the suffix pass's layers in backward: same gradients.
    model.gradient_checkpointing = ckpt
    model.train()
    g = torch.Generator().manual_seed(1)
    prompts = {7: [5, 9, 11, 3], 2: [8, 1, 4, 6, 2, 10], 5: [12, 13]}
    rows = [(7, 3), (2, 1), (7, 5), (5, 4), (2, 2)]  # (group, response length); groups interleaved
    seqs = [prompts[gid] + torch.randint(0, 250, (r,), generator=g).tolist() for gid, r in rows]
    L = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (L - len(s)) for s in seqs])
    prompt_lens = torch.tensor([len(prompts[gid]) for gid, _ in rows])
    seq_lens = torch.tensor([len(s) for s in seqs])
    group_ids = torch.tensor([gid for gid, _ in rows])

    shared = response_hidden(model, ids, prompt_lens, seq_lens, group_ids)  # [N, R, H]
    loss_a = sum(shared[i, :r].pow(2).sum() for i, (_, r) in enumerate(rows))
    grads_a = torch.autograd.grad(loss_a, list(model.parameters()))

    loss_b = 0.0
    for i, (_, r) in enumerate(rows):
        h = model(ids[i : i + 1, : seq_lens[i]])[0]  # [len, H]
        p = int(prompt_lens[i])
        ref = h[p - 1 : p - 1 + r]  # states predicting the response tokens
        torch.testing.assert_close(shared[i, :r], ref, atol=1e-5, rtol=1e-4)
        loss_b = loss_b + ref.pow(2).sum()
    grads_b = torch.autograd.grad(loss_b, list(model.parameters()))
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_rejects_one_token_prompts():
    model = Decoder(tiny_args("llama"))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        response_hidden(model, ids, torch.tensor([1]), torch.tensor([3]), torch.tensor([0]))
