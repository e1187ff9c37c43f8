"""Build a typed `RecipeConfig` from a YAML recipe plus dotted `key=value` overrides.

Every key path (`train.steps`, `stages[1].overrides.train.steps`) is mapped to where it was
set (`recipes/x.yaml:12` or `command-line override 'train.steps=5'`); the built config keeps
that map, so code running long after loading can still raise an error located at the line
that set the offending key (`config_error`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import yaml

from rlkit.config import rules, yaml_io
from rlkit.config.errors import ConfigError
from rlkit.config.schema import RecipeConfig

# Maps a key path to the place that set it.
Locate = Callable[[str], str]

# Integers in a recipe are counts, sizes and seeds; anything beyond this is a typo.
INT_LIMIT = 2**31 - 1

_KEY = re.compile(r"[^.\[\]\s]+(?:\.[^.\[\]\s]+|\[\d+\])*")
_KEY_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def _join(key: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{key}[{part}]"
    return f"{key}.{part}" if key else part


def _parent(key: str) -> str:
    cut = max(key.rfind("."), key.rfind("["))
    return key[:cut] if cut > 0 else ""


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    kind = {int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return f"{kind.get(type(value), type(value).__name__)} {text}"


_NOUNS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _expect(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _expect(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        item = args[0] if args else Any
        noun = _NOUNS.get(item) or ("mappings" if dataclasses.is_dataclass(item) else "")
        return f"a list of {noun}" if noun else "a list"
    if origin is dict:
        return "a mapping"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, "any value")


def _type_error(tp: Any, value: Any, key: str, locate: Locate) -> ConfigError:
    problem = f"expected {_expect(tp)}, got {_describe(value)}"
    if str in (tp, *typing.get_args(tp)) and isinstance(value, (int, float, bool)):
        problem += " (quote it to make it a string)"
    if tp is bool and isinstance(value, str):
        problem += " (write true or false)"
    return ConfigError(locate(key), key, problem)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(tp: Any, value: Any, key: str, locate: Locate) -> Any:
    """Check `value` against the type hint `tp` and build it (dataclasses included)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, key, locate)
    if tp is Any:
        _check_plain(value, key, locate)
        return copy.deepcopy(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _build(option, value, key, locate)
            except ConfigError as e:
                # An error deeper inside (a list item) says more than "expected X or null".
                if e.key != key:
                    raise
        raise _type_error(tp, value, key, locate)
    if origin is Literal:
        if any(type(value) is type(choice) and value == choice for choice in args):
            return value
        problem = f"must be one of {', '.join(repr(a) for a in args)}, got {_describe(value)}"
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        raise ConfigError(
            locate(key), key, problem + (f"; did you mean '{close[0]}'?" if close else "")
        )
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(tp, value, key, locate)
        item_tp = args[0] if args else Any
        return [_build(item_tp, item, _join(key, i), locate) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(tp, value, key, locate)
        value_tp = args[1] if args else Any
        for name in value:
            if not isinstance(name, str):
                raise ConfigError(locate(key), key, f"keys must be strings, got {_describe(name)}")
        return {
            name: _build(value_tp, item, _join(key, name), locate) for name, item in value.items()
        }
    if tp in (bool, int, float, str):
        # Exact types: a bool is not an integer here; an integer is a fine float.
        if type(value) is not tp and not (tp is float and type(value) is int):
            raise _type_error(tp, value, key, locate)
        if tp is float and not math.isfinite(value):
            raise ConfigError(locate(key), key, f"must be a finite number, got {_describe(value)}")
        if tp is int and not -INT_LIMIT <= value <= INT_LIMIT:
            problem = f"must be within +-{INT_LIMIT}, got {_describe(value)}"
            raise ConfigError(locate(key), key, problem)
        return float(value) if tp is float else value
    raise TypeError(f"the recipe loader does not support the schema type {tp!r} of {key}")


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, key: str, locate: Locate) -> None:
    """Free-form values (task_args, kwargs) hold only what YAML's core schema writes."""
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                problem = f"keys must be strings, got {_describe(name)}"
                raise ConfigError(locate(key), key, problem)
            _check_plain(item, _join(key, name), locate)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, _join(key, i), locate)
    elif not isinstance(value, _PLAIN):
        problem = (
            f"expected strings, numbers, booleans, null, lists or mappings, "
            f"got {type(value).__name__} (from a YAML tag?)"
        )
        raise ConfigError(locate(key), key, problem)


