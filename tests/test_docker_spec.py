"""The Docker runtime's run spec, image tag and messages, checked without a Docker engine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from drip.runtime import docker as dr
from drip import cli, launcher
from drip.runtime.docker import GIB, Host, Identity
from drip.errors import DripError

ROOT = Path(__file__).resolve().parents[1]
ALICE = Identity(1234, 2345, "alice", (27, 999))


@pytest.fixture
def project(tmp_path):
    """A working folder laid out like the README's: files/ with the sample inputs. Has a space."""
    cwd = tmp_path / "my project"
    (cwd / "files" / "images" / "cam 1").mkdir(parents=True)
    (cwd / "files" / "metadata.json").write_text("{}")
    (cwd / "files" / "augmentations.yaml").write_text("[]")
    (cwd / "files" / "test_images" / "batch_1").mkdir(parents=True)
    return cwd


def host(cwd, **kw) -> Host:
    return Host(cwd=str(cwd), identity=kw.pop("identity", ALICE), memory_bytes=kw.pop("memory", 16 * GIB),
                nvidia_runtime=kw.pop("nvidia", True), **kw)


def spec(command, argv, cwd, **kw):
    args = launcher.build_parser(command, "starter").parse_args(argv)
    return dr.build_run_spec(command, args, "drip:test", host(cwd, **kw))


def mounts(s) -> dict[str, tuple[str, str]]:
    return {m.container: (m.host, m.mode) for m in s.mounts}


def default_training_mounts(p: str) -> dict[str, tuple[str, str]]:
    """What training (and the audit) mounts with the default inputs, run from the project ``p``."""
    return {
        f"{p}/files/metadata.json": (f"{p}/files/metadata.json", "ro"),
        f"{p}/files/images": (f"{p}/files/images", "ro"),
        f"{p}/files/augmentations.yaml": (f"{p}/files/augmentations.yaml", "ro"),
        f"{p}/pipeline": (f"{p}/pipeline", "rw"),
    }


# -- train ------------------------------------------------------------------------------------
def test_train_defaults_mount_the_default_inputs_read_only_and_the_session_read_write(project):
    s = spec("train", ["--device", "cpu"], project)
    p = str(project)
    assert mounts(s) == default_training_mounts(p)
    # Same paths inside, same working folder: the flags reach drip exactly as typed.
    assert s.command == ["drip", "train", "--session_folder", "pipeline/", "--device", "cpu"]
    assert s.working_dir == p
    assert s.make_dirs == [f"{p}/pipeline"]  # made by the starter, owned by the user
    assert s.environment["TORCH_HOME"] == f"{p}/pipeline/cache"  # weights survive sessions


def test_train_given_paths_elsewhere_are_mounted_where_they_are(project, tmp_path):
    data = tmp_path / "data set"
    (data / "imgs").mkdir(parents=True)
    (data / "coco.json").write_text("{}")
    (data / "labels.pbtxt").write_text("")
    s = spec("train", [
        "--src_json_path", str(data / "coco.json"), "--image_folder_path", "../data set/imgs",
        "--class_map_path", str(data / "labels.pbtxt"), "--session_folder", str(tmp_path / "sess"),
        "--resume_training", "--number_of_steps", "5",
    ], project)
    m = mounts(s)
    assert m[str(data / "coco.json")] == (str(data / "coco.json"), "ro")
    assert m[str(data / "imgs")] == (str(data / "imgs"), "ro")
    assert m[str(data / "labels.pbtxt")] == (str(data / "labels.pbtxt"), "ro")
    assert m[str(tmp_path / "sess")][1] == "rw"
    assert s.command[:5] == ["drip", "train", "--session_folder", str(tmp_path / "sess"), "--resume_training"]
    assert "../data set/imgs" in s.command  # a relative flag stays relative: the cwd is the same
    assert s.command[-2:] == ["--number_of_steps", "5"]


