"""One LightningModule per DC-CCL stage; each runs alone through ``dcccl fit``/``dcccl test``/``dcccl predict``."""

from lightning_modules.base import StageModule
from lightning_modules.centralized import CentralizedModule
from lightning_modules.cloud import CloudSubmodelModule
from lightning_modules.cloud_round import CloudCoTrainingModule
from lightning_modules.device import DeviceCoTrainingModule
from lightning_modules.distill import ControlDistillationModule
from lightning_modules.evaluate import ServedModelEvaluation
from lightning_modules.fusion import FusionModule
from lightning_modules.guided import GuidedCoTrainingModule
from lightning_modules.predict import ServedModelPrediction

__all__ = [
    "CentralizedModule",
    "CloudCoTrainingModule",
    "CloudSubmodelModule",
    "ControlDistillationModule",
    "DeviceCoTrainingModule",
    "FusionModule",
    "GuidedCoTrainingModule",
    "ServedModelEvaluation",
    "ServedModelPrediction",
    "StageModule",
]
