"""`--model tokred` in lmms-eval's evaluator and `tokred vlm eval`, on tiny checkpoints and a task the test writes.

The oracle is a hand-written pass per document: the processor's chat template over the question, the
processor, and ``model.generate`` of the unmodified model — with the reducer attached by hand for the reduced
run — exactly what lmms-eval's stock chat classes do for a one-image question.
"""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval", reason="the eval extra (tokred-vlm[eval]) is not installed")

from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from transformers import AutoModelForImageTextToText

from tokred.core.cli import main
from tokred.core.errors import InvalidInputError
from tokred.vlm import ApET, attach
from tokred.vlm.eval.models import GenerationFailedError, Tokred, TokredLlava, TokredQwenVL
from tokred.vlm.processors import load_processor
from tokred.vlm.testing import FAMILIES

QWEN_PIXELS = {"min_pixels": 28 * 28, "max_pixels": 112 * 112}  # the test images are inside: no resize
QUESTIONS = ["what is it?", "describe the image", "which color?"]

TASK_YAML = """\
task: tiny_questions
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
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: answered
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0
"""

TASK_UTILS = """\
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [Image.open(os.path.join(HERE, doc["image"])).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"answered": float(bool(results[0].strip()))}
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three questions about three 112 x 84 noise images (multiples of 28, so Qwen resizes nothing)."""
    root = tmp_path_factory.mktemp("tasks")
    folder = root / "tiny_questions"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for index, question in enumerate(QUESTIONS):
        Image.fromarray(rng.integers(0, 256, (84, 112, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        rows.append(json.dumps({"image": f"{index}.png", "question": question, "answer": "x"}))
    (folder / "test.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "utils.py").write_text(TASK_UTILS)
    (folder / "tiny_questions.yaml").write_text(TASK_YAML)
    return root


def run(task_dir, **model_args):
    lm = Tokred(**model_args)
    lm.progress = False
    manager = TaskManager("WARNING", include_path=str(task_dir), include_defaults=False)
    result = simple_evaluate(
        model=lm, tasks=["tiny_questions"], task_manager=manager, batch_size=1, log_samples=True, bootstrap_iters=0
    )
    samples = sorted(result["samples"]["tiny_questions"], key=lambda s: s["doc_id"])
    return lm, result, samples


def reference(folder, family, task_dir, reducer=None):
    """The texts a user gets by hand for each question: chat template, processor, generate."""
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    qwen = family.startswith("qwen")
    processor = load_processor(str(folder), **(QWEN_PIXELS if qwen else {}))
    tokenizer = processor.tokenizer
    texts = []
    for index, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        with Image.open(task_dir / "tiny_questions" / f"{index}.png") as image:
            inputs = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
        pad = tokenizer.pad_token_id if qwen else tokenizer.eos_token_id
        options = {"max_new_tokens": 3, "do_sample": False, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
        with torch.inference_mode():
            if reducer is None:
                output = model.generate(**inputs, **options)
            else:
                with attach(model, reducer):
                    output = model.generate(**inputs, **options)
        new = output[0, inputs["input_ids"].shape[1] :]
        decoded = processor.batch_decode([new], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
        texts.append((decoded, int(new.shape[0]), int(inputs["input_ids"].shape[1])))
    return texts


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_answers_as_the_hand_written_pass(family, checkpoint, task_dir):
    folder = checkpoint(family)
    extra = QWEN_PIXELS if family.startswith("qwen") else {}
    lm, result, samples = run(task_dir, pretrained=str(folder), reducer="apet", num_keep=4, device="cpu", **extra)
    assert isinstance(lm, TokredQwenVL if family.startswith("qwen") else TokredLlava)
    expected = reference(folder, family, task_dir, ApET(num_keep=4))
    assert [s["filtered_resps"][0] for s in samples] == [text for text, _, _ in expected]
    _, _, dense = run(task_dir, pretrained=str(folder), reducer="none", device="cpu", **extra)
    assert [s["filtered_resps"][0] for s in dense] == [text for text, _, _ in reference(folder, family, task_dir)]
    for sample, reduced_sample, (_, new_tokens, length) in zip(dense, samples, expected, strict=True):
        (counts,) = reduced_sample["token_counts"]
        (dense_counts,) = sample["token_counts"]
        visual = dense_counts["visual_tokens"]
        assert 0 < visual < length and counts["visual_tokens"] == visual
        assert counts["input_tokens"] == dense_counts["input_tokens"] == length
        assert counts["output_tokens"] == new_tokens
        groups = counts["groups"]
        assert groups >= 1 and counts["kept_tokens"][0] >= 4 * groups  # structural tokens are kept besides
        assert counts["kept_tokens"][0] < visual and counts["average_tokens"] == counts["kept_tokens"][0] / groups
        assert counts["prefill_ms"] > 0 and dense_counts["prefill_ms"] > 0
        assert dense_counts["kept_tokens"] == [] and dense_counts["average_tokens"] is None
    assert result["results"]["tiny_questions"]["answered,none"] == pytest.approx(
        np.mean([bool(text.strip()) for text, _, _ in expected])
    )


def test_inner_stages_are_reported_per_sample(checkpoint, task_dir):
    folder = checkpoint("llava")
    _, _, samples = run(task_dir, pretrained=str(folder), num_keep=8, layers="1:4", device="cpu")
    for sample in samples:
        (counts,) = sample["token_counts"]
        assert counts["kept_tokens"] == [8, 4]
        assert counts["average_tokens"] == pytest.approx(6.0)  # 8 in layer 0, 4 in layer 1 of the tiny decoder


def test_the_entry_point_resolves_the_model():
    from lmms_eval.models import get_model

    assert get_model("tokred") is Tokred


def test_mistakes_fail_before_loading(checkpoint, tmp_path):
    folder = str(checkpoint("llava"))
    with pytest.raises(InvalidInputError, match=r"unknown model_args 'num_kep'.*valid: pretrained, device"):
        Tokred(pretrained=folder, num_kep=4)
    with pytest.raises(InvalidInputError, match="give batch_size 1, not 4"):
        Tokred(pretrained=folder, num_keep=4, batch_size="4")
    with pytest.raises(InvalidInputError, match="needs num_keep, keep_ratio or average"):
        Tokred(pretrained=folder)
    with pytest.raises(InvalidInputError, match="needs pretrained="):
        Tokred(num_keep=4)
    with pytest.raises(InvalidInputError, match="cannot read the config of"):
        Tokred(pretrained=str(tmp_path), num_keep=4)
    with pytest.raises(InvalidInputError, match="dtype='half'"):
        Tokred(pretrained=folder, num_keep=4, dtype="half")


def test_an_unsupported_family_lists_the_supported_ones(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    config.save_pretrained(tmp_path)
    with pytest.raises(InvalidInputError, match=re.escape("does not serve 'llama' checkpoints; supported: llava")):
        Tokred(pretrained=str(tmp_path), num_keep=4)


def test_a_generation_the_stock_class_swallowed_is_an_error(checkpoint, task_dir):
    lm = Tokred(pretrained=str(checkpoint("llava")), num_keep=4, device="cpu")

    def broken(**kwargs):
        raise RuntimeError("out of memory")

    lm._model.generate = broken  # the stock llava_hf logs generate errors and answers ""
    manager = TaskManager("WARNING", include_path=str(task_dir), include_defaults=False)
    with pytest.raises(GenerationFailedError, match="did not generate for document 0 of task tiny_questions"):
        simple_evaluate(model=lm, tasks=["tiny_questions"], task_manager=manager, batch_size=1, bootstrap_iters=0)


# ----- tokred vlm eval -----


def eval_argv(folder, task_root, out, *extra):
    return [
        "vlm", "eval", "--model", str(folder), "--tasks", "tiny_questions", "--include-path", str(task_root),
        "--out", str(out), "--device", "cpu", "--no-progress", *extra,
    ]  # fmt: skip


def test_eval_writes_results_summary_and_samples(checkpoint, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(eval_argv(checkpoint("llava"), task_dir, out, "--num-keep", "4", "--compare", "--limit", "2")) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert report["tasks"] == ["tiny_questions"] and report["limit"] == 2 and report["processes"] == 1
    assert report["model_args"]["num_keep"] == 4 and report["model_args"]["reducer"] == "apet"
    assert set(report["results"]["tiny_questions"]) >= {"answered,none"}
    assert report["n-samples"]["tiny_questions"]["effective"] == 2
    stats = report["tokred"]["tiny_questions"]
    assert stats["samples"] == 2 and stats["visual_tokens"] == 16 and stats["kept_tokens"] == [4.0]
    assert stats["average_tokens"] == 4.0 and stats["prefill_ms"] > 0
    dense = report["dense"]
    assert (
        dense["tokred"]["tiny_questions"]["kept_tokens"] == [] and "answered,none" in dense["results"]["tiny_questions"]
    )
    reduced_score = report["results"]["tiny_questions"]["answered,none"]
    dense_score = dense["results"]["tiny_questions"]["answered,none"]
    retained = report["retained"]["tiny_questions"]["answered,none"]
    assert retained == (pytest.approx(reduced_score / dense_score) if dense_score else None)
    for label in ("tokred", "dense"):
        lines = (out / "samples" / f"{label}_tiny_questions.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all("token_counts" in json.loads(line) for line in lines)
        assert all("doc" not in json.loads(line) for line in lines)
    summary = (out / "summary.md").read_text()
    assert "| tiny_questions" in summary or "tiny_questions  answered,none" in summary
    assert "answered,none" in printed and str((out / "results.json").resolve()) in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--reducer", "none", "--compare"), "--compare needs a reducer"),
        (("--reducer", "none", "--num-keep", "4"), "need a reducer (not --reducer none)"),
        ((), "--reducer apet needs --num-keep, --keep-ratio or --average"),
        (("--average", "64", "--layers", "1:2"), "give either --average or --layers"),
        (("--num-keep", "4", "--reducer", "nonsense"), "nonsense"),
    ],
)
def test_option_mistakes_are_one_line(extra, message, checkpoint, task_dir, tmp_path, capsys):
    assert main(eval_argv(checkpoint("llava"), task_dir, tmp_path / "out", *extra)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokred vlm eval: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_misspelt_shipped_task_is_suggested(checkpoint, task_dir, tmp_path, capsys, monkeypatch):
    from tokred.vlm.eval import tasks

    monkeypatch.setattr(tasks, "shipped_tasks", lambda: ["tiny_shipped_scenes"])
    argv = eval_argv(
        checkpoint("llava"), task_dir, tmp_path / "out", "--num-keep", "4", "--tasks", "tiny_shipped_scenez"
    )
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "tokred vlm eval: unknown task 'tiny_shipped_scenez'; did you mean tiny_shipped_scenes?", err


def test_other_mistakes_are_one_line(checkpoint, task_dir, tmp_path, capsys):
    folder = checkpoint("llava")
    cases = [
        (["--tasks", "tiny_questons"], "unknown task 'tiny_questons'; did you mean tiny_questions?"),
        (["--include-path", str(tmp_path / "missing")], "not a folder"),
    ]
    for extra, message in cases:
        argv = eval_argv(folder, task_dir, tmp_path / "out", "--num-keep", "4", *extra)
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[-1], err
    (tmp_path / "file").write_text("x")
    assert main(eval_argv(folder, task_dir, tmp_path / "file", "--num-keep", "4")) != 0
    assert "is a file; give a folder" in capsys.readouterr().err
