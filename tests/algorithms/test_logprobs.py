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
    # the backward without the entropy term (its own in-place branch)
    coef = torch.randn(37, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((logp * coef).sum(), (hidden, weight))
    ref_logp = reference(hidden, weight, targets, temperature=0.7)[0]
    ref_grads = torch.autograd.grad((ref_logp * coef).sum(), (hidden, weight))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradient_with_temperature_and_bf16_rows(temperature):
    hidden, weight, targets = inputs(dtype=torch.bfloat16)
    logp, ent = token_logprobs(
        hidden, weight, targets, chunk_size=8, with_entropy=True, temperature=temperature
    )
    ref_logp, ref_ent = reference(hidden, weight, targets, temperature)
    coef = torch.randn(37, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((logp * coef).sum() - 0.3 * ent.sum(), (hidden, weight))
    ref = torch.autograd.grad((ref_logp * coef).sum() - 0.3 * ref_ent.sum(), (hidden, weight))
    for got, want in zip(grads, ref, strict=True):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want)


def test_backward_holds_one_chunk_of_logits_at_a_time():
    """The live bytes of tensors made during backward stay near one chunk's [C, V] logits
    (a few of them), not the whole batch's."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key and key not in self.seen:
                        self.seen.add(key)
                        self.live += st.nbytes()
                        self.peak = max(self.peak, self.live)
                        weakref.finalize(st, self._free, key, st.nbytes())
            return out

        def _free(self, key, n):
            self.seen.discard(key)
            self.live -= n

    m, h, v, chunk = 512, 16, 4000, 32
    hidden, weight, targets = inputs(m=m, h=h, v=v)
    logp, ent = token_logprobs(hidden, weight, targets, chunk_size=chunk, with_entropy=True)
    loss = logp.sum() + ent.sum()
    with LiveBytes() as mode:
        loss.backward()
    chunk_logits = chunk * v * 4
    # gradients of hidden and weight (float32) plus a handful of chunk-sized temporaries
    grads = (m * h + v * h) * 4
    assert mode.peak < grads + 8 * chunk_logits
    assert mode.peak < m * v * 4 / 2  # far below the batch's logits
