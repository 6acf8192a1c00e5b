"""Aggregate the per-sample statistics of the ``tokred`` model from lmms-eval's logged samples.

Each logged sample of a ``--model tokred`` run carries, under ``token_counts``, what
[`TokredCounts`][tokred.vlm.eval.models.TokredCounts] recorded for its request: the visual tokens of the
prompt, the visual tokens kept after each stage, the layer-averaged count per group and the prefill time.
[`summarize_samples`][tokred.vlm.eval.summary.summarize_samples] averages them per task. Pure Python: it
needs neither lmms-eval nor torch.

Examples:
    >>> from tokred.vlm.eval.summary import summarize_samples
    >>> sample = {"token_counts": [{"visual_tokens": 576, "kept_tokens": [96, 32], "average_tokens": 64.0,
    ...                             "groups": 1, "prefill_ms": 20.0}]}
    >>> summarize_samples({"gqa": [sample, sample]})["gqa"]["average_tokens"]
    64.0
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["STATISTICS", "summarize_samples"]

STATISTICS: tuple[str, ...] = ("visual_tokens", "kept_tokens", "average_tokens", "groups", "prefill_ms")
"""The per-sample statistics of the ``tokred`` model, as they appear in a sample's ``token_counts``."""


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize_samples(samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per task, the mean of each statistic over the samples that recorded it.

    Args:
        samples: ``{task: [sample, ...]}`` as lmms-eval's evaluator returns them under ``"samples"`` (or as
            the lines of its ``samples_<task>.jsonl`` files).

    Returns:
        ``{task: {"samples": n, "visual_tokens": mean, "kept_tokens": [mean per stage], "average_tokens": mean,
        "groups": mean, "prefill_ms": mean, "prefill_ms_median": median}}``; a statistic no sample recorded is
        ``None`` (``kept_tokens`` is empty for the dense model).
    """
    summary: dict[str, dict[str, Any]] = {}
    for task, rows in samples.items():
        counts = [c for row in rows for c in (row.get("token_counts") or []) if isinstance(c, Mapping)]
        scalars = {
            key: [float(c[key]) for c in counts if isinstance(c.get(key), (int, float))]
            for key in STATISTICS
            if key != "kept_tokens"
        }
        stages = [c["kept_tokens"] for c in counts if isinstance(c.get("kept_tokens"), list)]
        depth = min((len(s) for s in stages), default=0)
        prefill = scalars["prefill_ms"]
        summary[task] = {
            "samples": len(rows),
            **{key: _mean(values) for key, values in scalars.items()},
            "kept_tokens": [statistics.fmean(s[i] for s in stages) for i in range(depth)],
            "prefill_ms_median": statistics.median(prefill) if prefill else None,
        }
    return summary
