import copy

import pytest
import torch

from rlkit.workers.master_weights import MasterWeights


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


@pytest.mark.parametrize("max_norm", [1e-3, 100.0])  # clipped, and not
@pytest.mark.parametrize(
    "one_at_a_time,group_numel",
    [(True, 0), (False, 1 << 30), (False, 100)],  # per parameter; one group; groups of ~100
)
def test_per_parameter_step_equals_the_all_at_once_update(max_norm, one_at_a_time, group_numel):
    a, b = _model(), _model()
    ma, mb = MasterWeights(a, torch.bfloat16), MasterWeights(b, torch.bfloat16)
    if group_numel:
        mb.group_numel = (
            group_numel  # parameters of 128, 16, 64, 4 elements: groups [128], [16, 64, 4]
        )
    opt_a = torch.optim.AdamW(ma.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(mb.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    for _ in range(3):
        for m in (a, b):
            m(x).float().pow(2).sum().backward()
        # reference: every float32 gradient at once
        ma.grads_to_master()
        norm_a = torch.nn.utils.clip_grad_norm_(ma.parameters(), max_norm)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        ma.master_to_model()
        norm_b = mb.step(opt_b, max_norm, one_at_a_time=one_at_a_time)
        assert norm_b == pytest.approx(float(norm_a), rel=1e-5)
        for p, q in zip(ma.parameters(), mb.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q) and q.grad is None
    # the optimizer state is the usual one: it round-trips through state_dict
    opt_c = torch.optim.AdamW(copy.deepcopy(mb.parameters()), lr=1e-2)
    opt_c.load_state_dict(opt_b.state_dict())
    assert opt_c.state_dict()["state"][0]["step"] == 3
