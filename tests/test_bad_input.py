"""Bad input through the real ``dcccl`` command: one line on stderr saying what is wrong and what to do, exit
status 2, no traceback (``--debug`` shows it), and an existing run directory left exactly as it was.

Starting Python with torch and Lightning takes seconds, so the cases that fail before any training run one after
another in one interpreter: each is a call of the console script's ``cli.main`` with its own argv, its stderr (file
descriptor 2) captured to its own file, its exit status taken from ``SystemExit`` as the interpreter would. The
disk-full and NaN cases run as processes of their own.
"""

from __future__ import annotations

import hashlib
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.commands import command_env, dcccl

ROOT = Path(__file__).resolve().parents[1]

# Runs cli.main once per case (argv lists in the JSON file argv[1]); writes each case's stderr to <dir>/<i>.err and
# the exit statuses to <dir>/codes.json.
DRIVER = """
import json, os, sys, traceback
from pathlib import Path
import cli
cases = json.loads(Path(sys.argv[1]).read_text())
out = Path(sys.argv[2])
codes = []
for index, argv in enumerate(cases):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    with open(out / f"{index}.err", "wb") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            cli.main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if isinstance(stop.code, str):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    codes.append(code)
(out / "codes.json").write_text(json.dumps(codes))
"""


@dataclass
class Outcome:
    """How one command ended."""

    code: int
    stderr: str

    @property
    def last_line(self) -> str:
        """The last non-empty line of stderr."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def run_in_one_interpreter(cases: list[list[str]], out: Path) -> list[Outcome]:
    """Run ``dcccl <argv>`` for every argv of ``cases`` in one fresh interpreter, in order."""
    out.mkdir(parents=True)
    (out / "cases.json").write_text(json.dumps(cases))
    subprocess.run([sys.executable, "-c", DRIVER, str(out / "cases.json"), str(out)], cwd=ROOT, env=command_env(),
                   check=True, timeout=600)
    codes = json.loads((out / "codes.json").read_text())
    return [Outcome(code, (out / f"{index}.err").read_text()) for index, code in enumerate(codes)]


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path."""
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def _image(path: Path, value: int, tag: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, tag % 256)).save(path)


def image_folders(root: Path, layout: dict[str, dict[str, int]]) -> dict[str, str]:
    """``layout[side][class]`` images of 8x8 pixels under ``root/side/class``; returns the three folders."""
    for side_index, (side, classes) in enumerate(layout.items()):
        (root / side).mkdir(parents=True, exist_ok=True)
        for class_index, (name, count) in enumerate(classes.items()):
            (root / side / name).mkdir(parents=True, exist_ok=True)
            for index in range(count):  # every image its own bytes: no two sides share an image
                _image(root / side / name / f"{index}.png", 40 * index + 10, 64 * side_index + 7 * class_index)
    return {f"{side}_dir": str(root / side) for side in ("cloud", "device", "test")}


GOOD_LAYOUT = {"cloud": {"cat": 2, "dog": 2}, "device": {"emu": 2}, "test": {"cat": 1, "dog": 1, "emu": 1}}


def data_config(path: Path, class_path: str, **init_args: object) -> str:
    """A data config file; returns its path."""
    path.write_text(yaml.safe_dump({"data": {"class_path": class_path, "init_args": init_args}}))
    return str(path)


def stage_config(path: Path, stage: str, **model_args: object) -> str:
    """``configs/stages/<stage>.yaml`` with ``model_args`` merged into its model's init_args; returns its path."""
    config = yaml.safe_load((ROOT / "configs" / "stages" / f"{stage}.yaml").read_text())
    config["model"]["init_args"].update(model_args)
    path.write_text(yaml.safe_dump(config))
    return str(path)


def earlier_run(run_dir: Path) -> Path:
    """A finished one-round run of the quickstart's config: genuine tiny exports (10 classes, 1 channel) written by a
    fake stage runner, metrics, ledger, plots and a pipeline.yaml."""
    from dcccl.commands.pipeline import pipeline_parser, settings_from
    from dcccl.pipeline.execution import PlanRun
    from dcccl.pipeline.plan import dcccl_plan
    from dcccl.pipeline.steps import StageCall
    from tests.conftest import RecordingRunner

    class _Runner(RecordingRunner):
        def metrics(self, call: StageCall, output: Path) -> dict[str, float]:
            return {"served/acc": 0.5, "served/acc_cloud_classes": 0.6, "served/acc_device_classes": 0.3}

    parser = pipeline_parser()
    settings = settings_from(parser, parser.parse_args(["--config", str(ROOT / "configs" / "quickstart.yaml"),
                                                        "--run_dir", str(run_dir), "--rounds", "1"]))
    PlanRun(settings, dcccl_plan(settings), _Runner()).execute(None)
    (run_dir / "pipeline.yaml").write_text("# the config of the earlier run\nrounds: 1\n")
    return run_dir


