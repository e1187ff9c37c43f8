import textwrap

import pytest
from rlkit.rewards import resolve_verifier

CHAT = [{"role": "user", "content": "What is 1 + 1?"}]
SAMPLES = [
    {"prompt": CHAT, "ground_truth": "2", "data_source": "arithmetic", "extra_info": {"i": 0}},
    {"prompt": "plain prompt", "ground_truth": "3", "data_source": "other", "extra_info": {"i": 1}},
]

USER_FILE = """
def rlkit_style(completion, sample, bonus=0.0):
    return float(completion.strip() == sample["ground_truth"]) + bonus


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    # verl's signature, unchanged
    ok = solution_str.strip() == ground_truth
    return {"score": float(ok), "acc": float(ok), "source": data_source, "i": extra_info["i"]}


def reward_func(prompts, completions, ground_truth, **kwargs):
    # TRL's signature: completions follow the prompt's form
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    kinds = [isinstance(c, list) for c in completions]
    assert kinds == [isinstance(p, list) for p in prompts]
    assert kwargs["data_source"] == ["arithmetic", "other"]
    return [float(t.strip() == g) for t, g in zip(texts, ground_truth)]


def two_args(a, b):
    return 1.0


def unclear(x):
    return 1.0


not_a_function = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(USER_FILE))
    return path


def test_registered_name(user_file):
    verifier = resolve_verifier("arithmetic")
    assert verifier.style == "rlkit" and not verifier.batched
    assert verifier(["2", "4"], SAMPLES) == [1.0, 0.0]


def test_file_spec_rlkit_style_with_kwargs_and_base_dir(user_file):
    verifier = resolve_verifier(
        "my_rewards.py:rlkit_style", kwargs={"bonus": 0.5}, base_dir=str(user_file.parent)
    )
    assert verifier.style == "rlkit"
    assert verifier.spec == f"{user_file}:rlkit_style"
    assert verifier(["2", "0"], SAMPLES) == [1.5, 0.5]


def test_verl_compute_score_plugged_in_unchanged(user_file):
    verifier = resolve_verifier(f"{user_file}:compute_score")
    assert verifier.style == "verl"
    out = verifier(["2", "3"], SAMPLES)
    assert out[0] == {"score": 1.0, "acc": 1.0, "source": "arithmetic", "i": 0}
    assert out[1]["score"] == 1.0 and out[1]["source"] == "other"


def test_trl_reward_func_plugged_in_unchanged(user_file):
    verifier = resolve_verifier(f"{user_file}:reward_func")
    assert verifier.style == "trl" and verifier.batched
    assert verifier(["2", "4"], SAMPLES) == [1.0, 0.0]


def test_module_spec(user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(user_file.parent))
    verifier = resolve_verifier("my_rewards:compute_score")
    assert verifier.style == "verl"


def test_explicit_style_overrides_detection(user_file):
    verifier = resolve_verifier(f"{user_file}:two_args", style="rlkit")
    assert verifier(["x"], SAMPLES[:1]) == [1.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing_file.py:fn", "does not exist"),
        ("no_such_pkg_xyz.module:fn", "cannot import module 'no_such_pkg_xyz.module'"),
        ("{file}:nope", "has no function 'nope'"),
        ("{file}:not_a_function", "not callable"),
        ("{file}:unclear", "cannot tell its style"),
        ("no_such_verifier", "unknown verifier"),
    ],
)
def test_bad_specs_name_the_spec_and_what_is_missing(user_file, tmp_path, spec, message):
    spec = spec.format(file=user_file)
    with pytest.raises(ValueError, match=message) as info:
        resolve_verifier(spec, base_dir=str(tmp_path))
    assert spec.split(":")[0] in str(info.value)


def test_bad_style(user_file):
    with pytest.raises(ValueError, match="style"):
        resolve_verifier("arithmetic", style="verl")
    with pytest.raises(ValueError, match="style"):
        resolve_verifier("arithmetic", style="openrlhf")


def test_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="importing .*broken.py failed: RuntimeError: boom"):
        resolve_verifier(f"{path}:fn")
