"""Distributed training through real torchrun processes on the CPU (gloo).

Every run here is ``drip`` under ``python -m torch.distributed.run``: two processes on one
machine (``--device cpu --nproc_per_node 2``), or two torchrun launches meeting at 127.0.0.1 as
two "nodes". The model is the smallest network from scratch at 64 px, batch 2, a few steps (FCOS
where one process and two must reach the same weights); the fast tests at the top check the
pieces that need no processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from drip.training import distributed
from drip.runtime import torchrun
from drip.config import Config
from drip.data.records import StepBatchSampler
from drip.errors import ConfigError
from drip.session import Session
from drip.stages import configure, records, split
from drip.data.synthetic import make_dataset, write_drip_json
from test_interrupt import Child

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4

SETTINGS = {
    "network": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none", "image_size": 64,
    "batch_size": 2, "number_of_steps": STEPS, "checkpoint_every": 2, "keep_checkpoints": 5,
    "augmentations": 0, "eval_percentage": 25, "num_workers": 0, "device": "cpu", "log_every": 1,
    "warmup_steps": 2, "images_per_shard": 4, "eval_every": 0, "box_batch_size_per_image": 32,
}


# -- without processes ---------------------------------------------------------------------------
def test_global_batch_split_and_refused():
    assert distributed.split_batch(8, 4) == 2
    with pytest.raises(ConfigError, match=r"--batch_size 5 does not divide over 2 processes.*--batch_size 4 or 6"):
        distributed.split_batch(5, 2)
    with pytest.raises(ConfigError, match=r"--batch_size 1 does not divide over 2 processes.*use --batch_size 2$"):
        distributed.split_batch(1, 2)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_together_read_each_steps_global_batch(world):
    sampler = StepBatchSampler(7, 4, seed=3, start_step=2, num_steps=9)
    slices = [list(distributed.RankSlice(sampler, r, world)) for r in range(world)]
    for step_index, batch in enumerate(sampler):
        assert [key for r in range(world) for key in slices[r][step_index]] == batch
    assert all(len(s) == len(sampler) == 7 for s in slices)


def test_backend_is_nccl_only_where_each_process_has_a_gpu():
    assert distributed.backend_for("cuda", 2, 2) == distributed.backend_for("cuda", 1, 8) == "nccl"
    assert distributed.backend_for("cuda", 2, 1) == "gloo"  # NCCL refuses two processes on one GPU
    assert distributed.backend_for("cpu", 2, 0) == distributed.backend_for("cpu", 1, 4) == "gloo"


def test_torchrun_command_lines(tmp_path):
    one = torchrun.torchrun_argv(torchrun.Launch(nproc_per_node="2"), 2, tmp_path, resume=False, dist_timeout=1)
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in one
    assert one[one.index("--nproc-per-node") + 1] == "2" and one[-4:] == ["-m", "drip.runtime.worker", "--session_folder",
                                                                         str(tmp_path)]
    two = torchrun.torchrun_argv(torchrun.Launch("1", 2, 1, "10.0.0.1:29400", 3), 1, tmp_path, resume=True,
                                 dist_timeout=5)
    assert "--standalone" not in two and two[-1] == "--resume"
    for flag, value in (("--rdzv-backend", "static"), ("--rdzv-endpoint", "10.0.0.1:29400"), ("--node-rank", "1"),
                        ("--nnodes", "2"), ("--max-restarts", "3"), ("--rdzv-conf", "join_timeout=300")):
        assert two[two.index(flag) + 1] == value
    with pytest.raises(ConfigError, match="--rdzv_endpoint HOST:PORT"):
        torchrun.Launch(nnodes=2).check()
    with pytest.raises(ConfigError, match="--node_rank 2 is not in 0..1"):
        torchrun.Launch(nnodes=2, node_rank=2, rdzv_endpoint="h:1").check()


def test_failure_report_becomes_one_line(tmp_path):
    """torchrun's own report (its ChildFailedError text) of a killed rank, read back as one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failure = ProcessFailure(local_rank=1, pid=4321, exitcode=-signal.SIGKILL, error_file=str(tmp_path / "none.json"))
    report = tmp_path / "torchrun.log"
    report.write_text("earlier run\n" + ChildFailedError("drip.runtime.worker", {1: failure}).format_msg())
    (tmp_path / "rank-1.log").write_text("[drip] rank 1 of 2\n")
    line = torchrun.failure_line(report, len("earlier run\n"), tmp_path, 1)
    assert "\n" not in line
    assert re.fullmatch(rf"rank 1 on \S+ was killed by SIGKILL; its log: {re.escape(str(tmp_path))}/rank-1\.log", line)


