"""LightningCLI over the stage modules and DataModules: ``dcccl fit|validate|test|predict``, and the parser the
pipeline's stage runner resolves every stage call through."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from datamodules import DEFAULT_DATAMODULE
from datamodules.base import DCCCLDataModule
from dcccl.artifacts.exports import check_lightning_checkpoint
from dcccl.reporting.tracking import prepare_wandb_environment, wandb_logger_args
from lightning_modules import StageModule

STAGE_HELP = """dcccl: device-cloud collaborative controlled learning. Subcommands fit/validate/test/predict run one
stage (e.g. dcccl fit --config configs/stages/cloud.yaml); 'dcccl pipeline --help' runs the whole method,
'dcccl compare --help' compares it with the paper's baselines, 'dcccl ablate --help' compares variants of it,
'dcccl export --help' writes the ONNX bundle, 'dcccl audit --help' attacks a run's device copies."""

def plain(value: Any) -> Any:
    """A parsed option as plain dicts and lists (jsonargparse namespaces converted)."""
    if isinstance(value, Namespace):
        return plain(value.as_dict())
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items() if key != "__path__"}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value

class ConfigToLoggers(SaveConfigCallback):
    """Saves the resolved config next to the logs, as LightningCLI does, and also hands it to every logger
    (the W&B run's config, CSV and TensorBoard hyperparameters)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Log the resolved config as the run's hyperparameters."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)

class DCCCLCLI(LightningCLI):
    """LightningCLI with the DataModule's shape linked into every stage and the bundled digits as default data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link ``num_classes`` and ``in_chans`` from the data to the model; default to the bundled MNIST."""
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": DEFAULT_DATAMODULE}})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, logging to CSV in its ``default_root_dir`` unless a logger is configured.

        (Lightning's own default switches to TensorBoard whenever ``tensorboard`` happens to be installed;
        dcccl's default stays the same on every machine. ``--trainer.logger TensorBoardLogger`` picks it.)
        """
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = CSVLogger(save_dir=trainer_config.get("default_root_dir") or os.getcwd())
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then make sure a ``--ckpt_path`` file is a Lightning checkpoint before Lightning reads it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path is not None and Path(path).is_file():  # else Lightning's own names (last, best) and messages
            check_lightning_checkpoint(path, "point --ckpt_path at a .ckpt file a stage saved, e.g. "
                                             "<stage dir>/checkpoints/last.ckpt")

    def before_instantiate_classes(self) -> None:
        """With a W&B logger configured, pick its mode (offline without key or network) before it starts."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if wandb_logger_args(plain(config.get("trainer.logger"))) is not None:
            prepare_wandb_environment()

class ParseOnlyCLI(DCCCLCLI):
    """The stage parser without instantiating anything (artifacts a stage reads may not exist yet) or seeding."""

    def _set_seed(self) -> None:
        """Seeding belongs to the stage's run, not to the check."""

    def before_instantiate_classes(self) -> None:
        """Nothing is instantiated."""

    def instantiate_classes(self) -> None:
        """Nothing is instantiated."""


# Parse errors raise jsonargparse's ArgumentError instead of printing the usage: main() reports them in one line.
_RAISE_PARSE_ERRORS: dict[str, Any] = {"exit_on_error": False,
                                       **{name: {"exit_on_error": False} for name in LightningCLI.subcommands()}}


def cli_main(args: Optional[list[str]] = None, run: bool = True, cli_class: type[DCCCLCLI] = DCCCLCLI) -> DCCCLCLI:
    """Build (and with ``run`` execute) the stage CLI; ``args`` replaces ``sys.argv[1:]``."""
    with warnings.catch_warnings():  # the arguments are given explicitly on purpose
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended")
        return cli_class(StageModule, DCCCLDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         auto_configure_optimizers=False, save_config_callback=ConfigToLoggers,
                         save_config_kwargs={"overwrite": True},
                         parser_kwargs={"description": STAGE_HELP, **_RAISE_PARSE_ERRORS}, args=args, run=run)
