import pytest
import torch

from rlkit.algorithms import token_logprobs


def reference(hidden, weight, targets, temperature=1.0):
    logits = hidden.float() @ weight.float().T / temperature  # [M, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy


def inputs(m=37, h=16, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (m,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("checkpoint", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("chunk_size", [1, 8, 37, 1024], ids=lambda c: f"C{c}")
def test_matches_log_softmax_gather_and_gradient(chunk_size, checkpoint):
    hidden, weight, targets = inputs()
    logp, ent = token_logprobs(
        hidden, weight, targets, chunk_size=chunk_size, with_entropy=True, checkpoint=checkpoint
    )
    ref_logp, ref_ent = reference(hidden, weight, targets)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(ent, ref_ent)

    # a loss that uses both outputs, so the entropy's gradient is checked too
    coef = torch.randn(37, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((logp * coef).sum() + 0.1 * ent.sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref_logp * coef).sum() + 0.1 * ref_ent.sum(), (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_temperature_and_no_entropy():
    hidden, weight, targets = inputs()
    logp, ent = token_logprobs(hidden, weight, targets, chunk_size=10, temperature=0.7)
    assert ent is None
    torch.testing.assert_close(logp, reference(hidden, weight, targets, temperature=0.7)[0])


def test_bf16_inputs_computed_in_float32():
    hidden, weight, targets = inputs(dtype=torch.bfloat16)
    logp, ent = token_logprobs(hidden, weight, targets, chunk_size=8, with_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32
    # same as float32 math on the bf16 values, far tighter than a bf16 matmul would give
    ref_logp, _ = reference(hidden.float(), weight.float(), targets)
    torch.testing.assert_close(logp, ref_logp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_logp, _ = token_logprobs(hidden.float(), weight.float(), targets, chunk_size=8)
    torch.testing.assert_close(auto_logp, ref_logp)


def test_no_grad_path_and_empty_input():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        logp, _ = token_logprobs(hidden, weight, targets, chunk_size=8)
    assert logp.grad_fn is None
    torch.testing.assert_close(logp, reference(hidden, weight, targets)[0])
    empty, ent = token_logprobs(hidden[:0], weight, targets[:0], with_entropy=True)
    assert empty.shape == ent.shape == (0,)


def saved_bytes(fn) -> int:
    """Bytes of distinct storage autograd keeps for backward while fn runs.

    Counted by storage so that the weight, saved once per chunk, counts once, as in memory.
    """
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_checkpointing_keeps_logits_out_of_autograd():
    m, h, v = 256, 16, 2000
    hidden, weight, targets = inputs(m=m, h=h, v=v)
    full_logits = m * v * 4
    kept = saved_bytes(
        lambda: token_logprobs(hidden, weight, targets, chunk_size=32, with_entropy=True)
    )
    not_kept = saved_bytes(
        lambda: token_logprobs(
            hidden, weight, targets, chunk_size=32, with_entropy=True, checkpoint=False
        )
    )
    assert not_kept > full_logits  # plain autograd keeps every chunk's [C, V] logits
    assert kept < full_logits / 10  # checkpointing keeps hidden rows, weight and targets only


def test_shape_errors():
    hidden, weight, targets = inputs()
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(hidden[None], weight, targets)
    with pytest.raises(ValueError, match="weight"):
        token_logprobs(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:3])
