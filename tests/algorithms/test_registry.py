import pytest

from rlkit.algorithms import ADVANTAGES, POLICY_LOSSES, Registry, ppo_clip_loss


def test_register_get_names():
    reg: Registry = Registry("widget")

    @reg.register("b")
    def b():
        return 2

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and reg.get("b")() == 2
    assert reg.names() == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_duplicate_name_is_rejected():
    reg: Registry = Registry("widget")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(lambda: 2)


def test_miss_lists_valid_names():
    reg: Registry = Registry("widget")
    reg.register("x")(lambda: 1)
    reg.register("y")(lambda: 2)
    with pytest.raises(ValueError, match=r"unknown widget 'z'; valid names: x, y"):
        reg.get("z")


def test_builtin_registries():
    assert ADVANTAGES.names() == [
        "dr_grpo",
        "grpo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "rloo",
    ]
    assert POLICY_LOSSES.get("ppo_clip") is ppo_clip_loss
