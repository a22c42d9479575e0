"""One LightningModule per DC-CCL stage; each runs alone through ``dcccl fit``/``dcccl test``/``dcccl predict``."""

from lightning_modules.centralized import CentralizedModule
from lightning_modules.cloud import CloudSubmodelModule
from lightning_modules.cloud_round import CloudCoTrainingModule
from lightning_modules.device import DeviceCoTrainingModule
from lightning_modules.device_round import DeviceRoundFailed, DeviceRoundModule, DeviceSteps
from lightning_modules.distill import ControlDistillationModule
from lightning_modules.evaluate import ServedModelEvaluation
from lightning_modules.guided import GuidedCoTrainingModule
from lightning_modules.head import HeadFinetuneModule
from lightning_modules.predict import ServedModelPrediction
from lightning_modules.speed import ChannelsLast, CompileNetworks
from lightning_modules.stage_module import StageModule

__all__ = [
    "CentralizedModule",
    "ChannelsLast",
    "CloudCoTrainingModule",
    "CloudSubmodelModule",
    "CompileNetworks",
    "ControlDistillationModule",
    "DeviceCoTrainingModule",
    "DeviceRoundFailed",
    "DeviceRoundModule",
    "DeviceSteps",
    "GuidedCoTrainingModule",
    "HeadFinetuneModule",
    "ServedModelEvaluation",
    "ServedModelPrediction",
    "StageModule",
]
