"""The ``drip`` command: argument parsing and dispatch.

Flags are generated from the config dataclasses (``drip.config``), so a flag, its config key, its
range and its help text never drift apart. This module imports only the standard library at the
top: ``--help`` answers at once, and the host-side starters reuse these parsers. The work itself
(``drip.runtime.local``, the stages) is imported only when a command runs.

    drip train   [flags]            split -> augment -> records -> configure -> train
    drip infer   [flags]            run a trained model on a folder of folders of images
    drip evaluate [flags]           COCO metrics of a model on an annotated set of images
    drip export  [flags]            a trained model as ONNX or TorchScript, self-describing
    drip report  [flags]            a session's pictures and index.html, drawn again
    drip audit   [flags]            out-of-fold label issues, then the final model
    drip select  [flags]            the unlabelled images worth labelling next
    drip stage NAME [flags]         run one stage alone on an existing session
    drip networks                   list the detectors Drip can train
    drip doctor                     check the Docker engine, GPUs, disk and shared memory
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from pathlib import Path

from .config import (CLI, AuditConfig, Config, EvaluateConfig, ExportConfig, InferConfig, ReportConfig, SelectConfig,
                     start_clock)
from .errors import DripError, guarded
from .runtime import torchrun

DEFAULT_SESSION_FOLDER = "pipeline/"
STAGES = ("split", "augment", "records", "configure", "train")
GROUP_TITLES = {
    "data": "data (the inputs and how they are split, augmented and stored)",
    "model": "model",
    "train": "training",
    "infer": "inference",
    "audit": "audit (folds and the final model)",
}


class Parser(argparse.ArgumentParser):
    """argparse with a hint for each flag it does not know: the flag meant, or who takes it.

    A flag another command takes is not a typo: ``drip evaluate --threshold`` says that
    ``drip infer`` takes it rather than suggesting the flag itself.
    """

    def parse_args(self, args=None, namespace=None):
        parsed, strays = self.parse_known_args(args, namespace)
        if strays:
            command = getattr(parsed, "command", None)
            self.error(f"unrecognized arguments: {' '.join(strays)}{self.stray_hints(strays, command)}")
        return parsed

    # For a parser without sub-commands (a starter): a function returning the parsers of the
    # commands beside it, by name, asked only when a flag is not known.
    related = None

    def stray_hints(self, strays: list[str], command: str | None = None) -> str:
        """`` (did you mean: ...)`` for the flags in ``strays``, as given to ``command``."""
        commands = _commands(self) or (self.related() if self.related else {})
        own = commands.get(command, self) if command else self
        prog = own.prog
        known = _long_flags(own)
        others = {p.prog: _long_flags(p) for name, p in commands.items() if name != command}
        meant, notes = [], []
        for word in strays:
            flag = word.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            close = difflib.get_close_matches(flag, sorted(known - {flag}), n=1, cutoff=_CLOSE)
            if close:
                meant.append(f"{flag} -> {close[0]}")
                continue
            takers = [name for name, flags in others.items() if flag in flags]
            if takers:
                same = SAME_PURPOSE.get(flag)
                here = f"; '{prog}' takes {same} for that" if same in known else ""
                notes.append(f"{flag} is a flag of {_names(takers)}, not of '{prog}'{here}")
                continue
            near = {name: c for name, flags in others.items()
                    for c in difflib.get_close_matches(flag, sorted(flags), n=1, cutoff=_CLOSE)}
            if len(set(near.values())) == 1:
                notes.append(f"{flag}: did you mean {next(iter(near.values()))}, a flag of {_names(list(near))}?")
        if meant:
            notes.insert(0, f"did you mean: {', '.join(meant)}?")
        return f" ({'; '.join(notes)})" if notes else ""


def _names(progs: list[str]) -> str:
    quoted = [f"'{prog}'" for prog in progs]
    return " and ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


# How alike a stray flag and a known one must be to suggest it (difflib's ratio): at its default
# 0.6, "--thresold" would be offered "--help".
_CLOSE = 0.75

# Flags of different commands that do the same job, for the hint when one is given to the wrong
# command (today every pair is also an alias; the table keeps the hint right if that changes).
SAME_PURPOSE = {"--output": "--results_path", "--results_path": "--output"}


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-command parsers of ``parser`` by name (none for the starters)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _long_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every --flag of ``parser`` and its sub-commands (the top parser reports their strays)."""
    flags = set()
    for action in parser._actions:
        flags.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _long_flags(sub)
    return flags


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34, width=100)


