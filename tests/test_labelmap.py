"""TF label-map text: parse what TF tools write, write what they read, reject what is ambiguous."""

import pytest

from drip.errors import InputError
from drip.data.labelmap import LabelMap

TF_STYLE = """
# a comment
item {
  name: "/m/01g317"
  id: 2
  display_name: "person"
}
item { id: 1 name: 'it\\'s a cat' }
"""


def test_parses_tf_style_and_orders_by_id():
    lm = LabelMap.parse(TF_STYLE)
    assert lm.names == ("it's a cat", "/m/01g317")
    assert lm.ids == {"it's a cat": 1, "/m/01g317": 2}


def test_round_trip(tmp_path):
    lm = LabelMap.from_names(["cat", "dog's toy", "back\\slash"])
    lm.write(tmp_path / "m.pbtxt")
    assert LabelMap.read(tmp_path / "m.pbtxt") == lm


@pytest.mark.parametrize(
    "text, expected",
    [
        ("item { id: 1 name: 'a' }\nitem { id: 3 name: 'b' }", "must run 1..2 without gaps"),
        ("item { id: 1 name: 'a' }\nitem { id: 1 name: 'b' }", "line 2: id 1 is used twice"),
        ("item { id: 1 name: 'a' }\nitem { id: 2 name: 'a' }", "name 'a' is used twice"),
        ("item { id: 1 }", "needs both 'id' and 'name'"),
        ("item { id: 1 name: 'a' ", "never closed"),
        ("", "no 'item"),
        ("items { id: 1 name: 'a' }", "expected 'item {'"),
        ("item { id: 0 name: 'a' }", "id 0 must be an integer >= 1"),
    ],
)
def test_errors_say_what_and_where(text, expected):
    with pytest.raises(InputError, match=expected.replace("(", r"\(").replace("{", r"\{")):
        LabelMap.parse(text, "class_map.pbtxt")


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(InputError, match="--class_map_path"):
        LabelMap.read(tmp_path / "nope.pbtxt")
