import pickle
import textwrap

import pytest

from rlkit.config import (
    ConfigError,
    RecipeConfig,
    StageConfig,
    apply_overrides,
    config_error,
    dump_recipe,
    load_recipe,
    save_resolved,
    sources_of,
)


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_no_file_gives_the_schema_defaults():
    assert load_recipe(None) == RecipeConfig()


def test_yaml_then_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        train:
          steps: 3
        optim:
          lr: 3e-6
        data:
          task_args: {digits: 2, ops: [+]}
        """,
    )
    cfg = load_recipe(
        path,
        ["train.steps=5", 'rollout.stop=["\\n\\n"]', "data.task_args.digits=3", "run.name=foo"],
    )
    assert cfg.train.steps == 5
    # YAML 1.1 would read 3e-6 as a string; the loader reads it as a float.
    assert cfg.optim.lr == 3e-6
    assert cfg.rollout.stop == ["\n\n"]
    assert cfg.data.task_args == {"digits": 3, "ops": ["+"]}
    assert cfg.run.name == "foo"
    assert cfg.train.prompts_per_step == RecipeConfig().train.prompts_per_step


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = load_recipe(None, ["optim.grad_clip=2", "algorithm.tis_cap=null", "ray.num_cpus=4"])
    assert cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.algorithm.tis_cap is None
    assert cfg.ray.num_cpus == 4


def test_unknown_key_names_file_line_valid_keys_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n  stpes: 4\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3: train.stpes: unknown key")
    assert "prompts_per_step" in message
    assert "did you mean 'steps'" in message


def test_unknown_section(tmp_path):
    path = write(tmp_path, "model:\n  path: x\ntrian:\n  steps: 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3: trian: unknown key")
    assert "did you mean 'train'" in message


def test_wrong_type_names_expected_and_got(tmp_path):
    path = write(tmp_path, "rollout:\n  n: 8\n  max_new_tokens: lots\n")
    message = error_of(path)
    assert message == f"{path}:3: rollout.max_new_tokens: expected an integer, got string 'lots'"


def test_yes_is_not_a_boolean(tmp_path):
    path = write(tmp_path, "run:\n  resume: yes\n")
    message = error_of(path)
    assert f"{path}:2: run.resume: expected true or false, got string 'yes'" in message
    (tmp_path / "runs" / "run").mkdir(parents=True)
    cfg = load_recipe(None, ["run.resume=true", f"run.dir={tmp_path / 'runs'}"])
    assert cfg.run.resume is True


def test_bool_is_not_an_integer():
    assert "expected an integer, got boolean true" in error_of(None, ["train.steps=true"])


def test_literal_lists_choices(tmp_path):
    path = write(tmp_path, "algorithm:\n  loss_agg: token_mean\n")
    message = error_of(path)
    assert message.startswith(f"{path}:2: algorithm.loss_agg: must be one of 'token-mean'")
    assert "'seq-mean-token-sum-norm'" in message
    assert "did you mean 'token-mean'" in message


def test_list_item_type_is_located_at_the_item(tmp_path):
    path = write(tmp_path, "rollout:\n  stop:\n    - '###'\n    - 12\n")
    assert error_of(path).startswith(
        f"{path}:4: rollout.stop[1]: expected a string, got integer 12"
    )


def test_invalid_yaml_gives_the_parser_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n  seed: [1,\nrun:\n  name: x\n")
    message = error_of(path)
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message
    line = int(message[len(path) + 1 :].split(":")[0])
    assert 3 <= line <= 5


def test_duplicate_key_is_an_error(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n  steps: 4\n")
    assert error_of(path) == f"{path}:3: train.steps: set twice (first on line 2)"


def test_recipe_must_be_a_mapping(tmp_path):
    assert "a recipe is a mapping of sections" in error_of(write(tmp_path, "- a\n- b\n"))


def test_missing_file():
    assert "cannot read the recipe" in error_of("/nonexistent/recipe.yaml")


@pytest.mark.parametrize(
    "text, key, problem",
    [
        ("train:\n  steps: 0\n", "train.steps", "must be positive, got 0"),
        ("rollout:\n  n: -2\n", "rollout.n", "must be positive, got -2"),
        ("rollout:\n  top_p: 1.5\n", "rollout.top_p", "must be in (0, 1], got 1.5"),
        ("rollout:\n  temperature: -0.1\n", "rollout.temperature", "must be >= 0"),
        ("optim:\n  lr: 0\n", "optim.lr", "must be in (0, 1], got 0.0"),
        ("algorithm:\n  eps_high: -0.1\n", "algorithm.eps_high", "must be >= 0"),
        ("optim:\n  betas: [0.9]\n", "optim.betas", "must be two numbers in [0, 1)"),
        ("data:\n  task: null\n", "data.task", "data.train_files is empty"),
        ("rollout:\n  stop: ['']\n", "rollout.stop", "empty stop string"),
    ],
)
def test_value_checks_name_key_file_and_line(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}:2: {key}: ")
    assert problem in message


def test_override_errors_name_the_override():
    assert error_of(None, ["train.steps=abc"]) == (
        "command-line override 'train.steps=abc': train.steps: expected an integer, got string 'abc'"
    )
    message = error_of(None, ["trian.steps=5"])
    assert message.startswith("command-line override 'trian.steps=5': trian: unknown key")
    assert "expected key=value" in error_of(None, ["train.steps"])
    assert "cannot be set inside it" in error_of(None, ["train.steps.x=1"])
    assert "must be positive" in error_of(None, ["train.steps=0"])


def test_override_replaces_a_file_value_and_its_location(tmp_path):
    path = write(tmp_path, "train:\n  steps: 3\n")
    cfg = load_recipe(path, ["train.steps=7"])
    assert cfg.train.steps == 7
    assert sources_of(cfg)["train.steps"] == "command-line override 'train.steps=7'"
    assert sources_of(cfg)["train"] == f"{path}:1"


def test_stages_accept_strings_and_mappings(tmp_path):
    path = write(
        tmp_path,
        """
        stages:
          - sft
          - type: rlvr
            name: generate
            overrides: {train.steps: 20}
        """,
    )
    cfg = load_recipe(path)
    assert cfg.stages == [
        StageConfig(type="sft"),
        StageConfig(type="rlvr", name="generate", overrides={"train.steps": 20}),
    ]
    assert load_recipe(path, ["stages[0].type=rlvr"]).stages[0].type == "rlvr"
    assert load_recipe(None, ["stages=[sft, rlvr]"]).stages == [StageConfig("sft"), StageConfig()]
    message = error_of(write(tmp_path, "stages:\n  - rl\n", "bad.yaml"))
    assert "bad.yaml:2: stages[0].type: must be one of 'sft', 'rlvr'" in message


def test_stage_overrides_apply_and_are_checked_at_load(tmp_path):
    path = write(
        tmp_path,
        """
        train:
          steps: 100
        stages:
          - sft
          - type: rlvr
            overrides:
              train.steps: 20
              algorithm:
                sparse: {rho_high: 2.0}
        """,
    )
    cfg = load_recipe(path)
    staged = apply_overrides(cfg, cfg.stages[1].overrides, "stages[1].overrides")
    assert (staged.train.steps, staged.algorithm.sparse.rho_high) == (20, 2.0)
    assert cfg.train.steps == 100
    message = str(config_error(staged, "train.steps", "too many"))
    assert message == f"{path}:7 (stages[1].overrides): train.steps: too many"

    bad = write(
        tmp_path,
        "stages:\n  - sft\n  - type: rlvr\n    overrides:\n      train.stepz: 2\n",
        "b.yaml",
    )
    message = error_of(bad)
    assert message.startswith(f"{bad}:5 (stages[1].overrides): train.stepz: unknown key")
    nested = write(
        tmp_path, "stages:\n  - type: rlvr\n    overrides:\n      stages: [sft]\n", "c.yaml"
    )
    assert "cannot change the stage list" in error_of(nested)


def test_config_error_locates_keys_set_after_loading(tmp_path):
    path = write(tmp_path, "run:\n  name: x\nalgorithm:\n  advantage: rloo\n")
    cfg = load_recipe(path)
    error = config_error(cfg, "algorithm.advantage", "found wanting later")
    assert isinstance(error, ValueError)
    assert str(error) == f"{path}:4: algorithm.advantage: found wanting later"
    assert str(config_error(cfg, "train.steps", "x")) == f"{path} (default): train.steps: x"
    # Ray pickles configs and errors across processes.
    assert sources_of(pickle.loads(pickle.dumps(cfg))) == sources_of(cfg)
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_recipe(
        None,
        [
            'rollout.stop=["\\n\\n", "yes", "1e5"]',
            "optim.lr=3e-6",
            "run.name='2024-01-01'",
            "data.task_args={digits: 3, ops: ['+', '-']}",
            "run.wandb_project='on'",
            "stages=[sft, {type: rlvr, name: gen, overrides: {train.steps: 2}}]",
        ],
    )
    path = write(tmp_path, dump_recipe(cfg), "dumped.yaml")
    assert load_recipe(path) == cfg
    saved = save_resolved(cfg, str(tmp_path / "run"))
    assert saved == str(tmp_path / "run" / "config.yaml")
    assert load_recipe(saved) == cfg


def test_a_stage_override_set_twice_in_two_forms_is_refused():
    """{train: {steps: 3}} and train.steps: 4 in one stage's overrides name the same key: the
    recipe is refused at that key, not resolved by whichever form comes last."""
    with pytest.raises(ConfigError, match=r"train\.steps: set twice in stages\[0\]\.overrides"):
        load_recipe(
            None,
            ["stages=[{type: rlvr, name: a, overrides: {train: {steps: 3}, train.steps: 4}}]"],
        )
    cfg = load_recipe(None, ["stages=[{type: rlvr, name: a, overrides: {train: {steps: 3}}}]"])
    assert cfg.stages[0].overrides == {"train": {"steps": 3}}
