"""The registries: stages registered by the module class that runs them (its name, its class, whether a pipeline
config must name its config, the typed arguments the plan gives it), and every rule and method of their packages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

import lightning_modules
from dcccl.errors import ConfigError
from dcccl.methods import stage_names
from dcccl.pipeline.plan import CloudArguments, DeviceArguments, dcccl_plan
from dcccl.pipeline.stages import STAGES, StageArguments, register_stage, required_stages
from dcccl.pipeline.steps import StageCall
from dcccl.registry import Registry
from tests.test_pipeline import settings


def test_every_stage_a_plan_calls_is_registered_with_the_module_that_runs_it(tmp_path: Path) -> None:
    plan = dcccl_plan(settings(tmp_path, rounds=1, finetune_head=True))
    calls = [step for step in plan if isinstance(step, StageCall)]
    assert [call.stage for call in calls] == ["cloud", "distill", "cloud_round", "device", "head", "evaluate"]
    for call in calls:
        stage = STAGES[call.stage]
        # The plan hands over exactly the arguments the stage declares (none other), each one a parameter of the
        # module; a field left unset is handed over only when the stage declares it optional.
        assert set(call.model_args) <= set(stage.arguments.names())
        assert set(stage.arguments.names()) - set(call.model_args) <= stage.arguments.OPTIONAL
    assert STAGES["device"].module is lightning_modules.DeviceCoTrainingModule
    assert STAGES["centralized"].module is lightning_modules.CentralizedModule


def test_typed_arguments_reach_the_parser_as_it_resolves_them(tmp_path: Path) -> None:
    from dcccl.federated.compression import Compression

    arguments = DeviceArguments(None, tmp_path / "start.pt", compression=Compression(codec="topk"))
    assert arguments.model_args() == {"control_model": None, "co_submodel": str(tmp_path / "start.pt"),
                                      "export_path": None, "compression": Compression(codec="topk").to_dict()}
    assert CloudArguments(tmp_path / "f.pt").model_args() == {"export_path": str(tmp_path / "f.pt")}


def test_which_stage_configs_a_run_needs_follows_the_registry(tmp_path: Path) -> None:
    plain = settings(tmp_path)
    assert sorted(required_stages(plain)) == ["cloud", "cloud_round", "device", "distill", "evaluate"]
    assert "head" in required_stages(settings(tmp_path, finetune_head=True))
    missing = settings(tmp_path, finetune_head=True)
    del missing.stages["head"]
    with pytest.raises(ConfigError, match="names no stage config for head: add stages.head"):
        missing.check_stages(stage_names(), required_stages(missing))
    typo = settings(tmp_path, stage_args={"clud": ["--x=1"]})
    with pytest.raises(ConfigError, match=r"unknown stages \['clud'\]"):
        typo.check_stages(stage_names(), required_stages(typo))


def test_a_stage_may_not_declare_an_argument_its_module_does_not_take() -> None:
    @dataclass(frozen=True)
    class Arguments(StageArguments):
        export_path: Path
        teacher: Optional[Path] = None

    class Module:
        def __init__(self, export_path: str) -> None:
            self.export_path = export_path

    with pytest.raises(TypeError, match=r"takes no teacher"):
        register_stage("probe", arguments=Arguments)(Module)
    assert "probe" not in STAGES


def test_two_entries_may_not_share_a_name_and_an_unknown_name_lists_the_known_ones() -> None:
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    registry.add("a", 1)  # the same entry again (a module imported twice) is fine
    with pytest.raises(ValueError, match="two things are registered as 'a'"):
        registry.add("a", 2)
    with pytest.raises(ConfigError, match="unknown thing 'b': choose among a"):
        registry["b"]


def test_every_concrete_rule_and_method_of_their_packages_is_registered() -> None:
    """A class added without its decorator would be invisible to ``dcccl compare`` or to the rules' listing."""
    import inspect
    import sys

    from dcccl.federated.aggregation import RULES, AggregationRule
    from dcccl.methods import METHODS, Method

    def concrete(package: str, base: type) -> set[type]:
        return {cls for name, module in list(sys.modules.items()) if name.startswith(package + ".")
                for _, cls in inspect.getmembers(module, inspect.isclass)
                if issubclass(cls, base) and cls.__module__ == name and not inspect.isabstract(cls)}

    rules = concrete("dcccl.federated.aggregation", AggregationRule)
    assert rules - {rule for _, rule in RULES.items()} <= {cls for cls in rules if cls.__name__ in
                                                          ("ServerOptimizer", "RobustRule")}
    assert {"FedAvg", "FedAdam", "Median", "MultiKrum", "NormClipping"} <= set(RULES)
    assert {type(method) for method in METHODS.values()} == concrete("dcccl.methods", Method)