def test_a_yolo_dataset_is_mounted_whole_read_only(project, tmp_path):
    """YOLO images sit beside the labels, not in --image_folder_path: the dataset folder goes in."""
    data = tmp_path / "yolo set"
    for split in ("train", "valid"):
        (data / split / "images").mkdir(parents=True)
        (data / split / "labels").mkdir(parents=True)
    (data / "data.yaml").write_text("names: [a]\ntrain: ../train/images\nval: ../valid/images\n")
    s = spec("train", ["--src_json_path", str(data / "data.yaml"), "--eval_json_path", str(data / "valid" / "labels")], project)
    m = mounts(s)
    assert m[str(data)] == (str(data), "ro")
    assert str(data / "data.yaml") not in m and str(data / "valid") not in m  # covered by the folder
    s = spec("train", ["--src_json_path", str(data / "train" / "labels")], project)
    assert mounts(s)[str(data / "train")] == (str(data / "train"), "ro")
    s = spec("infer", ["--src_json_path", str(data / "data.yaml"), "--images_path", str(data / "valid")], project)
    assert mounts(s)[str(data)] == (str(data), "ro")

    # A yaml whose path: is elsewhere (an Ultralytics datasets folder): that folder goes in too.
    elsewhere = tmp_path / "datasets" / "shapes"
    (elsewhere / "images" / "train").mkdir(parents=True)
    yaml = tmp_path / "configs" / "shapes.yaml"
    yaml.parent.mkdir()
    yaml.write_text(f"path: '{elsewhere}'  # root\ntrain: images/train\nnames:\n  0: a\n")
    m = mounts(spec("train", ["--src_json_path", str(yaml)], project))
    assert m[str(yaml.parent)] == (str(yaml.parent), "ro") and m[str(elsewhere)] == (str(elsewhere), "ro")


def test_nothing_else_of_the_host_is_mounted(project):
    s = spec("train", [], project)
    for m in s.mounts:
        assert m.host.startswith(str(project) + "/files/") or m.host == str(project / "pipeline")
    assert all(not m.container.startswith(("/etc", "/var/run", "/usr")) for m in s.mounts)


def test_a_missing_optional_input_is_not_mounted_and_a_missing_given_one_is_left_to_drip(project):
    (project / "files" / "augmentations.yaml").unlink()
    s = spec("train", ["--src_json_path", "nope.json"], project)
    assert not any("augmentations" in c for c in mounts(s))  # default file absent: built-in policy
    assert not any("nope" in c for c in mounts(s))
    assert s.command[-2:] == ["--src_json_path", "nope.json"]  # drip says 'not found' as typed


def test_network_and_weights_are_mounted_only_when_they_are_files(project):
    (project / "brought model.pt").write_bytes(b"x")
    s = spec("train", ["--network", "brought model.pt", "--weights", "coco"], project)
    assert mounts(s)[str(project / "brought model.pt")][1] == "ro"
    assert s.command[-4:] == ["--network", "brought model.pt", "--weights", "coco"]
    s = spec("train", ["--network", "fasterrcnn_resnet50_fpn", "--weights", "state.pt"], project)
    assert not any(c.endswith((".pt", "fpn")) for c in mounts(s))  # a name, and a missing file


def test_inputs_inside_the_image_folder_share_its_mount(project):
    (project / "files" / "images" / "meta.json").write_text("{}")
    s = spec("train", ["--src_json_path", "files/images/meta.json"], project)
    assert str(project / "files/images/meta.json") not in mounts(s)  # covered, read-only as well


def test_symlinked_input_mounts_its_target_at_the_path_as_typed(project, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (project / "linked").symlink_to(real)
    s = spec("train", ["--image_folder_path", "linked"], project)
    assert mounts(s)[str(project / "linked")] == (str(real), "ro")


def test_paths_on_the_images_own_folders_move_under_drip_host(project):
    """/root, /opt, /usr... hold the image's own files: mirroring there would hide them."""
    s = spec("train", ["--image_folder_path", "/opt/data/imgs"], project)
    assert "/opt/data/imgs" not in mounts(s)  # does not exist: drip reports it as typed
    assert dr.container_path("/opt/data/imgs") == "/drip/host/opt/data/imgs"
    assert dr.container_path("/root/proj") == "/drip/host/root/proj"
    assert dr.container_path("/home/alice/proj") == "/home/alice/proj"
    assert dr.container_path("/tmp/x") == "/tmp/x"


def test_a_working_folder_under_root_is_mirrored_under_drip_host(tmp_path, monkeypatch):
    monkeypatch.setattr(dr, "RESERVED_TOP", dr.RESERVED_TOP | {tmp_path.parts[1]})
    cwd = tmp_path / "proj"
    (cwd / "files" / "images").mkdir(parents=True)
    outside = tmp_path.parent / f"{tmp_path.name}-other"
    s = spec("train", ["--session_folder", "pipeline/"], cwd)
    assert s.working_dir == "/drip/host" + str(cwd)
    assert mounts(s)["/drip/host" + str(cwd / "pipeline")][1] == "rw"
    assert s.command[2:4] == ["--session_folder", "pipeline/"]  # still resolves from the workdir
    assert dr._arg_in_container(str(outside), str(cwd)) == "/drip/host" + str(outside)


# -- infer ------------------------------------------------------------------------------------
def test_infer_default_model_mounts_the_session_read_only_and_results_read_write(project):
    (project / "pipeline" / "dl").mkdir(parents=True)
    s = spec("infer", ["--images_path", "files/test_images", "--threshold", "50"], project)
    p = str(project)
    assert mounts(s) == {
        f"{p}/files/test_images": (f"{p}/files/test_images", "ro"),
        f"{p}/files/results": (f"{p}/files/results", "rw"),
        f"{p}/pipeline": (f"{p}/pipeline", "ro"),
    }
    assert s.make_dirs == [f"{p}/files/results"]
    assert s.command == ["drip", "infer", "--session_folder", "pipeline/",
                         "--images_path", "files/test_images", "--threshold", "50"]
    assert s.tensorboard is None and s.tensorboard_relay is None


def test_infer_brought_model_is_mounted_read_only_and_the_session_is_not(project, tmp_path):
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"x")
    (project / "pipeline" / "dl").mkdir(parents=True)
    s = spec("infer", ["--model", str(model), "--results_path", str(tmp_path / "out")], project)
    m = mounts(s)
    assert m[str(model)] == (str(model), "ro")
    assert m[str(tmp_path / "out")] == (str(tmp_path / "out"), "rw")
    assert str(project / "pipeline") not in m