@dataclass
class Case:
    """A command that must fail, and what its one line must say."""

    argv: list[str]
    says: tuple[str, ...]
    run_dir: Path | None = None
    must_not_exist: Path | None = None


def _cases(tmp: Path, template: Path) -> dict[str, Case]:
    """Every case that fails before training, with the inputs it needs (written under ``tmp``)."""
    from dcccl.artifacts.exports import NetworkExport, Role, save_export
    from dcccl.backbones.spec import BackboneSpec

    folders = image_folders(tmp / "good", GOOD_LAYOUT)
    missing = {**folders, "cloud_dir": str(tmp / "no_such_folder")}
    empty_device = image_folders(tmp / "empty", {**GOOD_LAYOUT, "device": {}})
    empty_class = image_folders(tmp / "empty_class", {**GOOD_LAYOUT, "cloud": {"cat": 2, "dog": 2, "cow": 0}})
    unlearnable = image_folders(tmp / "unlearnable", {**GOOD_LAYOUT, "test": {"cat": 1, "dog": 1, "emu": 1, "yak": 2}})
    corrupt = image_folders(tmp / "corrupt", GOOD_LAYOUT)
    (Path(corrupt["cloud_dir"]) / "cat" / "broken.png").write_text("not an image\n")
    (Path(corrupt["device_dir"]) / "emu" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    folder_module = "datamodules.ImageFolderDataModule"
    mnist = "datamodules.BundledMNISTDataModule"
    text_file = tmp / "notes.txt"
    text_file.write_text("these are notes, not weights\n")
    spec = BackboneSpec("small_cnn", kwargs={"width": 2, "depth": 1})
    exports = {}
    made: tuple[tuple[str, Role, int], ...] = (("cloud10", "cloud_submodel", 10), ("co10", "co_submodel", 10),
                                               ("co5", "co_submodel", 5))
    for name, role, classes in made:
        exports[name] = str(save_export(NetworkExport.of(spec.build(classes, 1), role, spec, classes, 1, 40),
                                        tmp / f"{name}.pt"))
    fit_dir = tmp / "fit_dir"

    def pipeline(name: str, *args: str) -> tuple[list[str], Path]:
        run_dir = tmp / "runs" / name
        shutil.copytree(template, run_dir)
        argv = ["pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir), "--rounds", "1", *args]
        return argv, run_dir

    def on_data(name: str, class_path: str, **init_args: object) -> tuple[list[str], Path]:
        return pipeline(name, "--data", data_config(tmp / f"{name}.yaml", class_path, **init_args))

    def stage(subcommand: str, *args: str) -> list[str]:
        return [subcommand, *args, "--trainer.default_root_dir", str(fit_dir)]

    table: dict[str, tuple[tuple[list[str], Path] | list[str], tuple[str, ...]]] = {
        "missing data folder": (on_data("missing", folder_module, **missing),
                                ("data folder not found", str(tmp / "no_such_folder"), "cloud_dir")),
        "empty data folder": (on_data("empty", folder_module, **empty_device),
                              ("the device folder", "holds no images", "one sub-folder per class")),
        "empty class folder": (on_data("empty_class", folder_module, **empty_class),
                               ("class folder(s) without images", "cow", "add images")),
        "test class nobody holds": (on_data("unlearnable", folder_module, **unlearnable),
                                    ("neither the cloud nor any device", "yak", "allow_unlearnable_test_classes")),
        "corrupt images": (on_data("corrupt", folder_module, **corrupt),
                           ("cannot be read as images", "broken.png", "fix or remove")),
        "corrupt device images": (on_data("corrupt_device", folder_module,
                                          **{**folders, "device_dir": corrupt["device_dir"]}),
                                  ("cannot be read as images", "cut.png")),
        "class id out of range": (on_data("out_of_range", mnist, cloud_classes=[0, 1, 12], device_classes=[7, 8, 9]),
                                  ("cloud_classes [12] are out of range", "classes 0..9")),
        "device holds no classes": (on_data("device_empty", mnist, cloud_classes=[0, 1], device_classes=[]),
                                    ("the devices hold no classes", "device_classes")),
        "nobody holds a class": (on_data("both_empty", mnist, cloud_classes=[], device_classes=[]),
                                 ("neither the cloud nor the devices hold any class",)),
        "unlearnable digit": (on_data("digit_nine", mnist, cloud_classes=[0, 1, 2], device_classes=[7, 8]),
                              ("neither the cloud nor any device", "3, 4, 5, 6, 9")),
        "unknown backbone": (pipeline("backbone", "--stages.cloud", stage_config(
            tmp / "cloud_typo.yaml", "cloud", backbone={"name": "resnet181"})),
            ("unknown backbone 'resnet181'", "Did you mean", "resnet18")),
        "unknown backbone (fit)": (stage("fit", "--config", "configs/stages/cloud.yaml",
                                         "--model.init_args.backbone.name", "resnt18"),
                                   ("unknown backbone 'resnt18'", "resnet18")),
        # The run directory's manifest knows its stages were made from other data (10 digits, not 3 animals).
        "run directory from other data": (on_data("other_classes", folder_module, **folders),
                                          ("the config of the finished stage 'cloud submodel' changed",
                                           "--rerun_changed", "--run_dir")),
        "evaluate mismatched exports": (stage("test", "--config", "configs/stages/evaluate.yaml",
                                              "--model.init_args.cloud_submodel", exports["cloud10"],
                                              "--model.init_args.co_submodel", exports["co5"]),
                                        ("trained for 5 classes but the data has 10", "co5.pt")),
        "fine-tune a mismatched copy": (stage("fit", "--config", "configs/stages/head.yaml",
                                              "--model.init_args.cloud_submodel", exports["cloud10"],
                                              "--model.init_args.co_submodel", exports["co5"]),
                                        ("predicts 5 classes but the data has 10", "co5.pt")),
        "unknown pipeline key": (pipeline("key", "--rounds_per_device", "2"),
                                 ("unrecognized arguments", "--rounds_per_device", "--help")),
        "unknown stage config key": (pipeline("stage_key", "--stages.cloud", stage_config(
            tmp / "cloud_key.yaml", "cloud", bogus_key=1)), ("cloud stage's config does not parse", "bogus_key")),
        "unknown key (fit)": (stage("fit", "--config", "configs/stages/cloud.yaml", "--model.init_args.bogus", "1"),
                              ("Option 'bogus' is not accepted", "--help")),
        "split base weights not a checkpoint": (pipeline("split", "--split.base.name", "small_cnn",
                                                         "--split.base.checkpoint_path", str(text_file)),
                                                ("notes.txt is not a weights file", "not a file written by torch.save",
                                                 "checkpoint_path")),
        "export path is a text file (fit)": (stage("fit", "--config", "configs/stages/distill.yaml",
                                                   "--model.init_args.cloud_submodel", str(text_file)),
                                             ("notes.txt is not a readable dcccl export",
                                              "not a file written by torch.save")),
        "ckpt_path not a checkpoint (fit)": (stage("fit", "--config", "configs/stages/cloud.yaml",
                                                   "--ckpt_path", str(text_file)),
                                             ("notes.txt is not a Lightning checkpoint",
                                              "not a file written by torch.save", "checkpoints/last.ckpt")),
        "device budget exceeded": (pipeline("budget", "--device_budget.max_params", "10"),
                                   ("exceeds the device budget", "params", "> limit 10")),
    }
    cases = {}
    for name, (command, says) in table.items():
        if isinstance(command, tuple):
            cases[name] = Case(command[0], says, run_dir=command[1])
        else:
            cases[name] = Case(command, says, must_not_exist=fit_dir)
    return cases


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, Outcome, dict[str, str]]]:
    """Every fast case run once: the case, how it ended, and the hashes of the earlier run it was given."""
    tmp = tmp_path_factory.mktemp("bad_input")
    template = earlier_run(tmp / "earlier_run")
    before = file_hashes(template)
    cases = _cases(tmp, template)
    debug = Case(cases["missing data folder"].argv + ["--debug"], ())
    ended = run_in_one_interpreter([case.argv for case in cases.values()] + [debug.argv], tmp / "stderr")
    results = {name: (case, outcome, before) for (name, case), outcome in zip(cases.items(), ended)}
    results["--debug"] = (debug, ended[-1], before)
    return results


