"""``tokred bench`` and ``tokred demo``: run the reference suites of the installed packages.

Both commands find the suites through the ``tokred.suites`` entry-point group (tokred-vlm: a small trained
LLaVA, tokred-mamba: a small trained Vim) and add each suite's own options (``--vlm-…``, ``--mamba-…``).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

from tokred.core.bench import Progress, ReferenceSuite, load_suites
from tokred.core.bench.report import format_table, markdown_table, write_suite_report

__all__ = ["register_bench", "register_demo", "run_bench", "run_demo"]

_NO_SUITE = (
    "no reference suite is installed: `tokred {command}` runs the reference models of tokred-vlm and tokred-mamba; "
    "install one of them (pip install tokred-vlm or tokred-mamba)"
)


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
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random reducer (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many held-out examples per suite")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
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
            "installed reference suite: accuracy, accuracy retained, FLOPs, time and peak memory. Writes a Markdown "
            "table, a JSON file and two SVG plots per suite into --out."
        ),
    )
    _add_common(parser, "bench", suites)
    parser.add_argument("--quick", action="store_true", help="a small subset, under two minutes on two CPU cores")
    parser.set_defaults(func=run_bench)


def register_demo(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    suites, _ = load_suites()
    parser = subparsers.add_parser(
        "demo",
        help="show what token reduction does, on the bundled reference models (offline)",
        description=(
            "Run a handful of held-out scenes through each installed reference model, dense and with token "
            "reduction (ApET on the LLaVA, MTR on the Vim by default), print tokens, FLOPs, time and the answers "
            "next to the truth, and write a picture per method of which patches were kept, merged or dropped."
        ),
    )
    _add_common(parser, "demo", suites)
    parser.set_defaults(func=run_demo, quick=True)


def _selected(args: argparse.Namespace, command: str) -> list[ReferenceSuite] | None:
    suites, problems = load_suites()
    for problem in problems:
        print(problem, file=sys.stderr)
    if args.only:
        suites = [s for s in suites if s.name in args.only]
    if not suites:
        print(f"tokred {command}: " + _NO_SUITE.format(command=command), file=sys.stderr)
        return None
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise SystemExit(f"tokred {command}: --batch-size and --limit must be positive")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return suites


def _command_line(args: argparse.Namespace) -> str:
    return shlex.join(["tokred", *getattr(args, "argv", sys.argv[1:])])


def _environment() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, Python {platform.python_version()}"


def run_bench(args: argparse.Namespace) -> int:
    """Run ``tokred bench``; exit code 1 when no suite is installed."""
    suites = _selected(args, "bench")
    if suites is None:
        return 1
    progress = Progress(enabled=not args.no_progress)
    command = _command_line(args)
    sections = [f"# tokred bench\n\n`{command}`\n\n{_environment()}\n"]
    for suite in suites:
        start = time.perf_counter()
        results = suite.bench(args, progress)
        if not results or results[0].method != "dense":
            raise RuntimeError(f"suite {suite.name!r} returned no results or no dense row first")
        write_suite_report(suite, results, args.out, command=command)
        table = markdown_table(results)
        print(f"\n## {suite.title} ({time.perf_counter() - start:.0f} s)\n\n{table}")
        sections.append(
            f"## {suite.title}\n\n{table}\n![accuracy]({suite.name}-accuracy.svg)\n![time]({suite.name}-speed.svg)\n"
        )
    (args.out / "results.md").write_text("\n".join(sections))
    print(f"tables and plots: {args.out.resolve()}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Run ``tokred demo``; exit code 1 when no suite is installed."""
    suites = _selected(args, "demo")
    if suites is None:
        return 1
    progress = Progress(enabled=not args.no_progress)
    args.out.mkdir(parents=True, exist_ok=True)
    for suite in suites:
        report = suite.demo(args, args.out, progress)
        print(f"\n{report.title}\n{'=' * len(report.title)}\n")
        print(format_table(report.rows))
        for note in report.notes:
            print(note)
        for image in report.images:
            print(f"picture: {Path(image).resolve()}")
    return 0