def test_results_inside_the_images_folder_stay_writable(project):
    """drip skips its own results folder when it lies inside the images: it must see it there."""
    s = spec("infer", ["--images_path", "files", "--results_path", "files/results"], project)
    m = mounts(s)
    assert m[str(project / "files")][1] == "ro"
    assert m[str(project / "files" / "results")][1] == "rw"
    order = [x.container for x in s.mounts]
    assert order.index(str(project / "files")) < order.index(str(project / "files" / "results"))


@pytest.mark.parametrize("schema, table", [("Config", "TRAIN_PATHS"), ("InferConfig", "INFER_PATHS")])
def test_every_path_option_has_a_mount_rule(schema, table):
    """A new path option without a rule would name a file the container cannot see."""
    import dataclasses

    from drip import config

    names = {f.name for f in dataclasses.fields(getattr(config, schema))}
    paths = {n for n in names if n.endswith(("_path", "_folder", "_policy")) or n in ("network", "weights", "model")}
    assert paths == {name for name, _, _ in getattr(dr, table)}


# -- user -------------------------------------------------------------------------------------
def test_the_container_runs_as_the_invoking_user_with_a_home_of_their_own(project):
    s = spec("train", [], project)
    assert s.user == "1234:2345"
    assert s.group_add == ["27", "999"]
    assert s.environment["USER"] == "alice" and s.environment["HOME"] == "/home/alice"
    assert s.tmpfs == {"/home/alice": "uid=1234,gid=2345,mode=0700"}


def test_identity_under_sudo_is_the_user_behind_it():
    env = {"SUDO_UID": "1234", "SUDO_GID": "2345", "SUDO_USER": "nobody-such-user"}
    who = dr.invoking_identity(env, euid=0)
    assert (who.uid, who.gid, who.name) == (1234, 2345, "nobody-such-user")
    who = dr.invoking_identity(env, euid=1000)  # not root: SUDO_* is not ours to trust
    assert who.uid == os.getuid()


def test_root_gets_root_home():
    assert Identity(0, 0, "root").home == "/root"
    assert Identity(5, 5, "a b/c").home == "/home/a_b_c"


# -- GPUs -------------------------------------------------------------------------------------
def test_gpus_all_by_default(project):
    s = spec("train", [], project)
    assert s.device_requests == [{"driver": "", "count": -1, "capabilities": [["gpu"]]}]
    s = spec("train", ["--gpus", "2"], project)
    assert s.device_requests[0]["count"] == 2


def test_no_gpus_requested_for_the_cpu_or_none(project):
    assert spec("train", ["--gpus", "none"], project).device_requests == []
    s = spec("train", ["--device", "cpu"], project, nvidia=False)
    assert s.device_requests == []
    assert len(s.notes) == 1 and "NVIDIA Container Toolkit" in s.notes[0]


