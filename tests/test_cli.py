"""The drip command and the starters: flags from the schema, fast help, one-line errors."""

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drip import cli
from drip.config import Config, InferConfig

ROOT = Path(__file__).resolve().parents[1]

# Stand-ins for the heavy packages: importing any of them fails, as on a host without them.
NO_HEAVY = (
    "import sys, runpy\n"
    "for m in ('torch', 'torchvision', 'numpy', 'PIL', 'cv2', 'albumentations', 'yaml', 'tensorboard', 'docker'):\n"
    "    sys.modules[m] = None\n"
    "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.mark.parametrize("starter", ["training_starter.py", "inference_starter.py"])
def test_starter_help_needs_no_heavy_packages_and_is_fast(starter):
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", NO_HEAVY, str(ROOT / starter), "--help"],
        capture_output=True, text=True, cwd=ROOT,
    )
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert "--runtime" in out.stdout and "--session_folder" in out.stdout
    # "well under a second": generous for a loaded CI machine, far below a torch import (~2 s).
    assert elapsed < 1.5, f"--help took {elapsed:.2f} s"


def _flags(parser):
    return {o for a in parser._actions for o in a.option_strings}


def test_every_config_field_is_a_flag_and_back():
    flags = _flags(cli.add_train_flags(cli.new_parser()))
    for f in dataclasses.fields(Config):
        assert (f"--{f.name}" in flags) == f.metadata["flag"], f.name
    infer_flags = _flags(cli.add_infer_flags(cli.new_parser()))
    assert {f"--{f.name}" for f in dataclasses.fields(InferConfig)} <= infer_flags


def test_original_drip_flags_are_kept():
    train = _flags(cli.add_train_flags(cli.new_parser()))
    assert {"--src_json_path", "--image_folder_path", "--eval_percentage", "--resume_training",
            "--session_folder", "--batch_size", "--number_of_steps"} <= train
    assert {"--images_path", "--threshold"} <= _flags(cli.add_infer_flags(cli.new_parser()))


def test_only_given_flags_override():
    args = cli.build_parser().parse_args(["train", "--batch_size", "8"])
    assert cli.given(args, Config) == {"batch_size": "8"}


def test_mistyped_flag_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["train", "--batchsize", "8"])
    assert exc.value.code == 2
    assert "did you mean: --batchsize -> --batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "--threshold", "50"], "(--threshold is a flag of 'drip infer' and 'drip report', not of 'drip evaluate')"),
    (["export", "--results_path", "x"],
     "--results_path is a flag of 'drip infer' and 'drip evaluate', not of 'drip export'; "
     "'drip export' takes --output for that"),
    (["infer", "--numbr_of_steps", "3"], "did you mean --number_of_steps, a flag of 'drip train', 'drip audit' and 'drip stage'?"),
])
def test_a_flag_of_another_command_names_the_command_that_takes_it(capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expected in err, err
    flag = argv[1]
    assert f"{flag} -> {flag}" not in err  # the old hint: the flag suggested as its own fix


def test_a_starter_names_the_other_starter_for_its_flags():
    out = _starter("--threshold", "50")
    assert out.returncode == 2
    assert "(--threshold is a flag of 'inference_starter.py', not of 'training_starter.py')" in out.stderr


@pytest.mark.parametrize("command", ["infer", "evaluate"])
@pytest.mark.parametrize("flag", ["--results_path", "--output"])
def test_results_path_is_where_results_go_and_output_its_alias(command, flag):
    from drip.config import EvaluateConfig

    args = cli.build_parser().parse_args([command, flag, "out dir"])
    assert vars(args)["results_path"] == "out dir" and "output" not in vars(args)
    if command == "evaluate":
        assert EvaluateConfig(results_path="out dir").metrics_path() == Path("out dir/metrics.json")
        assert EvaluateConfig(results_path="a/m.json").metrics_path() == Path("a/m.json")  # the old --output FILE


def _starter(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "training_starter.py"), "--runtime", "local", *args],
        capture_output=True, text=True, cwd=cwd,
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--batch_size", "0"], "drip: error: --batch_size 0 is out of range; expected 1..4096"),
        (["--eval_percentage", "150"], "drip: error: --eval_percentage 150 is out of range; expected 0..100"),
        (["--src_json_path", "missing.json"], "drip: error: --src_json_path missing.json: not found"),
    ],
)
def test_user_mistakes_are_one_line_and_non_zero(tmp_path, args, expected):
    out = _starter("--session_folder", str(tmp_path / "s"), *args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith(expected), out.stderr
    assert "Traceback" not in out.stderr


def test_a_failed_start_leaves_the_current_session_alone(tmp_path):
    (tmp_path / "s" / "dl").mkdir(parents=True)
    (tmp_path / "s" / "dl" / "keep.txt").write_text("mine")
    out = _starter("--session_folder", str(tmp_path / "s"), "--src_json_path", "missing.json")
    assert out.returncode == 2
    assert (tmp_path / "s" / "dl" / "keep.txt").read_text() == "mine"


def test_resume_without_a_session_says_how_to_start_one(tmp_path):
    out = _starter("--session_folder", str(tmp_path / "s"), "--resume_training")
    assert out.returncode == 2
    assert "no session to resume" in out.stderr and "without --resume_training" in out.stderr


def test_readme_documents_every_flag():
    readme = (ROOT / "README.md").read_text()
    from drip import launcher

    parsers = [launcher.build_parser("train", "t"), launcher.build_parser("infer", "i")]
    missing = sorted(f for p in parsers for f in _flags(p) if f.startswith("--") and f"`{f}`" not in readme and f != "--help")
    assert not missing, f"README.md does not document {missing}"


def test_the_pytorchjob_example_is_a_drip_train_command_line():
    # deploy/pytorchjob.yaml has never run on a cluster; this at least keeps its command one that
    # drip train accepts, with one restart (a restarted group meets at its first try).
    import shlex

    import yaml

    job = yaml.safe_load((ROOT / "deploy" / "pytorchjob.yaml").read_text())
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = {"RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    line = container["args"][0]
    for name, value in env.items():
        line = line.replace(f"${name}", value)
    argv = shlex.split(line)
    assert argv[:3] == ["exec", "drip", "train"]
    args = cli.build_parser().parse_args(argv[2:])
    assert (args.nnodes, args.node_rank, args.rdzv_endpoint, args.max_restarts) == (2, 1, "10.0.0.1:29400", 1)
