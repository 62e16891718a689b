"""The CUDA path: mixed-precision training and its resume, inference on the GPU, DDP on NCCL and
on gloo with CUDA tensors, a DETR family in bf16.

Every test here is marked ``gpu``: where no CUDA GPU answers it is skipped with the reason
(``conftest.py``), and ``scripts/gpu_checks.sh`` runs them all, with the Docker ``--gpus`` test
(``tests/test_docker.py``) and the GPU benchmarks, in one call on a machine with a GPU; there no
test may skip (``DRIP_NO_SKIPS=1``), and the script leaves out by name what the machine cannot
run (the multi-GPU test on one GPU, the container without an engine). The container with
``--gpus`` lives in ``test_docker.py`` beside the engine fixtures it needs.

Small on purpose (the smallest network, 128 px, a few steps): they prove that the CUDA code
runs and keeps its promises, not how fast it is; the benchmarks measure that.
"""

from __future__ import annotations

import json

import pytest
import torch

from drip.detectors import models
from drip.runtime import local
from drip.config import InferConfig
from drip.session import Session
from drip.stages import infer, train
from drip.data.synthetic import make_dataset, write_drip_json

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

TINY = {
    "network": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none", "image_size": 128,
    "batch_size": 2, "augmentations": 0, "num_workers": 0, "log_every": 1, "warmup_steps": 1,
    "eval_percentage": 25, "eval_every": 0, "device": "cuda", "amp": True,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu data")
    write_drip_json(root / "metadata.json", make_dataset(root / "images", 12, size=(160, 120), seed=11))
    return root


def overrides(data, **values):
    return {**TINY, "src_json_path": str(data / "metadata.json"), "image_folder_path": str(data / "images"), **values}


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_amp_training_checkpoints_the_gradient_scaler_and_resume_restores_it(data, tmp_path):
    """fp16 autocast with a GradScaler: its state is checkpointed, and resuming continues from it."""
    folder = tmp_path / "session"
    local.train(folder, overrides(data, number_of_steps=4, checkpoint_every=2))
    session = Session(folder)
    path = session.checkpoints_dir / "step-0000004.pt"
    saved = checkpoint(path)
    # An enabled GradScaler saves its scale (65536 at the start, halved on every overflow); a
    # disabled one, as on the CPU, saves an empty state: this is what shows that AMP was on.
    assert saved["scaler"] and saved["scaler"]["scale"] > 0, saved["scaler"]
    assert all(v.dtype == torch.float32 for v in saved["model"].values() if v.is_floating_point())  # fp32 master weights
    assert saved["config"]["device"] == "cuda"

    # A scale no fresh scaler has: two more steps can halve it, but cannot grow it (growth comes
    # every 2000 clean steps), so a resume that started a fresh scaler (65536) would show.
    saved["scaler"]["scale"] = 1024.0
    torch.save(saved, path)
    result = local.train(folder, {"number_of_steps": 6}, resume=True)
    assert result.step == 6
    resumed = checkpoint(session.checkpoints_dir / "step-0000006.pt")
    assert 0 < resumed["scaler"]["scale"] <= 1024.0, resumed["scaler"]
    # The optimizer's state came back too: its step count goes on from 4, not from 0.
    steps = [float(state["step"]) for state in resumed["optimizer"]["state"].values()]
    assert steps and max(steps) == 6.0, steps
    assert all(torch.isfinite(v).all() for v in resumed["model"].values() if v.is_floating_point())
    model = models.load_model(session.model_path, "cuda")
    assert next(model.model.parameters()).device.type == "cuda"


def test_inference_on_cuda_matches_the_cpu(data, tmp_path):
    folder = tmp_path / "session"
    local.train(folder, overrides(data, number_of_steps=2, checkpoint_every=2))
    loaded = models.load_model(Session(folder).model_path, "cpu")
    # Random-ish weights score low: spread the class scores so there is something to compare.
    with torch.no_grad():
        cls = loaded.model.roi_heads.box_predictor.cls_score
        cls.weight.copy_(torch.randn(cls.weight.shape, generator=torch.Generator().manual_seed(0)) * 5)
    model_path = tmp_path / "lively.pt"
    models.export_model(model_path, loaded.model, loaded.network, loaded.classes, loaded.image_size, {}, {})
    images = tmp_path / "images"
    make_dataset(images, 4, size=(200, 150), folders=("cam",), seed=12)

    def run(device):
        config = InferConfig().updated({"images_path": str(images), "results_path": str(tmp_path / device),
                                        "model": str(model_path), "device": device, "threshold": 20,
                                        "batch_size": 1}, "test")
        result = infer.run(config, tmp_path)
        out = {}
        for group in result.groups.values():
            for entry in json.loads((group / "detections.json").read_text())["images"]:
                out[entry["image"]] = json.loads((group / entry["result"]).read_text())["detections"]
        return result, out

    gpu_result, on_gpu = run("cuda")
    _, on_cpu = run("cpu")
    assert json.loads((next(iter(gpu_result.groups.values())) / "detections.json").read_text())["images"]
    assert sum(len(d) for d in on_cpu.values()) >= 4, "the model found too little to compare"
    for image, expected in on_cpu.items():
        got = on_gpu[image]
        # The same detections, give or take the ones at the threshold and GPU rounding.
        strong = [d for d in expected if d["score"] >= 0.22]
        for det in strong:
            assert any(
                g["class_id"] == det["class_id"] and abs(g["score"] - det["score"]) < 0.01
                and max(abs(x - y) for x, y in zip(g["box"], det["box"])) < 1.0
                for g in got
            ), (image, det)


def test_train_stage_runs_on_the_gpu_it_was_asked_for(data, tmp_path):
    folder = tmp_path / "session"
    local.train(folder, overrides(data, number_of_steps=1, checkpoint_every=1, amp=False))
    saved = checkpoint(Session(folder).checkpoints_dir / "step-0000001.pt")
    assert saved["config"]["device"] == "cuda" and not saved["scaler"]  # amp off: no scaler state
    assert train.list_checkpoints(Session(folder).checkpoints_dir)


# -- several processes ---------------------------------------------------------------------------
# NCCL refuses two processes on one GPU. So: one process per GPU on NCCL (the probe, with as many
# processes as there are GPUs: one on a one-GPU machine), two processes sharing one GPU through
# Drip on gloo with CUDA tensors (what Drip does where a node runs more processes than it has
# GPUs), and with two or more GPUs, Drip itself on NCCL with one process per GPU.
def gpu_count() -> int:
    return torch.cuda.device_count()


def starter_run(data, tmp_path, *extra: str, steps: int = 2):
    from test_distributed import Drip

    flags = [f"--{k}={v}" for k, v in TINY.items() if k not in ("amp", "device")]
    session = tmp_path / "session"
    run = Drip("--runtime", "local", "--session_folder", str(session), "--src_json_path", str(data / "metadata.json"),
               "--image_folder_path", str(data / "images"), *flags, "--device", "cuda", "--number_of_steps", str(steps),
               "--checkpoint_every", str(steps), *extra, starter="training_starter.py").finish()
    return session, run


def test_ddp_on_nccl_one_process_per_gpu(tmp_path):
    """torchrun with one process per GPU on NCCL: DDP's gradient is the mean of the ranks' own, an
    all-reduce of CUDA tensors sums, the weights agree after fp16 steps (tests/nccl_probe.py)."""
    import subprocess
    import sys

    from test_distributed import ROOT

    gpus = gpu_count()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
                        str(ROOT / "tests" / "nccl_probe.py")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert out.count("nccl probe ok") == gpus, out[-4000:]
    print(out[-1000:])


def test_ddp_two_processes_sharing_one_gpu_on_gloo_with_cuda_tensors(data, tmp_path, monkeypatch):
    """Two processes on one GPU through Drip: NCCL would refuse them, so the group is gloo, moving
    the CUDA gradients; rank 0 alone writes, the weights agree, mixed precision ran."""
    from test_distributed import drip_processes, load, steps_in

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU, whatever the machine has
    session, run = starter_run(data, tmp_path, "--nproc_per_node", "2")
    assert "2 processes x 1 images = batch 2, gloo on cuda (processes share GPUs" in run.stderr, run.stderr[-3000:]
    assert "weights identical on all 2 ranks after step 2" in run.stderr
    assert "rank 1 of 2" in (session / "dl" / "logs" / "rank-1.log").read_text()
    saved = load(session / "dl" / "checkpoints" / "step-0000002.pt")
    assert saved["config"]["device"] == "cuda" and saved["scaler"] and saved["scaler"]["scale"] > 0  # AMP ran
    assert steps_in(session) == [2] and not drip_processes(session)


def test_ddp_on_nccl_on_every_gpu_through_drip(data, tmp_path):
    """Two or more GPUs: Drip's own run, one process per GPU (--nproc_per_node auto) on NCCL."""
    from test_distributed import drip_processes, steps_in

    gpus = gpu_count()
    if gpus < 2:
        pytest.skip(f"needs 2 or more GPUs (this machine has {gpus}): NCCL takes one process per GPU")
    session, run = starter_run(data, tmp_path, "--nproc_per_node", "auto", "--batch_size", str(2 * gpus))
    assert f"{gpus} processes x 2 images = batch {2 * gpus}, nccl on cuda" in run.stderr, run.stderr[-3000:]
    assert f"weights identical on all {gpus} ranks after step 2" in run.stderr
    assert steps_in(session) == [2] and not drip_processes(session)


# -- a DETR family: bf16 -----------------------------------------------------------------------------
def test_detr_family_trains_with_bf16_autocast(data, tmp_path):
    """D-FINE-N at 256 px, two steps with --amp on: the forward runs in bfloat16 (the DETR
    families' choice where the GPU has it: fp16 overflows in their attention), the master
    weights stay float32, the losses finite."""
    from drip import detectors

    assert torch.cuda.is_bf16_supported(), "this GPU has no bfloat16: the DETR families would use fp16"
    seen: set[torch.dtype] = set()

    def record(module, _inputs, output):
        if isinstance(module, torch.nn.Linear) and torch.is_tensor(output) and module.training:
            seen.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        folder = tmp_path / "session"
        local.train(folder, overrides(data, network="dfine_n", image_size=256, number_of_steps=2, checkpoint_every=2))
    finally:
        hook.remove()
    assert torch.bfloat16 in seen and torch.float16 not in seen, seen
    saved = checkpoint(Session(folder).checkpoints_dir / "step-0000002.pt")
    assert saved["network"] == "dfine_n" and saved["config"]["amp"] is True
    weights = [v for v in saved["model"].values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)
    model = models.load_model(Session(folder).model_path, "cuda")
    assert detectors.mixed_precision(model.model, torch.device("cuda")) == torch.bfloat16
