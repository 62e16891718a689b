"""The Docker runtime end to end: the real starters, a real engine, the sample data, the CPU.

A session fixture makes everything these tests need, as ``.ci/run`` does on a fresh machine:

1. an engine: ``scripts/docker_engine.sh start`` installs Debian's docker.io and starts dockerd
   only when none answers (and the fixture stops only the dockerd it started);
2. a base image without a registry: ``scripts/docker_base_image.sh`` (debootstrap + Python);
3. Drip's image on that base, through the same code the starters use (``--base_image``).

Without root and without an engine the tests skip, unless $CI is set: then they fail.

Run as root, the starters get SUDO_UID/SUDO_GID/SUDO_USER of an unprivileged user, exactly
what ``sudo python3 training_starter.py`` sets: the tests then prove that files written in the
container belong to that user and not to root. Run as a user in the docker group, they check
that files belong to that user.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = os.environ.get("DRIP_TEST_BASE_IMAGE", "drip-test-base:bookworm")
SUDO_UID = 4321  # an unprivileged user with no account here: nothing on the host can help it
TINY = [
    "--network", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "none", "--image_size", "128",
    "--batch_size", "2", "--augmentations", "1", "--checkpoint_every", "2", "--log_every", "1",
    "--warmup_steps", "1",
]
# Host networking for builds: pip in the build then reaches the index directly (PLATFORM.md).
RUNTIME = ["--runtime", "docker", "--base_image", BASE_IMAGE, "--docker_network", "host",
           "--device", "cpu", "--gpus", "none"]
# Training itself runs on the engine's default bridge, as users run it: TensorBoard is then
# reached through a port published on 127.0.0.1 (the image is built by then, so no pip).
RUNTIME_BRIDGE = RUNTIME[:4] + RUNTIME[6:]

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def _answers() -> bool:
    from drip import cli

    return cli.docker_unavailable_reason() is None


@pytest.fixture(scope="session")
def drip_image():
    """Drip's image tag, with an engine and the base image made first when missing."""
    try:
        import docker
    except ImportError:
        unavailable("the Docker SDK for Python is not installed (pip install docker)")
    started_engine = False
    if not _answers():
        if os.geteuid() != 0:
            unavailable("no Docker engine answers, and starting one needs root")
        r = subprocess.run([str(ROOT / "scripts" / "docker_engine.sh"), "start"], text=True, check=False)
        if r.returncode != 0:
            pytest.fail("scripts/docker_engine.sh start failed (see its output above)")
        started_engine = True
    try:
        from drip.runtime import docker as dr

        client = dr.connect()
        try:
            client.images.get(BASE_IMAGE)
        except docker.errors.ImageNotFound:
            if os.geteuid() != 0:
                unavailable(f"the base image {BASE_IMAGE} is missing; sudo scripts/docker_base_image.sh makes it")
            r = subprocess.run([str(ROOT / "scripts" / "docker_base_image.sh"), BASE_IMAGE], text=True, check=False)
            if r.returncode != 0:
                pytest.fail("scripts/docker_base_image.sh failed (see its output above)")
        plan = dr.ImagePlan.of_project(BASE_IMAGE)
        start = time.monotonic()
        tag = dr.ensure_image(client, plan, "host")
        print(f"[test] image {tag}: ready in {time.monotonic() - start:.0f} s, "
              f"{client.images.get(tag).attrs['Size'] / 1e9:.2f} GB", file=sys.stderr)
        yield tag
    finally:
        if started_engine:
            subprocess.run([str(ROOT / "scripts" / "docker_engine.sh"), "stop"], check=False)


@pytest.fixture(scope="module")
def user():
    """(uid, gid, extra env) of the user the starters act for."""
    if os.geteuid() == 0:
        return SUDO_UID, SUDO_UID, {"SUDO_UID": str(SUDO_UID), "SUDO_GID": str(SUDO_UID), "SUDO_USER": "drip-test"}
    return os.getuid(), os.getgid(), {}


@pytest.fixture(scope="module")
def workdir(user):
    """A copy of the sample data in a folder with a space, owned by the user, like theirs."""
    uid, gid, _ = user
    base = Path(tempfile.mkdtemp(prefix="drip docker "))
    work = base / "my project"
    work.mkdir()
    shutil.copytree(ROOT / "files" / "images", work / "files" / "images")
    shutil.copytree(ROOT / "files" / "test_images", work / "files" / "test images")
    for name in ("metadata.json", "class_map.pbtxt"):
        shutil.copy(ROOT / "files" / name, work / "files" / name)
    if os.geteuid() == 0:
        for path in [base, *base.rglob("*")]:
            os.chown(path, uid, gid)
    os.chmod(base, 0o755)
    yield work
    shutil.rmtree(base, ignore_errors=True)


