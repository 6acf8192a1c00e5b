"""A small trained LLaVA and its held-out questions: the reference model of ``tokred bench`` and ``tokred demo``.

* :mod:`~tokred.vlm.reference.questions`: templated one-word questions about :mod:`tokred.core.scenes`.
* :mod:`~tokred.vlm.reference.model`: the model's tokenizer, processor and config, the shipped checkpoint
  (:func:`load_reference_model`) and evaluation.
* :mod:`~tokred.vlm.reference.train`: training from scratch (``scripts/train_llava_scenes.py``).
* :mod:`~tokred.vlm.reference.suite`: :class:`~tokred.vlm.reference.suite.VLMSuite`, the ``vlm`` suite of
  ``tokred bench`` / ``tokred demo``.

Example:
    ```python
    from tokred.vlm import ApET, attach
    from tokred.vlm.reference import evaluate, load_reference_model, make_questions

    model, processor = load_reference_model()
    questions = make_questions(200, split="test")
    print(evaluate(model, processor, questions).accuracy)
    with attach(model, ApET(num_keep=11), positions="original"):  # see VLMSuite's POSITIONS
        print(evaluate(model, processor, questions).accuracy)
    ```
"""

from tokred.vlm.reference.model import EvalResult, ModelShape, evaluate, load_card, load_reference_model
from tokred.vlm.reference.questions import QUESTION_KINDS, Question, QuestionSet, make_questions

__all__ = [
    "QUESTION_KINDS",
    "EvalResult",
    "ModelShape",
    "Question",
    "QuestionSet",
    "evaluate",
    "load_card",
    "load_reference_model",
    "make_questions",
]
