"""Config schema: types, ranges, unknown keys, the commented file and its round trip."""

import pytest

from drip.config import CLI, Config
from drip.errors import ConfigError


def test_defaults_keep_the_original_drip_flags():
    c = Config()
    assert (c.eval_percentage, c.batch_size) == (20.0, 4)
    assert c.src_json_path == "files/metadata.json"
    assert c.image_folder_path == "files/images/"


def test_values_are_coerced_from_strings():
    c = Config().updated({"batch_size": "8", "amp": "false", "eval_percentage": "12.5"}, CLI)
    assert (c.batch_size, c.amp, c.eval_percentage) == (8, False, 12.5)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("batch_size", "0", "--batch_size 0 is out of range; expected 1..4096"),
        ("eval_percentage", "101", "--eval_percentage 101 is out of range; expected 0..100"),
        ("eval_percentage", "-1", "out of range"),
        ("batch_size", "two", "--batch_size two is not a valid int"),
        ("batch_size", "2.5", "not a valid int"),
        ("learning_rate", "nan", "not a valid float"),
        ("optimizer", "adam", "--optimizer adam is not one of auto, sgd, adamw"),
        ("amp", "maybe", "not a valid bool"),
    ],
)
def test_bad_values_name_the_flag_and_the_fix(key, value, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        Config().updated({key: value}, CLI)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize'; did you mean 'batch_size'\?"):
        Config().updated({"batchsize": 3}, "pipeline.config")


def test_file_round_trip_keeps_every_value(tmp_path):
    c = Config().updated({"batch_size": 6, "learning_rate": 0.003, "network": 'we"ird name', "class_map_path": None}, CLI)
    path = tmp_path / "pipeline.config"
    path.write_text(c.to_text())
    assert Config.read(path) == c


def test_file_comments_every_field():
    text = Config().to_text()
    lines = text.splitlines()
    for name in Config.fields():
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
        assert lines[i - 1].startswith("# "), f"{name} has no comment above it"


def test_edited_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "pipeline.config"
    path.write_text("batch_size: 4\nnetwork: [unclosed\n")
    with pytest.raises(ConfigError, match=r"pipeline.config line \d: not valid YAML"):
        Config.read(path)
    path.write_text("batch_size: 0\n")
    with pytest.raises(ConfigError, match=r"pipeline.config: batch_size=0 is out of range"):
        Config.read(path)
    path.write_text("numbr_of_steps: 10\n")
    with pytest.raises(ConfigError, match="did you mean 'number_of_steps'"):
        Config.read(path)


def test_newer_schema_version_is_refused(tmp_path):
    path = tmp_path / "pipeline.config"
    path.write_text("version: 2\n")
    with pytest.raises(ConfigError, match="version 2 is not supported"):
        Config.read(path)
