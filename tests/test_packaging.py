"""pyproject.toml lists its packages explicitly (the top-level directories are mapped into
`torpor`); every package directory must be listed, and every listed one must exist."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_every_package_directory_is_listed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = config["package-dir"]
    found = set()
    for package, directory in mapping.items():
        base = ROOT / directory
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            parts = [package, *rel.parts] if rel.parts else [package]
            name = ".".join(parts)
            # Subdirectories of one mapped package that are themselves mapped elsewhere.
            if not any(
                name.startswith(k + ".") or name == k
                for k in mapping
                if k != package and k.startswith(package + ".")
            ):
                found.add(name)
    listed = set(config["packages"])
    assert found - listed == set(), "package directories missing from pyproject.toml"
    assert listed - found == set(), "pyproject.toml lists packages that do not exist"
