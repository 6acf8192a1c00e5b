"""Fixtures for cross-package tests: fake installed distributions that declare entry points."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from tokred.core.registry import REDUCERS


class FakeDistributions:
    """Writes distributions (a module plus a ``.dist-info`` with entry points) onto ``sys.path``.

    ``importlib.metadata`` discovers them exactly as it discovers pip-installed packages, so the registry's
    real entry-point code path is exercised without installing anything.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def add(self, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        dist_info = self.root / f"{name.replace('-', '_')}-0.1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
        lines = []
        for group, entries in entry_points.items():
            lines.append(f"[{group}]")
            lines.extend(f"{key} = {value}" for key, value in entries.items())
        (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        REDUCERS.refresh()


@pytest.fixture
def fake_distributions(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    dists = FakeDistributions(tmp_path)
    registered_before = set(REDUCERS._objects)
    REDUCERS.refresh()
    yield dists
    for name in set(REDUCERS._objects) - registered_before:
        REDUCERS.unregister(name)
    for module in dists.modules:
        sys.modules.pop(module, None)
    monkeypatch.undo()
    REDUCERS.refresh()


KEEP_FIRST_SOURCE = '''
    import torch

    from tokred.core import Reducer, Reduction, select_top


    class KeepFirstReducer(Reducer):
        """Keep the first tokens of every set (a plug-in declared only through an entry point)."""

        def reduce(self, tokens, num_keep, *, scores, protected, sizes):
            order = -torch.arange(tokens.shape[1], dtype=torch.float32).expand(tokens.shape[:2])
            return Reduction.from_selection(tokens, select_top(order, num_keep, protected), sizes)
'''