def add_schema_flags(parser: argparse.ArgumentParser, schema) -> None:
    """One flag per field of the dataclass ``schema``, grouped by the field's group.

    Defaults are SUPPRESSed so the parsed namespace holds only what the user typed: that is what
    overrides the session's config file, which in turn overrides the defaults.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(schema):
        meta = f.metadata
        if not meta["flag"]:
            continue
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(GROUP_TITLES.get(meta["group"], meta["group"]))
        default = f.default
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else (
            "{true,false}" if str(f.type) == "bool" else f.name.split("_")[-1].upper()
        )
        aliases = [f"--{a}" for a in meta.get("aliases", ())]
        also = f"; also {', '.join(aliases)}" if aliases else ""
        # A yes/no flag alone means yes: --int8 is --int8 true.
        bare = {"nargs": "?", "const": "true"} if str(f.type) == "bool" else {}
        group.add_argument(
            f"--{f.name}",
            *aliases,
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=metavar,
            **bare,
            help=f"{meta['help']} (default: {shown}{also})".replace("%", "%%"),
        )


def given(args: argparse.Namespace, schema) -> dict:
    """The schema fields the user set on the command line."""
    names = {f.name for f in dataclasses.fields(schema)}
    return {k: v for k, v in vars(args).items() if k in names}


TRAIN_DESCRIPTION = (
    "Train a detector on labelled images, end to end:\n"
    "  split -> augment -> records -> configure -> train\n"
    "Each run starts a new session in SESSION_FOLDER/dl (an existing one is moved to\n"
    "SESSION_FOLDER/trash/, never deleted) unless --resume_training is given.\n\n"
    "Example:\n"
    "  %(prog)s --src_json_path files/metadata.json --image_folder_path files/images/"
)
INFER_DESCRIPTION = (
    "Detect objects in a folder of folders of images. Each sub-folder's results go to\n"
    "RESULTS_PATH/<folder>/: the images with boxes drawn, one JSON per image and\n"
    "detections.json for the folder. Earlier results there are moved to\n"
    "RESULTS_PATH/trash/, never overwritten.\n\n"
    "Example:\n"
    "  %(prog)s --images_path files/test_images --threshold 60"
)

EVALUATE_DESCRIPTION = (
    "Score a model on any annotated set of images with COCO metrics (pycocotools): AP at\n"
    "IoU .50:.95, AP50, AP75, AP and AR by object size, AP per class and precision-recall\n"
    "curves. Annotation classes are matched to the model's by name. The metrics JSON goes to\n"
    "RESULTS_PATH/metrics.json; an earlier one there is moved to trash/, never overwritten.\n\n"
    "Example:\n"
    "  %(prog)s --model pipeline/ --images_path files/test_images --src_json_path files/test.json"
)

EXPORT_DESCRIPTION = (
    "Export a trained model as ONNX (runs in ONNX Runtime, no PyTorch needed) or TorchScript.\n"
    "The file describes itself: class names, image size and input layout are in its metadata.\n"
    "Feed it one RGB image, float 3xHxW in 0..1, resized so its longer side is the image size;\n"
    "it returns boxes (in that image's pixels), labels and scores.\n\n"
    "Example:\n"
    "  %(prog)s --model pipeline/ --format onnx --output model.onnx\n"
    "  drip infer --model model.onnx --images_path files/test_images"
)


REPORT_DESCRIPTION = (
    "Draw a session's report again into SESSION_FOLDER/dl/report/ (training writes it at the\n"
    "end): training curves, precision-recall curves, a confusion matrix, the dataset, eval\n"
    "images with predictions beside the ground truth, and index.html showing them all with the\n"
    "run's config and metrics. An earlier report is moved to SESSION_FOLDER/trash/.\n\n"
    "Example:\n"
    "  %(prog)s --session_folder pipeline/ --threshold 40"
)


AUDIT_DESCRIPTION = (
    "Find the labels to fix: train --folds models out of fold, so that every image is predicted\n"
    "by a model that never saw its labels, compare each image's labels with those predictions,\n"
    "then train the session's final model on all the data. Writes SESSION_FOLDER/dl/audit/:\n"
    "label_issues.json (missing, wrong_class, bad_box, duplicate, spurious; ranked by score),\n"
    "suggested.json (the annotations with the suggestions applied, COCO) and index.html; the\n"
    "rest of SESSION_FOLDER is an ordinary session (model.pt, report, logs). Takes training's flags.\n\n"
    "Example:\n"
    "  %(prog)s --src_json_path files/metadata.json --image_folder_path files/images/ --folds 2"
)

SELECT_DESCRIPTION = (
    "Rank a folder of unlabelled images by how much labelling them would teach the model\n"
    "(uncertain to it, and unlike each other) and write the best COUNT to OUTPUT as JSON:\n"
    "images, best first, each with why it was chosen. An earlier OUTPUT goes to trash/ first.\n\n"
    "Example:\n"
    "  %(prog)s --model pipeline/ --images_path new_images/ --count 50 --output next.json"
)


def new_parser(prog: str | None = None, description: str | None = None) -> Parser:
    return Parser(prog=prog, description=description, formatter_class=_formatter, allow_abbrev=False)


def add_train_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_session_flags(p)
    add_schema_flags(p, Config)
    torchrun.add_flags(p)
    return p


def _add_session_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("session")
    g.add_argument(
        "--session_folder",
        default=DEFAULT_SESSION_FOLDER,
        metavar="PATH",
        help="Folder holding the session (dl/), augmented images, trash and the weights cache "
        f"(default: {DEFAULT_SESSION_FOLDER})",
    )
    g.add_argument(
        "--resume_training",
        action="store_true",
        help="Continue the session in SESSION_FOLDER/dl from its newest checkpoint, with the "
        "settings of its pipeline.config (edit it first to change them) and any flags given now",
    )


def _add_model_run_flags(p: argparse.ArgumentParser, schema) -> argparse.ArgumentParser:
    p.add_argument(
        "--session_folder",
        default=DEFAULT_SESSION_FOLDER,
        metavar="PATH",
        help="Session whose exported model is used when --model is not given "
        f"(default: {DEFAULT_SESSION_FOLDER})",
    )
    add_schema_flags(p, schema)
    return p


def add_infer_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_model_run_flags(p, InferConfig)
    torchrun.add_flags(p, "infer")
    return p


def add_audit_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--session_folder", default=DEFAULT_SESSION_FOLDER, metavar="PATH",
        help=f"Folder of the audit's session: dl/audit/ and the final model (default: {DEFAULT_SESSION_FOLDER})",
    )
    add_schema_flags(p, Config)
    add_schema_flags(p, AuditConfig)
    torchrun.add_flags(p)
    return p


def add_select_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return _add_model_run_flags(p, SelectConfig)


def add_evaluate_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return _add_model_run_flags(p, EvaluateConfig)


def add_export_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return _add_model_run_flags(p, ExportConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="drip",
        description="Drip: retrain torchvision object detectors on your images, then run them.",
        formatter_class=_formatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"drip {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_train_flags(sub.add_parser(
        "train", help="train a detector: split, augment, records, configure, train",
        description=TRAIN_DESCRIPTION, formatter_class=_formatter, allow_abbrev=False,
    ))
    add_infer_flags(sub.add_parser(
        "infer", help="run a trained detector on images and write JSON results",
        description=INFER_DESCRIPTION, formatter_class=_formatter, allow_abbrev=False,
    ))
    add_evaluate_flags(sub.add_parser(
        "evaluate", help="COCO metrics of a trained detector on annotated images",
        description=EVALUATE_DESCRIPTION, formatter_class=_formatter, allow_abbrev=False,
    ))
    add_export_flags(sub.add_parser(
        "export", help="write a trained detector as ONNX or TorchScript",
        description=EXPORT_DESCRIPTION, formatter_class=_formatter, allow_abbrev=False,
    ))
    add_runtime_flags(add_audit_flags(sub.add_parser(
        "audit", help="find wrong, missing and bad labels with out-of-fold models, then train",
        description=AUDIT_DESCRIPTION, formatter_class=_formatter, allow_abbrev=False,
    )), "audit", default="local")
    add_runtime_flags(add_select_flags(sub.add_parser(
        "select", help="choose the unlabelled images worth labelling next",
        description=SELECT_DESCRIPTION, formatter_class=_formatter, allow_abbrev=False,
    )), "select", default="local")
    report = sub.add_parser(
        "report", help="draw a session's report (pictures and index.html) again",
        description=REPORT_DESCRIPTION, formatter_class=_formatter, allow_abbrev=False,
    )
    report.add_argument(
        "--session_folder", default=DEFAULT_SESSION_FOLDER, metavar="PATH",
        help=f"The session to report on: its dl/ folder (default: {DEFAULT_SESSION_FOLDER})",
    )
    add_schema_flags(report, ReportConfig)
    stage = sub.add_parser(
        "stage",
        help="run one stage alone on an existing session",
        description=(
            "Run one stage alone. Settings come from the session's pipeline.config when it\n"
            "exists (else the defaults), then from the flags given; the result is written back."
        ),
        formatter_class=_formatter,
        allow_abbrev=False,
    )
    stage.add_argument("name", choices=STAGES, help="the stage to run")
    _add_session_flags(stage)
    add_schema_flags(stage, Config)
    torchrun.add_flags(stage)
    sub.add_parser("networks", help="list the detectors Drip can train", allow_abbrev=False)
    doctor = sub.add_parser(
        "doctor",
        help="check that this host can run Drip's container, with a fix for each problem",
        description=(
            "Check the Docker engine, its NVIDIA runtime, free disk for the image and the\n"
            "session, and shared memory for data loading; each failed check says how to fix it."
        ),
        formatter_class=_formatter,
        allow_abbrev=False,
    )
    doctor.add_argument(
        "--session_folder", default=DEFAULT_SESSION_FOLDER, metavar="PATH",
        help=f"Where sessions will go, for the free-space check (default: {DEFAULT_SESSION_FOLDER})",
    )
    doctor.add_argument(
        "--base_image", default=None, metavar="IMAGE",
        help="The --base_image the starters will be given, to tell whether Drip's image is built",
    )
    return parser


def _version() -> str:
    from . import __version__

    return __version__


SCHEMAS = {
    "train": Config, "stage": Config, "infer": InferConfig, "evaluate": EvaluateConfig, "export": ExportConfig,
    "report": ReportConfig, "select": SelectConfig,
}


def run_command(command: str, args: argparse.Namespace) -> int:
    """Run a parsed command in this Python process. Imports the heavy parts only now."""
    schema = SCHEMAS.get(command)
    if schema is not None:
        schema().updated(given(args, schema), CLI)  # a bad flag fails now, not after a torch import
    if command == "audit":
        Config().updated(given(args, Config), CLI)
        AuditConfig().updated(given(args, AuditConfig), CLI)
    session_folder = Path(getattr(args, "session_folder", DEFAULT_SESSION_FOLDER))
    # An ONNX model runs in ONNX Runtime without PyTorch: sent there before the pipeline's
    # imports, which import PyTorch.
    onnx = command == "infer" and str(getattr(args, "model", None) or "").lower().endswith(".onnx")
    try:
        if onnx:
            from .deploy import onnx_infer
        else:
            from .runtime import local
    except ImportError as exc:
        if (exc.name or "drip").split(".")[0] == "drip":
            raise  # our own import broke: a bug, keep the traceback
        raise DripError(
            f"this Python ({sys.executable}) lacks Drip's dependencies ({exc.name} is missing); "
            "run scripts/setup.sh, or 'pip install -e .', or use --runtime docker"
        ) from None
    if onnx:
        onnx_infer.run(InferConfig().updated(given(args, InferConfig), CLI), session_folder)
        return 0
    if command == "train":
        local.train(session_folder, given(args, Config), resume=args.resume_training, launch=torchrun.from_args(args))
    elif command == "stage":
        local.run_stage(args.name, session_folder, given(args, Config), resume=args.resume_training,
                           launch=torchrun.from_args(args))
    elif command == "infer":
        local.infer(session_folder, given(args, InferConfig), launch=torchrun.from_args(args))
    elif command == "evaluate":
        local.evaluate(session_folder, given(args, EvaluateConfig))
    elif command == "export":
        local.export(session_folder, given(args, ExportConfig))
    elif command == "report":
        local.report(session_folder, given(args, ReportConfig))
    elif command == "audit":
        from .runtime import audit

        audit.audit(session_folder, given(args, Config), given(args, AuditConfig), launch=torchrun.from_args(args))
    elif command == "select":
        from .runtime import audit

        audit.select(session_folder, given(args, SelectConfig))
    elif command == "networks":
        local.list_networks()
    return 0


RUNTIMES = ("auto", "local", "docker")


DOCKER_FLAGS = ("base_image", "docker_network", "gpus", "tensorboard_port", "shell")


def _gpus(value: str) -> str:
    v = value.strip().lower()
    if v in ("all", "none") or (v.isdigit() and int(v) > 0):
        return v
    raise argparse.ArgumentTypeError(f"{value!r} is not 'all', 'none' or a number of GPUs (e.g. 1)")


def _port(value: str) -> int:
    if value.isdigit() and 0 <= int(value) <= 65535:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535, or 0 for none)")


def add_runtime_flags(p: argparse.ArgumentParser, command: str = "train", default: str = "auto") -> None:
    """``--runtime`` and the Docker runtime's flags. The starters default to ``auto``; the ``drip``
    command, which otherwise runs in this Python, to ``local``."""
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=os.environ.get("DRIP_RUNTIME", default),
        help="Where the stages run: 'docker' in Drip's container (GPU through the NVIDIA "
        "Container Toolkit), 'local' in this Python, 'auto' = docker when a Docker engine "
        f"answers, else local (default: {default}, or $DRIP_RUNTIME)",
    )
    # Docker-only flags default to SUPPRESS: the namespace then tells whether the user gave
    # one, and --runtime local can say that it has no effect.
    d = p.add_argument_group("docker runtime")
    d.add_argument(
        "--gpus",
        type=_gpus,
        default=argparse.SUPPRESS,
        metavar="{all,N,none}",
        help="GPUs the container gets, through the NVIDIA Container Toolkit (default: all; "
        "with --device cpu none are requested)",
    )
    d.add_argument(
        "--base_image",
        default=argparse.SUPPRESS,
        metavar="IMAGE",
        help="Image to build Drip's image on, passed as the Dockerfile's BASE_IMAGE: any image "
        "with Python >= 3.10 and venv, e.g. one made by scripts/docker_base_image.sh where no "
        "registry can be reached (default: the Dockerfile's, an official slim Python image)",
    )
    d.add_argument(
        "--docker_network",
        default=argparse.SUPPRESS,
        metavar="NETWORK",
        help="Docker network for the image build and the container, e.g. 'host' when pip in a "
        "build cannot reach the package index through the default bridge (default: the "
        "engine's bridge)",
    )
    if command == "train":
        d.add_argument(
            "--tensorboard_port",
            type=_port,
            default=argparse.SUPPRESS,
            metavar="PORT",
            help="TensorBoard runs in the container during training, on http://127.0.0.1:PORT/ "
            "only (0 = no TensorBoard) (default: 6006)",
        )
    d.add_argument(
        "--shell",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Open an interactive shell in Drip's container with the mounts, user and GPUs "
        f"this 'drip {command}' would get, instead of running it",
    )



def docker_unavailable_reason(timeout: float = 2.0) -> str | None:
    """None when Drip can run in Docker here, else why not (one line).

    Fast: when no engine listens the socket refuses at once, and a hung one gets ``timeout``.
    """
    from .runtime import docker

    try:
        docker.connect(timeout=timeout)
    except DripError as exc:
        return str(exc)
    return None


def choose_runtime(requested: str) -> str:
    if requested == "local":
        return "local"
    reason = docker_unavailable_reason()
    if reason is None:
        return "docker"
    if requested == "docker":
        raise DripError(f"--runtime docker: {reason}; use --runtime local")
    print(f"[drip] running locally ({reason})", file=sys.stderr)
    return "local"

def run_in_runtime(command: str, args: argparse.Namespace) -> int:
    """``command`` in this Python or in Drip's container, as ``--runtime`` (and the engine) decide."""
    requested = "docker" if getattr(args, "shell", False) and args.runtime == "auto" else args.runtime
    if choose_runtime(requested) == "local":
        docker_only = [f"--{name}" for name in DOCKER_FLAGS if hasattr(args, name)]
        if "--shell" in docker_only:
            raise DripError("--shell opens a shell in Drip's container; it needs --runtime docker")
        if docker_only:
            print(f"[drip] {', '.join(docker_only)}: no effect with the local runtime", file=sys.stderr)
        return run_command(command, args)
    from .runtime import docker

    return docker.run(command, args)


def main(argv: list[str] | None = None) -> int:
    start_clock()  # --time_limit counts from here
    args = build_parser().parse_args(argv)
    if args.command == "doctor":  # host side: needs the Docker SDK, not PyTorch
        from .runtime import docker

        return guarded(docker.doctor, args.session_folder, args.base_image)
    if args.command in ("audit", "select"):  # they take --runtime, as the starters do
        return guarded(run_in_runtime, args.command, args)
    return guarded(run_command, args.command, args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CLI", "main", "build_parser", "run_command"]
