"""A recipe fuzzer: several hundred malformed recipes and overrides, built systematically from
the shipped recipes, each of which must fail with one clear located error naming the key.

Every case is invalid by construction. Run through the loader in-process, a case counts as
- a traceback: it raised anything but ConfigError;
- a hang: it ran past HANG_S;
- accepted-invalid: it loaded;
- unnamed: its error does not name the offending key (or, for a file that is not a recipe at
  all, the file and line), or spans several lines.
All four counts must be 0. A sample also goes through `rlkit check` as a subprocess, and every
shipped recipe must pass it. `pytest -s` prints the counts by category.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import subprocess
import sys
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from rlkit.cli import main
from rlkit.config import ConfigError, load_recipe, yaml_io
from rlkit.config.rules import LAUNCH_ONLY
from rlkit.config.schema import RecipeConfig
from rlkit.config.yaml_io import MAX_FILE_BYTES

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
HANG_S = 5


@dataclass
class Case:
    category: str
    # Overrides on the command line, and/or the recipe: a shipped recipe's name, a mutated
    # recipe (a dict to dump), or raw file bytes.
    overrides: list[str] = field(default_factory=list)
    recipe: str | dict | bytes | None = None
    # What the error must name: a key (ConfigError.key starts with it) ...
    key: str | None = None
    # ... or, for a file that is no recipe, this text in the message (with the file's path).
    says: str | None = None


def leaves(cls: Any = RecipeConfig, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """(dotted key, type hint) of every scalar, list or mapping field of the schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, key + ".")
        else:
            yield key, tp


