"""Hostile files: models that would run code, archives that would write elsewhere, names that escape.

Whatever a user brings (a ``.pt`` from the internet, a zip of one, annotations naming
``../../etc/passwd``), Drip reads it as data: a pickle that would run code is refused before the
code runs, an archive member that would land outside its folder refuses the archive before
anything is written, and no name in a file makes Drip read or write outside the image folder, the
session or the results.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from drip.detectors import files, models
from drip.errors import DripError, InputError, ModelError
from drip.data.synthetic import CLASSES, make_dataset, write_drip_json

ROOT = Path(__file__).resolve().parents[1]
NETWORK = "fasterrcnn_mobilenet_v3_large_320_fpn"


class Payload:
    """Unpickling this runs ``touch marker``: what a booby-trapped model file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def plant_pickle(path: Path, marker: Path, drip_model: bool = True) -> Path:
    content = {"format": "drip-model", "network": NETWORK, "payload": Payload(marker)} if drip_model else {"w": Payload(marker)}
    torch.save(content, path)
    assert not marker.exists()
    return path


def files_under(folder: Path) -> dict[str, tuple[int, int] | None]:
    return {p.relative_to(folder).as_posix(): ((p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def starter(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / name), "--runtime", "local", *args],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )


def one_error_line(out: subprocess.CompletedProcess, *parts: str) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("drip: error: ")
    for part in parts:
        assert part in last, last
    return last


@pytest.fixture
def small_data(tmp_path):
    images = tmp_path / "my images"
    annotations = make_dataset(images, 6, size=(96, 64), seed=2)
    write_drip_json(tmp_path / "metadata.json", annotations)
    return ["--src_json_path", str(tmp_path / "metadata.json"), "--image_folder_path", str(images),
            "--network", NETWORK, "--weights", "none", "--image_size", "64", "--batch_size", "1",
            "--number_of_steps", "1", "--augmentations", "0", "--num_workers", "0", "--device", "cpu"]


# -- models that would run code ----------------------------------------------------------------
@pytest.mark.slow
def test_booby_trapped_network_is_refused_before_the_session_moves(tmp_path, small_data):
    marker = tmp_path / "pwned"
    evil = plant_pickle(tmp_path / "evil model.pt", marker)
    session = tmp_path / "session"
    (session / "dl").mkdir(parents=True)
    (session / "dl" / "keep.txt").write_text("the current session")
    out = starter("training_starter.py", *small_data, "--session_folder", str(session), "--network", str(evil))
    one_error_line(out, "--network", str(evil), "refused", "would run code")
    assert not marker.exists()
    assert (session / "dl" / "keep.txt").read_text() == "the current session"  # checked before anything moved


@pytest.mark.slow
def test_booby_trapped_weights_are_refused(tmp_path, small_data):
    marker = tmp_path / "pwned"
    evil = plant_pickle(tmp_path / "weights.pth", marker, drip_model=False)
    out = starter("training_starter.py", *small_data, "--session_folder", str(tmp_path / "s"), "--weights", str(evil))
    one_error_line(out, "--weights", "refused")
    assert not marker.exists()
    assert not (tmp_path / "s" / "dl" / "model.pt").exists()


@pytest.mark.slow
def test_booby_trapped_model_for_inference_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = plant_pickle(tmp_path / "model.pt", marker)
    make_dataset(tmp_path / "images", 2, size=(64, 48), folders=("cam",), seed=1)
    out = starter("inference_starter.py", "--model", str(evil), "--images_path", str(tmp_path / "images"),
                  "--results_path", str(tmp_path / "results"), "--device", "cpu")
    one_error_line(out, "refused")
    assert not marker.exists()


@pytest.mark.parametrize("wrapped", ["dict", "list", "nested"])
def test_refused_wherever_the_payload_hides(tmp_path, wrapped):
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    content = {"dict": {"state_dict": {"w": payload}}, "list": [torch.zeros(1), payload],
               "nested": {"a": {"b": [{"c": payload}]}}}[wrapped]
    path = tmp_path / "m.pt"
    torch.save(content, path)
    for load in (lambda: models.load_model(path), lambda: models.network_name(str(path)),
                 lambda: models.build_model(NETWORK, 4, str(path), 64)):
        with pytest.raises(ModelError, match="refused"):
            load()
    assert not marker.exists()


# -- archives ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One state_dict file and one Drip model file, copied by the tests that need them."""
    folder = tmp_path_factory.mktemp("built")
    model = models.build_model(NETWORK, 4, "none", 64)
    torch.save(model.state_dict(), folder / "weights.pth")
    models.export_model(folder / "model.pt", model, NETWORK, CLASSES, 64, {})
    return folder


def _copier(source: Path):
    def copy(path: Path) -> Path:
        shutil.copyfile(source, path)
        return path
    return copy


@pytest.fixture
def state_dict_file(built):
    return _copier(built / "weights.pth")


@pytest.fixture
def drip_model_file(built):
    return _copier(built / "model.pt")


def test_zip_of_weights_is_unpacked_into_the_cache(tmp_path, state_dict_file):
    weights = state_dict_file(tmp_path / "weights.pth")
    archive = tmp_path / "weights.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(weights, "export/weights.pth")
        zf.writestr("export/README.txt", "trained on my data")
    cache = tmp_path / "session" / "cache"
    model = models.build_model(NETWORK, 4, str(archive), 64, cache)
    expected = torch.load(weights, weights_only=True)
    key = "backbone.body.0.0.weight"
    assert torch.equal(model.state_dict()[key], expected[key])
    (unpacked,) = cache.glob("archives/*/weights.pth")
    assert unpacked.read_bytes() == weights.read_bytes()
    assert not list(cache.glob("archives/*/README.txt"))  # only the model file is written
    models.build_model(NETWORK, 4, str(archive), 64, cache)  # again: found in the cache
    assert len(list(cache.glob("archives/*/*"))) == 1


def test_zip_of_a_drip_model_works_as_network(tmp_path, drip_model_file):
    model = drip_model_file(tmp_path / "model.pt")
    archive = tmp_path / "my model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(model, "model.pt")
    assert models.network_name(str(archive)) == NETWORK
    rebuilt = models.build_model(str(archive), 4, "coco", 64, tmp_path / "cache")  # no download: a model file
    assert list((tmp_path / "cache" / "archives").glob("*/model.pt"))
    original = torch.load(model, weights_only=True)["state_dict"]
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_a_torch_file_named_zip_is_read_as_it_is(tmp_path, drip_model_file):
    path = drip_model_file(tmp_path / "model.zip")  # torch.save writes a zip archive
    assert models.network_name(str(path), tmp_path / "cache") == NETWORK
    assert not (tmp_path / "cache").exists()


def test_booby_trapped_model_in_a_zip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = plant_pickle(tmp_path / "evil.pt", marker)
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(evil, "evil.pt")
    with pytest.raises(ModelError, match="refused"):
        models.build_model(str(archive), 4, "none", 64, tmp_path / "cache")
    with pytest.raises(ModelError, match="refused"):
        models.build_model(NETWORK, 4, str(archive), 64, tmp_path / "cache")
    assert not marker.exists()


def _member(name: str, mode: int | None = None) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    if mode is not None:
        info.external_attr = mode << 16
    return info


HOSTILE = {
    "dot-dot": ([("../evil.pt", None)], "points outside the archive"),
    "deep dot-dot": ([("models/../../../evil.pt", None)], "points outside the archive"),
    "backslash dot-dot": (["..\\..\\evil.pt"], "points outside the archive"),
    "absolute": ([("{outside}/evil.pt", None)], "absolute path"),  # {outside}: a folder of this test's own
    "drive": ([("C:/evil.pt", None)], "absolute path"),
    "symlink": ([("model.pt", stat.S_IFLNK | 0o777)], "symbolic link"),
    "symlink folder": ([("up", stat.S_IFLNK | 0o777), ("model.pt", None)], "symbolic link"),
    "fifo": ([("model.pt", stat.S_IFIFO | 0o644)], "not a regular file"),
    "device": ([("model.pt", stat.S_IFCHR | 0o644)], "not a regular file"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("flag", ["--network", "--weights"])
def test_hostile_archive_member_refuses_the_archive_and_writes_nothing(tmp_path, case, flag):
    members, expected = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "bad.zip"
    payload = b"weights"  # never read: the archive is refused before any member is
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good/model.pt", payload)  # a good model file too: the archive is refused whole
        for member in members:
            name, mode = member if isinstance(member, tuple) else (member, None)
            name = name.format(outside=tmp_path / "outside")
            zf.writestr(_member(name, mode), "../../outside" if mode and stat.S_ISLNK(mode) else payload)
    before = files_under(tmp_path)
    cache = tmp_path / "session" / "cache"
    with pytest.raises(ModelError, match=expected) as err:
        if flag == "--network":
            models.build_model(str(archive), 4, "none", 64, cache)
        else:
            models.build_model(NETWORK, 4, str(archive), 64, cache)
    assert str(err.value).startswith(f"{flag} {archive}") and "\n" not in str(err.value)
    assert files_under(tmp_path) == before  # nothing written, not even in the cache
    assert not (tmp_path / "outside").exists()


def test_archive_limits(tmp_path, monkeypatch):
    target = tmp_path / "target"
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(files.ARCHIVE_MAX_MEMBERS + 1):
            zf.writestr(f"f{i}.txt", "")
    with pytest.raises(ModelError, match="members, more than the 1000"):
        files.extract_model_archive(many, target)

    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.pt", b"\0" * 4_000_000)  # a few KiB packed: a small zip bomb
    monkeypatch.setattr(files, "ARCHIVE_MAX_BYTES", 1_000_000)
    with pytest.raises(ModelError, match="unpacks to 3.8 MiB, more than the 1.0 MiB"):
        files.extract_model_archive(big, target)

    encrypted = tmp_path / "encrypted.zip"
    with zipfile.ZipFile(encrypted, "w") as zf:
        zf.writestr("model.pt", b"x")
    data = bytearray(encrypted.read_bytes())  # zipfile cannot encrypt: set the flag by hand
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + offset] |= 0x1
    encrypted.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="encrypted"):
        files.extract_model_archive(encrypted, target)
    assert not target.exists()


@pytest.mark.parametrize("names, expected", [
    ([], r"found 0 \(none\)"),
    (["a.pt", "b.pth"], r"found 2 \(a.pt, b.pth\)"),
])
def test_archive_without_exactly_one_model_file(tmp_path, names, expected):
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("notes.txt", "x")
        zf.writestr("__MACOSX/._a.pt", "resource fork, not a model")
        for name in names:
            zf.writestr(name, "x")
    with pytest.raises(ModelError, match=f"expected exactly one model file.*{expected}"):
        files.extract_model_archive(archive, tmp_path / "t")


def test_damaged_archive_is_a_model_error(tmp_path, drip_model_file):
    model = drip_model_file(tmp_path / "model.pt")
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(model, "model.pt")
    data = archive.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="not a readable zip archive"):
        models.network_name(str(tmp_path / "cut.zip"), tmp_path / "cache")
    flipped = bytearray(data)
    flipped[len(flipped) // 3] ^= 0xFF  # inside the member's data: the CRC check fails on unpacking
    (tmp_path / "flip.zip").write_bytes(bytes(flipped))
    with pytest.raises(ModelError):
        models.network_name(str(tmp_path / "flip.zip"), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no half file left
    with pytest.raises(ModelError, match="no such model file"):
        models.network_name(str(tmp_path / "missing.zip"))


# -- names that would escape -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "set_a/../../outside.jpg", "..\\..\\x.jpg"])
def test_session_manifests_naming_outside_files_are_refused(tmp_path, name, dataset, session, config):
    """A hand-edited session manifest is read as carefully as the user's annotations."""
    from drip.stages import augment, records, split

    split.run(session, config)
    manifest = json.loads(session.train_manifest.read_text())
    manifest["images"][0]["file"] = name
    session.train_manifest.write_text(json.dumps(manifest))
    outside = tmp_path.parent
    before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(InputError, match="give it relative to"):
        augment.run(session, config, workers=1)
    with pytest.raises(InputError, match="give it relative to"):
        records.run(session, config, workers=1)
    assert sorted(p.name for p in outside.iterdir()) == before
    assert not session.images_augmented.exists() or all(
        p.resolve().is_relative_to(session.images_augmented.resolve()) for p in session.images_augmented.rglob("*")
    )


ODD = ["..jpg.jpg", "a..b.jpg", "-rf.jpg", "x\\..\\y.jpg", "trash.jpg", "detections.jpg", "nö pe.jpg", "..../b.jpg"]


def test_result_files_stay_inside_the_results_folder(tmp_path):
    """Result names come from image file names: none of them leads out of --results_path."""
    from PIL import Image

    from drip.evaluation.results import GROUP_INDEX, find_images

    images = tmp_path / "images"
    for rel in ODD + [f"cam/{n}" for n in ODD]:
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path, format="JPEG")
    results = tmp_path / "results"
    groups = find_images(images, results)
    outputs = []
    for group, jobs in groups.items():
        for job in jobs:
            for suffix in (".json", ".jpg"):
                out = (results / group / f"{job.out_stem}{suffix}").resolve()
                assert out.is_relative_to(results.resolve() / group), (group, job.out_stem)
                outputs.append(out)
        assert (results / group / GROUP_INDEX).resolve().parent == (results / group).resolve()
    assert len(outputs) == len(set(outputs))  # and no two images share a result file


def test_drip_errors_only(tmp_path):
    """The hostile inputs above are all answered with Drip's own error type, never another."""
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(DripError):
        models.network_name(str(junk), tmp_path / "cache")
