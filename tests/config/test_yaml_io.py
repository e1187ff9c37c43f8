"""Hostile recipe files are refused quickly, at their line, never with a traceback or a hang."""

import os
import time

import pytest

from rlkit.config import ConfigError, load_recipe, yaml_io
from rlkit.config.yaml_io import MAX_DEPTH, MAX_FILE_BYTES, MAX_VALUES


def error_of(tmp_path, content: bytes | str):
    path = tmp_path / "r.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    assert time.perf_counter() - start < 2.0
    return str(info.value).removeprefix(str(path))


def bomb(levels: int, width: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_the_line_where_it_explodes(tmp_path):
    # 9**6 > MAX_VALUES >= 9**5: the sixth level is the first too big.
    assert 9**5 < MAX_VALUES < 9**6
    assert error_of(tmp_path, bomb(9)) == (
        f":6: refused: expands to more than {MAX_VALUES} values (aliases repeating aliases?)"
    )


def test_small_aliases_are_fine(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "optim:\n  lr: &lr 1.0e-5\nstages:\n  - type: rlvr\n    overrides: {optim.lr: *lr}\n"
    )
    assert load_recipe(str(path)).stages[0].overrides == {"optim.lr": 1e-5}


def test_a_chain_of_aliases_is_as_deep_as_its_expansion(tmp_path):
    chain = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 60))
    message = error_of(tmp_path, chain)
    line = int(message.split(":")[1])
    # Refused where the chain first gets too deep: about MAX_DEPTH anchors down.
    assert MAX_DEPTH - 5 <= line <= MAX_DEPTH + 1
    assert message.endswith(f"nested more than {MAX_DEPTH} levels deep (with aliases expanded)")


def test_recursive_alias(tmp_path):
    assert "refers to the value that contains it" in error_of(tmp_path, "a: &a [1, *a]\n")


@pytest.mark.parametrize("opener, closer", [("[", "]"), ("{a: ", "}")])
def test_deep_nesting(tmp_path, opener, closer):
    depth = 10_000
    text = "data:\n  task_args: {x: " + opener * depth + "1" + closer * depth + "}\n"
    # libyaml may stop at its own limit (1000) first; a shallower excess reaches the composer's.
    message = error_of(tmp_path, text)
    assert message.startswith(":2:") and ("nesting depth" in message or "nested more" in message)
    text = "data:\n  task_args: {x: " + opener * 100 + "1" + closer * 100 + "}\n"
    assert error_of(tmp_path, text) == f":2: refused: nested more than {MAX_DEPTH} levels deep"


def test_huge_file_and_endless_device(tmp_path):
    big = "# " + "x" * MAX_FILE_BYTES + "\ntrain: {steps: 1}\n"
    assert "larger than 64 KiB" in error_of(tmp_path, big)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_recipe("/dev/zero")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_recipe(str(tmp_path / "fifo"))
    with pytest.raises(ConfigError, match="Is a directory|not a regular file"):
        load_recipe(str(tmp_path))


def test_non_utf8_names_line_and_column(tmp_path):
    text = b"train:\n  steps: 3\nrun:\n  name: caf\xe9\n"
    assert error_of(tmp_path, text) == (
        ":4: not UTF-8 text: byte 0xe9 at column 12 (save the recipe as UTF-8)"
    )


def test_control_characters_and_binary(tmp_path):
    assert error_of(tmp_path, "train:\n  steps: 3\x00\n") == (
        ":2: invalid YAML: control character #x0000"
    )
    garbage = bytes(range(256)) * 8
    assert "not UTF-8 text" in error_of(tmp_path, garbage)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"\xef\xbb\xbftrain:\n  steps: 3\n")
    assert load_recipe(str(path)).train.steps == 3


@pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n", "---\n", "{}\n", "~\n"])
def test_empty_recipe_is_an_error(tmp_path, text):
    assert "the recipe is empty" in error_of(tmp_path, text)


def test_integer_too_large_to_parse(tmp_path):
    assert error_of(tmp_path, "train:\n  steps: " + "9" * 5000 + "\n") == (
        ":2: refused: integer too large"
    )


def test_tags_outside_the_core_schema(tmp_path):
    assert "could not determine a constructor" in error_of(
        tmp_path, "train: !!python/object:os.system {}\n"
    )
    assert ":2: data.task_args.when: expected strings" in error_of(
        tmp_path, "data:\n  task_args: {when: !!timestamp 2024-01-01}\n"
    )


def test_overrides_have_the_same_bounds():
    with pytest.raises(ConfigError, match="refers to the value that contains it"):
        load_recipe(None, ["data.task_args=&a [*a]"])
    with pytest.raises(ConfigError, match="nested more than"):
        load_recipe(None, ["data.task_args=" + "[" * 100 + "]" * 100])
    with pytest.raises(ConfigError, match="longer than 64 KiB"):
        load_recipe(None, ["run.name=" + "x" * (MAX_FILE_BYTES + 1)])


@pytest.mark.parametrize(
    "text, message",
    [
        (bomb(9), ":6: refused: expands to more than"),
        ("a: &a [1, *a]\n", ":1: refused: an alias refers to"),
        ("x: " + "[" * 100 + "]" * 100 + "\n", ":1: refused: nested more than"),
        ("a:\n  b: 1\x00\n", ":2: invalid YAML: control character #x0000"),
        ("é: 1\nb: [1,\n", ":3: invalid YAML"),
    ],
)
def test_the_pure_python_loader_has_the_same_bounds(tmp_path, monkeypatch, text, message):
    # Where PyYAML was built without libyaml.
    monkeypatch.setattr(yaml_io, "_Loader", yaml_io._PyLoader)
    assert message in error_of(tmp_path, text)
