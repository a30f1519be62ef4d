"""Which served model a request's `model` field means (server/model_names.py), without MLX:
-m NAME=PATH, aliases with and without a target, globs in order, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxc.errors import InputError
from mlxc.model.refs import ModelRef
from mlxc.server.model_names import ModelNames, served_name, split_model_option


def _ref(name: str, source: str = "folder") -> ModelRef:
    return ModelRef(name, Path("/models") / Path(name).name, source)


def test_name_equals_path_names_a_model_and_a_plain_path_stays_one(tmp_path):
    assert split_model_option("small=./models/SmolLM2") == ("small", "./models/SmolLM2")
    assert split_model_option("./models/SmolLM2") == (None, "./models/SmolLM2")
    assert split_model_option("Qwen/Qwen3-0.6B") == (None, "Qwen/Qwen3-0.6B")
    odd = tmp_path / "a=b"  # a folder whose name has '=' is still that folder
    odd.mkdir()
    assert split_model_option(str(odd)) == (None, str(odd))
    assert split_model_option("./x/a=b") == (None, "./x/a=b")  # the name would hold '/'
    assert served_name(_ref("./models/tiny-llama")) == "tiny-llama"
    assert served_name(_ref("org/model", "hub")) == "org/model"


def test_aliases_route_to_their_target_and_globs_go_in_order():
    names = ModelNames(
        ["main", "small"], [_ref("./m/Qwen3"), _ref("./m/SmolLM2")],
        ("claude-haiku*=small", "claude-*", "gpt-4o-mini", "fast=SMALL"),
    )
    assert names.find("main") == 0 and names.find("SMALL") == 1
    assert names.find("claude-haiku-4-5-20251001") == 1  # given first: wins over claude-*
    assert names.find("claude-sonnet-4-5") == 0  # no target: the default
    assert names.find("gpt-4o-mini") == 0 and names.find("fast") == 1
    assert names.find("./m/SmolLM2") == 1 and names.find("Qwen3") == 0  # path, folder name
    assert names.find("gpt-5") is None
    assert names.listed() == [("main", 0), ("small", 1), ("gpt-4o-mini", 0), ("fast", 1)]


def test_a_model_s_own_name_is_never_shadowed_by_an_alias():
    names = ModelNames(["a", "b"], [_ref("./a"), _ref("./b")], ("b=a",))
    assert names.find("b") == 1


def test_an_alias_for_a_model_not_served_names_the_served_ones():
    with pytest.raises(InputError, match=r"'haiku'.*not served; the models are main, small"):
        ModelNames(["main", "small"], [_ref("./a"), _ref("./b")], ("claude-haiku*=haiku",))
