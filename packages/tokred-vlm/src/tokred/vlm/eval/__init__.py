r"""Evaluation on lmms-eval: the ``tokred`` model of the harness and ``tokred vlm eval``.

With the ``eval`` extra (``pip install 'tokred-vlm[eval]'``), lmms-eval finds a model named ``tokred`` through
its ``lmms_eval.models`` entry-point group, so the stock command line runs any supported checkpoint with a
reducer attached:

```bash
lmms-eval --model tokred --model_args pretrained=llava-hf/llava-1.5-7b-hf,reducer=apet,num_keep=64 \\
    --tasks gqa,pope --log_samples --output_path logs/
```

* [`tokred.vlm.eval.plugin`][tokred.vlm.eval.plugin] is what the entry point loads: it imports neither torch
  nor lmms-eval's models.
* [`tokred.vlm.eval.models`][tokred.vlm.eval.models] holds the model classes: one per family of lmms-eval's
  stock chat classes, whose prompting and preprocessing they keep, with tokred's options and per-sample
  statistics added.
* [`tokred.vlm.eval.options`][tokred.vlm.eval.options] parses the ``model_args``.
* [`tokred.vlm.eval.summary`][tokred.vlm.eval.summary] aggregates the per-sample statistics.
* [`tokred.vlm.eval.tasks`][tokred.vlm.eval.tasks] finds the task folders other packages ship (tokred-bench's
  offline ``tokred_scenes``).
* [`tokred.vlm.eval.run`][tokred.vlm.eval.run] is ``tokred vlm eval``: lmms-eval's evaluator, the reduced and
  optionally the dense model, one ``results.json`` and a Markdown summary.

Only the plug-in and the summary import without the extra; the rest says which extra to install.
"""

from __future__ import annotations

__all__ = ["EXTRA_HINT", "MODEL_ID", "require_lmms_eval"]

MODEL_ID = "tokred"
"""The name of the model in lmms-eval (``--model tokred``)."""

EXTRA_HINT = "install the eval extra: pip install 'tokred-vlm[eval]' (lmms-eval and accelerate)"
"""What to do when lmms-eval is missing."""


def require_lmms_eval() -> None:
    """Import lmms-eval and accelerate, or fail with the extra that provides them.

    Raises:
        MissingDependencyError: If either is not installed.
    """
    from tokred.core.errors import MissingDependencyError

    try:
        import accelerate  # noqa: F401
        import lmms_eval  # noqa: F401
    except ImportError as error:
        raise MissingDependencyError(f"lmms-eval evaluation needs {error.name}: {EXTRA_HINT}") from error
