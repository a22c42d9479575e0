"""A cloud stage module that claims the pooled samples on its instance (the class still declares ``cloud``): what
a subclass that tries to train the cloud submodel on device samples looks like to the DataModule."""

from __future__ import annotations

from typing import Any

from lightning_modules import CloudSubmodelModule


class PooledCloud(CloudSubmodelModule):
    """The cloud stage, asking for the cloud's and the devices' samples together."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_partition = "pooled"  # type: ignore[misc]
