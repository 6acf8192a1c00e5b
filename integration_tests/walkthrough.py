"""Following a contributing walkthrough literally: write its titled files, install them, run commands there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def install_walkthrough(files: dict[str, str], root: Path) -> dict[str, str]:
    """Write ``files`` (path under ``root`` -> text) and return the environment in which they are installed.

    Installed the way pip would for discovery: the package's metadata and entry points next to its module
    under ``root/src``, which goes first on ``PYTHONPATH``.
    """
    for title, code in files.items():
        path = root / title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    project = tomllib.loads(files["pyproject.toml"])["project"]
    dist_info = root / "src" / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}


def run_python(root: Path, env: dict[str, str], *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python *args`` in ``root`` under ``env``, capturing its text output; never raises on failure."""
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
