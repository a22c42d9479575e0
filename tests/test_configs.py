"""Every YAML in configs/ parses against what consumes it: the stage CLI or the pipeline parser."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from cli import build_pipeline, cli_main, pipeline_parser, split_trainer_arguments, stage_arguments
from dcccl.pipeline import StageCall

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGE_CONFIGS = sorted((CONFIGS / "stages").glob("*.yaml"))
PIPELINE_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))


def print_config(args: list[str]) -> dict:
    """Parse ``args`` with the stage CLI (no instantiation) and return the resolved config."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_there_are_configs_to_check() -> None:
    assert len(STAGE_CONFIGS) == 8 and PIPELINE_CONFIGS


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: p.name)
def test_stage_config_parses_alone_and_with_data_and_trainer(path: Path) -> None:
    command = "test" if path.stem == "evaluate" else "fit"
    alone = print_config([command, "--config", str(path)])
    assert alone["model"]["class_path"].startswith("lightning_modules.")
    assert alone["data"]["class_path"] == "datamodules.BundledMNISTDataModule"  # the default data
    composed = print_config([command, "--config", str(CONFIGS / "data/mnist.yaml"), "--config", str(path),
                             "--config", str(CONFIGS / "trainer/cpu.yaml"), "--trainer.max_epochs=1"])
    assert composed["trainer"]["accelerator"] == "cpu" and composed["trainer"]["max_epochs"] == 1


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_pipeline_config_parses_and_names_existing_stage_configs(path: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # config files named in a config file are found from anywhere
    parser = pipeline_parser()
    cfg = parser.parse_args(["--config", str(path)])
    pipeline = build_pipeline(parser, cfg)
    for stage_config in vars(pipeline.stages).values():
        assert Path(stage_config).is_absolute() and Path(stage_config).is_file()
        assert Path(stage_config).parent == CONFIGS / "stages"
    assert pipeline.rounds >= 1 and pipeline.run.root == Path("runs") / cfg.name


def test_pipeline_stage_arguments_parse_with_the_stage_cli(tmp_path: Path) -> None:
    parser = pipeline_parser()
    cfg = parser.parse_args(["--config", str(CONFIGS / "quickstart.yaml"), f"--run_dir={tmp_path}"])
    for _, call in build_pipeline(parser, cfg).plan():
        resolved = print_config([call.command, *stage_arguments(call)])
        for key, value in call.model_args.items():
            assert resolved["model"]["init_args"][key] == value
        assert resolved["trainer"]["default_root_dir"] == str(call.work_dir)


def test_trainer_arguments_are_split_off_and_typed() -> None:
    trainer, rest = split_trainer_arguments(
        ["--config", "x.yaml", "--trainer.max_epochs", "2", "--trainer.logger=false", "--rounds", "1"])
    assert trainer == {"max_epochs": 2, "logger": False}
    assert rest == ["--config", "x.yaml", "--rounds", "1"]


def test_stage_arguments_render_values_for_the_cli(tmp_path: Path) -> None:
    call = StageCall("fusion", "fit", [Path("a.yaml")], {"device_copies": ["d.pt"], "co_submodel": None},
                     {"max_epochs": 1}, 3, tmp_path, (tmp_path / "x.pt",), ["--extra=1"])
    assert stage_arguments(call) == [
        "--config", "a.yaml", "--trainer.max_epochs=1", '--model.init_args.device_copies=["d.pt"]',
        "--model.init_args.co_submodel=null", "--seed_everything=3", "--data.init_args.seed=3", "--extra=1",
    ]


def test_compare_takes_seeds_as_a_list() -> None:
    from cli import compare_parser

    cfg = compare_parser().parse_args(["--config", str(CONFIGS / "quickstart.yaml"), "--seeds", "0", "1", "2"])
    assert cfg.seeds == [0, 1, 2]
    assert compare_parser().parse_args(["--config", str(CONFIGS / "quickstart.yaml")]).seeds is None


def test_progress_bars_are_off_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    call = StageCall("cloud", "fit", [Path("a.yaml")], {}, {"max_epochs": 1}, 0, tmp_path, (tmp_path / "x.pt",))
    assert "--trainer.enable_progress_bar=false" in stage_arguments(call, interactive=False)
    assert not any("enable_progress_bar" in a for a in stage_arguments(call, interactive=True))
    call.trainer_args["enable_progress_bar"] = True  # asked for explicitly: kept
    assert "--trainer.enable_progress_bar=true" in stage_arguments(call, interactive=False)
