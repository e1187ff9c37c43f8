import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rlkit.cli import main
from rlkit.config import load_recipe
from rlkit.exit_codes import RunFailed, RunInterrupted


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "check", "eval", "report", "bench"):
        assert command in out


def test_cli_imports_no_torch_or_ray():
    code = "import sys, rlkit.cli; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_recipe_key_exits_2_with_the_located_message(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# rlkit train r.yaml\ntrain:\n  stpes: 3\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}:3: train.stpes: unknown key" in err
    assert "did you mean 'steps'" in err
    assert "Traceback" not in err


def test_bad_override_exits_2(capsys):
    assert main(["train", "/nonexistent.yaml"]) == 2
    assert "cannot read the recipe" in capsys.readouterr().err


@pytest.fixture
def fake_trainer(monkeypatch):
    calls = {}
    run = types.ModuleType("rlkit.trainer.run")
    run.train = lambda cfg, recipe_path: calls.update(cfg=cfg, recipe=recipe_path)
    evaluate = types.ModuleType("rlkit.trainer.evaluate")
    evaluate.main = lambda **kwargs: calls.update(kwargs)
    monkeypatch.setitem(sys.modules, "rlkit.trainer.run", run)
    monkeypatch.setitem(sys.modules, "rlkit.trainer.evaluate", evaluate)
    return calls


def test_train_passes_overrides_and_address(tmp_path, fake_trainer):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    argv = ["train", str(recipe), "train.steps=5", "--address", "auto", "run.name=x"]
    assert main(argv) == 0
    cfg = fake_trainer["cfg"]
    assert (cfg.train.steps, cfg.run.name, cfg.ray.address) == (5, "x", "auto")
    assert fake_trainer["recipe"] == str(recipe)


def test_eval_passes_its_arguments(fake_trainer):
    argv = ["eval", "runs/x/checkpoints/step_4", "rollout.n=2", "--k", "4", "--json", "out.json"]
    assert main(argv) == 0
    assert fake_trainer["model"] == "runs/x/checkpoints/step_4"
    assert (fake_trainer["split"], fake_trainer["k"], fake_trainer["json_path"]) == (
        "eval",
        4,
        "out.json",
    )
    assert fake_trainer["cfg"].rollout.n == 2


def test_config_errors_raised_by_the_trainer_exit_2(tmp_path, monkeypatch, capsys):
    from rlkit.config import config_error

    def train(cfg, recipe_path):
        raise config_error(cfg, "algorithm.advantage", "found wanting by the trainer")

    monkeypatch.setitem(sys.modules, "rlkit.trainer.run", types.SimpleNamespace(train=train))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm:\n  advantage: rloo\n")
    assert main(["train", str(recipe)]) == 2
    assert f"{recipe}:2: algorithm.advantage: found wanting" in capsys.readouterr().err


def test_bench_forwards_argv_or_says_it_is_missing(monkeypatch, capsys):
    got = []
    monkeypatch.setitem(sys.modules, "rlkit.bench", types.SimpleNamespace(main=got.append))
    assert main(["bench", "rollout", "--batch", "4"]) == 0
    assert got == [["rollout", "--batch", "4"]]
    monkeypatch.setitem(sys.modules, "rlkit.bench", None)
    assert main(["bench", "rollout"]) == 2
    assert "rlkit.bench is not part of this rlkit installation" in capsys.readouterr().err


def test_report_prints_the_png_paths(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.5}\n')
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "plots" / "reward.png")]
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def test_check_prints_the_resolved_recipe_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["check", "recipes/sparse_grpo_arithmetic.yaml", "train.steps=7"]) == 0
    out, err = capsys.readouterr()
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(out)
    expected = load_recipe("recipes/sparse_grpo_arithmetic.yaml", ["train.steps=7"])
    assert load_recipe(str(resolved)) == expected
    assert err.startswith("rlkit check: recipes/sparse_grpo_arithmetic.yaml is valid")
    assert "20000 train and 200 eval samples" in err


