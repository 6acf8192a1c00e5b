"""The four distributions together: imports, declared dependencies, in-tree entry points, the console script."""

import importlib
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from tokred.core.registry import REDUCERS

DISTRIBUTIONS = ("tokred-core", "tokred-vlm", "tokred-mamba", "tokred-bench")


@pytest.mark.parametrize("module", ["tokred.core", "tokred.vlm", "tokred.mamba", "tokred.bench"])
def test_each_package_imports_and_has_a_version(module):
    mod = importlib.import_module(module)
    dist = "tokred-" + module.split(".")[1]
    assert mod.__version__ == metadata.version(dist)


def test_tokred_is_a_namespace_package():
    import tokred

    assert getattr(tokred, "__file__", None) is None, "no distribution may ship tokred/__init__.py"
    assert len(list(tokred.__path__)) >= 1


def runtime_requirements(dist):
    reqs = [Requirement(r) for r in metadata.requires(dist) or []]
    return {r.name for r in reqs if r.marker is None or "extra" not in str(r.marker)}


def test_declared_dependencies_stay_minimal():
    assert runtime_requirements("tokred-core") == {"torch"}
    assert runtime_requirements("tokred-vlm") == {"tokred-core", "torch", "transformers", "pillow"}
    assert runtime_requirements("tokred-mamba") == {"tokred-core", "torch", "numpy", "pillow", "tqdm"}
    assert runtime_requirements("tokred-bench") == {
        "tokred-core",
        "tokred-vlm",
        "tokred-mamba",
        "torch",
        "matplotlib",
        "pillow",
        "tqdm",
    }


def test_every_in_tree_entry_point_resolves_to_the_registered_class():
    eps = [ep for ep in metadata.entry_points(group="tokred.reducers") if ep.dist.metadata["Name"] in DISTRIBUTIONS]
    assert {ep.name for ep in eps} >= {"random", "uniform", "norm", "divprune", "tome"}
    for ep in eps:
        assert ep.load() is REDUCERS.get(ep.name)


def test_console_script_lists_the_reducers():
    exe = shutil.which("tokred", path=os.path.dirname(sys.executable))
    assert exe, "the tokred console script is not installed next to the interpreter"
    result = subprocess.run([exe, "reducers"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "package", "description"]
    assert {line.split()[0] for line in lines[1:]} >= {"divprune", "norm", "random", "tome", "uniform"}
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120, check=True)
    assert "tokred-core 0.1.0" in version.stdout


@pytest.mark.parametrize("group", ["tokred.reducers", "tokred.models", "tokred.vlm_adapters", "tokred.vlm_checkpoints"])
def test_every_in_tree_entry_point_of_every_group_loads(group):
    eps = [ep for ep in metadata.entry_points(group=group) if ep.dist.metadata["Name"] in DISTRIBUTIONS]
    assert eps, f"no in-tree entry point in {group}"
    for ep in eps:
        assert ep.load() is not None, ep


def test_no_runtime_package_knows_its_siblings_by_name():
    """tokred-core finds the others through entry points only; no list of sibling distributions in its code."""
    core = importlib.import_module("tokred.core").__path__[0]
    for path in __import__("pathlib").Path(core).rglob("*.py"):
        text = path.read_text()
        for sibling in ("tokred-vlm", "tokred-mamba", "tokred-bench"):
            assert f'"{sibling}"' not in text, f"{path} names {sibling}"