FAST_CASES = ["missing data folder", "empty data folder", "empty class folder", "test class nobody holds",
              "corrupt images", "corrupt device images", "class id out of range", "device holds no classes",
              "nobody holds a class", "unlearnable digit", "unknown backbone", "unknown backbone (fit)",
              "run directory from other data", "evaluate mismatched exports", "fine-tune a mismatched copy",
              "unknown pipeline key", "unknown stage config key", "unknown key (fit)",
              "split base weights not a checkpoint", "export path is a text file (fit)",
              "ckpt_path not a checkpoint (fit)", "device budget exceeded"]


@pytest.mark.parametrize("name", FAST_CASES)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
        name: str, outcomes: dict[str, tuple[Case, Outcome, dict[str, str]]]) -> None:
    case, outcome, before = outcomes[name]
    assert outcome.code == 2, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr and "usage:" not in outcome.stderr, outcome.stderr[-3000:]
    command = f"dcccl {case.argv[0]}: error: "
    assert outcome.last_line.startswith(command) and outcome.last_line.endswith(")"), outcome.last_line
    for words in case.says:
        assert words in outcome.last_line, (words, outcome.last_line)
    if case.run_dir is not None:
        assert file_hashes(case.run_dir) == before  # not one file written, changed or removed
    if case.must_not_exist is not None:
        assert not case.must_not_exist.exists()