def starter(name: str, args: list[str], cwd: Path, user, sigint_ignored: bool = False, **popen) -> subprocess.Popen:
    """The starter ``name`` run by the user; with ``sigint_ignored`` it starts with SIGINT ignored,
    as a background job of a script or a CI runner does (its shell ignores SIGINT for it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUDO_", "DRIP_"))}
    env.update(user[2])
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
    try:
        return subprocess.Popen(
            [sys.executable, str(ROOT / name), *args], cwd=cwd, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen,
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outward_address() -> str | None:
    """This host's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def owned_by(folder: Path, uid: int, gid: int) -> list[str]:
    """Paths under ``folder`` (and itself) NOT owned by uid:gid."""
    wrong = []
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        if (st.st_uid, st.st_gid) != (uid, gid):
            wrong.append(f"{path} {st.st_uid}:{st.st_gid}")
    return wrong


def connect_ex(address: str, port: int) -> int:
    """0 when something accepts a TCP connection at address:port, else the errno."""
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((address, port))


def container_addresses(pid: int) -> dict[str, str] | None:
    """The bridge address and gateway of the container the starter with ``pid`` runs, if it runs."""
    import docker

    for container in docker.from_env().containers.list(filters={"name": f"drip-{pid}-"}):
        for net in container.attrs["NetworkSettings"]["Networks"].values():
            if net.get("IPAddress"):
                return {"container": net["IPAddress"], "gateway": net["Gateway"]}
    return None


@pytest.fixture(scope="module")
def trained(drip_image, workdir, user):
    """Train for 3 steps in the container on the bridge while polling TensorBoard; what was seen.

    Once TensorBoard answers on the host's loopback, and while the container still runs, the same
    port and TensorBoard's own (6006) are probed on every other address that could reach it: the
    container's bridge address (other containers, and the host through the bridge), the bridge's
    gateway on the host (where other containers reach the host), and the host's outward address.
    """
    port = free_port()
    answered = []
    elsewhere: dict[str, int] = {}

    def poll(proc):
        addresses = None
        while proc.poll() is None and not answered:
            addresses = addresses or container_addresses(proc.pid)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                    answered.append(r.status)
            except OSError:
                time.sleep(0.5)
        if not answered:
            return
        addresses = addresses or container_addresses(proc.pid) or {}
        outward = outward_address()
        if outward:
            addresses["outward"] = outward
        for name, address in addresses.items():
            # 6006, TensorBoard's port inside, only on the container: the host may run its own.
            for p in sorted({port, 6006}) if name == "container" else [port]:
                elsewhere[f"{name} {address}:{p}"] = connect_ex(address, p)
        elsewhere["still running"] = proc.poll() is None

    start = time.monotonic()
    proc = starter("training_starter.py", [
        *RUNTIME_BRIDGE, *TINY, "--src_json_path", "files/metadata.json", "--image_folder_path", "files/images",
        "--class_map_path", "files/class_map.pbtxt", "--number_of_steps", "3", "--tensorboard_port", str(port),
    ], workdir, user)
    poller = threading.Thread(target=poll, args=(proc,), daemon=True)
    poller.start()
    rc, out = finish(proc)
    poller.join(5)
    print(f"[test] train in the container: {time.monotonic() - start:.0f} s", file=sys.stderr)
    return {"rc": rc, "out": out, "tensorboard": answered, "port": port, "elsewhere": elsewhere}


def test_train_in_the_container(trained, workdir, user):
    assert trained["rc"] == 0, trained["out"][-3000:]
    dl = workdir / "pipeline" / "dl"
    assert (dl / "model.pt").is_file()
    assert (dl / "pipeline.config").is_file() and (dl / "label_map.pbtxt").is_file()
    assert max(p.name for p in (dl / "checkpoints").glob("step-*.pt")) == "step-0000003.pt"
    assert list((dl / "logs").rglob("events.out.tfevents.*"))
    # The flags reached drip as typed: the config records the user's paths, not container ones.
    assert 'src_json_path: "files/metadata.json"' in (dl / "pipeline.config").read_text()


def test_tensorboard_answered_on_loopback_only_during_training(trained):
    assert trained["tensorboard"] == [200], trained["out"][-2000:]
    probes = dict(trained["elsewhere"])
    assert probes.pop("still running") is True, "training ended before the other addresses were probed"
    assert any(name.startswith("container ") for name in probes), probes  # the bridge address was probed
    reachable = [name for name, code in probes.items() if code == 0]
    assert not reachable, f"TensorBoard's ports answer beyond the host's loopback: {reachable}"
    assert f"TensorBoard: http://127.0.0.1:{trained['port']}/" in trained["out"]


