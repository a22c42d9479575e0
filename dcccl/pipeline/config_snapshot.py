"""The config files a run's stages read, copied once: the bytes the checks read are the bytes that run.

A stage config or a data config could be changed between the checks before a run and the stage that reads it (a
stage may start an hour later). Every file a plan names is copied the first time this process sees it, into a
folder of its own that lives as long as the process; the checks, the stages and the run's fingerprints read the copy,
and messages name the original.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Optional

_copies: dict[Path, Path] = {}  # original (resolved) -> copy
_origins: dict[Path, Path] = {}  # copy -> original as the user named it
_folder: Optional[Path] = None


def _snapshot_folder() -> Path:
    global _folder
    if _folder is None:
        _folder = Path(tempfile.mkdtemp(prefix="dcccl-configs-"))
        atexit.register(shutil.rmtree, _folder, True)
    return _folder


def snapshot(path: str | Path) -> Path:
    """The copy of the config file ``path`` taken the first time this process asked for it (the file's bytes then)."""
    original = Path(path)
    key = original.resolve()
    if key not in _copies:
        folder = _snapshot_folder() / str(len(_copies))
        folder.mkdir()
        copy = folder / original.name
        try:
            copy.write_bytes(original.read_bytes())
        except OSError as err:  # name the file (a full disk is bad input, and the message says where)
            raise OSError(err.errno, err.strerror, str(copy)) from err
        _copies[key] = copy
        _origins[copy] = original
    return _copies[key]


def origin_of(path: str | Path) -> Path:
    """The file a snapshot was copied from, as it was named (``path`` itself if it is not a snapshot)."""
    return _origins.get(Path(path), Path(path))