def test_a_rank_that_found_a_peer_hung_names_the_peer(tmp_path):
    """The rank that gave up waiting fails first; the line is about the one it waited for."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    said = (f"rank 1 on node-b stopped answering: rank 0 waited --dist_timeout (0.2 min) for it in a collective, and "
            f"its heartbeat stood still (hung, stopped, or its machine froze); its log: {tmp_path}/rank-1.log")
    (tmp_path / "rank-0.log").write_text(f"[drip] rank 0 of 2\ndrip: error: {said}\n")
    (tmp_path / "rank-1.log").write_text("[drip] rank 1 of 2\n")
    failures = {0: ProcessFailure(0, 11, 1, str(tmp_path / "none.json")),
                1: ProcessFailure(1, 12, -signal.SIGKILL, str(tmp_path / "none.json"))}
    report = tmp_path / "torchrun.log"
    report.write_text(ChildFailedError("drip.runtime.worker", failures).format_msg())
    assert torchrun.failure_line(report, 0, tmp_path, 1) == said
    # The waiting rank ends the hung one; torchrun may see that death first, report it alone and
    # stop the waiting rank itself (as CI once saw): the waiting rank's log still names the peer.
    report.write_text(ChildFailedError("drip.runtime.worker", {1: failures[1]}).format_msg())
    assert torchrun.failure_line(report, 0, tmp_path, 1) == said
    # A line an earlier run wrote is not this run's.
    earlier = {"rank-0.log": (tmp_path / "rank-0.log").stat().st_size}
    assert torchrun.failure_line(report, 0, tmp_path, 1, earlier).startswith("rank 1 on ")
    assert "was killed by SIGKILL" in torchrun.failure_line(report, 0, tmp_path, 1, earlier)


# -- real processes ----------------------------------------------------------------------------------
def prepare(root: Path, annotations, settings: dict) -> Path:
    """``root/template``: a session through split and records (what the ranks start from), made
    from ``annotations`` (written to ``root/metadata.json``, the images under ``root/images``)."""
    images = root / "images"
    write_drip_json(root / "metadata.json", annotations)
    config = Config().updated(
        {"src_json_path": str(root / "metadata.json"), "image_folder_path": str(images), **settings}, "test"
    )
    session = Session(root / "template")
    session.start_new()
    split.run(session, config)
    session.images_augmented.mkdir(exist_ok=True)
    session.augmented_manifest.write_text(json.dumps({"image_root": str(session.images_augmented), "images": []}))
    records.run(session, config, workers=1)
    configure.write(session, config)
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A session through split and records, and its raw data."""
    root = tmp_path_factory.mktemp("distributed")
    return prepare(root, make_dataset(root / "images", 8, size=(96, 72), seed=5), SETTINGS)


def fresh(prepared: Path, tmp_path: Path, name: str = "session") -> Path:
    shutil.copytree(prepared / "template", tmp_path / name, symlinks=True)
    return tmp_path / name


class Drip(Child):
    """``python -m drip.cli ...`` (or a starter) in its own process, as test_interrupt runs it."""

    def __init__(self, *args: str, starter: str | None = None):
        super().__init__(*args, wrapper=ROOT / starter if starter else None)

    def finish(self, expect: int = 0, timeout: float = 600) -> "Drip":
        code = super().finish(timeout)
        assert code == expect, f"exit {code}, expected {expect}:\n{self.stderr[-4000:]}"
        return self


def train(session: Path, *extra: str) -> Drip:
    return Drip("stage", "train", "--session_folder", str(session), *extra)


def after_first_checkpoint(session: Path, *extra: str) -> Drip:
    """A 2-process run, once its first checkpoint is written."""
    run = train(session, "--nproc_per_node", "2", *extra)
    run.wait_until((session / "dl" / "checkpoints" / "step-0000002.pt").exists, "the first checkpoint")
    return run