def wrong_values(tp: Any) -> list[str]:
    """YAML texts of values of the wrong type for `tp` (null is allowed for Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return wrong_values(inner[0]) if len(inner) == 1 else ["[[1]]"]
    if origin is Literal:
        return ["bogus_choice", "3"]
    if origin is list:
        item = args[0]
        if dataclasses.is_dataclass(item):
            return ["5", "[{type: bogus}]", "[{type: rlvr, bogus: 1}]"]
        return ["not_a_list", "[[1]]" if item is str else "[a, b]"]
    if origin is dict:
        return ["[1, 2]", "a_string"]
    return {
        bool: ["yes", "1"],
        int: ["five", "2.5", "true"],
        float: ["x", "true", "[1.0]"],
        str: ["5", "[a]", "{a: 1}"],
    }[tp]


# Values out of each ranged key's range (an independent statement of the ranges; the table in
# rlkit/config/rules.py must agree).
OUT_OF_RANGE: dict[str, list[Any]] = {
    "data.num_train": [0, -1, 1_000_001],
    "data.num_eval": [0, 2_000_000],
    "data.max_prompt_tokens": [0, -5],
    "data.seed": [-1, 2**31],
    "reward.timeout_s": [0, -1.0, 86_401, 1e12],
    "reward.num_workers": [0, 1025],
    "rollout.n": [0, -8],
    "rollout.temperature": [-0.1],
    "rollout.top_p": [0, 1.01, -0.5],
    "rollout.top_k": [-1],
    "rollout.max_new_tokens": [0],
    "rollout.max_batch_size": [0],
    "rollout.kv_memory_gb": [0, -1.5, 2e6],
    "rollout.kv_memory_fraction": [0, 1.01, -0.5],
    "rollout.num_workers": [0],
    "rollout.kv_compression.budget": [1, 0],
    "rollout.kv_compression.window": [0],
    "rollout.kv_compression.interval": [0, -1],
    "rollout.kv_compression.sink": [-1],
    "rollout.kv_compression.pool_kernel": [0],
    "rollout.kv_compression.rkv_lambda": [-0.1, 1.5],
    "rollout.kv_compression.rkv_threshold": [-1.5, 2],
    "rollout.kv_compression.full_every": [0],
    "rollout.vllm.gpu_memory_utilization": [0, 1.2],
    "rollout.vllm.cpu_kv_cache_gb": [0, 1e9],
    "rollout.vllm.startup_timeout_s": [0, 1e7],
    "rollout.vllm.request_timeout_s": [-1],
    "algorithm.eps_low": [-0.1, 1.0, 2],
    "algorithm.eps_high": [-0.01],
    "algorithm.kl_coef": [-1],
    "algorithm.entropy_coef": [-0.5],
    "algorithm.max_refill_rounds": [-1],
    "algorithm.tis_cap": [0, -2.0],
    "algorithm.sparse.rho_low": [-0.1, 1.2],
    "algorithm.sparse.rho_high": [0.9, -1],
    "algorithm.sparse.veto_threshold": [-1e-4, 1.0],
    "algorithm.sparse.weight_cap": [0, -1.5],
    "algorithm.sparse.log_ratio_clamp": [0, 100],
    "optim.lr": [0, -1e-6, 10],
    "optim.weight_decay": [-0.1, 1.5],
    "optim.betas": [[0.9], [0.9, 1.0], [-0.1, 0.9], [0.9, 0.99, 0.999]],
    "optim.eps": [0],
    "optim.grad_clip": [0, -1],
    "optim.warmup_steps": [-1],
    "optim.min_lr_ratio": [-0.1, 1.1],
    "train.steps": [0, -100],
    "train.prompts_per_step": [0],
    "train.mini_batches": [0],
    "train.ppo_epochs": [0],
    "train.micro_batch_size": [0],
    "train.seed": [-3, 2**31],
    "train.eval_every": [-1],
    "train.save_every": [-1],
    "train.keep_checkpoints": [0],
    "sft.batch_size": [0],
    "judge.num_problems": [0],
    "judge.candidates_per_problem": [0],
    "judge.pairs_per_problem": [0],
    "judge.min_pairs": [0],
    "judge.temperature": [-1.0],
    "judge.candidate_max_new_tokens": [0],
    "judge.max_new_tokens": [0],
    "judge.refresh_every": [-1],
    "judge.num_eval_problems": [0],
    "judge.num_eval_pairs": [1, 0],
    "eval.max_new_tokens": [0],
    "eval.k": [0],
    "eval.temperature": [-1],
    "ray.num_cpus": [0],
    "ray.object_store_memory_mb": [0, 74],
}


def typo(name: str, rng: random.Random) -> str:
    i = rng.randrange(len(name))
    ops = [name[:i] + name[i + 1 :], name[:i] + "x" + name[i:], name + "s"]
    return rng.choice([o for o in ops if o and o != name] or [name + "_x"])


def core_yaml(text: str) -> Any:
    """A value as rlkit reads YAML (1.2 core schema: `yes` is a string, not true)."""
    return yaml_io.parse_value(text, "fuzzer", "")


def recipe_data(name: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / name).read_text())


def set_in(data: dict, key: str, value: Any) -> dict:
    """`data` with the dotted `key` set, creating the sections on the way."""
    node = data
    *sections, last = key.split(".")
    for part in sections:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    return data


def laughs(levels: int, width: int) -> list[str]:
    """Billion laughs: each anchor is a list of `width` aliases of the one before."""
    items = [f"&a0 [{', '.join(['lol'] * width)}]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return items


def bomb(levels: int, width: int) -> bytes:
    return "".join(f"a{i}: {item}\n" for i, item in enumerate(laughs(levels, width))).encode()


def build_cases() -> list[Case]:
    rng = random.Random(14)
    names = [p.name for p in RECIPES]
    cases: list[Case] = []

    def base() -> str:
        return rng.choice(names)

    # Wrong types, for every key of the schema, alternately on the command line and in a file.
    for i, (key, tp) in enumerate(leaves()):
        for j, text in enumerate(wrong_values(tp)):
            if (i + j) % 2:
                cases.append(Case("wrong type", [f"{key}={text}"], base(), key=key))
            else:
                data = set_in(recipe_data(base()), key, core_yaml(text))
                cases.append(Case("wrong type", recipe=data, key=key))

    # Out of range.
    for key, values in OUT_OF_RANGE.items():
        for value in values:
            cases.append(Case("out of range", [f"{key}={value}"], base(), key=key))

    # Not finite: every float key, as .inf, -.inf and .nan, in a file.
    floats = [k for k, tp in leaves() if float in (tp, *typing.get_args(tp))]
    for key in floats:
        for text in (".inf", "-.inf", ".nan"):
            data = set_in(recipe_data(base()), key, core_yaml(text))
            cases.append(Case("not finite", recipe=data, key=key))
    cases.append(Case("not finite", ["optim.betas=[0.9, .nan]"], base(), key="optim.betas[1]"))

    # Unknown keys: a typo in the section or the key.
    known = {k for k, _tp in leaves()}
    for key, _tp in rng.sample(list(leaves()), 40):
        section, _, name = key.rpartition(".")
        bad = f"{section}.{typo(name, rng)}" if section else typo(name, rng)
        if bad not in known:
            cases.append(Case("unknown key", [f"{bad}=1"], base(), key=bad))
    for section in ("model", "data", "rollout", "algorithm", "optim", "train", "run", "ray"):
        bad = typo(section, rng)
        data = recipe_data(base())
        data[bad] = {"x": 1}
        cases.append(Case("unknown key", recipe=data, key=bad))

    # Bad registered names.
    for key, value in [
        ("algorithm.advantage", "gpro"),
        ("algorithm.advantage", "ppo"),
        ("algorithm.policy_loss", "gspo"),
        ("algorithm.loss_agg", "mean"),
        ("algorithm.kl_estimator", "k4"),
        ("rollout.kv_compression.policy", "snap_kv"),
        ("rollout.engine", "sglang"),
        ("data.task", "gsm8k"),
        ("data.task", "''"),
        ("reward.verifier", "arithmetik"),
        ("reward.verifier", "no_such_module_q:f"),
        ("reward.verifier", "rlkit.rewards.builtin:nothing_here"),
        ("reward.verifier", "examples/verl_reward.py:nothing_here"),
        ("reward.verifier", "examples/missing.py:compute_score"),
        ("reward.verifier", "''"),
        ("reward.style", "openai"),
        ("model.path", "/no/such/model"),
        ("model.path", "missing.gguf"),
    ]:
        cases.append(Case("bad name", [f"{key}={value}"], base(), key=key))

    # Rules between keys.
    for overrides, key in [
        (["rollout.kv_compression.window=512"], "rollout.kv_compression.window"),
        (["rollout.kv_compression.budget=8"], "rollout.kv_compression.window"),
        (
            ["rollout.kv_compression.policy=streaming", "rollout.kv_compression.sink=600"],
            "rollout.kv_compression.sink",
        ),
        (
            ["rollout.kv_compression.policy=snapkv", "rollout.engine=vllm"],
            "rollout.kv_compression.policy",
        ),
        (
            ["algorithm.sparse.rho_low=1.0", "algorithm.sparse.rho_high=1.0"],
            "algorithm.sparse.rho_low",
        ),
        (["rollout.n=1", "algorithm.advantage=grpo"], "rollout.n"),
        (["rollout.n=1", "algorithm.advantage=rloo"], "rollout.n"),
        (["rollout.n=1", "algorithm.advantage=dr_grpo"], "rollout.n"),
        (["rollout.n=1", "algorithm.advantage=reinforce_pp_baseline"], "rollout.n"),
        (
            ["rollout.n=1", "algorithm.advantage=reinforce_pp", "algorithm.dynamic_sampling=true"],
            "rollout.n",
        ),
        (["train.mini_batches=1000"], "train.mini_batches"),
        (["data.task=null"], "data.task"),
        (["data.task=null", "data.train_files=[examples/verl_reward.py]"], "data.train_files[0]"),
        (["data.task=null", "data.train_files=[nothing.jsonl]"], "data.train_files[0]"),
        (["data.eval_files=[a.jsonl, b.csv]"], "data.eval_files[0]"),
        (["data.task_args={digits: 0}"], "data.task_args"),
        (["data.task_args={digits: 99999999}"], "data.task_args"),
        (["data.task_args={ops: [/]}"], "data.task_args"),
        (["data.task_args={eval_fraction: 1.5}"], "data.task_args"),
        (["data.task_args={nope: 1}"], "data.task_args"),
        (["data.task=countdown", "data.task_args={num_numbers: 1}"], "data.task_args"),
        (["data.task=countdown", "data.task_args={max_number: 10000000}"], "data.task_args"),
        (["reward.verifier=arithmetic", "reward.kwargs={tolerance: 0.1}"], "reward.kwargs"),
        (["reward.verifier=numeric", "reward.kwargs={rel_tol: 0.1, abs: 1}"], "reward.kwargs"),
        (
            [
                "reward.verifier=examples/verl_reward.py:compute_score",
                "reward.kwargs={ground_truth: 1}",
            ],
            "reward.kwargs",
        ),
        (
            ["reward.verifier=examples/verl_reward.py:compute_score", "reward.kwargs={scale: 2}"],
            "reward.kwargs",
        ),
        (["reward.verifier=arithmetic", "reward.style=trl"], "reward.verifier"),
        (
            ["reward.verifier=examples/verl_reward.py:compute_score", "reward.style=rlkit"],
            "reward.verifier",
        ),
        (["run.resume=true", "run.name=no_run_was_ever_here"], "run.resume"),
        (["run.dir=README.md"], "run.dir"),
        (["judge.extra_checkpoints=[/no/such/step_3]"], "judge.extra_checkpoints[0]"),
        (["judge.template='Is {problem} right?'"], "judge.template"),
        (["rollout.vllm.python=/no/such/python"], "rollout.vllm.python"),
        (["stages=[]"], "stages"),
        (["stages=[sft]", "data.task=null", "data.train_files=[x.jsonl]"], "data.train_files[0]"),
    ]:
        cases.append(Case("cross-field", overrides, base(), key=key))

    # YAML bombs (billion laughs) and recursive aliases, in files and overrides.
    for levels, width in [(9, 9), (12, 10), (30, 2), (7, 50), (20, 3)]:
        cases.append(Case("yaml bomb", recipe=bomb(levels, width), says="expands to more than"))
    for text in ["a: &a [*a]\n", "a: &a {b: *a}\n", "data:\n  task_args: &t {x: [1, *t]}\n"]:
        cases.append(
            Case("yaml bomb", recipe=text.encode(), says="refers to the value that contains it")
        )
    cases.append(Case("yaml bomb", ["data.task_args=&b [*b]"], base(), key="data.task_args"))
    for levels, width in [(9, 9), (40, 2)]:
        flow = f"data.task_args={{k: [{', '.join(laughs(levels, width))}]}}"
        cases.append(Case("yaml bomb", [flow], base(), key="data.task_args"))

    # Deep nesting.
    for depth in (41, 100, 1000, 5000):
        flow = "train: " + "[" * depth + "]" * depth + "\n"
        cases.append(Case("deep nesting", recipe=flow.encode(), says="nest"))
    block = "".join("  " * i + f"k{i}:\n" for i in range(60)) + "  " * 60 + "v\n"
    cases.append(Case("deep nesting", recipe=block.encode(), says="nested more than"))
    for length in (45, 400):
        # No line is indented, but each anchor holds an alias of the one before.
        chain = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, length))
        cases.append(Case("deep nesting", recipe=chain.encode(), says="with aliases expanded"))
    cases.append(
        Case(
            "deep nesting",
            ["data.task_args=" + "{a: " * 300 + "1" + "}" * 300],
            base(),
            key="data.task_args",
        )
    )

    # Binary garbage, bytes that are not UTF-8 inside a recipe, control characters.
    for i in range(15):
        noise = random.Random(i).randbytes(random.Random(i).randrange(1, 4096))
        cases.append(Case("binary garbage", recipe=noise, says=""))
    for i in range(10):
        text = (REPO / "recipes" / names[i % len(names)]).read_bytes()
        lines = text.split(b"\n")
        at = rng.randrange(len(lines) - 1)
        lines[at] += rng.choice([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80abc"])
        cases.append(Case("binary garbage", recipe=b"\n".join(lines), says=f":{at + 1}: not UTF-8"))
    for ch in ("\x00", "\x07", "\x1b", "\x7f"):
        cases.append(
            Case(
                "binary garbage",
                recipe=f"train:\n  steps: 3{ch}\n".encode(),
                says=":2: invalid YAML: control character",
            )
        )

    # Huge files.
    pad = b"# " + b"x" * MAX_FILE_BYTES + b"\n"
    cases.append(Case("huge file", recipe=pad + b"train: {steps: 3}\n", says="larger than"))
    cases.append(
        Case(
            "huge file",
            recipe=b"train: {steps: 3}\nrun: {name: " + b"a" * MAX_FILE_BYTES + b"}\n",
            says="larger than",
        )
    )
    cases.append(Case("huge file", recipe="/dev/zero", says="not a regular file"))
    cases.append(
        Case("huge file", ["run.name=" + "x" * (MAX_FILE_BYTES + 1)], base(), key="run.name")
    )

    # Run and stage names that are not plain names.
    for name in [
        "../x",
        "../../etc",
        "/tmp/abs",
        "a/b",
        "a\\\\b",
        ".",
        "..",
        "''",
        "'  '",
        "' lead'",
        "'x\\ty'",
        "x" * 201,
    ]:
        cases.append(Case("bad run name", [f"run.name={name}"], base(), key="run.name"))
    for name in ["../up", "/abs", "a/b", "..", "''"]:
        cases.append(
            Case(
                "bad run name",
                [f"stages=[{{type: rlvr, name: {name}}}]"],
                base(),
                key="stages[0].name",
            )
        )

    # Stage overrides that cannot apply (set once at launch), nested or dotted.
    launch_keys = [
        k for k, _tp in leaves() if any(k == f or k.startswith(f + ".") for f in LAUNCH_ONLY)
    ]
    for i, key in enumerate(rng.sample(launch_keys, 30)):
        value = {"x": 1} if key.endswith(("kwargs", "task_args")) else 1
        overrides = {key: value} if i % 2 else set_in({}, key, value)
        data = recipe_data(base())
        data["stages"] = ["sft", {"type": "rlvr", "overrides": overrides}]
        cases.append(Case("bad stage override", recipe=data, key=key))
    for overrides, key in [
        ({"rollout": {}}, "rollout"),
        ({"judge": None}, "judge"),
        ({"stages": ["sft"]}, "stages"),
        ({"train.steps": 0}, "train.steps"),
        ({"train.stepz": 3}, "train.stepz"),
        ({"optim.lr": ".inf"}, "optim.lr"),
        ({"": 1}, ""),
    ]:
        data = recipe_data(base())
        data["stages"] = [{"type": "rlvr", "overrides": overrides}]
        cases.append(Case("bad stage override", recipe=data, key=key))

    # Empty recipes.
    for text in [b"", b"\n\n", b"# nothing but a comment\n", b"{}\n", b"~\n", b"---\n...\n"]:
        cases.append(Case("empty recipe", recipe=text, says="the recipe is empty"))

    # Malformed YAML and recipes that are no mapping.
    for text, says in [
        (b"train:\n  steps: [1,\n", "invalid YAML"),
        (b"train:\n  steps: 3\n bad: 1\n", "invalid YAML"),
        (b"train:\n\tsteps: 3\n", "invalid YAML"),
        (b"train: {steps: 3\n", "invalid YAML"),
        (b"a: 1\n---\nb: 2\n", "invalid YAML"),
        (b"train: *nope\n", "invalid YAML"),
        (b"- train\n- steps\n", "a recipe is a mapping"),
        (b"just a string\n", "a recipe is a mapping"),
        (b"train:\n  steps: 3\n  steps: 4\n", "set twice"),
        (b"? [a, b]\n: 1\n", "invalid YAML"),
        (b"train: !!python/object/apply:os.system [ls]\n", "invalid YAML"),
        (b"train:\n  steps: " + b"9" * 5000 + b"\n", "integer too large"),
    ]:
        cases.append(Case("malformed yaml", recipe=text, says=says))

    # Malformed overrides.
    for text, key in [
        ("train.steps", ""),
        ("=5", ""),
        ("train..steps=1", "train..steps"),
        ("stages[9].type=sft", "stages"),
        ("train.steps.x=1", "train.steps"),
        ("train[0]=1", "train"),
        ("train.steps=[1,", "train.steps"),
        ("train.steps=*a", "train.steps"),
        ("rollout.stop=['']", "rollout.stop"),
        ("rollout.stop=[a, 3]", "rollout.stop[1]"),
    ]:
        cases.append(Case("bad override", [text], base(), key=key))
    return cases


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def run_case(case: Case, tmp: Path) -> tuple[str, str]:
    """('ok' | 'traceback' | 'hang' | 'accepted' | 'unnamed', detail)."""
    path: str | None
    if isinstance(case.recipe, dict):
        path = str(tmp / "mutated.yaml")
        Path(path).write_text(yaml.safe_dump(case.recipe, sort_keys=False))
    elif isinstance(case.recipe, bytes):
        path = str(tmp / "raw.yaml")
        Path(path).write_bytes(case.recipe)
    elif case.recipe == "/dev/zero":
        path = case.recipe
    else:
        path = f"recipes/{case.recipe}" if case.recipe else None
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        load_recipe(path, case.overrides)
    except ConfigError as e:
        message = str(e)
        if "\n" in message:
            return "unnamed", f"several lines: {message!r}"
        # A mutated or raw file must be named (with its line) by the error about it.
        own_file = isinstance(case.recipe, dict | bytes) or case.recipe == "/dev/zero"
        if own_file and not case.overrides and not message.startswith(str(path)):
            return "unnamed", f"expected the file {path}: {message}"
        if case.key is not None and not (e.key.startswith(case.key) and case.key in message):
            return "unnamed", f"expected the key {case.key!r}: {message}"
        if case.says is not None and case.says not in message:
            return "unnamed", f"expected {case.says!r}: {message}"
        return "ok", message
    except Hang:
        return "hang", ""
    except BaseException as e:  # noqa: BLE001 - any other exception is the finding
        return "traceback", f"{type(e).__name__}: {e}"[:300]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return "accepted", ""


CASES = build_cases()


def test_the_fuzzer_has_hundreds_of_cases_in_every_category():
    counts = Counter(c.category for c in CASES)
    assert len(CASES) >= 500
    assert min(counts.values()) >= 4, counts


def test_every_malformed_recipe_fails_with_one_located_line(tmp_path, monkeypatch, capsys):
    # Shipped recipes name files relative to the repository root.
    monkeypatch.chdir(REPO)
    outcomes: dict[str, Counter] = {}
    failures = []
    start = time.perf_counter()
    for case in CASES:
        outcome, detail = run_case(case, tmp_path)
        outcomes.setdefault(case.category, Counter())[outcome] += 1
        if outcome != "ok":
            failures.append(f"[{case.category}] {outcome}: {case.key} {case.overrides} {detail}")
    elapsed = time.perf_counter() - start
    total = Counter()
    for counter in outcomes.values():
        total.update(counter)
    with capsys.disabled():
        print(f"\nrecipe fuzzer: {len(CASES)} cases in {elapsed:.1f} s")
        for category, counter in outcomes.items():
            print(f"  {category:20s} {sum(counter.values()):4d}  {dict(counter)}")
        print(
            f"  {len(CASES)} cases, {total['traceback']} tracebacks, {total['hang']} hangs, "
            f"{total['accepted']} accepted-invalid, {total['unnamed']} without the key"
        )
    assert not failures, "\n".join(failures[:40])


SUBPROCESS_SAMPLE = [
    ("wrong type", ["train.steps=five"], "train.steps"),
    ("not finite", ["optim.lr=.inf"], "optim.lr"),
    ("cross-field", ["rollout.kv_compression.window=600"], "rollout.kv_compression.window"),
    ("bad name", ["algorithm.advantage=gpro"], "algorithm.advantage"),
    ("bad run name", ["run.name=../x"], "run.name"),
    ("cross-field", ["reward.kwargs={nope: 1}"], "reward.kwargs"),
    (
        "bad stage override",
        ["stages=[sft, {type: rlvr, overrides: {rollout.kv_compression.policy: h2o}}]"],
        "rollout.kv_compression.policy",
    ),
]


def _rlkit_check(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlkit.cli", "check", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


@pytest.mark.parametrize(
    "category, overrides, key", SUBPROCESS_SAMPLE, ids=[k for *_, k in SUBPROCESS_SAMPLE]
)
def test_rlkit_check_subprocess_exits_2_with_one_line(category, overrides, key):
    out = _rlkit_check(["recipes/grpo_arithmetic.yaml", *overrides])
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("rlkit check: error: command-line override")
    assert f": {key}: " in out.stderr


def test_rlkit_check_subprocess_refuses_hostile_files(tmp_path):
    for content, says in [
        (bomb(12, 10), "expands to more than"),
        (b"\xff\xfe garbage", "not UTF-8"),
    ]:
        path = tmp_path / "hostile.yaml"
        path.write_bytes(content)
        out = _rlkit_check([str(path)])
        assert (out.returncode, out.stderr.count("\n")) == (2, 1), out.stderr
        assert out.stderr.startswith(f"rlkit check: error: {path}:") and says in out.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_passes_rlkit_check(recipe, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["check", f"recipes/{recipe.name}"]) == 0
    assert "is valid" in capsys.readouterr().err


def test_rlkit_check_subprocess_passes_a_shipped_recipe():
    out = _rlkit_check(["recipes/custom_verifier.yaml"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "# resolved recipe of recipes/custom_verifier.yaml\ndevice: auto\nmodel:"
    )
