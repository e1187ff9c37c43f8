"""The one error a recipe can raise, located at a key and the place that set it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A recipe value is wrong. The message reads `<where>: <key>: <problem>`.

    `where` is `file:line` for a key set in a YAML file, `command-line override 'k=v'` for a
    key set on the command line, or `<file> (default)` for a key left at its default.
    """

    def __init__(self, where: str, key: str, problem: str):
        self.where = where
        self.key = key
        self.problem = problem
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")

    def __reduce__(self):
        # Ray ships exceptions between processes by pickling; keep the three parts.
        return (type(self), (self.where, self.key, self.problem))