def test_check_reads_the_data(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_bytes(
        b'{"prompt": "p", "ground_truth": "1"}\n{"prompt": "\xff"}\n'
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data:\n  task: null\n  train_files: [{tmp_path}/d.jsonl]\n  eval_files: [{tmp_path}/d.jsonl]\n"
        "reward:\n  verifier: arithmetic\n"
    )
    assert main(["check", str(recipe)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err
        == f"rlkit check: error: {tmp_path}/d.jsonl: line 2: not UTF-8 text: byte 0xff at column 13\n"
    )


def _failing_trainer(monkeypatch, error):
    def train(cfg, recipe_path):
        raise error

    monkeypatch.setitem(sys.modules, "rlkit.trainer.run", types.SimpleNamespace(train=train))


def test_a_runtime_failure_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    _failing_trainer(
        monkeypatch, RuntimeError("the learner died\n  Traceback (most recent call last): ...")
    )
    monkeypatch.delenv("RLKIT_DEBUG", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "rlkit train: error: RuntimeError: the learner died Traceback (most recent"
    )
    assert err.rstrip().endswith("(run with --debug or RLKIT_DEBUG=1 for the traceback)")


@pytest.mark.parametrize("how", [["--debug", "train"], ["train", "--debug"], "env"])
def test_debug_lets_the_traceback_through(tmp_path, monkeypatch, how):
    _failing_trainer(monkeypatch, RuntimeError("boom"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    if how == "env":
        monkeypatch.setenv("RLKIT_DEBUG", "1")
        argv = ["train", str(recipe)]
    else:
        monkeypatch.delenv("RLKIT_DEBUG", raising=False)
        argv = [*how, str(recipe)] if how[0] == "--debug" else [how[0], str(recipe), how[1]]
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    _failing_trainer(monkeypatch, KeyboardInterrupt())
    monkeypatch.delenv("RLKIT_DEBUG", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    assert main(["train", str(recipe)]) == 130
    assert capsys.readouterr().err == "rlkit train: interrupted\n"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_run_says_where_and_exits_by_its_signal(
    tmp_path, monkeypatch, capsys, signum, code
):
    text = "interrupted by X during rollout of stage 0 (rlvr) step 3; run.resume=true continues"
    _failing_trainer(monkeypatch, RunInterrupted(text, signum))
    monkeypatch.delenv("RLKIT_DEBUG", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    assert main(["train", str(recipe)]) == code
    assert capsys.readouterr().err == f"rlkit train: {text}\n"


def test_a_failed_run_is_one_line_without_the_debug_hint(tmp_path, monkeypatch, capsys):
    text = "the learner's process died during learn of stage 0 (rlvr) step 2; run.resume=true"
    _failing_trainer(monkeypatch, RunFailed(text))
    monkeypatch.delenv("RLKIT_DEBUG", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    assert main(["train", str(recipe)]) == 1
    assert capsys.readouterr().err == f"rlkit train: error: {text}\n"


class FakeRayTaskError(Exception):
    """Like ray.exceptions.RayTaskError: its text is the remote traceback, `.cause` the error."""

    def __init__(self, cause):
        super().__init__(
            "ray::Learner.train_step() (pid=1)\nTraceback (most recent call last):\n  ..."
        )
        self.cause = cause


def test_an_actors_error_is_reported_not_rays_wrapper(tmp_path, monkeypatch, capsys):
    from rlkit.data.loaders import DataError

    monkeypatch.delenv("RLKIT_DEBUG", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n")
    _failing_trainer(monkeypatch, FakeRayTaskError(DataError("d.jsonl: line 4: invalid JSON")))
    assert main(["train", str(recipe)]) == 2
    assert capsys.readouterr().err == "rlkit train: error: d.jsonl: line 4: invalid JSON\n"
    _failing_trainer(monkeypatch, FakeRayTaskError(MemoryError("out of memory")))
    assert main(["train", str(recipe)]) == 1
    assert capsys.readouterr().err.startswith("rlkit train: error: MemoryError: out of memory (")


def test_check_imports_no_torch_or_ray():
    code = (
        "import sys; from rlkit.cli import main; rc = main(['check', 'recipes/grpo_arithmetic.yaml']);"
        "print(rc, sorted({'torch', 'ray'} & set(sys.modules)), file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert out.stderr.strip().splitlines()[-1] == "0 []"


@pytest.mark.parametrize(
    "argv", [["train"], ["tran", "x"], ["check", "r.yaml", "--bogus"], ["eval", "m", "--k", "x"]]
)
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ": error: " in err and err.rstrip().endswith("--help)")
