"""`rlkit eval`: greedy accuracy and pass@k of a checkpoint on a task split."""

import json

import pytest

from rlkit.cli import main
from rlkit.trainer.evaluate import pass_at_k


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)


def test_eval_command_writes_json(tmp_path, tiny_model_dir, tiny_recipe, parity_verifier):
    recipe = tiny_recipe(str(tmp_path / "r.yaml"), tiny_model_dir, str(tmp_path / "runs"))
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            tiny_model_dir,
            "--recipe",
            recipe,
            f"reward.verifier={parity_verifier}",
            "--k",
            "4",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["eval/num_problems"] == 8
    assert 0.0 <= result["eval/accuracy"] <= 1.0
    # The parity verifier scores about half of random completions: pass@4 beats one sample.
    assert result["eval/pass@4"] >= result["eval/pass@1_sampled"] > 0.0
