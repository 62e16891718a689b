"""The session folder: new sessions move the old one to trash, never delete it."""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from drip.errors import SessionError
from drip.session import Session, move, trash_folder, write_json


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


# -- moving to trash: never lose either copy ------------------------------------------------

@pytest.fixture
def other_fs(tmp_path):
    """A small tmpfs mounted inside ``tmp_path``: another file system, where rename fails (EXDEV)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "other fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        assert os.stat(mount).st_dev != os.stat(tmp_path).st_dev
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _tree(root):
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


def _sample(folder):
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / "deep" / "er" / "f.bin").write_bytes(os.urandom(3000))
    (folder / "g.txt").write_text("g")
    (folder / "link").symlink_to("g.txt")  # moved as a link, not as what it points to
    return _tree(folder)


@pytest.mark.parametrize("direction", ["from other fs", "to other fs"])
def test_move_across_file_systems_keeps_everything(tmp_path, other_fs, direction):
    disk = tmp_path / "disk"
    disk.mkdir()
    src_root, dst_root = (other_fs, disk) if direction == "from other fs" else (disk, other_fs)
    src = src_root / "dl"
    src.mkdir()
    before = _sample(src)
    move(src, dst_root / "dl")
    assert not src.exists() and _tree(dst_root / "dl") == before
    assert (dst_root / "dl" / "link").is_symlink()
    assert not (dst_root / "dl.partial").exists()
    single = src_root / "model.pt"  # a file, too
    single.write_bytes(b"weights")
    move(single, dst_root / "model.pt")
    assert (dst_root / "model.pt").read_bytes() == b"weights" and not single.exists()


def test_session_with_trash_on_another_file_system(tmp_path, other_fs):
    """The trash folder a link to another disk: start_new copies, then removes."""
    s = Session(tmp_path / "pipeline")
    s.root.mkdir()
    s.trash.symlink_to(other_fs, target_is_directory=True)
    _fill(s, "first")
    before = _tree(s.dl)
    moved = s.start_new()
    assert moved.parent == s.trash and os.stat(moved).st_dev == os.stat(other_fs).st_dev
    assert _tree(moved / "dl") == before and (moved / "images_augmented" / "a.jpg").read_bytes() == b"xfirst"
    assert list(s.dl.iterdir()) == [] and not s.images_augmented.exists()


def test_failed_copy_leaves_the_source_and_no_partial(tmp_path, other_fs):
    src = tmp_path / "dl"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))  # larger than the 4 MiB tmpfs
    (src / "small.txt").write_text("small")
    before = _tree(src)
    with pytest.raises(SessionError, match=r"cannot copy .* on another file system .*is unchanged: free space") as err:
        move(src, other_fs / "dl")
    assert "\n" not in str(err.value)
    assert _tree(src) == before
    assert list(other_fs.iterdir()) == []


def test_killed_copy_leaves_the_source_and_the_next_move_finishes(tmp_path, monkeypatch):
    """A copy killed halfway: the source is whole, the half copy is only ``.partial``."""
    src, dst = tmp_path / "dl", tmp_path / "trash" / "dl"
    src.mkdir()
    before = _sample(src)
    dst.parent.mkdir()

    def cross_device(*_):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    real_rename, real_copytree = os.rename, shutil.copytree
    copied = []

    def killed_after_one(a, b, **kw):
        if copied:
            raise KeyboardInterrupt  # what a kill looks like from here: the copy stops mid-way
        copied.append(b)
        return shutil.copy2(a, b, **kw)

    monkeypatch.setattr(os, "rename", lambda a, b: cross_device() if Path(a) == src else real_rename(a, b))
    def copytree(a, b, symlinks=False, ignore=None, _copy=None, *rest, **kw):
        kw.pop("copy_function", None)
        return real_copytree(a, b, symlinks, ignore, killed_after_one, *rest, **kw)

    monkeypatch.setattr(shutil, "copytree", copytree)
    with pytest.raises(KeyboardInterrupt):
        move(src, dst)
    assert copied and _tree(src) == before and not dst.exists()
    assert (tmp_path / "trash" / "dl.partial").is_dir()  # a killed process leaves it like this

    monkeypatch.setattr(shutil, "copytree", real_copytree)
    move(src, dst)  # the next run replaces the stale partial copy
    assert _tree(dst) == before and not src.exists()
    assert not (tmp_path / "trash" / "dl.partial").exists()


def test_move_never_overwrites(tmp_path):
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("earlier")
    with pytest.raises(SessionError, match="that name is taken; nothing was moved"):
        move(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_text() == "new" and (tmp_path / "b").read_text() == "earlier"
    with pytest.raises(SessionError, match="nothing was moved"):
        move(tmp_path / "missing", tmp_path / "c")


def test_trash_folders_in_the_same_second_are_distinct(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(time, "strftime", lambda *_: "20240101-000000")  # every call the same second
    made = [trash_folder(tmp_path / "trash") for _ in range(3)] + [trash_folder(tmp_path / "trash", "train") for _ in range(2)]
    assert [p.name for p in made] == [
        "20240101-000000", "20240101-000000-2", "20240101-000000-3", "20240101-000000-train", "20240101-000000-train-2",
    ]
    s = Session(tmp_path / "p")
    s.start_new()
    for marker in ("one", "two", "three"):
        _fill(s, marker)
        s.start_new()
    kept = sorted((p / "dl" / "marker.txt").read_text() for p in s.trash.iterdir())
    assert kept == ["one", "three", "two"]