def test_files_written_in_the_container_belong_to_the_user(trained, workdir, user):
    uid, gid, _ = user
    assert owned_by(workdir / "pipeline", uid, gid) == []


def test_resume_continues_from_the_checkpoint(trained, workdir, user):
    rc, out = finish(starter("training_starter.py", [
        *RUNTIME, "--resume_training", "--number_of_steps", "5", "--tensorboard_port", "0",
    ], workdir, user))
    assert rc == 0, out[-3000:]
    steps = sorted(p.name for p in (workdir / "pipeline" / "dl" / "checkpoints").glob("step-*.pt"))
    assert steps[-1] == "step-0000005.pt"
    assert owned_by(workdir / "pipeline", *user[:2]) == []


def test_infer_in_the_container(trained, workdir, user):
    results = workdir / "files" / "results"
    rc, out = finish(starter("inference_starter.py", [
        *RUNTIME, "--images_path", "files/test images", "--threshold", "0", "--batch_size", "2",
    ], workdir, user))
    assert rc == 0, out[-3000:]
    groups = sorted(p.name for p in results.iterdir())
    assert groups == ["batch_1", "batch_2"]
    for group in groups:
        assert isinstance(json.loads((results / group / "detections.json").read_text()), dict)
        assert list((results / group).glob("*.jpg")) and list((results / group).glob("*.json"))
    assert owned_by(results, *user[:2]) == []


SHELL_PROBE = r"""
echo "uid=$(id -u) gid=$(id -g) HOME=$HOME USER=$USER"
probe() { if ( : > "$1" ) 2>/dev/null; then echo "WRITABLE $2"; rm -f "$1"; else echo "READONLY $2"; fi; }
probe files/images/.probe images
probe files/metadata.json metadata
probe files/class_map.pbtxt class_map
probe pipeline/.probe session
probe "$HOME/.probe" home
test -e /var/run/docker.sock && echo "ENGINE SOCKET VISIBLE" || echo "no engine socket"
ls /drip/host 2>/dev/null || echo "no other host paths"
"""


def test_shell_has_the_same_mounts_and_inputs_are_read_only(trained, workdir, user):
    uid, gid, _ = user
    proc = starter("training_starter.py", [
        *RUNTIME, "--src_json_path", "files/metadata.json", "--image_folder_path", "files/images",
        "--class_map_path", "files/class_map.pbtxt", "--shell",
    ], workdir, user, stdin=subprocess.PIPE)
    out, _ = proc.communicate(SHELL_PROBE, timeout=300)
    assert proc.returncode == 0, out
    name = user[2].get("SUDO_USER") or os.environ.get("USER") or ""
    assert f"uid={uid} gid={gid}" in out and f"USER={name}" in out
    for line in ("READONLY images", "READONLY metadata", "READONLY class_map", "WRITABLE session",
                 "WRITABLE home", "no engine socket", "no other host paths"):
        assert line in out, out
    assert "shell with the mounts of: drip train --session_folder pipeline/" in out


def test_ctrl_c_checkpoints_and_exits_130(drip_image, trained, workdir, user):
    """SIGINT to the starter reaches training in the container, which saves its step and stops.

    The starter starts with SIGINT ignored, as a background job of a script or a CI runner does:
    a starter that kept it so never forwarded the stop (no "stopping" line, training went on past
    the test's timeout, as in one CI run). Its own handler must hear it."""
    session = workdir / "interrupted session"
    proc = starter("training_starter.py", [
        *RUNTIME, *TINY, "--number_of_steps", "1000", "--session_folder", str(session),
        "--tensorboard_port", "0", "--class_map_path", "files/class_map.pbtxt",
    ], workdir, user, sigint_ignored=True)
    first = session / "dl" / "checkpoints" / "step-0000002.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.exists(), finish(proc, 60)[1][-3000:]
    proc.send_signal(signal.SIGINT)
    rc, out = finish(proc, 180)
    assert rc == 130, out[-3000:]
    steps = sorted(p.name for p in (session / "dl" / "checkpoints").glob("step-*.pt"))
    assert steps[-1] > "step-0000002.pt", (steps, out[-2000:])
    assert "stopping: SIGINT sent to the container" in out
    import docker

    client = docker.from_env()
    assert not client.containers.list(all=True, filters={"name": f"drip-{proc.pid}-"})
    assert owned_by(session, *user[:2]) == []


