"""Task folders that installed packages ship for lmms-eval, found through the ``tokred.eval_tasks`` group.

An entry point of the group is named after its task and loads a function ``folder(limit=None)`` that returns
the folder holding the task's YAML, writing it first if it has to (``limit``: the documents the run needs, all
when ``None``); tokred-bench ships ``tokred_scenes`` this way.
``tokred vlm eval`` adds the folders of the tasks it is asked for to lmms-eval's include path, so those tasks
run without ``--include_path``.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

from tokred.core.errors import PluginLoadError

__all__ = ["GROUP", "shipped_tasks", "task_folders"]

GROUP = "tokred.eval_tasks"
"""The entry-point group of shipped task folders."""


def shipped_tasks() -> list[str]:
    """The names of the tasks installed packages ship, sorted."""
    return sorted({entry.name for entry in entry_points(group=GROUP)})


def task_folders(tasks: Iterable[str], limit: int | None = None) -> list[Path]:
    """The folders of those of ``tasks`` that an installed package ships (others are lmms-eval's own).

    Args:
        tasks: Task names, as given to ``--tasks``.
        limit: The documents per task the run evaluates (``--limit``); all when ``None``.

    Returns:
        One folder per shipped task asked for, in the order asked.

    Raises:
        PluginLoadError: If a package's entry point cannot be loaded or gives no folder.
    """
    wanted = list(dict.fromkeys(tasks))
    found = {entry.name: entry for entry in entry_points(group=GROUP) if entry.name in wanted}
    folders = []
    for name in (n for n in wanted if n in found):
        entry = found[name]
        try:
            folder = Path(entry.load()(limit))
        except Exception as exc:
            raise PluginLoadError(f"the task {name} of {entry.value} could not be prepared: {exc}") from exc
        if not folder.is_dir():
            raise PluginLoadError(f"the task {name} of {entry.value} gave {folder}, which is not a folder")
        folders.append(folder)
    return folders
