"""The run directory's manifest: what each artifact is, which stage made it, and from which config.

``manifest.json`` holds, per artifact (path relative to the run directory), its SHA-256, the step that wrote
it, a fingerprint of everything in its config that decided its content (the stage's config files, its arguments,
the trainer options that change results, the seed) and a fingerprint of the bytes it was made from. A resumed run
checks them before it trusts an artifact: a different SHA-256 means the file was corrupted or truncated after it
was written; a different config fingerprint means the config changed since; different inputs mean an artifact it
was made from was made again (by this run or by another run it shares artifacts with).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from dcccl.artifacts.atomic import atomic_write_json
from dcccl.errors import DCCCLError

# Trainer options that change where and how a stage reports or which hardware runs it, not what it computes.
PRESENTATION_OPTIONS = frozenset({
    "logger", "callbacks", "enable_progress_bar", "enable_model_summary", "enable_checkpointing", "default_root_dir",
    "log_every_n_steps", "profiler", "accelerator", "devices", "strategy", "num_nodes",
})


class IntegrityError(DCCCLError):
    """An artifact of the run directory is not what the manifest says was written."""


class ConfigChangedError(DCCCLError):
    """A finished stage would have been made differently with the current config."""


def _signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


_HASHED: dict[str, tuple[tuple[int, int], str]] = {}  # path -> (size and mtime when hashed, SHA-256)


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes, as hex; a file unchanged since this process hashed it is not read again."""
    key, signature = str(Path(path).absolute()), _signature(Path(path))
    known = _HASHED.get(key)
    if known is not None and known[0] == signature:
        return known[1]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    _HASHED[key] = (signature, digest.hexdigest())
    return digest.hexdigest()


def _relative(value: Any, root: Path) -> Any:
    """Paths under ``root`` made relative, in nested lists and dicts too."""
    if isinstance(value, dict):
        return {key: _relative(item, root) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative(item, root) for item in value]
    if isinstance(value, str) and (value == str(root) or value.startswith(f"{root}/")):
        return Path(value).relative_to(root).as_posix()
    return value


def fingerprint(described: dict[str, Any], root: Path) -> str:
    """SHA-256 of a step's description, with paths under the run directory ``root`` made relative (so a moved run
    directory keeps its fingerprints)."""
    return hashlib.sha256(json.dumps(_relative(described, root), sort_keys=True, default=str).encode()).hexdigest()


def inputs_fingerprint(paths: tuple[Path, ...]) -> str:
    """SHA-256 of the bytes of the files a step reads, in order (where they live does not count)."""
    return hashlib.sha256("".join(sha256_of(path) for path in paths).encode()).hexdigest()


@dataclass
class ManifestEntry:
    """One artifact: its SHA-256, the step that wrote it, and the fingerprints of that step's config and inputs.

    Args:
        sha256: SHA-256 of the file.
        stage: The step (its label) that wrote it.
        config_sha256: :func:`fingerprint` of that step's description.
        inputs_sha256: :func:`inputs_fingerprint` of the files it read (empty in manifests of older runs).
        lineage: For a network export, where its weights came from (:mod:`dcccl.artifacts.lineage`).
    """

    sha256: str
    stage: str
    config_sha256: str
    inputs_sha256: str = ""
    lineage: Optional[dict[str, Any]] = None


class Manifest:
    """``manifest.json`` of a run directory.

    Args:
        path: The manifest file (``<run_dir>/manifest.json``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.root = self.path.parent
        self.entries: dict[str, ManifestEntry] = {}
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

    def record(self, paths: tuple[Path, ...], stage: str, config_sha256: str, inputs_sha256: str = "",
               lineages: Optional[dict[Path, dict[str, Any]]] = None) -> None:
        """Record artifacts just written by ``stage`` (with the lineage of those that are network exports) and save
        the manifest (atomically)."""
        for path in paths:
            key = self.key(path)
            self.entries[key] = ManifestEntry(sha256_of(path), stage, config_sha256, inputs_sha256,
                                              (lineages or {}).get(path))
        self.save()

    def save(self) -> None:
        """Write the manifest atomically."""
        atomic_write_json(self.path, {"artifacts": {key: asdict(value) for key, value in sorted(self.entries.items())}})

    def verify(self, path: Path) -> None:
        """Raise :class:`IntegrityError` if ``path``'s bytes are not those recorded."""
        entry = self.entry(path)
        if entry is None or sha256_of(path) == entry.sha256:
            return
        raise IntegrityError(
            f"{path} is corrupted or truncated: its SHA-256 differs from the one recorded when stage "
            f"{entry.stage!r} wrote it. Delete it (and what follows) or re-run with --from_stage / --force")
