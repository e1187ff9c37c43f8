"""Data errors surface before the run directory, the model or Ray, naming the file or key."""

import pytest

from rlkit.config import ConfigError, load_recipe
from rlkit.data.loaders import DataError
from rlkit.trainer.data_setup import load_raw, load_split


class CharTokenizer:
    chat_template = None

    def encode(self, text):
        return [ord(c) for c in text]


def files_recipe(tmp_path, monkeypatch, train_lines, extra=()):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(train_lines)
    (tmp_path / "eval.jsonl").write_text('{"prompt": "p", "ground_truth": "1"}\n')
    files = ["data.task=null", "data.train_files=[train.jsonl]", "data.eval_files=[eval.jsonl]"]
    return load_recipe(None, [*files, "reward.verifier=arithmetic", *extra])


def test_load_raw_reads_files_and_names_a_bad_line(tmp_path, monkeypatch):
    cfg = files_recipe(tmp_path, monkeypatch, '{"prompt": "a", "ground_truth": 2}\n')
    raw = load_raw(cfg)
    assert [s["ground_truth"] for s in raw["train"]] == ["2"]
    cfg = files_recipe(tmp_path, monkeypatch, '{"prompt": "a", "ground_truth": 2}\n{"prompt": \n')
    with pytest.raises(DataError, match="train.jsonl: line 2: invalid JSON"):
        load_raw(cfg)


def test_load_raw_reads_every_sft_stage_file(tmp_path, monkeypatch):
    (tmp_path / "sft.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"}\n')
    stage = "stages=[{type: sft, overrides: {sft.train_files: [sft.jsonl]}}, rlvr]"
    cfg = files_recipe(tmp_path, monkeypatch, '{"prompt": "a", "ground_truth": 2}\n', [stage])
    with pytest.raises(DataError, match="sft.jsonl: line 2: field 'response' is missing"):
        load_raw(cfg)


def test_a_task_split_too_small_is_named_at_its_key():
    cfg = load_recipe(None, ["data.task_args={digits: 1}", "data.num_eval=100"])
    with pytest.raises(ConfigError) as info:
        load_raw(cfg)
    assert info.value.key == "data.num_eval"
    assert "eval split holds" in info.value.problem


def test_all_prompts_dropped_is_an_error_naming_the_files(tmp_path, monkeypatch):
    cfg = files_recipe(
        tmp_path,
        monkeypatch,
        '{"prompt": "a long prompt", "ground_truth": 2}\n',
        ["data.max_prompt_tokens=4"],
    )
    raw = load_raw(cfg)
    with pytest.raises(
        DataError,
        match=r"train.jsonl: all 1 train prompts are longer than data.max_prompt_tokens=4",
    ):
        load_split(cfg, CharTokenizer(), "train", raw["train"])
    kept, ids, dropped = load_split(cfg, CharTokenizer(), "eval", raw["eval"])
    assert (len(kept), ids, dropped) == (1, [[ord("p")]], 0)