def _build_dataclass(cls: Any, value: Any, key: str, locate: Locate) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if value is None:
        value = {}
    # A stage (or any dataclass with a `type` field) may be written as just its type: `- sft`.
    if isinstance(value, str) and "type" in fields:
        value = {"type": value}
    if not isinstance(value, dict):
        what = f"a mapping with keys {', '.join(fields)}"
        raise ConfigError(locate(key), key or "recipe", f"expected {what}, got {_describe(value)}")
    hints = _hints(cls)
    built = {}
    for name, item in value.items():
        child = _join(key, str(name))
        if name not in fields:
            valid = f"valid keys{f' under {key!r}' if key else ''}: {', '.join(fields)}"
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(locate(child), child, f"unknown key; {valid}{hint}")
        built[name] = _build(hints[name], item, child, locate)
    missing = [
        name
        for name, f in fields.items()
        if name not in built
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            locate(key), key or "recipe", f"missing required key(s): {', '.join(missing)}"
        )
    return cls(**built)


def _is_under(key: str, parent: str) -> bool:
    return key.startswith((parent + ".", parent + "["))


def _locator(sources: Mapping[str, str], path: str | None) -> Locate:
    """Where a key was set: its own entry, else where a key inside it was set (an override
    `trian.steps=5` creates the unknown section `trian`), else its nearest parent's."""

    def locate(key: str) -> str:
        if key in sources:
            return sources[key]
        inside = [where for k, where in sources.items() if _is_under(k, key)]
        if inside:
            return inside[0]
        probe = _parent(key)
        while probe:
            if probe in sources:
                return sources[probe]
            probe = _parent(probe)
        return f"{path} (default)" if path else "recipe defaults"

    return locate


