"""A device stage module that fails on the second process of a DDP run (``LOCAL_RANK=1``): what a bug in one rank's
device looks like to the round (the other rank must stop too, not wait for it)."""

from __future__ import annotations

import os

from lightning_modules import DeviceCoTrainingModule


class FailsOnSecondRank(DeviceCoTrainingModule):
    """The device stage, except that every device trained on local rank 1 raises as it begins."""

    def begin_device(self, class_counts: list[int]) -> None:
        """Raise on local rank 1."""
        if os.environ.get("LOCAL_RANK") == "1":
            raise RuntimeError("injected failure of a device on rank 1")
        super().begin_device(class_counts)
