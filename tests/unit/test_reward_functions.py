"""Built-in reward functions and the loader for ``--reward.function``."""

import textwrap

import pytest

import rlhf_ray.rewards as rewards
from rlhf_ray.rewards import digit_fraction, load_reward_function, word_count_target


# ---- built-in tasks -----------------------------------------------------------------


def test_digit_fraction_hand_examples():
    responses = ["123", "a1", "", "   ", "1 2 3", "x y", "12ab", " 4 ab\n5\t"]
    assert digit_fraction(["p"] * len(responses), responses) == [1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.5, 0.5]


def test_digit_fraction_counts_non_space_characters_only():
    # "7 days": 5 non-space characters, one digit.
    assert digit_fraction(["q"], ["7 days"]) == [pytest.approx(0.2)]


def test_digit_fraction_ignores_prompts_and_keeps_order():
    assert digit_fraction(["", "long prompt 123"], ["ab", "9"]) == [0.0, 1.0]
    assert digit_fraction([], []) == []


def test_word_count_target_hand_examples():
    assert word_count_target(["p"] * 4, ["a b c d", "a", "", "a b c d e f"]) == [0.0, -0.75, -1.0, -0.5]


# ---- load_reward_function -----------------------------------------------------------------


def test_load_from_module():
    assert load_reward_function("rlhf_ray.rewards:digit_fraction") is digit_fraction
    assert load_reward_function("rlhf_ray.rewards:word_count_target") is rewards.word_count_target


def _write_reward_file(directory, name="my_reward.py"):
    path = directory / name
    path.write_text(textwrap.dedent(
        """
        def length_reward(prompts, responses):
            return [float(len(r)) for r in responses]

        NOT_A_FUNCTION = 3
        """
    ))
    return path


def test_load_from_file_path(tmp_path):
    path = _write_reward_file(tmp_path)
    fn = load_reward_function(f"{path}:length_reward")
    assert fn(["p", "q"], ["ab", ""]) == [2.0, 0.0]


def test_load_from_relative_file_path(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    _write_reward_file(tmp_path / "sub")
    monkeypatch.chdir(tmp_path)
    fn = load_reward_function("sub/my_reward.py:length_reward")
    assert fn([], ["abc"]) == [3.0]


def test_two_files_with_the_same_function_name_stay_separate(tmp_path):
    (tmp_path / "a.py").write_text("def r(p, s):\n    return [1.0] * len(s)\n")
    (tmp_path / "b.py").write_text("def r(p, s):\n    return [2.0] * len(s)\n")
    fa = load_reward_function(f"{tmp_path / 'a.py'}:r")
    fb = load_reward_function(f"{tmp_path / 'b.py'}:r")
    assert (fa([], ["x"]), fb([], ["x"])) == ([1.0], [2.0])


def test_missing_file_names_the_path_and_the_flag(tmp_path):
    path = tmp_path / "nope.py"
    with pytest.raises(FileNotFoundError) as err:
        load_reward_function(f"{path}:reward")
    msg = str(err.value)
    assert f"reward function file {str(path)!r} does not exist" in msg
    assert f"--reward.function {f'{path}:reward'!r}" in msg


def test_missing_function_in_a_file(tmp_path):
    path = _write_reward_file(tmp_path)
    with pytest.raises(AttributeError) as err:
        load_reward_function(f"{path}:nope")
    assert str(err.value) == f"{str(path)!r} has no function 'nope' (from --reward.function {f'{path}:nope'!r})."


def test_non_callable_attribute_is_not_a_function(tmp_path):
    path = _write_reward_file(tmp_path)
    with pytest.raises(AttributeError, match="has no function 'NOT_A_FUNCTION'"):
        load_reward_function(f"{path}:NOT_A_FUNCTION")


def test_missing_function_in_a_module():
    with pytest.raises(AttributeError) as err:
        load_reward_function("rlhf_ray.rewards:nope")
    assert str(err.value) == ("'rlhf_ray.rewards' has no function 'nope' "
                              "(from --reward.function 'rlhf_ray.rewards:nope').")


def test_missing_module():
    with pytest.raises(ImportError) as err:
        load_reward_function("rlhf_ray.no_such_module:reward")
    assert str(err.value).startswith("cannot import module 'rlhf_ray.no_such_module' for --reward.function "
                                     "'rlhf_ray.no_such_module:reward': ")


@pytest.mark.parametrize("spec", ["rlhf_ray.rewards.digit_fraction", "my_reward.py", ""])
def test_malformed_spec(spec):
    with pytest.raises(ValueError) as err:
        load_reward_function(spec)
    assert str(err.value) == f"reward function {spec!r} must look like path/to/file.py:name or module:name."
