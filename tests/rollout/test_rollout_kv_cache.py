import numpy as np
import torch

from rlkit.rollout import KVCache


def _cache(model, slots=4, length=64):
    a = model.args
    return KVCache(a.num_layers, slots, length, a.num_kv_heads, a.head_dim, torch.float32)


def test_multi_token_decode_matches_full_forward(reference):
    # Draft verification shape: T = 3 new tokens per slot in one forward, slots of different
    # lengths, after a shared-row prefill.
    model = reference()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    drafts = [[5, 3, 5], [8, 9, 7]]
    cache = _cache(model)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    tokens[0], tokens[1, :3] = torch.tensor(prompts[0]), torch.tensor(prompts[1])
    with torch.no_grad():
        cache.begin_prefill(torch.tensor([0, 1]), torch.tensor([0, 1]), [5, 3])
        model.forward_cached(tokens, torch.arange(5).expand(2, 5), cache)
        positions = cache.begin_decode(2, 3)
        assert positions.tolist() == [[5, 6, 7], [3, 4, 5]]
        hidden = model.forward_cached(torch.tensor(drafts), positions, cache)
        for b in range(2):
            full = model(torch.tensor([prompts[b] + drafts[b]]))[0, -3:]
            torch.testing.assert_close(hidden[b], full, atol=1e-5, rtol=1e-5)
    assert cache.lengths[:2].tolist() == [8, 6]


def test_rewind_drops_rejected_drafts(reference):
    model = reference()
    cache = _cache(model)
    prompt, accepted = [4, 8, 15], 16
    with torch.no_grad():
        cache.begin_prefill(torch.tensor([0]), torch.tensor([0]), [3])
        model.forward_cached(torch.tensor([prompt]), torch.arange(3)[None], cache)
        cache.begin_decode(1, 3)
        model.forward_cached(torch.tensor([[accepted, 99, 98]]), torch.tensor([[3, 4, 5]]), cache)
        cache.rewind(np.array([2]))  # keep the first draft only
        positions = cache.begin_decode(1, 1)
        assert positions.tolist() == [[4]]
        hidden = model.forward_cached(torch.tensor([[23]]), positions, cache)
        full = model(torch.tensor([prompt + [accepted, 23]]))[0, -1]
    torch.testing.assert_close(hidden[0, 0], full, atol=1e-5, rtol=1e-5)


def test_prefill_row_fans_out_to_slots_and_move_compacts(reference):
    model = reference()
    cache = _cache(model)
    with torch.no_grad():
        # One prompt row written to slots 1 and 3.
        cache.begin_prefill(torch.tensor([1, 3]), torch.tensor([0, 0]), [4])
        model.forward_cached(torch.tensor([[1, 2, 3, 4]]), torch.arange(4)[None], cache)
    torch.testing.assert_close(cache.k[:, 1, :, :4], cache.k[:, 3, :, :4])
    cache.move([3], [0])
    torch.testing.assert_close(cache.k[:, 0, :, :4], cache.k[:, 1, :, :4])
    assert cache.lengths[0] == 4 and cache.positions[0] == 4
