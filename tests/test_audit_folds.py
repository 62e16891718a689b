"""drip.runtime.folds: drip audit's folds side by side, one process each.

The scheduler runs real processes: a stand-in for ``python`` (a shell script) plays the folds
where a test is about the scheduling, and the end-to-end tests run ``drip audit --fold_jobs 2``
on the CPU itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drip.config import CLI, AuditConfig, Config
from drip.errors import ConfigError, DistributedError
from drip.runtime import folds
from drip.runtime.audit import fold_jobs
from drip.runtime.torchrun import Launch

# Plays ``python -m drip.runtime.audit --fold SPEC``: says where it runs, then acts as its spec's
# name says (the spec file itself is never read).
STAND_IN = """#!/bin/sh
echo "[drip] pid $$ gpu ${CUDA_VISIBLE_DEVICES:-none} cores $DRIP_FOLD_CPUS threads $OMP_NUM_THREADS"
case "$4" in
  *fails*) sleep 0.5; echo "Traceback (most recent call last):"; echo "drip: error: boom"; exit 3;;
  *hangs*) sleep 120;;
  *) sleep 0.3;;
esac
"""


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "python"
    path.write_text(STAND_IN)
    path.chmod(0o755)
    return str(path)


def _folds(tmp_path, *kinds):
    return [folds.Fold(n, tmp_path / f"fold-{n}-{kind}.json", tmp_path / f"fold-{n}" / "fold.log")
            for n, kind in enumerate(kinds, 1)]


def _said(fold) -> dict:
    words = fold.log.read_text().split()
    return dict(zip(words[1::2], words[2::2]))  # [drip] pid P gpu G cores C threads T


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- which fold runs where ---------------------------------------------------------------------
def test_each_slot_gets_one_gpu_named_as_this_process_names_it_and_its_share_of_the_cores():
    gpus = folds.visible_gpus(4, {"CUDA_VISIBLE_DEVICES": "3,5, 6,7"})
    assert gpus == ["3", "5", "6", "7"]
    assert folds.visible_gpus(2, {}) == ["0", "1"]
    assert folds.visible_gpus(2, {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb,GPU-cc"}) == ["GPU-aa", "GPU-bb"]
    places = folds.slots(4, gpus, list(range(16)))
    assert [s.gpu for s in places] == ["3", "5", "6", "7"]
    assert [s.cpus for s in places] == [tuple(range(i, i + 4)) for i in (0, 4, 8, 12)]
    env = folds.fold_environ(places[2], {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3,5,6,7"})
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and env["OMP_NUM_THREADS"] == "4"
    assert env[folds.CPUS_ENV] == "8,9,10,11"
    # The user's thread count stands; more slots than GPUs take the GPUs in turn; on the CPU none.
    assert folds.fold_environ(places[0], {"OMP_NUM_THREADS": "1"})["OMP_NUM_THREADS"] == "1"
    assert [s.gpu for s in folds.slots(3, ["0", "1"], [0, 1, 2])] == ["0", "1", "0"]
    cpu = folds.slots(2, [], [0, 1])
    assert [s.gpu for s in cpu] == [None, None] and [s.cpus for s in cpu] == [(0,), (1,)]
    assert "CUDA_VISIBLE_DEVICES" not in folds.fold_environ(cpu[0], {})
    assert folds.slots(2, [], [0])[1].cpus == (0,)  # fewer cores than slots: each keeps them all


@pytest.mark.parametrize("requested, device, gpus, launch, total, expected", [
    ("auto", "auto", 4, Launch(), 2, (2, ["0", "1"])),  # never more at once than there are folds
    ("auto", "auto", 4, Launch(), 5, (4, ["0", "1", "2", "3"])),
    ("auto", "cuda", 1, Launch(), 2, (1, [])),  # one GPU: today's path, one fold after another
    ("auto", "cpu", 4, Launch(), 2, (1, [])),
    ("auto", "auto", 0, Launch(), 2, (1, [])),
    ("auto", "auto", 4, None, 2, (1, [])),  # no launch: everything in this process
    ("auto", "auto", 4, Launch(nnodes=2, rdzv_endpoint="h:1"), 2, (1, [])),
    ("2", "cpu", 4, Launch(), 3, (2, [])),
    ("3", "auto", 2, Launch(), 3, (3, ["0", "1"])),  # two folds share GPU 0
    ("1", "auto", 4, Launch(), 3, (1, [])),
])
def test_fold_jobs_resolves_auto_from_the_gpus_this_process_sees(monkeypatch, requested, device, gpus, launch,
                                                                 total, expected):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = Config().updated({"device": device}, CLI)
    assert fold_jobs(requested, total, config, launch, gpu_count=lambda: gpus) == expected


def test_fold_jobs_is_auto_or_a_number_and_not_for_several_machines():
    assert AuditConfig().updated({"fold_jobs": " Auto"}, CLI).fold_jobs == "auto"
    assert AuditConfig().updated({"fold_jobs": 3}, CLI).fold_jobs == "3"
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ConfigError, match=f"--fold_jobs {bad} is not 'auto' or a number"):
            AuditConfig().updated({"fold_jobs": bad}, CLI)
    with pytest.raises(ConfigError, match="--nnodes 2"):
        fold_jobs("2", 2, Config(), Launch(nnodes=2, rdzv_endpoint="h:1"), gpu_count=lambda: 2)


def test_the_folds_run_at_once_on_their_slots_and_the_third_waits_for_a_free_one(tmp_path, stand_in, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    jobs = _folds(tmp_path, "ok", "ok", "ok")
    finished = []
    out = tmp_path / "console.txt"
    with open(out, "w") as console:
        folds.run(jobs, folds.slots(2, ["3", "5"], [0, 1, 2, 3]), finished.append, out=console, python=stand_in)
    said = [_said(fold) for fold in jobs]
    assert sorted(f.number for f in finished) == [1, 2, 3]
    assert [s["gpu"] for s in said[:2]] == ["3", "5"] and said[2]["gpu"] in ("3", "5")
    assert [s["cores"] for s in said[:2]] == ["0,1", "2,3"] and said[0]["threads"] == "2"
    assert len({s["pid"] for s in said}) == 3
    text = out.read_text()
    for n in (1, 2, 3):
        assert f"[drip fold {n}] pid " in text and f"fold {n} finished in" in text
    assert "(3 of 3 folds)" in text


def test_a_failed_fold_is_one_line_naming_it_and_its_log_and_ends_the_others(tmp_path, stand_in):
    jobs = _folds(tmp_path, "hangs", "fails", "ok")
    finished = []
    with open(tmp_path / "console.txt", "w") as console, pytest.raises(DistributedError) as caught:
        folds.run(jobs, folds.slots(2, [], [0, 1]), finished.append, out=console, python=stand_in)
    assert str(caught.value) == f"fold 2 of 3 exited with code 3 (boom); its log: {jobs[1].log}"
    assert finished == [] and not jobs[2].log.exists()  # the third never started
    assert not alive(int(_said(jobs[0])["pid"]))  # the hung one was ended, not left behind


def test_ctrl_c_ends_every_fold_process(tmp_path, stand_in):
    """``drip audit`` stands in as a Python process running ``folds.run``; SIGINT goes to it alone
    (the folds have sessions of their own, as a terminal's Ctrl-C would find them)."""
    jobs = _folds(tmp_path, "hangs", "hangs")
    driver = tmp_path / "audit.py"
    driver.write_text(
        "import json, sys\nfrom pathlib import Path\nfrom drip.errors import guarded\nfrom drip.runtime import folds\n"
        "given = json.loads(sys.argv[1])\n"
        "jobs = [folds.Fold(n, Path(spec), Path(log)) for n, spec, log in given['folds']]\n"
        "sys.exit(guarded(folds.run, jobs, folds.slots(2, [], [0, 1]), print, None, given['python']))\n")
    given = {"folds": [[j.number, str(j.spec), str(j.log)] for j in jobs], "python": stand_in}
    proc = subprocess.Popen([sys.executable, str(driver), json.dumps(given)], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.monotonic() + 60
    while not all(j.log.exists() and j.log.read_text().strip() for j in jobs):
        assert time.monotonic() < deadline and proc.poll() is None, "the folds never started"
        time.sleep(0.1)
    pids = [int(_said(j)["pid"]) for j in jobs]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "SIGINT: the audit stopped and ended its running folds (1, 2)" in err.strip().splitlines()[-1]
    assert not any(alive(pid) for pid in pids)


def test_the_console_tells_the_folds_apart_and_shows_progress_redraws_as_lines(tmp_path):
    import io

    fold = folds.Fold(2, tmp_path / "fold.json", tmp_path / "fold.log")
    fold.log.write_bytes(b"[drip] split finished\n\r[drip] train:  50%|5/10\r[drip] train: 100%|10/10\nTraceback (mo")
    job = folds._Running(fold, folds.Slot(0, None, (0,)), None)
    out = io.StringIO()
    job.pump(out)
    assert out.getvalue().splitlines() == ["[drip fold 2] split finished", "[drip fold 2] train:  50%|5/10",
                                           "[drip fold 2] train: 100%|10/10"]
    job.pump(out, final=True)
    assert out.getvalue().splitlines()[-1] == "[drip fold 2] Traceback (mo"


def test_the_time_left_counts_the_queued_folds_on_the_slots_that_free_first():
    # 10 s a fold; two running for 4 and 8 s, two queued, two slots: 6 s, then 2+10, then 6+10.
    assert folds.estimate_left([10.0], [4.0, 8.0], 2, 2) == pytest.approx(16.0)
    assert folds.estimate_left([10.0, 20.0], [], 0, 2) == 0.0


# -- drip audit --fold_jobs 2, end to end ------------------------------------------------------------
@pytest.mark.slow
def test_drip_audit_runs_two_folds_at_once_in_processes_of_their_own(tmp_path, dataset):
    """Two tiny folds side by side on the CPU (about 40 s on 2 cores): each fold's process records
    its pid and when it worked; the two differ and overlap, and the files are those one fold after
    another writes, keyed in fold order."""
    from test_audit import _audit

    from drip.evaluation.audit import assign_folds
    from drip.runtime.audit import read_dataset

    code, folder = _audit(tmp_path, dataset, list(dataset["annotations"]), "--fold_jobs", "2", "--report", "false")
    assert code == 0
    audit = folder / "dl" / "audit"
    ran = [json.loads((audit / "folds" / f"fold-{k}" / "dl" / "session.json").read_text())["stages"]["fold"]
           for k in (1, 2)]
    assert len({r["pid"] for r in ran} | {os.getpid()}) == 3, ran
    assert max(r["started_at"] for r in ran) < min(r["finished_at"] for r in ran), f"one after another: {ran}"
    assert [r["cores"] for r in ran] in (["0", "1"], ["0,1", "0,1"])  # 2 cores, or fewer: each keeps them all

    # predictions.json: every image once, in fold order (fold 1's held images first), as sequentially.
    config = Config().updated({"src_json_path": str(tmp_path / "labels.json"),
                               "image_folder_path": str(dataset["images"])}, CLI)
    items, _ = read_dataset(config)
    held = assign_folds([item.labels for item in items], 2, Config().seed)
    expected = [item.labels.image for k in (0, 1) for item, fold in zip(items, held) if fold == k]
    predictions = json.loads((audit / "predictions.json").read_text())
    assert sorted(list(predictions)[:held.count(0)]) == sorted(expected[:held.count(0)])
    assert sorted(predictions) == sorted(expected)
    for name, p in predictions.items():
        assert set(p) == {"image", "boxes", "labels", "scores"} and p["image"] == name
        assert len(p["boxes"]) == len(p["labels"]) == len(p["scores"])
    issues = json.loads((audit / "label_issues.json").read_text())
    assert isinstance(issues, list)
    for issue in issues:
        assert set(issue) >= {"image", "kind", "score", "box", "label", "suggested_label"}
    assert (audit / "index.html").is_file() and (audit / "suggested.json").is_file()
    stages = json.loads((folder / "dl" / "session.json").read_text())["stages"]
    assert stages["audit"]["folds"] == 2 and stages["audit"]["images"] == len(expected)
    assert (folder / "dl" / "model.pt").is_file()


@pytest.mark.slow
def test_a_fold_that_fails_stops_the_audit_with_one_line_and_nothing_claims_to_be_complete(tmp_path, dataset,
                                                                                             capsys):
    """Fold 2 trains on an undecodable image (--on_bad_image fail) and fails in its split; fold 1,
    still training, is ended, and dl/audit/ holds no issues."""
    from test_audit import _audit

    from drip.evaluation.audit import assign_folds
    from drip.runtime.audit import read_dataset

    config = Config().updated({"src_json_path": str(dataset["metadata"]), "image_folder_path": str(dataset["images"])},
                              CLI)
    items, _ = read_dataset(config)
    held = assign_folds([item.labels for item in items], 2, Config().seed)
    broken = next(item.path for item, fold in zip(items, held) if fold == 0)  # fold 2 trains on it
    broken.write_bytes(b"not an image")
    code, folder = _audit(tmp_path, dataset, list(dataset["annotations"]), "--fold_jobs", "2",
                          "--on_bad_image", "fail", "--number_of_steps", "200")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    audit = folder / "dl" / "audit"
    log = audit / "folds" / "fold-2" / "fold.log"
    assert code == 1 and last.startswith("drip: error: fold 2 of 2 exited with code 2 ("), last
    assert last.endswith(f"; its log: {log}") and log.is_file()
    first = err.split("audit: fold 1 started on ", 1)[1].split("pid ", 1)[1]
    assert not alive(int(first.split(";", 1)[0]))  # fold 1 was ended
    assert not (audit / "label_issues.json").exists() and not (audit / "predictions.json").exists()
    assert not (audit / "folds" / "fold-2" / "predictions.json").exists()
    state = folder / "dl" / "session.json"
    assert not state.exists() or "audit" not in json.loads(state.read_text()).get("stages", {})
    assert not (folder / "dl" / "model.pt").exists()
