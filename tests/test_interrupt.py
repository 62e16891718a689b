"""Interrupted training, through real processes: killed, stopped, out of disk, on changed data.

Each test runs ``drip stage train`` (or the records stage) in a child process on a copy of one
prepared session and interrupts it the way the world does: SIGKILL (the OOM killer, a power cut
seen from the file system), SIGKILL in the middle of writing a checkpoint, SIGTERM (``docker
stop``), a file size limit (``ulimit -f``, the same error path as a full disk). Afterwards the
session must resume to exactly what an uninterrupted run gives, or say in one line what is wrong.

Training is tiny (64 px, batch 1, the smallest network, no workers) and single-threaded, so the
runs are deterministic and cheap; each test still starts a Python with PyTorch, hence ``slow``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from drip.config import Config
from drip.errors import SessionError
from drip.session import Session
from drip.stages import configure, records, split, train
from drip.data.synthetic import make_dataset, write_drip_json
from drip.data.tfrecord import count_valid

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
pytestmark = pytest.mark.slow


# -- running drip in a child process -----------------------------------------------------------
class Child:
    """``python -m drip.cli ...`` in its own process; its stderr collected as it comes."""

    def __init__(self, *args: str, wrapper: Path | None = None, file_size_limit_kib: int | None = None,
                 own_group: bool = False):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # deterministic, and lean
        head = [sys.executable, str(wrapper)] if wrapper else [sys.executable, "-m", "drip.cli"]
        if file_size_limit_kib is not None:
            # What a user's `ulimit -f` does; Python ignores SIGXFSZ, so a write past the limit
            # fails with EFBIG, the same error path as a full disk (ENOSPC).
            head = ["bash", "-c", f'ulimit -f {file_size_limit_kib} && exec "$@"', "drip", *head]
        self.proc = subprocess.Popen(
            [*head, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=own_group,  # a process group of its own, as a job under systemd or Slurm
        )
        self._chunks: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stderr.read1(65536):
            self._chunks.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self._chunks).decode("utf-8", "replace")

    def wait_until(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"drip exited ({self.proc.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.stderr[-3000:]}")
            time.sleep(0.01)

    def finish(self, timeout: float = 600) -> int:
        self.proc.wait(timeout)
        self._reader.join(10)
        return self.proc.returncode


def train_args(session: Path, *extra: str) -> list[str]:
    return ["stage", "train", "--session_folder", str(session), *extra]


def run_train(session: Path, *extra: str, expect: int = 0, **kw) -> Child:
    child = Child(*train_args(session, *extra), **kw)
    code = child.finish()
    assert code == expect, f"exit {code}, expected {expect}:\n{child.stderr[-4000:]}"
    return child


def last_line(child: Child) -> str:
    assert "Traceback" not in child.stderr, child.stderr[-4000:]
    return child.stderr.strip().splitlines()[-1]


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: Path, b: Path) -> None:
    """Every tensor a step depends on (model, EMA, optimizer) equal, and the same step."""
    x, y = checkpoint(a), checkpoint(b)
    assert x["step"] == y["step"]
    for part in ("model", "ema"):
        if x.get(part) is None:
            assert y.get(part) is None
            continue
        assert x[part].keys() == y[part].keys()
        for key in x[part]:
            assert torch.equal(x[part][key], y[part][key]), f"{part}: {key}"
    states_x, states_y = x["optimizer"]["state"], y["optimizer"]["state"]
    assert states_x and states_x.keys() == states_y.keys()  # an optimizer that has stepped has state
    for index in states_x:
        for name, value in states_x[index].items():
            other = states_y[index][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (index, name)
    assert torch.equal(x["rng"]["torch"], y["rng"]["torch"])


def steps_in(session: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in train.list_checkpoints(session / "dl" / "checkpoints")]


# -- the prepared session and the uninterrupted run ----------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A session through split and records, with its pipeline.config: what training starts from."""
    root = tmp_path_factory.mktemp("interrupt")
    images = root / "images"
    write_drip_json(root / "metadata.json", make_dataset(images, 8, size=(96, 72), seed=5))
    config = Config().updated({
        "src_json_path": str(root / "metadata.json"), "image_folder_path": str(images),
        "network": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none", "image_size": 64,
        "batch_size": 1, "number_of_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 5,
        "augmentations": 0, "eval_percentage": 0, "num_workers": 0, "device": "cpu", "log_every": 1,
        "warmup_steps": 2, "images_per_shard": 4,
    }, "test")
    session = Session(root / "template")
    session.start_new()
    split.run(session, config)
    session.images_augmented.mkdir(exist_ok=True)
    (session.augmented_manifest).write_text(json.dumps({"image_root": str(session.images_augmented), "images": []}))
    records.run(session, config, workers=1)
    configure.write(session, config)
    return root, config


