"""Every YAML in configs/ parses against what consumes it: the stage CLI or the pipeline parser."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from dcccl.commands.pipeline import pipeline_parser, settings_from
from dcccl.commands.stage_cli import cli_main
from dcccl.commands.stage_runner import stage_arguments
from dcccl.pipeline.plan import dcccl_plan
from dcccl.pipeline.steps import StageCall

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
    assert len(STAGE_CONFIGS) == 10 and PIPELINE_CONFIGS


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
def test_pipeline_config_renders_and_names_existing_stage_configs(path: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # config files named in a config file are found from anywhere
    parser = pipeline_parser()
    cfg = parser.parse_args(["--config", str(path)])
    settings = settings_from(parser, cfg)
    for stage_config in settings.stages.values():
        assert Path(stage_config).is_absolute() and Path(stage_config).is_file()
        assert Path(stage_config).parent == CONFIGS / "stages"
    assert settings.rounds >= 1 and settings.run.root == Path("runs") / cfg.name
    rendered = yaml.safe_load(parser.dump(cfg, skip_none=False))  # what pipeline.yaml holds
    assert rendered["name"] == path.stem and set(rendered["stages"]) == set(settings.stages)
    assert dcccl_plan(settings)  # and it plans


def test_overlays_extend_the_quickstart() -> None:
    parser = pipeline_parser()
    quickstart = parser.parse_args(["--config", str(CONFIGS / "quickstart.yaml")])
    fleets = ("fleet.yaml", "fleet_100.yaml", "fleet_1000.yaml")
    for overlay in ("split_resnet.yaml", *fleets):
        text = (CONFIGS / overlay).read_text()
        assert "config: quickstart.yaml" in text and "trainer:" not in text
        cfg = parser.parse_args(["--config", str(CONFIGS / overlay)])
        assert cfg.trainer == quickstart.trainer and set(cfg.stages) == set(quickstart.stages)
        # A stages section replaces the quickstart's whole: a fleet names every stage, and changes only the two
        # local trainings of a round.
        fleet_stages = {"device": "device_fleet.yaml", "cloud_round": "cloud_round_fleet.yaml"}
        for name, path in cfg.stages.items():
            expected = fleet_stages[name] if overlay in fleets and name in fleet_stages else None
            assert Path(path).name == expected if expected else path == quickstart.stages[name], (overlay, name)
    sizes = {}
    for overlay in fleets:
        fleet = settings_from(parser, parser.parse_args(["--config", str(CONFIGS / overlay)]))
        assert type(fleet.aggregation).__name__ == "FedAdam", overlay
        sizes[overlay] = fleet.fleet.num_devices
    assert sizes == {"fleet.yaml": 20, "fleet_100.yaml": 100, "fleet_1000.yaml": 1000}


def test_pipeline_stage_arguments_parse_with_the_stage_cli(tmp_path: Path) -> None:
    parser = pipeline_parser()
    cfg = parser.parse_args(["--config", str(CONFIGS / "quickstart.yaml"), f"--run_dir={tmp_path}"])
    for call in dcccl_plan(settings_from(parser, cfg)):
        if not isinstance(call, StageCall):
            continue
        resolved = print_config([call.command, *stage_arguments(call)])
        for key, value in call.model_args.items():
            assert resolved["model"]["init_args"][key] == value
        assert resolved["trainer"]["default_root_dir"] == str(call.work_dir)


def test_trainer_options_parse_into_the_trainer_section() -> None:
    cfg = pipeline_parser().parse_args(["--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs", "2",
                                        "--trainer.logger=false", "--rounds", "1"])
    assert cfg.trainer == {"accelerator": "cpu", "devices": 1, "enable_model_summary": False, "max_epochs": 2,
                           "logger": False}
    assert cfg.rounds == 1


def _call(tmp_path: Path, **changes: object) -> StageCall:
    fields = dict(label="x", restart_point="rounds", outputs=(tmp_path / "x.pt",), inputs=(), round_index=0,
                  stage="cloud", command="fit", config_files=(Path("a.yaml"),), model_args={}, trainer_args={
                      "max_epochs": 1}, seed=0, work_dir=tmp_path)
    return StageCall(**{**fields, **changes})  # type: ignore[arg-type]


def test_stage_arguments_render_values_for_the_cli(tmp_path: Path) -> None:
    call = _call(tmp_path, model_args={"device_copies": ["d.pt"], "co_submodel": None}, seed=3,
                 extra_args=("--extra=1",))
    assert stage_arguments(call) == [
        "--config", "a.yaml", "--trainer.max_epochs=1", '--model.init_args.device_copies=["d.pt"]',
        "--model.init_args.co_submodel=null", "--seed_everything=3", "--data.init_args.seed=3", "--extra=1",
    ]


def test_compare_takes_seeds_and_methods_as_lists() -> None:
    from dcccl.commands.compare import compare_parser

    cfg = compare_parser().parse_args(["--config", str(CONFIGS / "quickstart.yaml"), "--seeds", "0", "1", "2",
                                       "--methods", "dcccl", "centralized"])
    assert cfg.seeds == [0, 1, 2] and cfg.methods == ["dcccl", "centralized"]
    assert compare_parser().parse_args(["--config", str(CONFIGS / "quickstart.yaml")]).seeds is None


def test_progress_bars_are_off_when_output_is_not_a_terminal(tmp_path: Path) -> None:
    call = _call(tmp_path)
    assert "--trainer.enable_progress_bar=false" in stage_arguments(call, interactive=False)
    assert not any("enable_progress_bar" in a for a in stage_arguments(call, interactive=True))
    call.trainer_args["enable_progress_bar"] = True  # asked for explicitly: kept
    assert "--trainer.enable_progress_bar=true" in stage_arguments(call, interactive=False)