def test_debug_shows_the_traceback(outcomes: dict[str, tuple[Case, Outcome, dict[str, str]]]) -> None:
    case, outcome, before = outcomes["--debug"]
    assert outcome.code == 1
    assert "Traceback (most recent call last)" in outcome.stderr
    assert "MissingFileError: data folder not found" in outcome.stderr
    assert "--debug shows the traceback" not in outcome.stderr
    assert file_hashes(Path(case.argv[case.argv.index("--run_dir") + 1])) == before


def test_unlearnable_test_classes_can_be_allowed_with_a_warning(tmp_path: Path) -> None:
    from datamodules.image_folder import ImageFolderDataModule

    folders = image_folders(tmp_path, {**GOOD_LAYOUT, "test": {"cat": 1, "dog": 1, "emu": 1, "yak": 2}})
    cloud, device, test = folders["cloud_dir"], folders["device_dir"], folders["test_dir"]
    with pytest.raises(ValueError, match=r"neither the cloud nor any device holds \(yak\)"):
        ImageFolderDataModule(cloud, device, test).data  # noqa: B018
    allowed = ImageFolderDataModule(cloud, device, test, allow_unlearnable_test_classes=True)
    with pytest.warns(UserWarning, match=r"\(yak\): nothing can learn them. They are left out of every evaluation"):
        allowed.data  # noqa: B018
    assert allowed.num_classes == 4 and len(allowed.data.test_labels) == 5
    assert len(allowed.test_dataset()) == 3  # type: ignore[arg-type]  # the two yak images are not evaluated


def _limit_file_size(limit: int) -> None:
    """In the child: writes beyond ``limit`` bytes fail with EFBIG (SIGXFSZ ignored) instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_disk_full_names_the_file_and_keeps_the_earlier_run(tmp_path: Path) -> None:
    run_dir = earlier_run(tmp_path / "run")
    before = file_hashes(run_dir)
    # --force would train every stage again: the first things written are the copies of the config files the checks
    # and the stages read (outside the run directory), which do not fit.
    result = dcccl("pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir), "--rounds", "1",
                   "--force", preexec_fn=lambda: _limit_file_size(256))
    outcome = Outcome(result.returncode, result.stderr)
    assert outcome.code == 2, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr
    assert re.match(r"dcccl pipeline: error: disk full / file too large while writing /\S+\.yaml",
                    outcome.last_line), outcome.last_line
    assert "free space" in outcome.last_line
    assert file_hashes(run_dir) == before  # the half-written config was removed, the old one kept


@pytest.mark.slow
def test_nan_loss_stops_the_stage_and_names_it(tmp_path: Path) -> None:
    exploding = stage_config(tmp_path / "cloud.yaml", "cloud",
                             optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0e20}})
    run_dir = tmp_path / "run"
    result = dcccl("pipeline", "--config", "configs/quickstart.yaml", "--run_dir", str(run_dir), "--rounds", "1",
                   "--stages.cloud", exploding, "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0",
                   "--trainer.enable_progress_bar", "false")
    outcome = Outcome(result.returncode, result.stderr)
    assert outcome.code == 2, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr
    assert re.search(rf"CloudSubmodelModule \(in {re.escape(str(run_dir / 'cloud'))}\): the training loss is "
                     r"(nan|inf|-inf) at global step \d+ \(epoch 0\).*lower the learning rate", outcome.last_line), \
        outcome.last_line
    assert not (run_dir / "cloud" / "cloud_submodel.pt").exists()  # the stage exported nothing
    assert not (run_dir / "distill").exists()  # and no later stage ran
