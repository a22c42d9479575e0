"""The ``dcccl`` command: wiring only.

``dcccl fit|validate|test|predict ...`` is LightningCLI over the stage modules and DataModules
(:mod:`dcccl.commands.stage_cli`); ``dcccl pipeline|compare|ablate|export|audit`` are one module each in
:mod:`dcccl.commands`. A command's module is imported when it runs: ``dcccl --help`` imports none of them, and a
command imports Lightning only once it runs a stage. Bad input (dcccl's own error types, parse errors, a full disk)
is reported in one line with exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any, Optional

from dcccl.errors import user_error_message

# Each command's entry point, as "module:function".
COMMANDS: dict[str, str] = {
    "pipeline": "dcccl.commands.pipeline:pipeline_main",
    "compare": "dcccl.commands.compare:compare_main",
    "ablate": "dcccl.commands.ablate:ablate_main",
    "export": "dcccl.commands.export:export_main",
    "audit": "dcccl.commands.audit:audit_main",
}

OVERVIEW = """usage: dcccl COMMAND [options]

dcccl: device-cloud collaborative controlled learning on PyTorch Lightning.

The whole method:
  pipeline   run DC-CCL end to end (cloud submodel, control model, rounds of devices and fusion)
  compare    compare DC-CCL with the paper's baselines, seed by seed
  ablate     run variants of DC-CCL side by side
  export     write a run's on-device bundle (ONNX or TorchScript) and check its parity
  audit      attack a finished run's device copies with a membership-inference attack

One stage, through LightningCLI:
  fit, validate, test, predict   e.g. dcccl fit --config configs/stages/cloud.yaml

'dcccl COMMAND --help' describes a command's options, e.g. dcccl pipeline --help."""


def entry_point(command: str) -> Callable[[list[str]], Any]:
    """The function that runs ``command`` (its module imported now)."""
    module, _, function = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``dcccl`` console script."""
    # Like `python -m`, make the user's own modules (backbones, stage subclasses) importable by name.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(OVERVIEW)
        return
    command = args[0] if args[0] in COMMANDS else None
    if command is None:  # a stage command: Lightning, imported first, keeps its own console output as it sets it up
        from dcccl.commands.stage_cli import cli_main
    from dcccl.commands.console import configure_logging

    configure_logging(verbose="--verbose" in args)
    debug = "--debug" in args  # every command takes it; the stage CLI does not know it
    try:
        if command is not None:
            entry_point(command)(args[1:])
        else:
            cli_main([arg for arg in args if arg != "--debug"])
    except Exception as err:
        message = None if debug else user_error_message(err)
        if message is None:
            raise
        name = f"dcccl {args[0]}" if not args[0].startswith("-") else "dcccl"
        hint = f"see {name} --help" if isinstance(err, argparse.ArgumentError) else "--debug shows the traceback"
        print(f"{name}: error: {message} ({hint})", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
