"""The run directory's manifest: what each artifact is, which stage made it, and from which config.

``manifest.json`` holds, per artifact (path relative to the run directory), its SHA-256, the stage that wrote
it and a fingerprint of everything that decided its content (the stage's config files, its arguments, the
trainer options that change results, the seed). A resumed run checks both before it trusts an artifact: a
different SHA-256 means the file was corrupted or truncated after it was written; a different fingerprint
means the config changed since.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from dcccl.atomic import atomic_write_json

# Trainer options that change where and how a stage reports or which hardware runs it, not what it computes.
PRESENTATION_OPTIONS = frozenset({
    "logger", "callbacks", "enable_progress_bar", "enable_model_summary", "enable_checkpointing", "default_root_dir",
    "log_every_n_steps", "profiler", "accelerator", "devices", "strategy", "num_nodes",
})


class IntegrityError(RuntimeError):
    """An artifact of the run directory is not what the manifest says was written."""


class ConfigChangedError(RuntimeError):
    """A finished stage would have been made differently with the current config."""


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _relative(value: Any, root: Path) -> Any:
    """Paths under ``root`` made relative, so a moved run directory keeps its fingerprints."""
    if isinstance(value, list):
        return [_relative(item, root) for item in value]
    if isinstance(value, str) and value.startswith(str(root)):
        return Path(value).relative_to(root).as_posix()
    return value


def config_fingerprint(stage: str, command: str, config_files: list[Path], model_args: dict[str, Any],
                       trainer_args: dict[str, Any], data_args: dict[str, Any], seed: int, extra_args: list[str],
                       root: Path) -> str:
    """SHA-256 of everything that decides what a stage call produces.

    Config files count by content, not by name; artifact paths count relative to the run directory
    ``root``; trainer options in :data:`PRESENTATION_OPTIONS` do not count.
    """
    described = {
        "stage": stage,
        "command": command,
        "config_files": [Path(path).read_text() for path in config_files],
        "model_args": {key: _relative(value, root) for key, value in sorted(model_args.items())},
        "trainer_args": {k: v for k, v in sorted(trainer_args.items()) if k not in PRESENTATION_OPTIONS},
        "data_args": data_args,
        "seed": seed,
        "extra_args": [_relative(arg, root) for arg in extra_args],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ManifestEntry:
    """One artifact: its SHA-256, the stage that wrote it and the fingerprint of that stage's config.

    Args:
        sha256: SHA-256 of the file.
        stage: The stage call (its label) that wrote it.
        config_sha256: :func:`config_fingerprint` of that call.
    """

    sha256: str
    stage: str
    config_sha256: str


class Manifest:
    """``manifest.json`` of a run directory.

    Args:
        path: The manifest file (``<run_dir>/manifest.json``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.root = self.path.parent
        self.entries: dict[str, ManifestEntry] = {}
        # Size and modification time of the files whose hash was confirmed: an unchanged file is hashed once.
        self._confirmed: dict[str, tuple[int, int]] = {}
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self.entries = {key: ManifestEntry(**value) for key, value in raw["artifacts"].items()}
            except (ValueError, KeyError, TypeError) as error:
                raise IntegrityError(f"{self.path} is corrupted ({error}); delete it to re-check every artifact "
                                     "from scratch, or start a new run directory") from None

    def key(self, path: str | Path) -> str:
        """The manifest key of an artifact: its path relative to the run directory."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return Path(path).as_posix()

    def entry(self, path: str | Path) -> Optional[ManifestEntry]:
        """What the manifest holds about an artifact, if anything."""
        return self.entries.get(self.key(path))

    def record(self, paths: tuple[Path, ...], stage: str, config_sha256: str) -> None:
        """Record artifacts just written by ``stage`` and save the manifest (atomically)."""
        for path in paths:
            key = self.key(path)
            self.entries[key] = ManifestEntry(sha256_of(path), stage, config_sha256)
            self._confirmed[key] = _signature(path)
        self.save()

    def save(self) -> None:
        """Write the manifest atomically."""
        atomic_write_json(self.path, {"artifacts": {key: asdict(value) for key, value in sorted(self.entries.items())}})

    def verify(self, path: Path) -> None:
        """Raise :class:`IntegrityError` if ``path``'s bytes are not those recorded."""
        key, entry = self.key(path), self.entry(path)
        if entry is None or self._confirmed.get(key) == _signature(path):
            return
        if sha256_of(path) == entry.sha256:
            self._confirmed[key] = _signature(path)
            return
        raise IntegrityError(
            f"{path} is corrupted or truncated: its SHA-256 differs from the one recorded when stage "
            f"{entry.stage!r} wrote it. Delete it (and what follows) or re-run with --from_stage / --force")