def _map_lines(node: yaml.Node, key: str, path: str, lines: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for name_node, value_node in node.value:
            child = _join(key, str(name_node.value))
            line = name_node.start_mark.line + 1
            if child in first_line:
                problem = f"set twice (first on line {first_line[child]})"
                raise ConfigError(f"{path}:{line}", child, problem)
            first_line[child] = line
            lines[child] = f"{path}:{line}"
            _map_lines(value_node, child, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[_join(key, i)] = f"{path}:{item.start_mark.line + 1}"
            _map_lines(item, _join(key, i), path, lines)


def _read_yaml(path: str) -> tuple[dict, dict[str, str]]:
    """The recipe file's mapping and the line of every key path in it."""
    data, node = yaml_io.compose(yaml_io.read_text(path), path)
    if data is None or data == {}:
        problem = (
            "the recipe is empty; a recipe names at least what it changes from the defaults "
            "(see recipes/grpo_arithmetic.yaml)"
        )
        raise ConfigError(path, "", problem)
    if not isinstance(data, dict):
        problem = (
            f"a recipe is a mapping of sections (model:, data:, train:, ...), got {_describe(data)}"
        )
        raise ConfigError(f"{path}:1", "", problem)
    lines: dict[str, str] = {}
    _map_lines(node, "", path, lines)
    return data, lines


def _flatten(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    """Dotted leaves of a (nested) mapping; mappings merge key by key, other values replace."""
    if isinstance(value, dict) and value:
        for name, item in value.items():
            yield from _flatten(item, _join(key, str(name)))
    else:
        yield key, value


def _set(data: dict, key: str, value: Any, where: str) -> str:
    """Set the dotted `key` inside `data`; return the key in canonical form (`stages[0].type`)."""
    if not _KEY.fullmatch(key):
        raise ConfigError(where, key, "not a valid key path (write section.key, or list[i].key)")
    parts = [int(m[1]) if m[1] else m[2] for m in _KEY_PART.finditer(key)]
    node: Any = data
    canonical = ""
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = part if isinstance(part, int) else int(part) if part.isdigit() else None
            if index is None:
                raise ConfigError(where, canonical, f"is a list; index it as {canonical}[i]")
            if index >= len(node):
                raise ConfigError(
                    where, canonical, f"has {len(node)} item(s), so [{index}] is out of range"
                )
            canonical = _join(canonical, index)
            if last:
                node[index] = copy.deepcopy(value)
            elif isinstance(node[index], str):
                node[index] = {"type": node[index]}
            node = node[index]
        elif isinstance(node, dict):
            if isinstance(part, int):
                raise ConfigError(
                    where, canonical, f"is a mapping, not a list; use {canonical}.<key>"
                )
            canonical = _join(canonical, part)
            if last:
                node[part] = copy.deepcopy(value)
            elif node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            problem = f"is {_describe(node)}, so {key} cannot be set inside it"
            raise ConfigError(where, canonical, problem)
    return canonical


def _apply(data: dict, sources: dict[str, str], key: str, value: Any, where: str) -> None:
    for leaf, item in _flatten(value, key):
        canonical = _set(data, leaf, item, where)
        for old in [k for k in sources if _is_under(k, canonical)]:
            del sources[old]
        sources[canonical] = where


def _override_where(text: str) -> str:
    shown = text if len(text) <= 120 else text[:117] + "..."
    return f"command-line override {shown!r}"


def _parse_override(text: str) -> tuple[str, Any]:
    where = _override_where(text)
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(where, "", "expected key=value, e.g. train.steps=5")
    return key.strip(), yaml_io.parse_value(raw, where, key.strip())


validate = rules.validate


def sources_of(cfg: RecipeConfig) -> dict[str, str]:
    """Key path -> where it was set (`file:line` or `command-line override '...'`)."""
    return vars(cfg).get("_sources", {})


def config_error(cfg: RecipeConfig, key: str, message: str) -> ConfigError:
    """A ConfigError for `key` located where the recipe set it; for checks made after loading."""
    return ConfigError(_locator(sources_of(cfg), vars(cfg).get("_path"))(key), key, message)


def _finish(data: dict, sources: dict[str, str], path: str | None) -> RecipeConfig:
    locate = _locator(sources, path)
    cfg = _build(RecipeConfig, data, "", locate)
    validate(cfg, locate)
    # Plain instance attributes: not fields, so dumps and equality ignore them; pickling and
    # deepcopy keep them.
    vars(cfg)["_sources"] = sources
    vars(cfg)["_path"] = path
    return cfg


def load_recipe(path: str | None, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Recipe file (None: all defaults) + `key=value` overrides -> a validated RecipeConfig.

    An empty recipe file is an error (it is a mistake more often than a wish for defaults).

    Every stage's `overrides` are applied once here too, so a typo in the last stage fails
    at load time rather than after the earlier stages have trained.
    """
    data = to_dict(RecipeConfig())
    sources: dict[str, str] = {}
    if path is not None:
        file_data, sources = _read_yaml(path)
        for name, value in file_data.items():
            data[name] = _merge(data.get(name), value)
    for text in overrides:
        key, value = _parse_override(text)
        _apply(data, sources, key, value, _override_where(text))
    cfg = _finish(data, sources, path)
    for i, stage in enumerate(cfg.stages):
        staged = apply_overrides(cfg, stage.overrides, f"stages[{i}].overrides")
        rules.validate_stage(staged, i, _locator(sources_of(staged), path))
    return cfg


def _merge(base: Any, value: Any) -> Any:
    if isinstance(base, dict) and isinstance(value, dict):
        merged = dict(base)
        for name, item in value.items():
            merged[name] = _merge(base.get(name), item)
        return merged
    return value


def apply_overrides(cfg: RecipeConfig, overrides: Mapping[str, Any], where: str) -> RecipeConfig:
    """A new config with dotted overrides (`{train.steps: 20}` or nested mappings) applied.

    `where` names the recipe key holding them, e.g. `stages[1].overrides`; errors are located
    at the override's line in the recipe file and mention `where`.
    """
    sources = dict(sources_of(cfg))
    path = vars(cfg).get("_path")
    in_file = _locator(sources, path)
    data = to_dict(cfg)
    seen: dict[str, str] = {}  # each leaf set once: {train: {steps: 3}} and train.steps: 4 clash
    for key, value in overrides.items():
        for leaf, item in _flatten(value, str(key)):
            place = f"{in_file(f'{where}.{leaf}')} ({where})"
            if leaf in seen:
                raise ConfigError(
                    place, leaf, f"set twice in {where} (as {seen[leaf]!r} and as {str(key)!r})"
                )
            seen[leaf] = str(key)
            if leaf.split(".")[0].split("[")[0] == "stages":
                raise ConfigError(place, leaf, "a stage's overrides cannot change the stage list")
            why = rules.launch_only(leaf)
            if why:
                problem = f"cannot be set in a stage's overrides: {why} (set it at the top level)"
                raise ConfigError(place, leaf, problem)
            _apply(data, sources, leaf, item, place)
    return _finish(data, sources, path)


def to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_recipe(cfg: RecipeConfig) -> str:
    """The resolved recipe as YAML that `load_recipe` reads back to an equal config."""
    return yaml_io.dump(to_dict(cfg))


def save_resolved(cfg: RecipeConfig, run_dir: str) -> str:
    """Write `run_dir/config.yaml` atomically; return its path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    header = f"# rlkit train {path}  (resolved recipe of run '{cfg.run.name}')\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(header + dump_recipe(cfg))
    os.replace(tmp, path)
    return path
