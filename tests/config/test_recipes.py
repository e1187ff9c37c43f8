from pathlib import Path

import pytest

from rlkit.config import apply_overrides, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert RECIPES, "recipes/ holds no *.yaml"


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_opens_with_its_command(recipe, monkeypatch):
    # Recipes name paths relative to the repository root, where their command runs.
    monkeypatch.chdir(recipe.parents[1])
    first_line = recipe.read_text().splitlines()[0]
    assert first_line.startswith("#"), f"{recipe.name}: the first line must be a comment"
    assert f"rlkit train recipes/{recipe.name}" in first_line
    cfg = load_recipe(f"recipes/{recipe.name}")
    for i, stage in enumerate(cfg.stages):
        apply_overrides(cfg, stage.overrides, f"stages[{i}].overrides")
