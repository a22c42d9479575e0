"""A device stage module with arguments of its own, a mapping and a folder: what a subclass could use to read more
than the control model and the co-submodel."""

from __future__ import annotations

from typing import Any, Optional

from lightning_modules import DeviceCoTrainingModule


class DeviceWithExtras(DeviceCoTrainingModule):
    """The device stage, with an extra mapping and an extra folder among its arguments.

    Args:
        extras: Any mapping.
        folder: Any folder.
    """

    def __init__(self, *args: Any, extras: Optional[dict[str, str]] = None, folder: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extras = extras
        self.folder = folder