def test_exit_code_of_the_container_is_the_starters(drip_image, workdir, user):
    rc, out = finish(starter("training_starter.py", [
        *RUNTIME, "--src_json_path", "no such file.json", "--session_folder", "failing session",
        "--tensorboard_port", "0",
    ], workdir, user))
    assert rc == 2, out
    assert "drip: error: --src_json_path no such file.json: not found" in out  # as typed, as local


def test_doctor_passes_on_this_engine(drip_image, workdir):
    r = subprocess.run([sys.executable, "-m", "drip.cli", "doctor", "--base_image", BASE_IMAGE,
                        "--session_folder", str(workdir / "pipeline")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^OK    engine +Docker", r.stdout, re.MULTILINE)
    assert re.search(r"^OK    image +drip:[0-9a-f]{16} ", r.stdout, re.MULTILINE)
    assert re.search(r"^(OK|WARN)  nvidia", r.stdout, re.MULTILINE)  # a CPU-only engine is a warning


# -- GPUs ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_training_in_the_container_on_the_gpu(drip_image, workdir, user):
    """--gpus all --device cuda: the container gets the GPU and trains on it, mixed precision."""
    import torch

    from drip.runtime import docker as dr

    if dr.nvidia_runtime(dr.connect().info()) is False:
        reason = f"this machine has a GPU but the Docker engine cannot pass it on: {dr.NVIDIA_FIX}"
        if os.environ.get("DRIP_REQUIRE_GPU") == "1":
            pytest.fail(reason)
        unavailable(reason)
    session = workdir / "gpu session"
    rc, out = finish(starter("training_starter.py", [
        *RUNTIME[:6], "--device", "cuda", "--gpus", "all", *TINY, "--number_of_steps", "2",
        "--session_folder", str(session), "--tensorboard_port", "0", "--class_map_path", "files/class_map.pbtxt",
    ], workdir, user))
    assert rc == 0, out[-3000:]
    saved = torch.load(session / "dl" / "checkpoints" / "step-0000002.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["device"] == "cuda"
    assert saved["scaler"] and saved["scaler"]["scale"] > 0  # AMP ran: it runs only on CUDA
    assert owned_by(session, *user[:2]) == []


def test_yolox_trains_and_infers_in_the_container(drip_image, workdir, user):
    """The image holds YOLOX (pixeltable-yolox, installed --no-deps beside the headless OpenCV):
    it trains two steps from scratch and its session's model infers, both in the container."""
    rc, out = finish(starter("training_starter.py", [
        *RUNTIME_BRIDGE, "--network", "yolox_nano", "--weights", "none", "--image_size", "128", "--batch_size", "2",
        "--augmentations", "0", "--number_of_steps", "2", "--warmup_steps", "1", "--num_workers", "0",
        "--src_json_path", "files/metadata.json", "--image_folder_path", "files/images",
        "--class_map_path", "files/class_map.pbtxt", "--session_folder", "yolox", "--tensorboard_port", "0",
    ], workdir, user))
    assert rc == 0, out[-3000:]
    assert (workdir / "yolox" / "dl" / "model.pt").is_file()
    rc, out = finish(starter("inference_starter.py", [
        *RUNTIME, "--model", "yolox", "--images_path", "files/test images", "--results_path", "yolox results",
        "--threshold", "0",
    ], workdir, user))
    assert rc == 0, out[-3000:]
    found = [json.loads(p.read_text()) for p in (workdir / "yolox results").rglob("detections.json")]
    assert found and all(isinstance(f, dict) for f in found)
    assert owned_by(workdir / "yolox", *user[:2]) == []


def test_two_cpu_processes_train_under_torchrun_in_the_container(drip_image, workdir, user):
    """The container runs torchrun itself: two CPU ranks, rank 0 writing, every rank its log."""
    proc = starter("training_starter.py", [
        *RUNTIME_BRIDGE, *TINY, "--nproc_per_node", "2", "--num_workers", "0",
        "--src_json_path", "files/metadata.json", "--image_folder_path", "files/images",
        "--class_map_path", "files/class_map.pbtxt", "--number_of_steps", "2", "--session_folder", "two procs",
        "--tensorboard_port", "0",
    ], workdir, user)
    rc, out = finish(proc)
    assert rc == 0, out[-4000:]
    assert "2 processes x 1 images = batch 2" in out
    assert "weights identical on all 2 ranks after step 2" in out
    dl = workdir / "two procs" / "dl"
    assert "rank 1 of 2" in (dl / "logs" / "rank-1.log").read_text()
    assert (dl / "model.pt").is_file() and (dl / "checkpoints" / "step-0000002.pt").is_file()
    assert not owned_by(workdir / "two procs", user[0], user[1])
