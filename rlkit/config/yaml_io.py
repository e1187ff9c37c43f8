"""Reading recipe YAML safely: size, encoding, nesting and alias expansion are bounded.

A recipe is a few kilobytes of plain mappings. Anything far beyond that (a huge file, bytes
that are not UTF-8, nesting hundreds deep, aliases that expand exponentially, a recursive
alias) is refused with a `ConfigError` at the file and line, before any of it is walked.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from rlkit.config.errors import ConfigError

# Recipes are a few KB. This bounds the worst case, a flow list of 32k one-character items,
# to about half a second with libyaml (and two with PyYAML's pure-Python parser).
MAX_FILE_BYTES = 64 << 10
# Mappings and lists inside each other (a recipe needs about 6).
MAX_DEPTH = 40
# Values after expanding aliases: a YAML bomb of a few lines expands to billions.
MAX_VALUES = 100_000


class _LimitError(yaml.MarkedYAMLError):
    """A bound of this module exceeded at a place in the document."""


class _Bounded:
    """The composer's hooks, shared by both loaders: nesting depth and alias expansion."""

    _depth = 0
    # Whether ReaderError.position counts UTF-8 bytes (libyaml) or characters (PyYAML).
    byte_offsets = False

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses once per nesting level; stop long before Python's limit.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[attr-defined]
                problem = f"nested more than {MAX_DEPTH} levels deep"
                raise _LimitError(None, None, problem, mark)
            return super().compose_node(parent, index)  # type: ignore[misc]
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()  # type: ignore[misc]
        _check_expansion(node)
        return node


class _PyLoader(_Bounded, yaml.SafeLoader):
    yaml_implicit_resolvers: dict = {}


_LOADERS: list[Any] = [_PyLoader]
if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _CLoader(_Bounded, CParser, Composer, SafeConstructor, Resolver):  # type: ignore[misc]
        """libyaml scans and parses (several times faster than PyYAML's Python); composing
        stays in Python, where `_Bounded` sees every node."""

        yaml_implicit_resolvers: dict = {}
        byte_offsets = True
        get_single_node = Composer.get_single_node

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

    _LOADERS.append(_CLoader)

# The loader recipes are read with: libyaml's when PyYAML was built with it.
_Loader: Any = _LOADERS[-1]


class _Dumper(yaml.SafeDumper):
    yaml_implicit_resolvers: dict = {}


# YAML 1.2 core-schema scalars instead of PyYAML's YAML 1.1 ones: `yes`/`on` stay strings (a
# bool field must be given true/false), `3e-6` is a float (YAML 1.1 reads it as a string),
# `010` is ten, `2024-01-01` is a string. The dumper shares them so it quotes what the loader
# would misread.
_CORE_SCALARS = [
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
]
for _cls in (*_LOADERS, _Dumper):
    for _tag, _regexp, _first in _CORE_SCALARS:
        _cls.add_implicit_resolver(_tag, re.compile(_regexp), _first)  # type: ignore[attr-defined]


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    try:
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)
    except ValueError:
        # Python refuses to parse integers of more than 4300 digits.
        raise _LimitError(None, None, "integer too large", node.start_mark) from None


for _cls in _LOADERS:
    _cls.add_constructor("tag:yaml.org,2002:int", _construct_int)  # type: ignore[attr-defined]


def _check_expansion(root: yaml.Node | None) -> None:
    """Refuse a document that aliases make too big or too deep, or that contains itself.

    An alias is the same node object as its anchor, so the document is a graph: a chain of
    anchors each holding an alias of the one before is deep although no line is indented,
    and a few lines of aliases of aliases expand to billions of values. Each distinct node's
    expanded size and height are computed once (memoised), never by expanding it.
    """
    memo: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()

    def walk(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in open_nodes:
            raise _LimitError(
                None, None, "an alias refers to the value that contains it", node.start_mark
            )
        if key not in memo:
            if depth > MAX_DEPTH:
                problem = f"nested more than {MAX_DEPTH} levels deep (with aliases expanded)"
                raise _LimitError(None, None, problem, node.start_mark)
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            open_nodes.add(key)
            walked = [walk(child, depth + 1) for child in children]
            open_nodes.discard(key)
            size = 1 + sum(s for s, _ in walked)
            if size > MAX_VALUES:
                problem = f"expands to more than {MAX_VALUES} values (aliases repeating aliases?)"
                raise _LimitError(None, None, problem, node.start_mark)
            memo[key] = size, 1 + max((h for _, h in walked), default=0)
        size, height = memo[key]
        if depth + height - 1 > MAX_DEPTH:
            problem = f"nested more than {MAX_DEPTH} levels deep (with aliases expanded)"
            raise _LimitError(None, None, problem, node.start_mark)
        return size, height

    if root is not None:
        walk(root, 1)


def _line_of(text: str, position: int, byte_offsets: bool) -> int:
    if byte_offsets:
        return text.encode("utf-8")[:position].count(b"\n") + 1
    return text.count("\n", 0, position) + 1


def _decode(raw: bytes, path: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        problem = f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {column}"
        raise ConfigError(f"{path}:{line}", "", problem + " (save the recipe as UTF-8)") from None
    return text.removeprefix("\ufeff")


def read_text(path: str) -> str:
    """The recipe file's text, refused when it is not a small UTF-8 file."""
    try:
        # A FIFO or a device would block or never end: a recipe is a regular file.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError(path, "", "cannot read the recipe: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read the recipe: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        problem = f"the recipe is larger than {MAX_FILE_BYTES >> 10} KiB; recipes are a few KB"
        raise ConfigError(path, "", problem)
    return _decode(raw, path)


def compose(
    text: str, where: str, key: str = "", lines: bool = True
) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of one YAML document; errors are ConfigErrors at `where` (with
    `:line` appended when `lines`, i.e. `where` is a file) and `key`."""

    def fail(line: int | None, problem: str) -> ConfigError:
        place = f"{where}:{line}" if lines and line is not None else where
        return ConfigError(place, key, problem)

    loader = None
    try:
        # The reader refuses control characters as it is built.
        loader = _Loader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _LimitError as e:
        mark = e.problem_mark
        raise fail(mark.line + 1 if mark else None, f"refused: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(str(e.problem or e.context).split())
        raise fail(mark.line + 1 if mark else None, f"invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as e:
        code = e.character if isinstance(e.character, int) else ord(e.character)
        problem = f"invalid YAML: control character #x{code:04x}"
        raise fail(_line_of(text, e.position, _Loader.byte_offsets), problem) from None
    except yaml.YAMLError as e:
        raise fail(None, f"invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def parse_value(text: str, where: str, key: str) -> Any:
    """A command-line override's value, read with the same rules and bounds as a file."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(where, key, f"the value is longer than {MAX_FILE_BYTES >> 10} KiB")
    return compose(text, where, key, lines=False)[0]


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
