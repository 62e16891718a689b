"""The local runtime: ``drip train``, ``drip stage``, ``drip infer``, ``drip evaluate``, ``drip export``
and ``drip report`` run their stages in order in this process (training and inference on several
processes through ``drip.runtime.torchrun``).

The only module that knows the order of the stages and how a session starts, resumes and records
its resolved config; the stages themselves know nothing of each other.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

from .. import console
from ..config import CLI, Config, EvaluateConfig, ExportConfig, InferConfig, ReportConfig
from ..errors import ConfigError, InputError, SessionError
from ..session import Session
from ..stages import augment, configure, records, split
from ..stages import infer as infer_stage
from ..stages import train as train_stage
from .torchrun import Launch

STAGE_MODULES = {
    "split": split,
    "augment": augment,
    "records": records,
    "configure": configure,
    "train": train_stage,
}


def train(session_folder: Path, overrides: dict, resume: bool = False, launch: Launch | None = None):
    """``drip train``: a new session through every stage, or ``resume`` the current one.

    With ``launch`` asking for several processes the stages before training run here, once, and
    the training runs under torchrun (``drip.runtime.torchrun``).
    """
    session = Session(Path(session_folder))
    if resume:
        config = _session_config(session, overrides, require=True)
        nproc = processes(launch, config)
        record_image(session)
        # Every value in pipeline.config was chosen already: the family's recipe changes none.
        config = _timed("configure", lambda: configure.run(session, config, check_model=False,
                                                           chosen=Config.fields()))
        return _timed("train", lambda: _train(session, config, True, launch, nproc))

    config = Config().updated(overrides, CLI)
    nproc = processes(launch, config)  # a batch that does not divide fails now, not after the stages
    _check_inputs(config)
    moved = session.start_new()
    if moved:
        console.info(f"moved the previous session to {moved}")
    console.info(f"new session in {session.dl}")
    record_image(session)
    return run_all_stages(session, config, launch, nproc, chosen=overrides)


def run_all_stages(session: Session, config: Config, launch: Launch | None, nproc: int, chosen=()):
    """Every stage, in order, in ``session`` as it is (``train`` starts it; ``drip audit``'s
    folds and final model run here too). ``chosen``: the values the user set, which the network
    family's recipe leaves alone."""
    for name in ("split", "augment", "records"):
        _timed(name, lambda: STAGE_MODULES[name].run(session, config))
    config = _timed("configure", lambda: configure.run(session, config, chosen=chosen))
    return _timed("train", lambda: _train(session, config, False, launch, nproc))


def record_image(session: Session, environ: Mapping[str, str] = os.environ) -> None:
    """In Drip's container, note in session.json the image training runs in (``DRIP_IMAGE``, set
    by ``drip.runtime.docker``, and the base it was built on), so inference can run in it too."""
    from .docker import BASE_IMAGE_ENV, IMAGE_ENV, SESSION_IMAGE_KEY

    tag = environ.get(IMAGE_ENV)
    if tag:
        session.record(SESSION_IMAGE_KEY, {"tag": tag, "base_image": environ.get(BASE_IMAGE_ENV)})


def run_stage(name: str, session_folder: Path, overrides: dict, resume: bool = False, launch: Launch | None = None):
    """``drip stage NAME``: one stage on the existing session, with its config plus ``overrides``."""
    session = Session(Path(session_folder))
    session.dl.mkdir(parents=True, exist_ok=True)
    config = _session_config(session, overrides, require=False)
    if name == "train":
        nproc = processes(launch, config)
        return _timed(name, lambda: _train(session, config, resume, launch, nproc))
    if name == "configure":
        chosen = set(overrides) | (set(Config.fields()) if session.config_path.is_file() else set())
        return _timed(name, lambda: configure.run(session, config, chosen=chosen))
    result = _timed(name, lambda: STAGE_MODULES[name].run(session, config))
    if name != "configure":
        configure.write(session, config)
    return result


def processes(launch: Launch | None, config, split: bool = True) -> int:
    """Processes on this node; for training (``split``), checks that the global batch divides
    over all of them."""
    if launch is None:
        return 1
    gpus = 0
    if launch.nproc_per_node == "auto" and config.device != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = launch.processes(gpus)
    if split:
        from ..training.distributed import split_batch

        split_batch(config.batch_size, nproc * launch.nnodes)
    return nproc


def _train(session: Session, config: Config, resume: bool, launch: Launch | None, nproc: int):
    """The train stage in this process, or under torchrun on ``nproc`` processes per node."""
    if launch is None or nproc * launch.nnodes == 1:
        return train_stage.run(session, config, resume=resume)
    from ..training.checkpoints import set_aside_earlier_run
    from . import torchrun

    if not resume:
        set_aside_earlier_run(session)  # before the ranks start writing their logs there
    torchrun.run(launch, nproc, session.root.resolve(), session.logs_dir, resume, config.to_dict())
    done = (session.read_state().get("stages") or {}).get("train") or {}
    return train_stage.TrainResult(done.get("step", 0), session.model_path, done.get("images_per_sec"))


