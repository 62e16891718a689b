"""The session folder: new sessions move the old one to trash, never delete it."""

import json

from drip.session import Session, move, write_json


def _fill(session, marker):
    session.dl.mkdir(parents=True, exist_ok=True)
    (session.dl / "marker.txt").write_text(marker)
    session.images_augmented.mkdir(exist_ok=True)
    (session.images_augmented / "a.jpg").write_bytes(b"x" + marker.encode())


def test_start_new_moves_everything_to_trash(tmp_path):
    s = Session(tmp_path / "pipeline")
    assert s.start_new() is None and s.dl.is_dir()
    _fill(s, "first")
    first = s.start_new()
    _fill(s, "second")
    second = s.start_new()  # same second: must not collide with the first
    assert first != second
    assert (first / "dl" / "marker.txt").read_text() == "first"
    assert (second / "dl" / "marker.txt").read_text() == "second"
    assert (first / "images_augmented" / "a.jpg").read_bytes() == b"xfirst"
    assert list(s.dl.iterdir()) == [] and not s.images_augmented.exists()


def test_record_stage_accumulates(tmp_path):
    s = Session(tmp_path / "p")
    s.start_new()
    s.record_stage("split", train=3)
    s.record_stage("records", train=3)
    state = json.loads(s.state_path.read_text())
    assert set(state["stages"]) == {"split", "records"} and state["stages"]["split"]["train"] == 3


def test_write_json_leaves_no_temp_files(tmp_path):
    write_json(tmp_path / "a" / "b.json", {"x": "ü"})
    assert json.loads((tmp_path / "a" / "b.json").read_text(encoding="utf-8")) == {"x": "ü"}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_move_keeps_content(tmp_path):
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    (src / "deep" / "f").write_text("data")
    move(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "deep" / "f").read_text() == "data" and not src.exists()
