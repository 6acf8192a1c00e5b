"""The docs stay true: the API reference covers the public names, examples run, the walkthrough works."""

import doctest
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tokred.core
from tokred.core.registry import REDUCERS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)
DIRECTIVE = re.compile(r"^::: ([\w.]+)\n((?:[ \t]+.*\n)*)", re.M)


def code_blocks(page: Path):
    """(language, title or None, code) for every fenced block of a Markdown page."""
    for lang, info, code in FENCE.findall(page.read_text()):
        title = re.search(r'title="([^"]+)"', info)
        yield lang, title.group(1) if title else None, code


def public_modules(package):
    yield package.__name__
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            yield info.name


def documented_modules():
    """Modules rendered with their members by a `::: module` block somewhere under docs/api."""
    found = set()
    for page in (DOCS / "api").rglob("*.md"):
        for module, options in DIRECTIVE.findall(page.read_text()):
            if "members: false" not in options:
                found.add(module)
    return found


@pytest.mark.parametrize("package", ["tokred.core", "tokred.vlm", "tokred.mamba"])
def test_api_reference_shows_every_public_name(package):
    documented = documented_modules()
    missing = []
    for name in public_modules(importlib.import_module(package)):
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if callable(obj):
                homes = {obj.__module__}
            else:  # a constant: documented wherever a rendered module holds the same object
                homes = {m for m in documented if getattr(importlib.import_module(m), attr, None) is obj}
            if not homes & documented and name not in documented:
                missing.append(f"{name}.{attr}")
    assert not missing, "add a ::: block to docs/api for: " + ", ".join(sorted(set(missing)))


def test_public_modules_declare_all():
    for name in public_modules(tokred.core):
        assert hasattr(importlib.import_module(name), "__all__"), f"{name} has no __all__"


@pytest.mark.parametrize(
    "name",
    [
        *public_modules(tokred.core),
        *public_modules(importlib.import_module("tokred.vlm")),
        *public_modules(importlib.import_module("tokred.mamba")),
    ],
)
def test_docstring_examples_run(name, monkeypatch):
    # Examples may register reducers; keep that out of the process-wide registry.
    monkeypatch.setattr(REDUCERS, "_objects", dict(REDUCERS._objects))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize(
    "page",
    [
        "index.md",
        "getting-started.md",
        "reducers.md",
        "vlm/index.md",
        "vlm/attach.md",
        "vlm/apet.md",
        "vlm/models/llava.md",
        "vlm/models/llava-next.md",
        "vlm/models/qwen2-vl.md",
        "vlm/models/llava-onevision.md",
        "vlm/models/video-llava.md",
        "mamba/mtr.md",
        "api/core/visualize.md",
    ],
)
def test_page_examples_run(page):
    namespace = {}
    blocks = [code for lang, title, code in code_blocks(DOCS / page) if lang == "python" and title is None]
    assert blocks, f"{page} has no Python example"
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), namespace)


def test_readme_commands_match_the_ci_script():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"^uv run pytest.*$", readme, re.M)
    assert test_command and test_command.group(0) in ci, "the README's test command must be what CI runs"
    run_command = re.search(r"^uv run tokred demo$", readme, re.M)
    assert run_command and "uv run tokred demo --out" in ci, "CI must run the README's main command"


def test_adding_a_reducer_walkthrough(tmp_path):
    """Follow docs/contributing/adding-a-reducer.md literally: write its files, install, test, list."""
    files = {title: code for _, title, code in code_blocks(DOCS / "contributing" / "adding-a-reducer.md") if title}
    assert set(files) == {"src/outlier_reducer/__init__.py", "pyproject.toml", "tests/test_outlier.py"}
    for title, code in files.items():
        path = tmp_path / title
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)

    # Install the way pip would for the purpose of discovery: metadata plus entry points on the path.
    project = tomllib.loads(files["pyproject.toml"])["project"]
    dist_info = tmp_path / "src" / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{key} = {value}" for key, value in entries.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), os.environ.get("PYTHONPATH", "")])}
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-3000:]
    assert re.search(r"\d+ passed", tests.stdout)
    assert "failed" not in tests.stdout.splitlines()[-1]

    listing = subprocess.run(
        [sys.executable, "-m", "tokred.core.cli.main", "reducers"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("outlier "))
    assert "outlier-reducer" in row and "farthest from their set's mean" in row
