"""The ``dcccl`` command: wiring only.

``dcccl fit|validate|test|predict ...`` is LightningCLI over the stage modules and DataModules
(:mod:`dcccl.commands.stage_cli`); ``dcccl pipeline|compare|ablate|export|audit`` are one module each in
:mod:`dcccl.commands`. Bad input (dcccl's own error types, parse errors, a full disk) is reported in one line with exit
status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Optional

from jsonargparse import ArgumentError

from dcccl.commands.ablate import ablate_main
from dcccl.commands.audit import audit_main
from dcccl.commands.compare import compare_main
from dcccl.commands.console import configure_logging
from dcccl.commands.export import export_main
from dcccl.commands.pipeline import pipeline_main
from dcccl.commands.stage_cli import cli_main
from dcccl.errors import user_error_message

COMMANDS: dict[str, Callable[[list[str]], Any]] = {
    "pipeline": pipeline_main, "compare": compare_main, "ablate": ablate_main, "export": export_main,
    "audit": audit_main,
}


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the ``dcccl`` console script."""
    # Like `python -m`, make the user's own modules (backbones, stage subclasses) importable by name.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    configure_logging()
    args = sys.argv[1:] if argv is None else list(argv)
    command = args[0] if args and args[0] in COMMANDS else None
    debug = "--debug" in args  # every command takes it; the stage CLI does not know it
    try:
        if command is not None:
            COMMANDS[command](args[1:])
        else:
            cli_main([arg for arg in args if arg != "--debug"])
    except Exception as err:
        message = None if debug else user_error_message(err)
        if message is None:
            raise
        name = f"dcccl {args[0]}" if args[:1] and not args[0].startswith("-") else "dcccl"
        hint = f"see {name} --help" if isinstance(err, ArgumentError) else "--debug shows the traceback"
        print(f"{name}: error: {message} ({hint})", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
