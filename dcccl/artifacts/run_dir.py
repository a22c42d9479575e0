"""Every path rule of a run directory, in one place.

Layout::

    <run_dir>/
      pipeline.yaml                         resolved pipeline config
      metrics.json                          final metrics, per-round served accuracy, transfer totals
      manifest.json                         per artifact: SHA-256, the stage that wrote it, its config's hash
      transfers.json                        the device/cloud ledger: every transfer in bytes
      accuracy_per_round.png                served accuracy per round (all, cloud and device classes)
      confusion_matrix.png                  confusion matrix of the final served model on the union test set
      wandb/                                W&B runs of the stages and of the pipeline (with a W&B logger)
      fleet/partition.json, partition.png   the fleet's data partition (with several devices)
      cloud/cloud_submodel.pt               export of the cloud submodel f
      distill/control_model.pt              export of the control model g
      rounds/initial_co_submodel.pt         the co-submodel h the cloud sends down in round 1
      rounds/round_001/cloud_round/co_submodel.pt     the cloud's copy of h after the round
      rounds/round_001/device_000/co_submodel.pt      device 0's copy of h after the round
      rounds/round_001/fusion/co_submodel.pt          fused h, the start of the next round
      rounds/round_001/fusion/server_state.pt         a server optimiser's state after the round (FedAvgM, FedAdam)
      rounds/round_001/fusion/replies.json            the cloud's verdict on each device copy it was to fuse
      rounds/round_001/head/co_submodel.pt            fused h with its classifier fine-tuned (finetune_head)
      rounds/round_001/evaluate/metrics.json          served model after the round
      rounds/round_001/fleet.json                     sampled, online and reporting devices, fused copies

Each stage's directory also holds its resolved config (``config.yaml``), Lightning checkpoints
(``checkpoints/last.ckpt`` is where an interrupted stage resumes) and ``stage.json`` (the config hash of the
stage's last start).
"""

from __future__ import annotations

from pathlib import Path

# What a stage with a training budget leaves in its directory: what it ran (epochs, steps, samples) and why it stopped.
BUDGET_REPORT = "budget.json"


class RunDirectory:
    """Paths of the artifacts of one pipeline run under ``root``.

    Args:
        root: The run directory.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def pipeline_config(self) -> Path:
        """The resolved pipeline config."""
        return self.root / "pipeline.yaml"

    @property
    def metrics(self) -> Path:
        """Final metrics of the run."""
        return self.root / "metrics.json"

    @property
    def manifest(self) -> Path:
        """SHA-256, stage and config hash of every artifact."""
        return self.root / "manifest.json"

    @staticmethod
    def last_checkpoint(stage_dir: Path) -> Path:
        """The checkpoint an interrupted stage resumes from."""
        return stage_dir / "checkpoints" / "last.ckpt"

    @staticmethod
    def stage_state(stage_dir: Path) -> Path:
        """Which config a stage was last started with (to know whether its checkpoints still apply)."""
        return stage_dir / "stage.json"

    @staticmethod
    def stage_progress(stage_dir: Path) -> Path:
        """What a stage that makes many artifacts in one run has finished (kept when the same start resumes)."""
        return stage_dir / "progress"

    @property
    def transfers(self) -> Path:
        """The device/cloud ledger."""
        return self.root / "transfers.json"

    @property
    def accuracy_plot(self) -> Path:
        """Served accuracy per round."""
        return self.root / "accuracy_per_round.png"

    @property
    def confusion_plot(self) -> Path:
        """Confusion matrix of the final served model."""
        return self.root / "confusion_matrix.png"

    @property
    def fleet_partition(self) -> Path:
        """Per-device label counts of the fleet's partition."""
        return self.root / "fleet" / "partition.json"

    @property
    def cloud_submodel(self) -> Path:
        """Export of the trained cloud submodel."""
        return self.root / "cloud" / "cloud_submodel.pt"

    @property
    def control_model(self) -> Path:
        """Export of the distilled control model."""
        return self.root / "distill" / "control_model.pt"

    @property
    def initial_co_submodel(self) -> Path:
        """The co-submodel every copy starts from in round 1."""
        return self.root / "rounds" / "initial_co_submodel.pt"

    def round_dir(self, round_index: int) -> Path:
        """Directory of round ``round_index`` (counted from 1)."""
        if round_index < 1:
            raise ValueError(f"rounds are counted from 1, got {round_index}")
        return self.root / "rounds" / f"round_{round_index:03d}"

    def cloud_copy(self, round_index: int) -> Path:
        """The cloud's copy of the co-submodel after training in a round."""
        return self.round_dir(round_index) / "cloud_round" / "co_submodel.pt"

    def device_copy(self, round_index: int, device_index: int) -> Path:
        """A device's copy of the co-submodel after training in a round."""
        return self.round_dir(round_index) / f"device_{device_index:03d}" / "co_submodel.pt"

    def device_state(self, round_index: int, device_index: int) -> Path:
        """What a device keeps after a round (its accountant's history, its compression residual): device-side."""
        return self.round_dir(round_index) / f"device_{device_index:03d}" / "device_state.pt"

    def secure_sum(self, round_index: int) -> Path:
        """The devices' weighted mean copy of a round, as secure aggregation reveals it to the cloud."""
        return self.round_dir(round_index) / "devices" / "secure_sum.pt"

    def fused_co_submodel(self, round_index: int) -> Path:
        """The fused co-submodel at the end of a round."""
        return self.round_dir(round_index) / "fusion" / "co_submodel.pt"

    def reply_verdicts(self, round_index: int) -> Path:
        """The cloud's verdict on each device copy a round's fusion was to fuse (accepted, or refused and why)."""
        return self.round_dir(round_index) / "fusion" / "replies.json"

    def server_state(self, round_index: int) -> Path:
        """What a server optimiser keeps after a round's fusion (its momentum or moments), for the next round's."""
        return self.round_dir(round_index) / "fusion" / "server_state.pt"

    def finetuned_co_submodel(self, round_index: int) -> Path:
        """The fused co-submodel of a round after its classifier was fine-tuned on cloud samples."""
        return self.round_dir(round_index) / "head" / "co_submodel.pt"

    def round_metrics(self, round_index: int) -> Path:
        """Evaluation of the served model after a round."""
        return self.round_dir(round_index) / "evaluate" / "metrics.json"