def steps_in(session: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (session / "dl" / "checkpoints").glob("step-*.pt"))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def losses(session: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(session / "dl" / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("loss/total")}


def drip_processes(session: Path) -> list[int]:
    """Processes whose command line names ``session``: what a clean exit must leave none of."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if str(session) in cmdline:
                found.append(int(entry.name))
    return found


def rank_pid(session: Path, rank: int) -> int:
    log = (session / "dl" / "logs" / f"rank-{rank}.log").read_text()
    return int(re.findall(rf"rank {rank} of \d+ .* pid (\d+)", log)[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


slow = pytest.mark.slow


@slow
def test_two_processes_through_the_starter_train_checkpoint_resume_export(prepared, tmp_path):
    session = tmp_path / "two procs"
    data = ["--src_json_path", str(prepared / "metadata.json"), "--image_folder_path", str(prepared / "images")]
    flags = [f"--{k}={v}" for k, v in SETTINGS.items() if k != "number_of_steps"]
    run = Drip("--runtime", "local", "--session_folder", str(session), *data, *flags, "--number_of_steps", "2",
               "--nproc_per_node", "2", starter="training_starter.py").finish()
    err = run.stderr
    assert err.count("split 8 of 8 images") == 1 and err.count("records: ") == 1  # prepared once, not per rank
    assert "2 processes x 1 images = batch 2" in err
    assert "weights identical on all 2 ranks after step 2" in err  # DDP kept them in sync (checked on each rank)
    logs = session / "dl" / "logs"
    assert "weights identical on all 2 ranks after step 2" in (logs / "rank-1.log").read_text()
    assert "[drip] train:" not in (logs / "rank-1.log").read_text()  # one progress bar: rank 0's
    assert steps_in(session) == [2]
    state = json.loads((session / "dl" / "session.json").read_text())["stages"]["train"]
    assert state["processes"] == 2 and state["step"] == 2
    assert load(session / "dl" / "model.pt")["last_step"] == 2

    resumed = Drip("--runtime", "local", "--session_folder", str(session), "--resume_training",
                   "--number_of_steps", "4", "--nproc_per_node", "2", starter="training_starter.py").finish()
    assert "resuming from step-0000002.pt at step 2" in resumed.stderr
    assert steps_in(session) == [2, 4]
    assert load(session / "dl" / "model.pt")["last_step"] == 4  # its "step" is the best evaluation's
    assert not drip_processes(session)


# FCOS started from a weights file: torchvision freezes the backbone's batch norm then (as for its
# own pretrained starting points), the head normalises with GroupNorm (per image), and its loss
# samples nothing. What it does couple across a batch is the normalisation of its losses by the
# foreground locations of the whole batch; every image below has the same two boxes in the same
# places (colours and classes differ), so each rank's count is the same and the mean of the
# ranks' losses is the one process's loss. SGD without clipping: an update proportional to the
# gradient (AdamW's is nearly scale-free, a clip caps it), so a wrong average shows in the weights.
EXACT = {
    **SETTINGS, "network": "fcos_resnet50_fpn", "number_of_steps": 3, "checkpoint_every": 3, "warmup_steps": 0,
    "optimizer": "sgd", "learning_rate": 0.005, "lr_schedule": "constant", "grad_clip": 0.0,
    "online_augmentation": "none", "ema": False,
}


def same_layout_dataset(images: Path, n: int) -> list:
    """``n`` images (96x72) whose boxes sit in the same places, symmetric under a flip; colours,
    backgrounds and classes differ."""
    import numpy as np
    from PIL import Image, ImageDraw

    from drip.data.dataset import ImageAnnotation
    from drip.data.synthetic import CLASSES

    rng = np.random.default_rng(21)
    boxes = [[28.0, 10.0, 68.0, 40.0], [38.0, 46.0, 58.0, 66.0]]
    out = []
    images.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (96, 72), tuple(int(c) for c in rng.integers(30, 220, 3)))
        draw = ImageDraw.Draw(img)
        labels = [CLASSES[int(c)] for c in rng.integers(0, len(CLASSES), len(boxes))]
        for box in boxes:
            draw.rectangle(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(images / f"img_{i}.png")
        out.append(ImageAnnotation(file=f"img_{i}.png", width=96, height=72, boxes=[list(b) for b in boxes],
                                   labels=labels))
    return out


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    from drip.detectors import models

    torch.manual_seed(0)
    weights = root / "fcos start.pt"
    torch.save(models.build_model("fcos_resnet50_fpn", 4, "none", 64).state_dict(), weights)
    return prepare(root, same_layout_dataset(root / "images", 8), {**EXACT, "weights": str(weights)})


@slow
def test_one_and_two_processes_reach_the_same_weights(exact, tmp_path):
    """The same seed and global batch on 1 and on 2 processes, three steps at the full rate: the
    weights after them are those of one process, to float rounding (summing in another order)."""
    one, two = fresh(exact, tmp_path, "one"), fresh(exact, tmp_path, "two")
    train(one).finish()
    train(two, "--nproc_per_node", "2").finish()
    start = load(exact / "fcos start.pt")
    a, b = (load(s / "dl" / "checkpoints" / "step-0000003.pt")["model"] for s in (one, two))
    assert a.keys() == b.keys()
    moved = max((a[k].double() - start[k].double()).abs().max().item() for k in start if k in a)
    apart = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    print(f"after 3 steps: largest weight change {moved:.3g}, largest difference 1 vs 2 processes {apart:.3g}")
    assert moved > 1e-3  # the steps did move the weights
    assert apart <= 1e-4 * moved, (moved, apart)


@slow
def test_checkpoints_resume_across_world_sizes(prepared, tmp_path):
    for first, then in (("2", "1"), ("1", "2")):
        session = fresh(prepared, tmp_path, f"{first}-then-{then}")
        train(session, "--number_of_steps", "2", "--nproc_per_node", first).finish()
        assert steps_in(session) == [2]
        resumed = train(session, "--resume_training", "--nproc_per_node", then).finish()
        assert "resuming from step-0000002.pt at step 2" in resumed.stderr
        assert steps_in(session) == [2, 4] and load(session / "dl/checkpoints/step-0000004.pt")["step"] == 4


@slow
def test_two_nodes_meet_at_127_0_0_1_and_finish_together(prepared, tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [fresh(prepared, tmp_path, f"node {r}") for r in (0, 1)]  # each node its own copy of the data
    runs = [train(nodes[r], "--number_of_steps", "2", "--nnodes", "2", "--node_rank", str(r), "--rdzv_endpoint",
                  endpoint, "--nproc_per_node", "1") for r in (0, 1)]
    for run in runs:
        run.finish()
    assert steps_in(nodes[0]) == [2] and (nodes[0] / "dl" / "model.pt").is_file()
    assert steps_in(nodes[1]) == [] and not (nodes[1] / "dl" / "model.pt").exists()  # rank 0 alone writes
    assert "rank 1 of 2" in (nodes[1] / "dl" / "logs" / "rank-1.log").read_text()
    assert "weights identical on all 2 ranks after step 2" in runs[0].stderr


@slow
def test_a_killed_worker_is_survived_with_restarts(prepared, tmp_path):
    session = fresh(prepared, tmp_path)
    # One kill, one restart allowed: the restarted ranks must meet at the first try. Before each
    # attempt had its own prefix in torchrun's store (drip/training/distributed.py), a restarted rank could
    # dial the dead attempt's address ("Connection refused") and use up the restart.
    run = after_first_checkpoint(session, "--max_restarts", "1")
    os.kill(rank_pid(session, 1), signal.SIGKILL)
    run.finish()
    log0 = (session / "dl" / "logs" / "rank-0.log").read_text()
    assert "restart 1" in log0 and re.search(r"resuming from step-000000[24]\.pt at step [24]", log0)
    assert steps_in(session)[-1] == STEPS and load(session / "dl" / "model.pt")["last_step"] == STEPS
    assert not drip_processes(session)


@slow
def test_a_killed_worker_without_restarts_ends_in_one_line(prepared, tmp_path):
    session = fresh(prepared, tmp_path)
    run = after_first_checkpoint(session, "--number_of_steps", "40")
    os.kill(rank_pid(session, 1), signal.SIGKILL)
    run.finish(expect=1)
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"drip: error: rank 1 on \S+ was killed by SIGKILL; its log: .*/dl/logs/rank-1\.log", last), last
    assert "Traceback" not in run.stderr
    for step in steps_in(session):  # what was written before stays whole
        assert load(session / "dl" / "checkpoints" / f"step-{step:07d}.pt")["step"] == step
    assert not drip_processes(session)


@slow
def test_ctrl_c_saves_one_checkpoint_and_leaves_no_process(prepared, tmp_path):
    session = fresh(prepared, tmp_path)
    run = after_first_checkpoint(session, "--number_of_steps", "40")
    run.proc.send_signal(signal.SIGINT)
    run.finish(expect=130)
    last = run.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"drip: error: stopped at step (\d+); checkpoint saved to (.*); resume with --resume_training",
                         last)
    assert match, run.stderr[-3000:]
    step = int(match.group(1))
    assert steps_in(session)[-1] == step and Path(match.group(2)).is_file()
    assert len([s for s in steps_in(session) if s % 2]) <= 1  # the stop wrote one checkpoint off the period
    assert not drip_processes(session)


@slow
def test_inference_on_two_processes_writes_what_one_writes(tmp_path):
    from drip.detectors import models

    torch.manual_seed(0)
    model = models.build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 4, "none", 64)
    model_path = models.export_model(tmp_path / "model.pt", model, "fasterrcnn_mobilenet_v3_large_320_fpn",
                                     ["circle", "triangle", "square"], 64, {})
    images = tmp_path / "images"
    make_dataset(images, 7, size=(96, 72), folders=("cam 1", "cam_2"), seed=8)
    common = ["infer", "--model", str(model_path), "--images_path", str(images), "--device", "cpu",
              "--threshold", "1", "--batch_size", "1"]
    Drip(*common, "--results_path", str(tmp_path / "one")).finish()
    two = Drip(*common, "--results_path", str(tmp_path / "two"), "--nproc_per_node", "2").finish()

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.parent.name != "logs"}

    one_files, two_files = files(tmp_path / "one"), files(tmp_path / "two")
    assert one_files.keys() == two_files.keys() and len(one_files) > 7
    for name in one_files:
        if name.endswith("detections.json"):
            a, b = (json.loads(f[name]) for f in (one_files, two_files))
            assert a == b, name
            assert len({r["image"] for r in a["images"]}) == len(a["images"])  # each image once
        else:
            assert one_files[name] == two_files[name], name
    done = [int(re.findall(r"infer: (\d+) images", (tmp_path / "two" / "logs" / f"rank-{r}.log").read_text())[-1])
            for r in (0, 1)]
    assert done == [7, 3]  # rank 0 reports all 7; rank 1 predicted its share, 3 of 7
    assert "infer: 7 images" in two.stderr


@slow
def test_a_hung_rank_ends_the_run_within_the_timeout_in_one_line(prepared, tmp_path):
    """SIGSTOP: the rank neither dies nor answers. The others' collectives time out after
    --dist_timeout, and the run ends in one line naming the hung rank and its log."""
    session = fresh(prepared, tmp_path)
    timeout_minutes = 0.25  # 15 s: long enough for a busy machine's slowest step, short for the test
    run = after_first_checkpoint(session, "--number_of_steps", "400", "--dist_timeout", str(timeout_minutes))
    hung = rank_pid(session, 1)
    os.kill(hung, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        run.finish(expect=1, timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)
    took = time.monotonic() - stopped
    print(f"ended {took:.1f} s after the SIGSTOP")
    last = run.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"drip: error: rank 1 on \S+ stopped answering: .*; its log: .*/dl/logs/rank-1\.log", last), last
    assert took < timeout_minutes * 60 + 20, took  # torchrun alone would wait 30 s more for the stopped rank
    assert not drip_processes(session)


@slow
def test_a_killed_worker_on_the_second_node_restarts_and_resumes(prepared, tmp_path):
    """Two torchrun launches as two "nodes" at 127.0.0.1, one restart allowed: the worker of
    node 1 is killed; node 1's torchrun restarts it, node 0's rank loses its peer and restarts
    too, and the two meet again and resume from node 0's newest checkpoint."""
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [fresh(prepared, tmp_path, f"node {r}") for r in (0, 1)]
    runs = [train(nodes[r], "--number_of_steps", "6", "--nnodes", "2", "--node_rank", str(r), "--rdzv_endpoint",
                  endpoint, "--nproc_per_node", "1", "--max_restarts", "1") for r in (0, 1)]
    runs[0].wait_until((nodes[0] / "dl" / "checkpoints" / "step-0000002.pt").exists, "the first checkpoint")
    killed = rank_pid(nodes[1], 1)
    os.kill(killed, signal.SIGKILL)
    for run in runs:
        run.finish()
    log0 = (nodes[0] / "dl" / "logs" / "rank-0.log").read_text()
    log1 = (nodes[1] / "dl" / "logs" / "rank-1.log").read_text()
    assert "restart 1" in log1 and rank_pid(nodes[1], 1) != killed  # a new worker on node 1
    assert "restart 1" in log0 and re.search(r"resuming from step-000000[24]\.pt at step [24]", log0), log0[-2000:]
    assert steps_in(nodes[0])[-1] == 6 and load(nodes[0] / "dl" / "model.pt")["last_step"] == 6
    assert steps_in(nodes[1]) == []  # rank 0 alone writes, on node 0
    assert "weights identical on all 2 ranks after step 6" in runs[0].stderr
    assert not drip_processes(nodes[0]) and not drip_processes(nodes[1])


@slow
def test_the_gpu_scripts_nccl_probe_holds_on_gloo_and_the_cpu():
    """tests/nccl_probe.py runs only on GPUs (test_gpu.py); its checks run here on gloo, so that a
    fault in the probe itself shows before the few minutes a GPU is lent."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(ROOT / "tests" / "nccl_probe.py"), "--cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert len(re.findall(r"nccl probe ok: rank [01] of 2, gloo on the CPU", out)) == 2, out[-3000:]
