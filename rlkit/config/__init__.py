"""Typed recipe schema, YAML loading with dotted overrides, and located validation errors."""

from rlkit.config.errors import ConfigError
from rlkit.config.loader import (
    apply_overrides,
    config_error,
    dump_recipe,
    load_recipe,
    save_resolved,
    sources_of,
    to_dict,
    validate,
)
from rlkit.config.schema import RecipeConfig, StageConfig

__all__ = [
    "ConfigError",
    "RecipeConfig",
    "StageConfig",
    "apply_overrides",
    "config_error",
    "dump_recipe",
    "load_recipe",
    "save_resolved",
    "sources_of",
    "to_dict",
    "validate",
]
