"""The rule table: complete, true to the registries, and each kind of rule located at its key."""

import dataclasses
import textwrap
import typing

import pytest

from rlkit.config import ConfigError, load_recipe
from rlkit.config.rules import GROUP_BASELINES, LAUNCH_ONLY, RULES, launch_only
from rlkit.config.schema import AlgorithmConfig, KVCompressionConfig, RecipeConfig


def schema_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        item = (typing.get_args(tp) or [None])[0]
        if dataclasses.is_dataclass(tp):
            yield from schema_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(item):
            yield key
            yield from schema_keys(item, key + "[].")
        else:
            yield key


def error_of(overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    return info.value


def test_every_schema_key_has_exactly_one_rule():
    keys = list(schema_keys(RecipeConfig))
    assert sorted(keys) == sorted(RULES), "a schema key without a rule, or a rule without a key"


def test_launch_only_keys_are_schema_keys():
    keys = set(schema_keys(RecipeConfig))
    for fixed in LAUNCH_ONLY:
        assert fixed in keys or any(k.startswith(fixed + ".") for k in keys), fixed


def test_literal_names_are_the_registered_names():
    from rlkit.algorithms import ADVANTAGES, AGG_MODES, KL_ESTIMATORS, POLICY_LOSSES
    from rlkit.rollout.compression import POLICIES

    hints = typing.get_type_hints(AlgorithmConfig)
    assert set(typing.get_args(hints["advantage"])) == set(ADVANTAGES.names())
    assert set(typing.get_args(hints["policy_loss"])) == set(POLICY_LOSSES.names())
    assert set(typing.get_args(hints["loss_agg"])) == set(AGG_MODES)
    assert set(typing.get_args(hints["kl_estimator"])) == set(KL_ESTIMATORS)
    policies = typing.get_args(typing.get_type_hints(KVCompressionConfig)["policy"])
    assert set(policies) - {"none"} == set(POLICIES.names())


def test_group_baselines_are_the_estimators_that_zero_a_group_of_one():
    import torch

    from rlkit.algorithms import ADVANTAGES

    rewards = torch.tensor([1.0, 0.0, 1.0, 0.5])  # four groups of one sample
    groups, mask = torch.arange(4), torch.ones(4, 3)
    for name in ADVANTAGES.names():
        zero = bool((ADVANTAGES.get(name)(rewards, groups, mask) == 0).all())
        assert zero == (name in GROUP_BASELINES), name
        if zero:
            assert error_of([f"algorithm.advantage={name}", "rollout.n=1"]).key == "rollout.n"
        else:
            load_recipe(None, [f"algorithm.advantage={name}", "rollout.n=1"])


@pytest.mark.parametrize(
    "overrides, key, problem",
    [
        (["rollout.kv_compression.window=512"], "rollout.kv_compression.window", "less than"),
        (
            ["rollout.kv_compression.policy=streaming", "rollout.kv_compression.compaction=fill"],
            "rollout.kv_compression.compaction",
            "fill needs policy snapkv, rkv or h2o",
        ),
        (
            [
                "rollout.kv_compression.policy=snapkv",
                "rollout.kv_compression.window=16",
                "rollout.kv_compression.interval=8",
                "rollout.kv_compression.compaction=fill",
            ],
            "rollout.kv_compression.compaction",
            "window <= interval",
        ),
        (
            ["rollout.kv_memory_gb=2", "rollout.kv_memory_fraction=0.5"],
            "rollout.kv_memory_fraction",
            "give one",
        ),
        (
            ["rollout.engine=vllm", "rollout.kv_memory_fraction=0.5"],
            "rollout.kv_memory_fraction",
            "needs rollout.engine: native",
        ),
        (
            ["rollout.kv_compression.policy=streaming", "rollout.kv_compression.sink=505"],
            "rollout.kv_compression.sink",
            "at most budget - window (504)",
        ),
        (
            ["rollout.kv_compression.policy=h2o", "rollout.engine=vllm"],
            "rollout.kv_compression.policy",
            "needs rollout.engine: native",
        ),
        (
            ["rollout.speculative.drafter=sam", "rollout.kv_compression.policy=h2o"],
            "rollout.speculative.drafter",
            "h2o",
        ),
        (
            ["rollout.speculative.drafter=mtp", "rollout.engine=vllm"],
            "rollout.speculative.drafter",
            "needs rollout.engine: native",
        ),
        (
            ["rollout.speculative.sam_static=true", "rollout.speculative.drafter=mtp"],
            "rollout.speculative.sam_static",
            "sam or sam+mtp",
        ),
        (
            ["rollout.speculative.drafter=sam", "rollout.speculative.mtp_draft=argmax"],
            "rollout.speculative.mtp_draft",
            "needs rollout.speculative.drafter mtp or sam+mtp",
        ),
        (
            ["rollout.speculative.drafter=sam+mtp", "rollout.speculative.mtp_draft=top"],
            "rollout.speculative.mtp_draft",
            "",
        ),
        (
            ["rollout.speculative.drafter=sam", "rollout.speculative.tail_rows=4"],
            "rollout.speculative.tail_rows",
            "needs tail_draft_tokens",
        ),
        (
            [
                "rollout.speculative.drafter=sam",
                "rollout.speculative.tail_rows=4",
                "rollout.speculative.tail_draft_tokens=2",
            ],
            "rollout.speculative.tail_draft_tokens",
            ">= num_draft_tokens (3)",
        ),
        (
            ["rollout.speculative.drafter=sam", "rollout.speculative.tail_draft_tokens=8"],
            "rollout.speculative.tail_draft_tokens",
            "only with tail_rows > 0",
        ),
        (
            ["rollout.speculative.draft_chains=2"],
            "rollout.speculative.draft_chains",
            "needs rollout.speculative.drafter",
        ),
        (
            ["rollout.speculative.drafter=sam", "rollout.speculative.draft_chains=3"],
            "rollout.speculative.draft_chains",
            "more than drafter 'sam' makes of chain_kinds",
        ),
        (
            [
                "rollout.speculative.drafter=sam+mtp",
                "rollout.speculative.mtp_draft=argmax",
                "rollout.speculative.draft_chains=2",
                "rollout.speculative.chain_kinds=[sam, mtp_2nd]",
            ],
            "rollout.speculative.chain_kinds",
            "unknown ['mtp_2nd']",
        ),
        (
            ["rollout.speculative.chain_kinds=[sam]"],
            "rollout.speculative.chain_kinds",
            "needs rollout.speculative.drafter",
        ),
        (
            ["rollout.speculative.drafter=sam+mtp", "rollout.speculative.draft_chains=4"],
            "rollout.speculative.draft_chains",
            "mtp_draft argmax",
        ),
        (
            ["rollout.speculative.drafter=sam", "rollout.speculative.draft_chains=5"],
            "rollout.speculative.draft_chains",
            "[1, 4]",
        ),
        (
            ["rollout.speculative.drafter=sam", "rollout.speculative.tail_draft_chains=2"],
            "rollout.speculative.tail_draft_chains",
            "only with tail_rows > 0",
        ),
        (
            [
                "rollout.speculative.drafter=sam",
                "rollout.speculative.draft_chains=2",
                "rollout.kv_compression.policy=snapkv",
            ],
            "rollout.speculative.draft_chains",
            "needs a dense cache",
        ),
        (
            ["rollout.speculative.num_draft_tokens=0"],
            "rollout.speculative.num_draft_tokens",
            "[1, 16]",
        ),
        (["algorithm.mtp.beta=11"], "algorithm.mtp.beta", "[0, 10]"),
        (
            ["stages=[mtp_warmup, rlvr]", "rollout.engine=vllm"],
            "rollout.engine",
            "mtp_warmup stage",
        ),
        (
            ["algorithm.sparse.rho_low=1.0", "algorithm.sparse.rho_high=1.0"],
            "algorithm.sparse.rho_low",
            "less than",
        ),
        (["algorithm.sparse.weight_cap=-1"], "algorithm.sparse.weight_cap", "positive"),
        (
            ["algorithm.dynamic_sampling=true", "rollout.n=1", "algorithm.advantage=reinforce_pp"],
            "rollout.n",
            "dynamic_sampling",
        ),
        (
            ["train.mini_batches=200", "train.prompts_per_step=2", "rollout.n=4"],
            "train.mini_batches",
            "empty",
        ),
        (["data.task=null"], "data.task", "data.train_files is empty"),
        (["reward.timeout_s=.inf"], "reward.timeout_s", "finite"),
        (["reward.timeout_s=1e7"], "reward.timeout_s", "(0, 86400]"),
        (["optim.lr=.nan"], "optim.lr", "finite"),
        (["optim.betas=[0.9, .inf]"], "optim.betas[1]", "finite"),
        (["train.steps=4294967296"], "train.steps", "within"),
        (["ray.object_store_memory_mb=10"], "ray.object_store_memory_mb", ">= 75"),
        (["data.task=arithmetc"], "data.task", "built-in tasks: arithmetic, arithmetic_set, count"),
        (["algorithm.advantage=grppo"], "algorithm.advantage", "did you mean 'grpo'"),
        (["model.path=/no/such/model"], "model.path", "neither a Hugging Face model directory"),
        (
            ["data.train_files=[/no/such.jsonl]", "data.task=null", "data.eval_files=[x.csv]"],
            "data.train_files[0]",
            "no such file",
        ),
        (["sft.train_files=[data.csv]"], "sft.train_files[0]", "unsupported file type"),
        (["judge.num_eval_pairs=1"], "judge.num_eval_pairs", ">= 2"),
        (["judge.template='no placeholders'"], "judge.template", "placeholder"),
        (["data.task_args={digits: 0}"], "data.task_args", "digits must be an integer in [1, 18]"),
        (["data.task_args={digits: 1000000000}"], "data.task_args", "[1, 18]"),
        (["data.task_args={digit: 2}"], "data.task_args", "unknown task_args ['digit']"),
        (["data.task_args={digits: '2'}"], "data.task_args", "got '2'"),
        (
            ["data.task=countdown", "data.task_args={num_numbers: [2, 100]}"],
            "data.task_args",
            "[2, 8]",
        ),
        (["data.task_args={tag: !!binary aGk=}"], "data.task_args.tag", "got bytes"),
        (["run.resume=true", "run.name=never_ran_here"], "run.resume", "nothing to resume"),
        (
            ["stages=[{type: sft}]", "data.task=null", "data.train_files=[recipes/x.jsonl]"],
            "data.train_files[0]",
            "no such file",
        ),
    ],
)
def test_rule_fails_at_its_key(overrides, key, problem):
    error = error_of(overrides)
    assert error.key == key
    assert problem in error.problem
    assert error.where.startswith("command-line override")


@pytest.mark.parametrize(
    "name", ["../x", "/abs/path", "a/b", "a\\b", ".", "..", "", "  ", " x", "x\n", "x" * 201]
)
def test_run_and_stage_names_are_plain_names(name):
    assert error_of([f"run.name={name!r}"]).key == "run.name"
    error = error_of([f"stages=[{{type: rlvr, name: {name!r}}}]"])
    assert error.key == "stages[0].name"


def test_plain_names_pass():
    cfg = load_recipe(None, ["run.name=try-2_b.v1", "stages=[{type: rlvr, name: gen}]"])
    assert (cfg.run.name, cfg.stages[0].name) == ("try-2_b.v1", "gen")


VERIFIERS = """
def needs_scale(completion, sample, scale):
    return scale

def verl_no_extra(data_source, solution_str, ground_truth):
    return 1.0

def trl_style(prompts, completions, **kwargs):
    return [1.0] * len(completions)
"""


@pytest.mark.parametrize(
    "overrides, key, problem",
    [
        (
            ["reward.kwargs={rel_tol: 0.1}"],
            "reward.kwargs",
            "unexpected keyword argument 'rel_tol'",
        ),
        (["reward.verifier=nope"], "reward.verifier", "unknown verifier 'nope'"),
        (
            ["reward.verifier=rlkit.rewards.builtin:nope"],
            "reward.verifier",
            "has no function 'nope'",
        ),
        (["reward.verifier=no_such_module_xyz:f"], "reward.verifier", "cannot import module"),
        (
            ["reward.verifier=v.py:needs_scale"],
            "reward.verifier",
            "missing a required argument: 'scale'",
        ),
        (
            ["reward.verifier=v.py:needs_scale", "reward.kwargs={scale: 1, x: 2}"],
            "reward.kwargs",
            "'x'",
        ),
        (["reward.verifier=v.py:verl_no_extra"], "reward.verifier", "'extra_info'"),
        (
            ["reward.verifier=v.py:trl_style", "reward.kwargs={ground_truth: 1}"],
            "reward.kwargs",
            "already receives ground_truth",
        ),
        (["reward.verifier=missing.py:f"], "reward.verifier", "does not exist"),
        (["reward.verifier=arithmetic", "reward.style=verl"], "reward.verifier", "rlkit style"),
    ],
)
def test_verifier_and_kwargs_are_checked_against_the_signature(
    tmp_path, monkeypatch, overrides, key, problem
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v.py").write_text(VERIFIERS)
    error = error_of(overrides)
    assert (error.key, problem in error.problem) == (key, True), error


def test_good_verifier_kwargs_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v.py").write_text(VERIFIERS)
    load_recipe(None, ["reward.verifier=numeric", "reward.kwargs={rel_tol: 0.01}"])
    load_recipe(None, ["reward.verifier=v.py:needs_scale", "reward.kwargs={scale: 2}"])
    load_recipe(None, ["reward.verifier=v.py:trl_style", "reward.kwargs={anything: 1}"])


def test_launch_only_keys_are_refused_in_stage_overrides_and_stage_keys_are_not():
    for key, value in [
        ("rollout.kv_compression.policy", "h2o"),
        ("rollout.kv_compression", "{budget: 64}"),
        ("rollout.dtype", "float32"),
        ("rollout.engine", "vllm"),
        ("model.path", "x"),
        ("data.task_args.digits", "3"),
        ("reward.timeout_s", "3"),
        ("run.name", "y"),
        ("ray.num_cpus", "2"),
        ("judge.num_eval_pairs", "8"),
        ("rollout", "{}"),
    ]:
        error = error_of([f"stages=[sft, {{type: rlvr, overrides: {{{key}: {value}}}}}]"])
        # A nested mapping is named by its leaf: rollout.kv_compression.budget.
        assert error.key.startswith(key) and "stages[1].overrides" in error.where, error
        assert "cannot be set in a stage's overrides" in error.problem
    allowed = "{rollout.n: 4, rollout.temperature: 0.7, rollout.max_new_tokens: 9, optim.lr: 0.1, algorithm.kl_coef: 0.1, train.steps: 2, sft.batch_size: 2, eval.max_new_tokens: 5, judge.max_new_tokens: 7}"
    cfg = load_recipe(None, [f"stages=[sft, {{type: rlvr, overrides: {allowed}}}]"])
    assert cfg.stages[1].overrides["rollout.n"] == 4
    assert launch_only("rollout.stop") is None and launch_only("rollout") is not None


def test_stage_rules_see_the_stage_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "ground_truth": "1"}\n')
    files = [
        "data.task=null",
        "data.train_files=[d.jsonl]",
        "data.eval_files=[d.jsonl]",
        "reward.verifier=arithmetic",
    ]
    error = error_of([*files, "stages=[sft, rlvr]"])
    assert error.key == "stages[0].type" and "sft.train_files" in error.problem
    load_recipe(
        None, [*files, "stages=[{type: sft, overrides: {sft.train_files: [sft.jsonl]}}, rlvr]"]
    )


def test_errors_from_a_file_name_its_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        textwrap.dedent("""\
        rollout:
          kv_compression:
            policy: snapkv
            budget: 16
            window: 16
        """)
    )
    error = error_of([], str(path))
    assert str(error).startswith(f"{path}:5: rollout.kv_compression.window: must be less than")