def infer(session_folder: Path, overrides: dict, launch: Launch | None = None):
    """``drip infer``; with ``launch`` asking for several processes, under torchrun, the images
    shared out (``drip.evaluation.results.run_groups``)."""
    config = InferConfig().updated(overrides, CLI)
    nproc = processes(launch, config, split=False)
    if nproc > 1:
        from . import torchrun

        logs = Path(config.results_path) / "logs"
        return _timed("infer", lambda: torchrun.run(launch, nproc, Path(session_folder).resolve(), logs, False,
                                                    config.to_dict(), command="infer"))
    return _timed("infer", lambda: infer_stage.run(config, Path(session_folder)))


def evaluate(session_folder: Path, overrides: dict):
    """``drip evaluate``: COCO metrics of a model on an annotated set of images."""
    from ..evaluation.metrics import evaluate_annotations

    config = EvaluateConfig().updated(overrides, CLI)
    return _timed("evaluate", lambda: evaluate_annotations(config, Path(session_folder)))


def export(session_folder: Path, overrides: dict):
    """``drip export``: the model as ONNX or TorchScript (see ``drip.deploy.export``)."""
    from ..deploy.export import export as export_model
    from ..evaluation.results import resolve_model_path

    config = ExportConfig().updated(overrides, CLI)
    model_path = resolve_model_path(config.model, Path(session_folder))
    path = _timed(
        "export", lambda: export_model(model_path, config.format, config.output, config.image_size, config.int8,
                                       config.calibration_images)
    )
    console.info(f"exported {model_path} as {config.format} to {path}")
    return path


def report(session_folder: Path, overrides: dict):
    """``drip report``: the session's pictures and index.html, drawn again (see ``drip.evaluation.report``)."""
    from ..evaluation.report import write_report

    config = ReportConfig().updated(overrides, CLI)
    return write_report(
        Session(Path(session_folder)), threshold=config.threshold / 100, device=config.device,
        batch_size=config.batch_size,
    )


def list_networks() -> None:
    """The networks Drip builds, with their published COCO figures and where those come from."""
    from .. import detectors

    rows = [("network", "COCO AP", "latency", "params", "licence")]
    sources: list[str] = []
    for name in detectors.network_names():
        figures = detectors.published(name)
        if figures.source not in sources:
            sources.append(figures.source)
        ap = "-" if figures.coco_ap is None else f"{figures.coco_ap:.1f}"
        mark = f" [{sources.index(figures.source) + 1}]"
        rows.append((name, ap + mark, figures.latency, f"{figures.params_m:g} M", figures.licence))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print()
    for i, source in enumerate(sources, 1):
        print(f"[{i}] {source}")


def _session_config(session: Session, overrides: dict, require: bool) -> Config:
    if session.config_path.exists():
        return Config.read(session.config_path).updated(overrides, CLI)
    if require:
        raise SessionError(
            f"{session.dl}: no session to resume ({session.config_path.name} is missing); "
            "run without --resume_training to start one"
        )
    return Config().updated(overrides, CLI)


def _check_inputs(config: Config) -> None:
    """Fail on a missing input before the current session is moved to trash."""
    from ..data.yolo import is_yolo_source

    sources = [("src_json_path", config.src_json_path), ("eval_json_path", config.eval_json_path)]
    for flag, value in sources:
        if value is not None and not Path(value).exists():
            raise InputError(
                f"--{flag} {value}: not found; point it at your annotations "
                "(a COCO/Drip JSON file, a VOC folder, or a YOLO data.yaml or labels folder)"
            )
    root = Path(config.image_folder_path)
    # YOLO keeps its images in images/ beside labels/; other formats name them under this folder.
    if not root.is_dir() and not all(is_yolo_source(Path(v)) for _, v in sources if v is not None):
        raise InputError(f"--image_folder_path {root}: not a folder; point it at the folder holding your images")
    if config.class_map_path is not None and not Path(config.class_map_path).is_file():
        raise InputError(f"--class_map_path {config.class_map_path}: not found; fix the path or leave the flag out to take classes from the annotations")
    if config.eval_percentage >= 100:
        raise ConfigError("--eval_percentage 100 leaves nothing to train on; use a value below 100")
    from ..detectors import models

    # A model file given as --network is read now: a missing, damaged or refused (code-running)
    # file must not cost the current session or an hour of data preparation.
    models.network_name(config.network)


def _timed(name: str, fn):
    start = time.perf_counter()
    result = fn()
    console.info(f"{name} finished in {time.perf_counter() - start:.1f} s")
    return result