def fresh(prepared, tmp_path: Path, name: str = "session") -> Path:
    template = prepared[0] / "template"
    shutil.copytree(template, tmp_path / name, symlinks=True)
    return tmp_path / name


@pytest.fixture(scope="module")
def uninterrupted(prepared):
    """The same training, never interrupted: what every interrupted run must end up equal to."""
    session = fresh(prepared, prepared[0], "uninterrupted")
    run_train(session)
    assert steps_in(session) == [2, 4, 6]
    return session


# -- SIGKILL -------------------------------------------------------------------------------------
def test_killed_mid_training_resumes_to_the_same_weights(prepared, uninterrupted, tmp_path):
    session = fresh(prepared, tmp_path)
    child = Child(*train_args(session))
    first = session / "dl" / "checkpoints" / "step-0000002.pt"
    child.wait_until(first.exists, "the first checkpoint")
    child.proc.send_signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    assert not (session / "dl" / "model.pt").exists(), "killed too late: the run had finished"
    saved = steps_in(session)
    assert saved and saved[-1] < STEPS

    resumed = run_train(session, "--resume_training")
    assert f"resuming from step-{saved[-1]:07d}.pt at step {saved[-1]}" in resumed.stderr
    assert steps_in(session)[-1] == STEPS
    assert_same_training_state(session / "dl/checkpoints/step-0000006.pt", uninterrupted / "dl/checkpoints/step-0000006.pt")
    a = checkpoint(session / "dl" / "model.pt")["state_dict"]
    b = checkpoint(uninterrupted / "dl" / "model.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KILL_WHILE_SAVING = '''
"""drip, killed (SIGKILL, by itself) after writing half of checkpoint step {step}."""
import io, os, signal, sys
sys.path.insert(0, {root!r})
import torch

real_save = torch.save


def half_then_die(obj, f, *args, **kwargs):
    if ".step-{step:07d}.pt.tmp-" in str(getattr(f, "name", "")):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = half_then_die
from drip.cli import main

sys.exit(main(sys.argv[1:]))
'''


def test_killed_while_writing_a_checkpoint(prepared, uninterrupted, tmp_path):
    session = fresh(prepared, tmp_path)
    wrapper = tmp_path / "kill_while_saving.py"
    wrapper.write_text(KILL_WHILE_SAVING.format(root=str(ROOT), step=4))
    run_train(session, wrapper=wrapper, expect=-signal.SIGKILL)
    folder = session / "dl" / "checkpoints"
    strays = list(folder.glob(".step-0000004.pt.tmp-*"))
    assert len(strays) == 1 and strays[0].stat().st_size > 0  # the half-written file
    assert steps_in(session) == [2]  # the rename never happened: no step-4 to mistake
    checkpoint(folder / "step-0000002.pt")  # the previous one loads

    resumed = run_train(session, "--resume_training")
    assert "resuming from step-0000002.pt at step 2" in resumed.stderr
    assert f"removed {strays[0].name}" in resumed.stderr
    assert not list(folder.glob(".*.tmp-*"))
    assert_same_training_state(folder / "step-0000006.pt", uninterrupted / "dl/checkpoints/step-0000006.pt")


def test_the_checkpoint_resumed_from_is_never_pruned(prepared, tmp_path):
    session = fresh(prepared, tmp_path)
    s = Session(session)
    config = prepared[1].updated({"number_of_steps": 2, "keep_checkpoints": 1}, "test")
    train.run(s, config)
    train.run(s, config.updated({"number_of_steps": 6}, "test"), resume=True)
    # keep 1: step 4 went when step 6 came; step 2, where this run started, stays.
    assert steps_in(session) == [2, 6]


# -- out of space ----------------------------------------------------------------------------------
def test_disk_full_while_saving_is_one_clear_line_and_keeps_the_checkpoint(prepared, uninterrupted, tmp_path):
    session = tmp_path / "session"
    shutil.copytree(uninterrupted, session)
    before = (session / "dl/checkpoints/step-0000006.pt").read_bytes()
    # 16 MiB: the logs fit, a checkpoint (tens of MB) does not.
    child = run_train(session, "--resume_training", "--number_of_steps", "8", expect=2, file_size_limit_kib=16 * 1024)
    line = last_line(child)
    target = session / "dl" / "checkpoints" / "step-0000008.pt"
    assert line.startswith(f"drip: error: could not save {target}: the disk is full or a file size limit was hit"), line
    assert "ulimit -f" in line and "resume from step-0000006.pt with --resume_training" in line
    assert not target.exists() and not list(target.parent.glob(".*.tmp-*"))
    assert (session / "dl/checkpoints/step-0000006.pt").read_bytes() == before
    checkpoint(session / "dl/checkpoints/step-0000006.pt")


def test_disk_full_in_process_is_a_session_error(tmp_path):
    """The same error path for ENOSPC: a real full file system (a 1 MiB tmpfs), when root may mount one.

    CI runs the suite as root, so this runs there. Elsewhere it skips: mounting needs root (or
    CAP_SYS_ADMIN), and the ``ulimit -f`` test above covers the same error path without it.
    """
    from drip.detectors import files
    from drip.errors import SessionError

    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root (CI runs as root); "
                    "test_disk_full_while_saving covers the same path with ulimit -f")
    mount = tmp_path / "small disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False, capture_output=True).returncode:
        pytest.skip("root, but mounting a tmpfs is not allowed here (a container without CAP_SYS_ADMIN)")
    try:
        files.save_atomic({"w": torch.zeros(1000)}, mount / "old.pt")
        with pytest.raises(SessionError, match=r"could not save .*big.pt: the disk is full .*No space left on device"):
            files.save_atomic({"w": torch.zeros(1_000_000)}, mount / "big.pt")
        assert sorted(p.name for p in mount.iterdir()) == ["old.pt"]
        assert checkpoint(mount / "old.pt")["w"].shape == (1000,)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# -- SIGTERM (docker stop) -------------------------------------------------------------------------
def test_sigterm_saves_a_checkpoint_and_exits_130(prepared, tmp_path):
    session = fresh(prepared, tmp_path)
    child = Child(*train_args(session, "--number_of_steps", "50", "--checkpoint_every", "100"))
    # The progress bar appears once the loop's signal handlers are in place.
    child.wait_until(lambda: "[drip] train:" in child.stderr, "training to start")
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == 130, child.stderr[-3000:]
    line = last_line(child)
    match = re.fullmatch(r"drip: error: stopped at step (\d+); checkpoint saved to (.+); resume with --resume_training", line)
    assert match, line
    step = int(match.group(1))
    assert 0 < step < 50 and steps_in(session) == [step]
    assert Path(match.group(2)) == session / "dl" / "checkpoints" / f"step-{step:07d}.pt"
    assert checkpoint(Path(match.group(2)))["step"] == step
    assert not (session / "dl" / "model.pt").exists()


def _stat(pid: int | str) -> list[str] | None:
    """State, parent and the rest of /proc/PID/stat after the command name; None once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and (f := _stat(p.name)) and int(f[1]) == pid and f[0] not in ("Z", "X")]


def test_sigterm_to_the_whole_process_group_saves_a_checkpoint(prepared, tmp_path):
    """systemd, Slurm (scancel, preemption) and ``kill -TERM -- -PGID`` signal every process of the
    job, the DataLoader workers included: they must keep serving while the trainer saves."""
    session = fresh(prepared, tmp_path)
    child = Child(*train_args(session, "--number_of_steps", "5000", "--checkpoint_every", "3", "--num_workers", "2"),
                  own_group=True)
    first = session / "dl" / "checkpoints" / "step-0000003.pt"
    child.wait_until(first.exists, "the first checkpoint")  # the workers have served batches by now
    child.wait_until(lambda: len(children_of(child.proc.pid)) >= 2, "the two DataLoader workers")
    workers = children_of(child.proc.pid)
    os.killpg(child.proc.pid, signal.SIGTERM)
    assert child.finish() == 130, child.stderr[-3000:]
    assert "DataLoader worker" not in child.stderr, child.stderr[-3000:]
    line = last_line(child)
    match = re.fullmatch(r"drip: error: stopped at step (\d+); checkpoint saved to (.+); resume with --resume_training", line)
    assert match, line
    step = int(match.group(1))
    assert 3 <= step < 5000 and steps_in(session)[-1] == step
    assert checkpoint(Path(match.group(2)))["step"] == step
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "the DataLoader workers outlived the trainer"
        time.sleep(0.1)


# -- changed data ------------------------------------------------------------------------------
def test_resume_on_changed_records_is_refused_unless_allowed(prepared, uninterrupted, tmp_path):
    from drip.runtime import local

    session = tmp_path / "session"
    shutil.copytree(uninterrupted, session)
    s = Session(session)
    manifest = json.loads(s.train_manifest.read_text())
    manifest["images"] = manifest["images"][:-1]  # one training image fewer, as after a new split
    s.train_manifest.write_text(json.dumps(manifest))
    records.run(s, prepared[1], workers=1)

    child = run_train(session, "--resume_training", "--number_of_steps", "8", expect=2)
    line = last_line(child)
    assert line.startswith("drip: error: the records changed since step-0000006.pt was saved (train images 8 -> 7; train shards differ: ")
    assert "pass --allow_changed_data true to resume anyway" in line
    assert steps_in(session) == [2, 4, 6]

    # Allowed: a warning, training goes on, and the permission is not written to pipeline.config.
    local.train(session, {"allow_changed_data": True, "number_of_steps": 8}, resume=True)
    assert steps_in(session)[-1] == 8
    assert "allow_changed_data: false" in s.config_path.read_text()
    assert checkpoint(session / "dl/checkpoints/step-0000008.pt")["data"] == train.data_fingerprint(s)
    # The next resume compares against the newest checkpoint: the same records, no complaint.
    local.train(session, {"number_of_steps": 9}, resume=True)
    assert steps_in(session)[-1] == 9


def test_rewriting_the_same_records_is_not_a_change(prepared, uninterrupted, tmp_path):
    session = tmp_path / "session"
    shutil.copytree(uninterrupted, session)
    s = Session(session)
    was = train.data_fingerprint(s)
    records.run(s, prepared[1], workers=1)  # deterministic: the same bytes, the same SHA-256
    assert train.data_fingerprint(s) == was == checkpoint(session / "dl/checkpoints/step-0000006.pt")["data"]


# -- records killed halfway ----------------------------------------------------------------------
KILL_WHILE_RECORDING = '''
"""The records stage, killed (SIGKILL, by itself) in the middle of its second shard."""
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from drip.config import Config
from drip.errors import SessionError
from drip.session import Session
from drip.stages import records
from drip.data.tfrecord import TFRecordWriter, masked_crc32c, _U32, _U64

real_write = TFRecordWriter.write
written = []


def write_then_die(self, payload):
    written.append(1)
    if len(written) < 6:
        return real_write(self, payload)
    # Shards of 4: the second has one record and half of the next when the process dies.
    header = _U64.pack(len(payload))
    self._fh.write(header + _U32.pack(masked_crc32c(header)) + payload[: len(payload) // 2])
    self._fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)


TFRecordWriter.write = write_then_die
records.run(Session(Path(sys.argv[1])), Config.read(Path(sys.argv[1]) / "dl" / "pipeline.config"), workers=1)
'''


def test_records_killed_halfway_are_rewritten(prepared, tmp_path, capsys):
    session = fresh(prepared, tmp_path)
    s = Session(session)
    good = {p.name: p.read_bytes() for p in s.records_dir.glob("*.tfrecord")}
    assert len(good) == 2
    wrapper = tmp_path / "kill_while_recording.py"
    wrapper.write_text(KILL_WHILE_RECORDING.format(root=str(ROOT)))
    child = Child(str(session), wrapper=wrapper)
    assert child.finish() == -signal.SIGKILL
    left = sorted(p.name for p in s.records_dir.iterdir())
    assert "records.json" not in left  # written last: a half set is never taken for a whole one
    assert "train-00000-of-00002.tfrecord" in left
    (half,) = [p for p in s.records_dir.glob(".*.tmp-*")]
    assert count_valid(half) is None  # the CRC check sees it is incomplete

    refused = run_train(session, expect=2)
    assert "records.json is missing; run the records stage first" in last_line(refused)

    records.run(s, prepared[1], workers=1)
    assert "an earlier run stopped before it finished (1 shards, 1 half-written, no records.json)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in s.records_dir.glob("*.tfrecord")} == good
    assert not list(s.records_dir.glob(".*"))
    assert all(count_valid(s.records_dir / name) == 4 for name in good)


def test_damaged_shard_is_found_before_training_and_a_rerun_repairs_it(prepared, tmp_path, capsys):
    session = fresh(prepared, tmp_path)
    s = Session(session)
    shard = s.records_dir / "train-00001-of-00002.tfrecord"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # truncated, as by a copy that stopped
    config = prepared[1].updated({"number_of_steps": 1}, "test")
    with pytest.raises(SessionError, match=r"train-00001-of-00002.tfrecord: corrupt TFRecord at byte \d+ \(truncated record\); rerun the records stage"):
        train.run(s, config)
    records.run(s, prepared[1], workers=1)
    assert shard.read_bytes() == data and count_valid(shard) == 4
