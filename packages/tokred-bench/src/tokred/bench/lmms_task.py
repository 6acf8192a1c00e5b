r"""``tokred_scenes``: the bench's held-out scene questions as an offline lmms-eval task.

The task holds the questions ``tokred bench`` asks the reference LLaVA — the first 1000 of the ``test`` split
([`make_questions`][tokred.bench.reference.questions.make_questions]), their scenes saved as 8-bit PNG files
exactly as the bench hands them to the processor — with lmms-eval's generation settings for a one-word answer
(greedy, one new token). A sample is right when the first generated word is the answer, the bench's rule, so
on the same questions ``lmms-eval --model tokred`` and ``tokred vlm eval`` give the accuracy ``tokred bench``
gives. Everything is made here, with no hub access.

[`task_folder`][tokred.bench.lmms_task.task_folder] writes the task once into a cache folder and returns it;
``tokred vlm eval --tasks tokred_scenes`` finds it through the ``tokred.eval_tasks`` entry-point group, and
``python -m tokred.bench.lmms_task`` prints it for lmms-eval's own command line:

```bash
lmms-eval --model tokred --model_args pretrained=llava_scenes,num_keep=28 --tasks tokred_scenes \\
    --include_path "$(python -m tokred.bench.lmms_task)"
```
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["QUESTIONS", "TASK_NAME", "task_folder", "write_task"]

TASK_NAME = "tokred_scenes"
"""The task's name in lmms-eval."""

QUESTIONS = 1000
"""Questions in the task: those of the full ``tokred bench`` (``--limit`` takes the first ones)."""

_VERSION = 1  # bump when the files written change

_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: test.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

_UTILS = '''\
"""tokred_scenes: the image, the question as the user's text, and the bench's scoring rule."""

import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    with Image.open(os.path.join(HERE, doc["image"])) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    words = results[0].split()
    return {"accuracy": float(bool(words) and words[0] == doc["answer"])}
'''


def write_task(folder: str | Path, *, count: int = QUESTIONS, image_size: int | None = None) -> Path:
    """Write the task's YAML, scoring code, questions and images into ``folder``.

    Args:
        folder: Where to write (created); it then holds ``tokred_scenes.yaml``, ``utils.py``, ``test.jsonl``
            and ``images/``.
        count: Questions, the first ``count`` of the bench's.
        image_size: Side of the scenes in pixels; the reference model's by default.

    Returns:
        ``folder``.
    """
    from tokred.bench.reference.llava import ModelShape, to_pil
    from tokred.bench.reference.questions import make_questions

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    questions = make_questions(count, split="test", image_size=image_size or ModelShape().image_size)
    lines = []
    for index, (question, image) in enumerate(zip(questions.questions, questions.images, strict=True)):
        name = f"images/{index:05d}.png"
        to_pil(image).save(folder / name)
        row = {"id": index, "image": name, "question": question.text, "answer": question.answer, "kind": question.kind}
        lines.append(json.dumps(row))
    (folder / "test.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "utils.py").write_text(_UTILS)
    (folder / f"{TASK_NAME}.yaml").write_text(_YAML.format(name=TASK_NAME, version=_VERSION))
    return folder


def _cache_root() -> Path:
    if os.environ.get("TOKRED_CACHE"):
        return Path(os.environ["TOKRED_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokred"


def _published(count: int) -> Path:
    from tokred.bench.reference.llava import ModelShape

    name = f"{TASK_NAME}-v{_VERSION}-{ModelShape().image_size}px-{count}"
    return _cache_root() / "lmms_tasks" / name


def task_folder(limit: int | None = None) -> Path:
    """The folder of the task, written on first use under ``$TOKRED_CACHE`` (default ``~/.cache/tokred``).

    Rendering the scenes takes a while (minutes for all of them on a small CPU), so a run that needs only
    the first ``limit`` questions gets a task of those alone unless the whole task is already there. Safe when
    many processes ask at once (torchrun): each writes a private copy and the first to finish publishes it.

    Args:
        limit: The number of questions the run evaluates (``--limit``); all of them when ``None``.

    Returns:
        The folder to give lmms-eval as ``--include_path``.
    """
    full = _published(QUESTIONS)
    if (full / f"{TASK_NAME}.yaml").is_file():
        return full
    count = QUESTIONS if limit is None else max(1, min(int(limit), QUESTIONS))
    target = _published(count)
    if (target / f"{TASK_NAME}.yaml").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write_task(scratch, count=count)
        try:
            scratch.rename(target)
        except OSError:  # another process published it first
            if not (target / f"{TASK_NAME}.yaml").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def main() -> int:
    """Print the task folder (writing it if needed), for ``lmms-eval --include_path``."""
    print(task_folder())
    return 0


if __name__ == "__main__":
    sys.exit(main())