def test_without_the_nvidia_runtime_gpu_runs_fail_with_the_fix(project):
    with pytest.raises(DripError) as e:
        spec("train", [], project, nvidia=False)
    msg = str(e.value)
    assert "NVIDIA Container Toolkit" in msg and "nvidia-ctk runtime configure" in msg
    assert "--device cpu" in msg and "\n" not in msg


def test_cuda_without_gpus_is_a_contradiction(project):
    with pytest.raises(DripError, match="--gpus none"):
        spec("train", ["--device", "cuda", "--gpus", "none"], project)


def test_unknown_runtime_list_still_requests_gpus(project):
    s = spec("train", [], project, nvidia=None)  # CDI: the request itself tells
    assert s.device_requests


def test_dockers_gpu_error_is_translated():
    class E(Exception):
        explanation = 'could not select device driver "" with capabilities: [[gpu]]'

    msg = dr._run_error(E())
    assert "could not select" not in msg and "NVIDIA Container Toolkit" in msg


@pytest.mark.parametrize("bad", ["some", "0", "-1", "1.5"])
def test_bad_gpus_flag_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit):
        launcher.build_parser("train", "starter").parse_args(["--gpus", bad])
    assert "--gpus" in capsys.readouterr().err


# -- ports, shared memory, shell ----------------------------------------------------------------
def test_tensorboard_listens_on_the_containers_loopback_behind_a_relay(project):
    """Bridge mode: no published port (it would serve the container's bridge address too)."""
    s = spec("train", ["--tensorboard_port", "7007"], project)
    assert s.tensorboard[-4:] == ["--host", "127.0.0.1", "--port", "6006"]
    assert s.tensorboard[s.tensorboard.index("--logdir") + 1] == f"{project}/pipeline/dl/logs"
    assert s.tensorboard_relay == ["python", "-m", "drip.runtime.relay", "--unix", f"{dr.RELAY_DIR}/{dr.RELAY_SOCKET}",
                                   "--to", "127.0.0.1:6006"]
    assert s.tensorboard_url == "http://127.0.0.1:7007/"


def test_tensorboard_on_the_host_network_binds_loopback_itself(project):
    s = spec("train", ["--docker_network", "host", "--tensorboard_port", "7007"], project)
    assert s.network == "host" and s.tensorboard_relay is None
    assert s.tensorboard[-4:] == ["--host", "127.0.0.1", "--port", "7007"]


def test_tensorboard_port_zero_turns_it_off(project):
    s = spec("train", ["--tensorboard_port", "0"], project)
    assert s.tensorboard is None and s.tensorboard_relay is None and s.tensorboard_url is None


def test_shared_memory_is_enough_for_dataloader_workers(project):
    assert spec("train", [], project, memory=16 * GIB).shm_size == 8 * GIB
    assert dr.shm_size_for(1 * GIB) == GIB
    assert dr.shm_size_for(512 * GIB) == 32 * GIB


def test_shell_gets_the_same_mounts_and_a_shell(project):
    run = spec("train", ["--device", "cpu"], project)
    shell = spec("train", ["--device", "cpu", "--shell"], project)
    assert shell.mounts == run.mounts and shell.user == run.user
    assert shell.command == ["/bin/bash"] and shell.interactive
    assert shell.tensorboard is None
    assert any("drip train --session_folder pipeline/ --device cpu" in n for n in shell.notes)


