import subprocess
import sys
import types

import pytest

from rlkit.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "report", "bench"):
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
