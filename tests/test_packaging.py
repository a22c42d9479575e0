"""What ``pip install`` ships: every folder of Python modules under the packages is a package that setuptools finds."""

from __future__ import annotations

from setuptools import find_packages

from tests.commands import ROOT


def test_every_folder_of_modules_is_a_package_the_install_ships() -> None:
    found = set(find_packages(str(ROOT), include=["dcccl", "dcccl.*", "lightning_modules", "datamodules"]))
    folders = {".".join(path.parent.relative_to(ROOT).parts)
               for top in ("dcccl", "lightning_modules", "datamodules") for path in (ROOT / top).rglob("*.py")}
    assert folders <= found, f"folders without __init__.py, left out of a non-editable install: {folders - found}"