def test_engine_arguments_are_whitelisted_and_never_privileged(project):
    docker = pytest.importorskip("docker")
    client = docker.DockerClient(base_url="unix:///nonexistent.sock", version="1.41")
    s = spec("train", ["--tensorboard_port", "7007"], project)
    kw = dr.create_kwargs(client, s, "drip-test")
    hc = kw["host_config"]
    assert not hc.get("Privileged") and hc["Init"] is True
    assert hc["SecurityOpt"] == ["no-new-privileges"]
    assert hc["ShmSize"] == 8 * GIB
    assert {(m["Target"], m["ReadOnly"]) for m in hc["Mounts"]} == {(m.container, m.mode == "ro") for m in s.mounts}
    assert all(m["Type"] == "bind" for m in hc["Mounts"])
    assert hc["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert "PortBindings" not in hc and "ports" not in kw  # nothing published: TensorBoard goes through the relay
    assert kw["user"] == "1234:2345" and kw["working_dir"] == str(project)
    assert "Binds" not in hc and "IpcMode" not in hc  # only the listed mounts; no host IPC


# -- the image --------------------------------------------------------------------------------
def fake_project(root: Path) -> Path:
    (root / "drip" / "__pycache__").mkdir(parents=True)
    (root / "drip" / "__init__.py").write_text("x = 1\n")
    (root / "drip" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    (root / "Dockerfile").write_text("FROM scratch\n")
    (root / ".dockerignore").write_text((ROOT / ".dockerignore").read_text())
    (root / "requirements.txt").write_text("torch\n")
    for junk in (".venv/lib/x.py", "files/images/a.jpg", "pipeline/dl/model.pt", ".git/HEAD", "files/results/r.json"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_text("junk")
    return root


def test_build_context_holds_only_what_the_image_installs(tmp_path):
    pytest.importorskip("docker")
    files = dr.context_files(fake_project(tmp_path))
    assert files == [".dockerignore", "Dockerfile", "drip/__init__.py", "requirements.txt"]


def test_real_build_context_has_no_data_sessions_or_venv():
    pytest.importorskip("docker")
    assert dr.project_root() == ROOT  # the clone holding the Dockerfile, wherever the module sits in it
    files = dr.context_files(dr.project_root())
    assert "Dockerfile" in files and "requirements.txt" in files and "drip/cli.py" in files
    assert not [f for f in files if f.startswith(("files/", "pipeline/", ".venv/", ".git/", "tests/"))]


def test_image_tag_changes_with_what_goes_into_the_image_only(tmp_path):
    pytest.importorskip("docker")
    root = fake_project(tmp_path)

    def tag(base="b:1"):
        return dr.image_tag(root, dr.context_files(root), base)

    first = tag()
    assert re.fullmatch(r"drip:[0-9a-f]{16}", first)
    (root / "files" / "images" / "b.jpg").write_text("more data")
    (root / "pipeline" / "dl" / "x").write_text("a session")
    assert tag() == first  # data and sessions do not rebuild the image
    assert tag("b:2") != first
    (root / "drip" / "__init__.py").write_text("x = 2\n")
    assert tag() != first


class Engine:
    """The images part of a Docker SDK client: which tags the engine has."""

    def __init__(self, *tags):
        import docker

        self.tags, self.errors = set(tags), docker.errors
        self.images = self

    def get(self, tag):
        if tag not in self.tags:
            raise self.errors.ImageNotFound(tag)
        return tag


def test_inference_runs_in_the_image_the_session_was_trained_in(project, tmp_path, monkeypatch, capsys):
    # scripts/quickstart.sh --base_image drip-test-base:bookworm --docker_network host trained in an
    # image on that base; inference, given no --base_image, must not compute the default base's tag
    # (and try to pull python:3.11-slim-bookworm where no registry answers).
    pytest.importorskip("docker")
    from drip.runtime import local
    from drip.session import Session

    clone = fake_project(tmp_path / "clone")
    monkeypatch.setattr(dr, "project_root", lambda: clone)
    monkeypatch.chdir(project)
    base = "drip-test-base:bookworm"
    trained = dr.ImagePlan.of_project(base)

    def plan(command, argv, engine):
        args = launcher.build_parser(command, "starter").parse_args(argv)
        return dr.plan_image(command, args, engine)

    # The training container's environment names its image; training records it in the session.
    train_spec = dr.build_run_spec("train", launcher.build_parser("train", "s").parse_args([]), trained.tag,
                                   host(project), base)
    assert train_spec.environment[dr.IMAGE_ENV] == trained.tag and train_spec.environment[dr.BASE_IMAGE_ENV] == base
    local.record_image(Session(project / "pipeline"), train_spec.environment)
    assert Session(project / "pipeline").read_state()["docker_image"] == {"tag": trained.tag, "base_image": base}

    assert plan("infer", [], Engine(trained.tag)) == trained
    assert plan("train", [], Engine(trained.tag)).base_image == dr.DEFAULT_BASE_IMAGE  # training: as told
    # The code changed since: still the image the model was made in, and a line says so.
    (clone / "drip" / "__init__.py").write_text("x = 2\n")
    assert plan("infer", [], Engine(trained.tag)).tag == trained.tag
    assert f"runs in {trained.tag}, the image pipeline/ was trained in" in capsys.readouterr().err
    # That image deleted: this clone's, on the base training used (no registry needed either).
    rebuilt = plan("infer", [], Engine())
    assert rebuilt == dr.ImagePlan.of_project(base) and rebuilt.tag != trained.tag
    assert "which the engine no longer has" in capsys.readouterr().err
    # Told otherwise: --base_image, or a model from elsewhere.
    assert plan("infer", ["--base_image", "other:1"], Engine(trained.tag)) == dr.ImagePlan.of_project("other:1")
    assert plan("infer", ["--model", "m.pt"], Engine(trained.tag)).base_image == dr.DEFAULT_BASE_IMAGE
    # Another session, or one trained locally, records no image: the default plan.
    assert plan("infer", ["--session_folder", "elsewhere"], Engine(trained.tag)).base_image == dr.DEFAULT_BASE_IMAGE
    local.record_image(Session(project / "local"), {})
    assert not (project / "local").exists()


def test_dockerfile_default_base_image_is_the_one_the_tag_assumes():
    text = (ROOT / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE={dr.DEFAULT_BASE_IMAGE}\n" in text
    assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE)  # a non-root default user


def test_context_tar_is_reproducible(tmp_path):
    import tarfile

    pytest.importorskip("docker")
    root = fake_project(tmp_path)
    files = dr.context_files(root)
    a, b = dr._context_tar(root, files).getvalue(), dr._context_tar(root, files).getvalue()
    assert a == b
    with tarfile.open(fileobj=dr._context_tar(root, files)) as tar:
        assert tar.getnames() == files


# -- engine messages ----------------------------------------------------------------------------
def test_no_engine_is_reported_fast_in_one_line(monkeypatch):
    pytest.importorskip("docker")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    import time

    start = time.monotonic()
    reason = cli.docker_unavailable_reason()
    assert time.monotonic() - start < 3
    assert "no Docker engine answers at unix:///nonexistent/docker.sock" in reason
    assert "\n" not in reason


def test_auto_falls_back_to_local_and_docker_fails(monkeypatch, capsys):
    monkeypatch.setattr(cli, "docker_unavailable_reason", lambda: "no engine here")
    assert cli.choose_runtime("auto") == "local"
    assert "no engine here" in capsys.readouterr().err
    with pytest.raises(DripError, match="--runtime docker: no engine here"):
        cli.choose_runtime("docker")
    monkeypatch.setattr(cli, "docker_unavailable_reason", lambda: None)
    assert cli.choose_runtime("auto") == "docker"


def test_shell_needs_docker(monkeypatch, capsys):
    monkeypatch.setattr(cli, "docker_unavailable_reason", lambda: "no engine here")
    assert launcher.main("train", ["--runtime", "local", "--shell"]) == 2
    assert "--shell" in capsys.readouterr().err


def test_missing_sdk_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "docker", None)
    with pytest.raises(DripError, match="Docker SDK for Python is not installed"):
        dr.connect()


def test_permission_denied_says_how_to_join_the_docker_group():
    msg = dr.unreachable_message(PermissionError(13, "Permission denied"))
    assert "usermod -aG docker" in msg


def test_base_image_unreachable_suggests_a_local_base():
    msg = dr._build_error("pull access denied for python, repository does not exist", "python:3.11-slim", [])
    assert "scripts/docker_base_image.sh" in msg and "--base_image" in msg


def test_attach_stream_is_split_into_stdout_and_stderr():
    import io
    import struct

    out, err = io.BytesIO(), io.BytesIO()
    d = dr._Demux(out, err, tty=False)
    frames = struct.pack(">BxxxL", 1, 3) + b"out" + struct.pack(">BxxxL", 2, 4) + b"err!"
    d.feed(frames[:5])
    d.feed(frames[5:])
    assert out.getvalue() == b"out" and err.getvalue() == b"err!"


def test_doctor_reports_a_missing_engine_with_its_fix(tmp_path):
    def no_engine():
        raise DripError("no Docker engine answers at unix:///x; install Docker and start it")

    checks = {c.name: c for c in dr.doctor_checks(str(tmp_path / "pipeline"), connect_fn=no_engine)}
    assert checks["engine"].status == "fail" and "install Docker" in checks["engine"].fix
    assert checks["session disk"].status == "ok"
    assert checks["shared memory"].status in ("ok", "warn")


def test_starter_help_does_not_import_docker_or_torch():
    code = (
        "import sys; sys.argv=['training_starter.py','--help']\n"
        "from drip import launcher\n"
        "try:\n    launcher.main('train')\nexcept SystemExit:\n    pass\n"
        "assert 'docker' not in sys.modules and 'torch' not in sys.modules, 'heavy import'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "--tensorboard_port" in r.stdout and "--base_image" in r.stdout


def test_an_input_reached_through_a_symlink_inside_another_keeps_its_own_mount(project, tmp_path):
    elsewhere = tmp_path / "annotations"
    elsewhere.mkdir()
    (elsewhere / "meta.json").write_text("{}")
    (project / "files" / "images" / "meta.json").symlink_to(elsewhere / "meta.json")
    s = spec("train", ["--src_json_path", "files/images/meta.json"], project)
    assert mounts(s)[str(project / "files/images/meta.json")] == (str(elsewhere / "meta.json"), "ro")


def test_drip_doctor_without_an_engine_fails_with_the_fix(tmp_path, monkeypatch, capsys):
    pytest.importorskip("docker")
    from drip import cli

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert cli.main(["doctor", "--session_folder", str(tmp_path / "s")]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL  engine .*no Docker engine answers", out, re.MULTILINE)
    assert "fix: install Docker and start it" in out
    assert re.search(r"^OK    session disk", out, re.MULTILINE)


# -- Ctrl-C -------------------------------------------------------------------------------------
class FakeAPI:
    def __init__(self):
        self.calls = []

    def kill(self, cid, signal):
        self.calls.append(("kill", signal))

    def stop(self, cid, timeout=None):
        self.calls.append(("stop", timeout))


def _pump_through(project, monkeypatch, script):
    """``_pump`` against a fake engine, ``select`` playing ``script``: "SIGINT"/"SIGTERM" are sent
    to this process for real (as Ctrl-C and kill are), "an hour passes" returns nothing, and
    "the container ends" closes its output. Returns (the engine's calls, what was printed)."""
    import io
    import socket
    import time as real_time
    import types

    ours, theirs = socket.socketpair()
    clock = [real_time.monotonic()]
    steps = iter(script)

    def fake_select(readers, writers, errors, timeout):
        step = next(steps)
        if step in ("SIGINT", "SIGTERM"):
            os.kill(os.getpid(), getattr(signal, step))  # its handler runs before this returns
            return [r for r in readers if r is not ours], [], []
        if step == "an hour passes":
            clock[0] += 3600
            return [], [], []
        theirs.close()
        return [ours], [], []

    monkeypatch.setattr(dr, "select", types.SimpleNamespace(select=fake_select))
    monkeypatch.setattr(dr.time, "monotonic", lambda: clock[0])
    client = types.SimpleNamespace(api=FakeAPI())
    err = io.StringIO()
    try:
        dr._pump(client, "cid", ours, spec("train", ["--device", "cpu"], project), io.StringIO(), err)
    finally:
        ours.close()
    return client.api.calls, err.getvalue()


def _noted(*_):
    pass  # stands for whatever handler the starter was started with


@pytest.fixture(params=["ignored", "handled"])
def inherited_sigint(request):
    """SIGINT as the starter may find it: ignored (a background job of a script or a CI runner
    inherits SIG_IGN from its shell, and Python keeps it) or with a handler (a terminal's Python:
    its KeyboardInterrupt). Either way a stray signal does not stop pytest."""
    handler = signal.SIG_IGN if request.param == "ignored" else _noted
    previous = signal.signal(signal.SIGINT, handler)
    term = signal.getsignal(signal.SIGTERM)
    try:
        yield handler
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, term)


def test_ctrl_c_waits_for_the_checkpoint_and_only_a_second_one_kills(project, monkeypatch, inherited_sigint):
    """However long training takes to save, the first Ctrl-C never turns into a stop or a kill.

    The starter handles SIGINT itself while the container runs. Left to Python's default, a
    starter started with SIGINT ignored (a background job, a CI runner) never forwarded the stop,
    and training went on; and a KeyboardInterrupt between two reads removed the container unsaved."""
    term = signal.getsignal(signal.SIGTERM)
    calls, text = _pump_through(project, monkeypatch,
                                ["SIGINT", "an hour passes", "an hour passes", "SIGINT", "the container ends"])
    assert calls == [("kill", "SIGINT"), ("kill", "SIGKILL")]  # never a timed stop
    assert "stopping: SIGINT sent to the container; training finishes its step, saves a checkpoint" in text
    assert "Ctrl-C again kills it now, losing every step since its last checkpoint" in text
    assert "killing the container: the checkpoint being written is lost" in text
    # The starter's own handlers are gone with the container.
    assert signal.getsignal(signal.SIGINT) is inherited_sigint and signal.getsignal(signal.SIGTERM) is term


def test_sigterm_to_the_starter_stops_the_container_like_ctrl_c(project, monkeypatch, inherited_sigint):
    calls, text = _pump_through(project, monkeypatch, ["SIGTERM", "an hour passes", "the container ends"])
    assert calls == [("kill", "SIGTERM")]
    assert "stopping: SIGTERM sent to the container; training finishes its step" in text


# -- several processes (torchrun inside the container) --------------------------------------------
def test_train_on_four_gpus_runs_one_process_per_gpu_in_the_container(project):
    s = spec("train", ["--gpus", "4"], project)
    assert s.device_requests == [{"driver": "", "count": 4, "capabilities": [["gpu"]]}]
    # drip train in the container launches torchrun itself, one process per GPU it was given.
    assert s.command == ["drip", "train", "--session_folder", "pipeline/", "--nproc_per_node", "4"]
    assert s.network is None  # one machine: the engine's bridge is enough
    assert spec("train", ["--gpus", "all"], project).command == ["drip", "train", "--session_folder", "pipeline/"]
    assert spec("train", ["--gpus", "4", "--nproc_per_node", "2"], project).command[-2:] == ["--nproc_per_node", "2"]


def test_train_on_several_machines_takes_the_host_network(project):
    s = spec("train", ["--device", "cpu", "--nproc_per_node", "2", "--nnodes", "2", "--node_rank", "1",
                       "--rdzv_endpoint", "10.0.0.1:29400", "--max_restarts", "2"], project)
    assert s.network == "host"
    assert s.command[s.command.index("--device"):] == [
        "--device", "cpu", "--nproc_per_node", "2", "--nnodes", "2", "--node_rank", "1",
        "--rdzv_endpoint", "10.0.0.1:29400", "--max_restarts", "2",
    ]
    assert any("host's network" in n for n in s.notes)
    with pytest.raises(DripError, match="--nnodes 2 needs the host's network.*drop --docker_network mynet"):
        spec("train", ["--nnodes", "2", "--rdzv_endpoint", "h:1", "--docker_network", "mynet"], project)


# -- audit and select ---------------------------------------------------------------------------
def cli_spec(command, argv, cwd, **kw):
    args = cli.build_parser().parse_args([command, *argv])
    return dr.build_run_spec(command, args, "drip:test", host(cwd, **kw))


def test_audit_mounts_as_training_does_and_passes_its_own_flags(project):
    s = cli_spec("audit", ["--device", "cpu", "--folds", "3", "--final_steps", "50"], project)
    p = str(project)
    assert mounts(s) == default_training_mounts(p)
    assert s.command == ["drip", "audit", "--session_folder", "pipeline/", "--runtime", "local", "--device", "cpu",
                         "--folds", "3", "--final_steps", "50"]
    assert s.environment["TORCH_HOME"] == f"{p}/pipeline/cache"


def test_select_mounts_the_model_and_images_read_only_and_the_output_folder_read_write(project, tmp_path):
    model = tmp_path / "old session"
    (model / "dl").mkdir(parents=True)
    s = cli_spec("select", ["--model", str(model), "--images_path", "files/test_images", "--count", "5",
                            "--output", str(tmp_path / "out dir" / "next.json")], project)
    m = mounts(s)
    assert m[str(model)] == (str(model), "ro")
    assert m[f"{project}/files/test_images"] == (f"{project}/files/test_images", "ro")
    assert m[str(tmp_path / "out dir")] == (str(tmp_path / "out dir"), "rw")
    assert str(tmp_path / "out dir") in s.make_dirs
    assert s.command[:2] == ["drip", "select"] and "--runtime" in s.command
    assert s.command[s.command.index("--output") + 1] == str(tmp_path / "out dir" / "next.json")


def test_the_container_counts_time_limit_from_the_hosts_start_but_a_shell_does_not(project, monkeypatch):
    """--time_limit counts from the start of the command the user typed: the image build and the
    container's start included. A shell's later commands start their own clocks."""
    from drip.config import HOST_STARTED_ENV, STARTED_ENV, start_clock

    monkeypatch.setenv(STARTED_ENV, "1000.5")
    assert spec("train", ["--device", "cpu"], project).environment[HOST_STARTED_ENV] == "1000.5"
    assert HOST_STARTED_ENV not in spec("train", ["--device", "cpu", "--shell"], project).environment
    # Inside, the command the container was started for takes the host's start, once.
    monkeypatch.setenv(HOST_STARTED_ENV, "1000.5")
    start_clock()
    assert os.environ[STARTED_ENV] == "1000.5" and HOST_STARTED_ENV not in os.environ
    start_clock()
    assert float(os.environ[STARTED_ENV]) > 1000.5
