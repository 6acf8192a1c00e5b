"""``tokred bench`` and ``tokred demo``: run the reference suites.

Both commands find the suites through the ``tokred.suites`` entry-point group (tokred-bench ships ``vlm``, a
small trained LLaVA, and ``mamba``, a small trained Vim) and add each suite's own options (``--vlm-…``,
``--mamba-…``). ``tokred bench --out DIR`` writes ``DIR/<suite>.json``, ``DIR/<suite>.md``, plots (PNG and SVG)
and ``DIR/results.md``; ``tokred demo --out DIR`` writes its pictures, the input images it showed and
``DIR/demo.json``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tokred.bench.measure import timing_warnings
from tokred.bench.report import results_table, write_suite_report
from tokred.bench.suite import ProgressFactory, ReferenceSuite, load_suites
from tokred.core.cli.main import set_command
from tokred.core.cli.options import add_device_argument, positive_int
from tokred.core.cli.tables import format_table
from tokred.core.errors import InvalidInputError, MissingDependencyError

__all__ = ["register_bench", "register_demo", "run_bench", "run_demo"]


def _add_common(parser: argparse.ArgumentParser, command: str, suites: list[ReferenceSuite]) -> None:
    names = [s.name for s in suites]
    parser.add_argument(
        "--only",
        action="append",
        choices=names or None,
        metavar="SUITE",
        help=f"run only this suite (repeatable; installed: {', '.join(names) or 'none'})",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(f"tokred-{command}"), help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=16, help="examples per forward pass (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of stochastic reducers (default: %(default)s)")
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="use at most this many held-out examples per suite"
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="draw no progress bars")
    for suite in suites:
        suite.add_arguments(parser.add_argument_group(f"{suite.name}: {suite.title}"), command)


def register_bench(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    suites, _ = load_suites()
    parser = subparsers.add_parser(
        "bench",
        help="measure every applicable reducer on the bundled reference models",
        description=(
            "Measure the dense model and every applicable reducer at several budgets on the held-out split of each "
            "reference suite: accuracy, accuracy retained, FLOPs, time and peak memory. Writes a Markdown table, a "
            "JSON file and two plots (PNG and SVG) per suite into --out."
        ),
    )
    _add_common(parser, "bench", suites)
    parser.add_argument("--quick", action="store_true", help="a small subset, a few minutes on two CPU cores")
    set_command(parser, run_bench)


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    suites, _ = load_suites()
    parser = subparsers.add_parser(
        "demo",
        help="show what token reduction does, on the bundled reference models (offline)",
        description=(
            "Run a handful of held-out scenes through each reference model, dense and with token reduction (ApET and "
            "the best baseline on the LLaVA, MTR and the best baseline on the Vim by default), print tokens, FLOPs, "
            "accuracy and the answers next to the truth, measure the speed-up at real checkpoints' shapes (random "
            "weights), and write a picture per method of which patches were kept, merged or dropped, the input "
            "images and demo.json."
        ),
    )
    _add_common(parser, "demo", suites)
    parser.add_argument("--scenes", type=positive_int, default=6, help="held-out scenes to show (default: 6)")
    parser.add_argument(
        "--eval-scenes",
        type=positive_int,
        default=200,
        help="held-out examples behind the accuracy under each table (default: 200)",
    )
    parser.add_argument(
        "--no-speed",
        dest="speed",
        action="store_false",
        help="skip the speed measurements on random-weight models of real checkpoints' shapes (about 40 s)",
    )
    set_command(parser, run_demo)


def _progress_factory(enabled: bool) -> ProgressFactory:
    try:
        from tqdm.auto import tqdm
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise MissingDependencyError("tokred bench and tokred demo need tqdm: pip install tqdm") from error
    if not enabled and importlib.util.find_spec("transformers") is not None:
        # Without this, loading the reference LLaVA still draws transformers' own "Loading weights" bar.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    return functools.partial(tqdm, disable=not enabled, leave=False, dynamic_ncols=True)


def _selected(args: argparse.Namespace, command: str) -> list[ReferenceSuite]:
    suites, problems = load_suites()
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.only:
        suites = [s for s in suites if s.name in args.only]
    if not suites:
        raise MissingDependencyError(
            f"no reference suite is installed: `tokred {command}` runs the suites of tokred-bench; reinstall it"
        )
    if args.out.exists() and not args.out.is_dir():
        raise InvalidInputError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    for suite in suites:
        suite.check_arguments(args, command)  # type: ignore[arg-type]
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return suites


def _command_line(args: argparse.Namespace) -> str:
    return shlex.join(["tokred", *getattr(args, "argv", sys.argv[1:])])


def _environment(args: argparse.Namespace) -> str:
    import torch

    device = args.device
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{device.type.upper()} ({platform.machine()}, {torch.get_num_threads()} threads)"
    return f"torch {torch.__version__}, {hardware}, Python {platform.python_version()}"


def run_bench(args: argparse.Namespace) -> int:
    """Run ``tokred bench``: every suite's bench, its report files, and ``results.md`` for all of them."""
    suites = _selected(args, "bench")
    progress = _progress_factory(not args.no_progress)
    command = _command_line(args)
    sections = [f"# tokred bench\n\n`{command}`\n\n{_environment(args)}\n"]
    args.out.mkdir(parents=True, exist_ok=True)
    for suite in suites:
        start = time.perf_counter()
        results = suite.bench(args, progress)
        if not results or results[0].method != "dense":
            raise RuntimeError(f"suite {suite.name!r} returned no results or no dense row first")
        write_suite_report(suite, results, args.out, command=command)
        print(f"\n{suite.title} ({time.perf_counter() - start:.0f} s)\n")
        print(results_table(results, style="plain"), end="")
        warnings = timing_warnings(results)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        flagged = "".join(f"\n> timing warning: {warning}\n" for warning in warnings)
        sections.append(
            f"## {suite.title}\n\n{results_table(results)}\n{flagged}"
            f"![accuracy]({suite.name}-accuracy.svg)\n![time]({suite.name}-speed.svg)\n"
        )
    (args.out / "results.md").write_text("\n".join(sections), encoding="utf-8")
    print(f"\ntables and plots: {args.out.resolve()}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Run ``tokred demo``: every suite's demo, its table, notes and pictures, and ``demo.json``."""
    suites = _selected(args, "demo")
    progress = _progress_factory(not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {}
    for suite in suites:
        report = suite.demo(args, args.out, progress)
        print(f"\n{report.title}\n{'=' * len(report.title)}\n")
        if report.rows:
            headers = list(report.rows[0])
            print(format_table(headers, [[row[h] for h in headers] for row in report.rows]), end="")
        for note in report.notes:
            print(note)
        for image in report.images:
            print(f"picture: {Path(image).resolve()}")
        records[suite.name] = report.records
    path = args.out / "demo.json"
    path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    print(f"\nanswers and input images: {path.resolve()}")
    return 0
