"""JudgeRLVR recipe checks that run when the recipe loads (no Ray)."""

import pytest

from rlkit.config import ConfigError, load_recipe
from rlkit.trainer.judge import build_step, evaluates
from rlkit.trainer.run import stage_specs

STAGES = ["stages=[{type: judge, overrides: {train.steps: 2}}, {type: generate}]"]


def test_judge_and_generate_stages_and_defaults():
    cfg = load_recipe(None, STAGES)
    specs = stage_specs(cfg)
    assert [(s.type, s.name, s.cfg.train.steps) for s in specs] == [
        ("judge", "judge", 2),
        ("generate", "generate", cfg.train.steps),
    ]
    assert evaluates(cfg)
    assert not evaluates(load_recipe(None))
    assert evaluates(load_recipe(None, ["judge.evaluate=true"]))
    assert cfg.judge.template is None and cfg.judge.refresh_every == 0


@pytest.mark.parametrize(
    "override, key",
    [
        ("judge.template='Judge {problem} only'", "judge.template"),
        ("judge.pairs_per_problem=0", "judge.pairs_per_problem"),
        ("judge.refresh_every=-1", "judge.refresh_every"),
        ("judge.extra_checkpoints=[/no/such/checkpoint]", "judge.extra_checkpoints[0]"),
    ],
)
def test_bad_judge_settings_fail_at_their_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, [*STAGES, override])
    assert e.value.key == key


def test_build_steps():
    assert [build_step(s, 0) for s in (1, 2, 7)] == [0, 0, 0]
    assert [build_step(s, 3) for s in (1, 3, 4, 6, 7)] == [0, 0, 3, 3, 6]
