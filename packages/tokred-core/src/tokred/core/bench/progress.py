"""A dependency-free progress bar on stderr for the long-running commands."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "ProgressTask"]


class ProgressTask:
    """One bar: ``update(n)`` advances it; used as a context manager it finishes the line on exit."""

    def __init__(self, owner: Progress, description: str, total: int) -> None:
        self.owner = owner
        self.description = description
        self.total = max(int(total), 1)
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._draw(force=True)

    def update(self, n: int = 1) -> None:
        """Advance the bar by ``n`` steps."""
        self.done = min(self.done + n, self.total)
        self._draw(force=self.done == self.total)

    def _draw(self, force: bool = False) -> None:
        stream = self.owner.stream
        if not self.owner.enabled or stream is None:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = 24
        filled = int(width * self.done / self.total)
        elapsed = now - self.start
        bar = "#" * filled + "." * (width - filled)
        line = f"{self.description[:40]:<40} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s"
        if self.owner.interactive:
            stream.write("\r" + line)
        elif self.done == self.total:  # logs and pipes: one line per finished task
            stream.write(line + "\n")
        stream.flush()

    def __enter__(self) -> ProgressTask:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owner.enabled and self.owner.interactive and self.owner.stream is not None:
            self.owner.stream.write("\n")
            self.owner.stream.flush()


class Progress:
    """Factory of progress bars; disabled, it draws nothing.

    Args:
        enabled: Draw bars at all.
        stream: Where to draw; stderr by default.

    Example:
        >>> progress = Progress(enabled=False)
        >>> with progress.task("scoring", total=3) as bar:
        ...     for _ in range(3):
        ...         bar.update()
        >>> bar.done
        3
    """

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())

    def task(self, description: str, total: int) -> ProgressTask:
        """Start a bar of ``total`` steps."""
        return ProgressTask(self, description, total)
