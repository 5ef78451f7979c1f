"""Config loading: typed sections, --set overrides, and errors that name the key and file."""

from dataclasses import dataclass
from typing import Annotated, Literal, Union

import pydantic
import pytest

from tokenmill.pipeline.config import ConfigError, StrictModel, apply_overrides, load_config


@dataclass
class SmallNet:
    __pydantic_config__ = {"extra": "forbid"}
    kind: Literal["small"] = "small"
    width: int = 8


@dataclass
class BigNet:
    __pydantic_config__ = {"extra": "forbid"}
    kind: Literal["big"] = "big"
    depth: int = 4


class Optim(StrictModel):
    lr: float = 1e-3
    steps: int = 10


class Example(StrictModel):
    model: Annotated[Union[SmallNet, BigNet], pydantic.Field(discriminator="kind")] = SmallNet()
    optim: Optim = Optim()


def write(tmp_path, text):
    path = tmp_path / "example.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "model:\n  kind: big\n  depth: 2\noptim:\n  lr: 0.01\n")
    config = load_config(Example, path, ["optim.steps=7", "model.depth=3"])
    assert config.model == BigNet(depth=3)
    assert config.optim.lr == 0.01 and config.optim.steps == 7


def test_defaults_without_a_file():
    assert load_config(Example).model == SmallNet()


def test_typo_names_key_and_file(tmp_path):
    path = write(tmp_path, "model:\n  kind: small\n  widht: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Example, path)
    assert "model.widht: unknown key" in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "optim:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"optim\.steps: .*integer.*'many'"):
        load_config(Example, path)


def test_override_typo_names_the_override(tmp_path):
    path = write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match=r"(?s)with --set optim\.stpes=3.*optim\.stpes: unknown key"):
        load_config(Example, path, ["optim.stpes=3"])


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.steps"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Example, tmp_path / "nope.yaml")


def test_a_bare_name_is_a_shipped_preset_from_any_folder(tmp_path, monkeypatch):
    from tokenmill.pipeline.training.config import load_train_config

    monkeypatch.chdir(tmp_path)  # not the repository: the preset comes from the installed package
    assert load_train_config("debug_vqvae", ["train.steps=3"]).run.name == "debug-vqvae"
    (tmp_path / "debug_vqvae").write_text("train: {steps: 7}\n")  # a file of that name here wins
    with pytest.raises(ConfigError, match="model: required key is missing"):
        load_train_config("debug_vqvae")
    with pytest.raises(ConfigError, match="'debug_vqvea' is neither a file nor a preset .*debug_vqvae"):
        load_config(Example, "debug_vqvea")
    with pytest.raises(ConfigError, match="does not exist"):  # a path is never a preset
        load_config(Example, "configs/debug_vqvae.yaml")
