"""Files named in a config file: relative names are relative to the folder of the config file that names them."""

from __future__ import annotations

import os

from jsonargparse.typing import register_type


class ConfigPath(str):
    """The absolute path of a file named in a config (a stage config, a data config, a schedule).

    The command line builds it while reading each config file from that file's folder, so ``data/mnist.yaml`` in
    ``configs/quickstart.yaml`` names ``configs/data/mnist.yaml`` from any working directory; on the command
    line a relative name is relative to the working directory.
    """

    def __new__(cls, value: str | os.PathLike[str]) -> ConfigPath:
        return super().__new__(cls, os.path.abspath(os.fspath(value)))


# The parsers build it from each value (jsonargparse reads each config file from its folder).
register_type(ConfigPath, serializer=str, deserializer=ConfigPath)
