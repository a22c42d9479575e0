"""What a pipeline run is configured with: the settings ``dcccl pipeline`` parses, as one typed dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from dcccl.artifacts.run_dir import RunDirectory
from dcccl.backbones.split import SplitSpec
from dcccl.config_path import ConfigPath
from dcccl.errors import ConfigError, MissingFileError
from dcccl.federated.aggregation import AggregationRule, FedAvg
from dcccl.federated.attacks import Attack
from dcccl.federated.compression import Compression
from dcccl.federated.device_limits import DeviceBudget
from dcccl.federated.fleet import FleetSpec
from dcccl.federated.privacy import DifferentialPrivacy
from dcccl.federated.secure_aggregation import SecureAggregation

Guide = Literal["cloud_submodel", "control_model", "none"]
DeviceGuide = Literal["control_model", "none"]
RestartPoint = Literal["cloud", "distill", "rounds"]
RESTART_ORDER: tuple[RestartPoint, ...] = ("cloud", "distill", "rounds")


@dataclass
class PipelineSettings:
    """Everything that decides what a DC-CCL run computes.

    Args:
        stages: The config file of each stage, by stage name: ``cloud``, ``distill``, ``cloud_round``, ``device``
            and ``evaluate`` always; ``head`` with ``finetune_head``; ``centralized`` and ``fedavg_client`` for
            ``dcccl compare``. The same files run each stage alone with ``dcccl fit``/``test``. In a config file,
            relative names are relative to that file's folder.
        data: Config file with the ``data`` section shared by all stages (default: the bundled MNIST digits).
        name: Run name; the run directory defaults to ``runs/<name>``.
        run_dir: Run directory (overrides ``runs/<name>``), relative to the working directory.
        rounds: Number of device-cloud rounds (at least 1).
        seed_everything: Seed of the whole run: data split and training of every stage.
        cloud_round_guide: Which model guides the cloud's copy of the co-submodel: the cloud submodel
            (default, as in the paper's code), the control model, or none (baselines).
        device_guide: Whether the control model guides the devices (``none``: the ablation without it).
        round_order: ``sequential`` (default): the cloud trains its copy first and the devices start from it, so
            each side corrects what the other left; ``parallel`` (the paper's): the cloud's copy and the devices'
            copies all start from the round's co-submodel.
        serve_cloud_submodel: Serve ``f + h`` (default) or the co-submodel alone (small-model baselines).
        fleet: Many devices: their data partition, sampling and availability (default: one device that always
            reports).
        aggregation: How the cloud fuses the copies of the co-submodel each round (default: ``FedAvg`` with the
            cloud's copy holding half); e.g. ``{class_path: LatestUpdate, init_args: {cloud_share: 0.5}}``.
        finetune_head: After each fusion, fine-tune the fused co-submodel's classifier on cloud samples with the
            cloud submodel frozen (the ``head`` stage config; needs timm's head API).
        device_budget: Limits the on-device part (control model + co-submodel) must fit; checked before the
            first device trains, and the run is refused if it does not fit.
        privacy: Train every device's copy with DP-SGD (Opacus, ``pip install 'dcccl[privacy]'``): e.g.
            ``{target_epsilon: 8, delta: 1.0e-5}``; each device's epsilon is in ``metrics.json`` and the ledger. The
            co-submodel must have no batch norm (``configs/privacy.yaml``).
        compression: Send the co-submodel's updates compressed, both ways: ``{codec: int8}`` (per-tensor scale) or
            ``{codec: topk, fraction: 0.1}`` (with error feedback); the ledger counts the encoded bytes.
        secure_aggregation: On Flower, average the device copies with SecAgg+: the cloud learns only their weighted
            mean (e.g. ``{}`` for the defaults). The aggregation rule must allow it (FedAvg without class-aware
            fusion); a simulated fleet refuses it.
        attack: Make some devices of a simulated fleet lie, to measure an aggregation rule under attack: e.g.
            ``{devices: 2, kind: sign_flip}`` (:class:`~dcccl.federated.attacks.Attack`); the attacked devices are
            marked in ``transfers.json``. Flower's devices are real and refuse it.
        split: Build the submodels by splitting one base model vertically instead of taking each stage's own
            backbone: the cloud submodel is the large group, the co-submodel (and the control model, which
            is distilled afterwards) the small group, all initialised from the base model's weights.
        trainer: Trainer options applied to every stage (e.g. ``--trainer.max_epochs 1``).
        stage_args: Extra command-line arguments per stage name, e.g. ``{cloud: ["--model.init_args.lr=0.01"]}``.
    """

    stages: dict[str, ConfigPath]
    data: Optional[ConfigPath] = None
    name: str = "dcccl"
    run_dir: Optional[str] = None
    rounds: int = 3
    seed_everything: int = 0
    cloud_round_guide: Guide = "cloud_submodel"
    device_guide: DeviceGuide = "control_model"
    round_order: Literal["parallel", "sequential"] = "sequential"
    serve_cloud_submodel: bool = True
    fleet: FleetSpec = field(default_factory=FleetSpec)
    aggregation: Optional[AggregationRule] = None
    finetune_head: bool = False
    device_budget: Optional[DeviceBudget] = None
    privacy: Optional[DifferentialPrivacy] = None
    compression: Optional[Compression] = None
    secure_aggregation: Optional[SecureAggregation] = None
    attack: Optional[Attack] = None
    split: Optional[SplitSpec] = None
    trainer: dict[str, Any] = field(default_factory=dict)
    stage_args: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        for config in [*self.stages.values(), *([self.data] if self.data is not None else [])]:
            if not Path(config).is_file():
                raise MissingFileError(f"config file not found: {config}")
        if self.aggregation is None:
            self.aggregation = FedAvg()
        if self.attack is not None:
            self.attack.attacked(self.fleet.num_devices, self.seed_everything)  # refuses devices the fleet lacks
        if self.secure_aggregation is not None:
            refusal = self.rule.secure_aggregation_refusal()
            if refusal is not None:
                raise ConfigError(f"secure_aggregation cannot be used with the aggregation rule "
                                  f"{type(self.rule).__name__}: {refusal}; use FedAvg, or remove secure_aggregation")
            if self.compression is not None:
                raise ConfigError("secure_aggregation and compression do not combine (SecAgg+ masks the full "
                                  "update): remove one of them")

    @property
    def rule(self) -> AggregationRule:
        """The aggregation rule in effect (FedAvg where the config names none: set when the settings are made)."""
        assert self.aggregation is not None
        return self.aggregation

    @property
    def device_privacy(self) -> Optional[DifferentialPrivacy]:
        """What every device trains with: the ``privacy`` setting, its target covering this run's rounds."""
        return None if self.privacy is None else replace(self.privacy, rounds=self.rounds)

    @property
    def keeps_device_state(self) -> bool:
        """Whether devices keep state from round to round (an accountant's history, what they hold, a residual)."""
        return self.privacy is not None or self.compression is not None

    @property
    def run(self) -> RunDirectory:
        """The run directory: ``run_dir``, or ``runs/<name>``."""
        return RunDirectory(self.run_dir if self.run_dir is not None else Path("runs") / self.name)

    @property
    def needs_control_model(self) -> bool:
        """Whether any stage uses the control model."""
        return self.device_guide == "control_model" or self.cloud_round_guide == "control_model"

    @property
    def needs_cloud_submodel(self) -> bool:
        """Whether any stage uses the cloud submodel."""
        return self.serve_cloud_submodel or self.cloud_round_guide == "cloud_submodel" or self.needs_control_model

    def check_stages(self, known: set[str], required: list[str]) -> None:
        """Refuse a config that names no stage config for a ``required`` stage, or names under ``stages`` and
        ``stage_args`` a stage that is none of ``known`` (a typo is not ignored).

        Raises:
            ConfigError: Naming the missing, or the unknown and the known, stages.
        """
        missing = [name for name in required if name not in self.stages]
        if missing:
            raise ConfigError(f"the pipeline config names no stage config for {', '.join(missing)}: add "
                              + ", ".join(f"stages.{name}" for name in missing) + " (see configs/quickstart.yaml)")
        unknown = sorted((set(self.stages) | set(self.stage_args)) - known)
        if unknown:
            raise ConfigError(f"stages / stage_args name unknown stages {unknown}: known are {sorted(known)}")
