"""``tokred vlm eval``: lmms-eval's evaluator on a checkpoint with a reducer attached, and optionally without.

[`evaluate`][tokred.vlm.eval.run.evaluate] builds the ``tokred`` model of lmms-eval
([`Tokred`][tokred.vlm.eval.models.Tokred]) exactly as ``lmms-eval --model tokred --model_args ...`` would,
runs ``lmms_eval.evaluator.simple_evaluate`` on the tasks (lmms-eval's own, the folders of
``--include-path`` and those installed packages ship, such as ``tokred_scenes``), and on rank 0 writes:

* ``results.json``: lmms-eval's metrics under ``"results"``, tokred's per-task statistics under ``"tokred"``
  ([`summarize_samples`][tokred.vlm.eval.summary.summarize_samples]), and with ``compare`` the dense model's
  under ``"dense"`` and the fraction of each metric the reduced model keeps under ``"retained"``;
* ``summary.md``: the same as a table;
* ``samples/<run>_<task>.jsonl``: lmms-eval's logged samples, one line per document.

Under ``torchrun`` or ``accelerate launch`` every process runs this; lmms-eval shards the documents and gathers
the samples, and only rank 0 writes.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokred.core.errors import InvalidInputError, UnknownNameError
from tokred.vlm.eval import require_lmms_eval
from tokred.vlm.eval.summary import summarize_samples
from tokred.vlm.options import ReductionOptions

__all__ = ["evaluate", "model_args", "retained_fractions", "summary_table"]


def model_args(
    model: str,
    reduction: ReductionOptions,
    *,
    device: str | None = None,
    dtype: str = "auto",
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """The ``model_args`` of ``--model tokred`` that ask for this model and reduction.

    Args:
        model: A checkpoint folder, Hub id or named checkpoint.
        reduction: The reduction (dense when its reducer is ``None`` or ``"none"``).
        device: Where the model runs; accelerate's device of each process by default.
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``.
        attn_implementation: The attention kernel; the model's default when ``None``.

    Returns:
        The keyword arguments, only those given; ``",".join(f"{k}={v}" ...)`` of them is the command-line form.
    """
    args: dict[str, Any] = {"pretrained": model, "reducer": "none" if reduction.dense else reduction.reducer}
    for key in ("num_keep", "keep_ratio", "average", "space", "positions"):
        if getattr(reduction, key) is not None:
            args[key] = getattr(reduction, key)
    if reduction.layers:
        args["layers"] = ";".join(f"{layer}:{amount}" for layer, amount in reduction.layers)
    if not reduction.dense:
        args["seed"] = reduction.seed
        args.update({f"reducer.{key}": value for key, value in reduction.reducer_args.items()})
    args["dtype"] = dtype
    if device is not None:
        args["device"] = device
    if attn_implementation is not None:
        args["attn_implementation"] = attn_implementation
    return args


def _metrics(results: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of one task's lmms-eval results, without their standard errors."""
    return {
        key: float(value)
        for key, value in results.items()
        if key != "alias" and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def retained_fractions(reduced: dict[str, Any], dense: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per task and metric, the reduced model's score over the dense model's (``None`` where dense scored 0).

    Args:
        reduced: lmms-eval's ``results["results"]`` of the reduced run.
        dense: The same of the dense run.
    """
    fractions: dict[str, dict[str, float | None]] = {}
    for task, values in reduced.items():
        base = _metrics(dense.get(task, {}))
        fractions[task] = {
            metric: (value / base[metric] if base.get(metric) else None)
            for metric, value in _metrics(values).items()
            if metric in base
        }
    return fractions


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def summary_table(report: dict[str, Any]) -> str:
    """The Markdown table of a ``results.json`` report: one row per task and metric."""
    from tokred.core.cli.tables import format_table

    headers = ["task", "metric", "tokred", "dense", "retained", "visual", "kept", "average", "prefill ms"]
    rows = []
    dense = report.get("dense", {}).get("results", {})
    retained = report.get("retained", {})
    for task, values in report["results"].items():
        stats = report["tokred"].get(task, {})
        kept = " / ".join(f"{k:.1f}" for k in stats.get("kept_tokens") or []) or "-"
        for metric, value in _metrics(values).items():
            rows.append(
                [
                    task,
                    metric,
                    _number(value),
                    _number(_metrics(dense.get(task, {})).get(metric)),
                    "-" if retained.get(task, {}).get(metric) is None else f"{retained[task][metric]:.1%}",
                    _number(stats.get("visual_tokens"), 5),
                    kept,
                    _number(stats.get("average_tokens"), 4),
                    _number(stats.get("prefill_ms"), 3),
                ]
            )
    return format_table(headers, rows)


_UNLOGGED = ("doc", "arguments")  # as lmms-eval's own sample files: the document's media and the callables


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _quiet_logs() -> None:
    # lmms-eval logs every step at INFO through loguru; the command shows its own progress and summary.
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="lmms-eval: {level}: {message}")


def _no_library_bars() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def _task_manager(tasks: Sequence[str], folders: Sequence[Path]) -> Any:
    from lmms_eval.tasks import TaskManager

    include = [str(folder) for folder in folders] or None
    manager = TaskManager("WARNING", include_path=include, include_defaults=False) if include else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager("WARNING", include_path=include)  # lmms-eval's own tasks too (a few seconds)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        from tokred.vlm.eval.tasks import shipped_tasks

        # The shipped tasks are in the manager only when asked for by name: offer them as well.
        hints = difflib.get_close_matches(unknown[0], [*shipped_tasks(), *manager.all_tasks], n=3)
        hint = f"; did you mean {', '.join(hints)}?" if hints else " (lmms-eval's tasks, those of --include-path)"
        raise UnknownNameError(f"unknown task {unknown[0]!r}{hint}")
    return manager


def _run(
    args: dict[str, Any],
    tasks: Sequence[str],
    manager: Any,
    limit: int | None,
    progress: bool,
) -> dict[str, Any] | None:
    import torch.distributed as dist
    from lmms_eval.evaluator import simple_evaluate

    from tokred.vlm.eval.models import Tokred

    lm = Tokred(**args)
    lm.progress = progress
    return simple_evaluate(
        model=lm,
        model_args=",".join(f"{key}={value}" for key, value in args.items()),
        tasks=list(tasks),
        task_manager=manager,
        batch_size=1,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
        distributed_executor_backend="torchrun" if dist.is_available() and dist.is_initialized() else "accelerate",
    )


def evaluate(
    model: str,
    tasks: Sequence[str],
    reduction: ReductionOptions,
    *,
    out: str | Path,
    limit: int | None = None,
    compare: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    include_path: Sequence[str | Path] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Evaluate ``model`` with the reduction on lmms-eval tasks, and optionally the dense model too.

    Args:
        model: A checkpoint folder, Hub id or named checkpoint (``llava_scenes``).
        tasks: lmms-eval task names (``gqa``, ``pope``, ``tokred_scenes``…).
        reduction: What to attach; a dense reduction evaluates the model as it is.
        out: The folder the files go to (created).
        limit: At most this many documents per task.
        compare: Also evaluate the dense model, and report the fraction of each metric kept.
        device: Where the model runs; each process's accelerate device by default.
        dtype: The parameters' dtype; ``auto`` is fp32 on the CPU and the checkpoint's elsewhere.
        attn_implementation: The attention kernel; the model's default when ``None``.
        include_path: More folders of task YAML files.
        progress: Draw a progress bar over each run's requests (rank 0).
        log: Where rank 0 writes its lines.

    Returns:
        On rank 0, the report written to ``results.json``; ``None`` on the other ranks.

    Raises:
        MissingDependencyError: Without the ``eval`` extra.
        InvalidInputError: On wrong options, a missing include folder, ``out`` being a file.
        UnknownNameError: On an unknown task (with close names).
    """
    require_lmms_eval()
    reduction.schedule()  # option mistakes before anything is loaded
    if compare and reduction.dense:
        raise InvalidInputError("--compare needs a reducer (not --reducer none)")
    tasks = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if not tasks:
        raise InvalidInputError("give at least one task (--tasks gqa,pope or tokred_scenes)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"--out {out} is a file; give a folder (it is created if missing)")
    folders = [Path(p) for p in include_path]
    for folder in folders:
        if not folder.is_dir():
            raise InvalidInputError(f"--include-path {folder}: not a folder")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (device or "cpu").startswith("cpu"):
        import torch

        if device is not None or not torch.cuda.is_available():
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")  # Gloo processes on the CPU
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # The process group first, as lmms-eval's own command line does; evaluation may be long.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(hours=6))])
    main = accelerator.is_main_process
    _quiet_logs()
    if not progress:
        _no_library_bars()
    from tokred.vlm.eval.tasks import task_folders

    manager = _task_manager(tasks, [*task_folders(tasks, limit), *folders])
    runs = [("tokred", reduction)]
    if compare:
        runs.append(("dense", ReductionOptions(reducer=None, spelling="model_args")))
    outputs: dict[str, dict[str, Any]] = {}
    for label, options in runs:
        args = model_args(model, options, device=device, dtype=dtype, attn_implementation=attn_implementation)
        if main:
            log(f"tokred vlm eval: {label}: {', '.join(f'{k}={v}' for k, v in args.items())}")
        result = _run(args, tasks, manager, limit, progress)
        if result is not None:
            outputs[label] = result
    if not main:
        return None
    reduced = outputs["tokred"]
    report: dict[str, Any] = {
        "model": model,
        "tasks": tasks,
        "limit": limit,
        "processes": accelerator.num_processes,
        "model_args": model_args(model, reduction, device=device, dtype=dtype, attn_implementation=attn_implementation),
        "results": reduced["results"],
        "tokred": summarize_samples(reduced["samples"]),
        "n-samples": reduced.get("n-samples"),
        "lmms_eval_version": reduced.get("lmms_eval_version"),
    }
    if "dense" in outputs:
        dense = outputs["dense"]
        report["dense"] = {"results": dense["results"], "tokred": summarize_samples(dense["samples"])}
        report["retained"] = retained_fractions(reduced["results"], dense["results"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    for label, result in outputs.items():
        for task, samples in result["samples"].items():
            kept = ({k: v for k, v in s.items() if k not in _UNLOGGED} for s in samples)
            lines = (json.dumps(sample, default=_jsonable) for sample in kept)
            (out / "samples" / f"{label}_{task}.jsonl").write_text("".join(line + "\n" for line in lines))
    (out / "results.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    table = summary_table(report)
    title = f"# tokred vlm eval: {model}\n\n"
    (out / "summary.md").write_text(f"{title}{table}")
    log(table.rstrip("\n"))
    log(f"results: {(out / 'results.json').resolve()}")
    return report
