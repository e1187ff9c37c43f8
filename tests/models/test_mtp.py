"""The MTP module (`rlkit.models.mtp`): causality of its teacher-forced forward, its file beside
a checkpoint, and which runs have one."""

import os

import pytest
import torch

from rlkit.config import load_recipe
from rlkit.models.decoder import Decoder
from rlkit.models.mtp import MTP_FILE, init_mtp, load_mtp, save_mtp, wanted
from rlkit.models.tiny import tiny_args


@pytest.fixture
def trunk():
    torch.manual_seed(0)
    return Decoder(tiny_args("qwen3", tie_word_embeddings=False)).eval()


def test_forward_train_row_j_sees_nothing_after_it(trunk):
    """Depth d's row j depends on the states and tokens of rows <= j + d - 1 only (those a
    draft anchored at j has), so changing later rows leaves it unchanged."""
    mtp = init_mtp(trunk.args, seed=1)
    N, R, D = 2, 9, 3
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, R, trunk.args.hidden_size, generator=g)
    tokens = torch.randint(0, 250, (N, R), generator=g)
    start = torch.tensor([4, 11])
    with torch.no_grad():
        out = mtp.forward_train(trunk, hidden, tokens, start, D)
        assert len(out) == D and all(o.shape == hidden.shape for o in out)
        j = 4
        h2, t2 = hidden.clone(), tokens.clone()
        h2[:, j + 1 :] = torch.randn(N, R - j - 1, hidden.shape[-1], generator=g)
        t2[:, j + D :] = (t2[:, j + D :] + 7) % 250
        changed = mtp.forward_train(trunk, h2, t2, start, D)
        for d in range(D):
            torch.testing.assert_close(changed[d][:, : j + 1], out[d][:, : j + 1])
            assert not torch.allclose(changed[d][:, j + 1 :], out[d][:, j + 1 :])


def test_saved_beside_the_checkpoint_and_loaded_back(trunk, tmp_path):
    mtp = init_mtp(trunk.args, seed=3)
    path = save_mtp(mtp, str(tmp_path))
    assert os.path.basename(path) == MTP_FILE
    back = load_mtp(str(tmp_path), trunk.args)
    for k, v in mtp.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert load_mtp(str(tmp_path / "none"), trunk.args) is None
    # Same seed, same module (the learner and the rollout worker initialise it apart).
    for k, v in init_mtp(trunk.args, seed=3).state_dict().items():
        assert torch.equal(mtp.state_dict()[k], v)
    other = init_mtp(tiny_args("qwen3", hidden_size=32, head_dim=8), seed=0)
    save_mtp(other, str(tmp_path / "wrong"))
    with pytest.raises(ValueError, match=f"{MTP_FILE}: MTP weights do not match"):
        load_mtp(str(tmp_path / "wrong"), trunk.args)


@pytest.mark.parametrize(
    "overrides, has",
    [
        ([], False),
        (["rollout.speculative.drafter=sam"], False),
        (["rollout.speculative.drafter=mtp"], True),
        (["rollout.speculative.drafter=sam+mtp"], True),
        (["stages=[mtp_warmup, rlvr]"], True),
    ],
)
def test_which_runs_have_an_mtp_module(overrides, has):
    assert wanted(load_recipe(None, overrides)) == has
