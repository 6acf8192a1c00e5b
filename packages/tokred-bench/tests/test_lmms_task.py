"""The offline ``tokred_scenes`` task: the bench's questions and pixels, its scoring rule, its cache folder.

lmms-eval itself is not needed here: the task's ``utils.py`` is loaded as the plain module it is. Running the
task through lmms-eval is tested in ``integration_tests/test_vlm_eval_lmms.py``.
"""

import importlib.util
import json

import pytest
from PIL import Image

from tokred.bench import lmms_task
from tokred.bench.reference.llava import to_pil
from tokred.bench.reference.questions import make_questions


def _load_utils(folder):
    spec = importlib.util.spec_from_file_location(f"tokred_scenes_utils_{id(folder)}", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    return lmms_task.write_task(tmp_path_factory.mktemp("task"), count=7, image_size=32)


def test_the_task_holds_the_bench_questions_and_the_pixels_the_bench_hands_to_the_processor(small_task):
    expected = make_questions(7, split="test", image_size=32)
    rows = [json.loads(line) for line in (small_task / "test.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows] == [q.text for q in expected.questions]
    assert [r["answer"] for r in rows] == [q.answer for q in expected.questions]
    assert [r["kind"] for r in rows] == [q.kind for q in expected.questions]
    utils = _load_utils(small_task)
    for row, image in zip(rows, expected.images, strict=True):
        (loaded,) = utils.doc_to_visual(row)
        assert loaded.mode == "RGB"
        assert loaded.tobytes() == to_pil(image).tobytes()  # PNG is lossless: the bench's 8-bit pixels exactly
        assert utils.doc_to_text(row) == row["question"]


def test_the_yaml_names_the_task_and_asks_for_one_greedy_token(small_task):
    text = (small_task / f"{lmms_task.TASK_NAME}.yaml").read_text()
    assert f"task: {lmms_task.TASK_NAME}\n" in text
    assert "max_new_tokens: 1\n" in text and "do_sample: false\n" in text
    assert "test: test.jsonl" in text


@pytest.mark.parametrize(
    ("generated", "right"),
    [("red", True), ("red and blue", True), (" red\n", True), ("Red", False), ("blue", False), ("", False)],
)
def test_a_sample_is_right_when_its_first_word_is_the_answer(small_task, generated, right):
    utils = _load_utils(small_task)
    assert utils.process_results({"answer": "red"}, [generated]) == {"accuracy": float(right)}


def test_task_folder_writes_once_into_the_cache_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path))
    written = []
    real_write = lmms_task.write_task

    def counting_write(folder, *, count=lmms_task.QUESTIONS, image_size=None):
        written.append(count)
        return real_write(folder, count=count, image_size=32)

    monkeypatch.setattr(lmms_task, "write_task", counting_write)
    first = lmms_task.task_folder(limit=3)
    assert first.parent == tmp_path / "lmms_tasks"
    assert len((first / "test.jsonl").read_text().splitlines()) == 3
    assert lmms_task.task_folder(limit=3) == first
    assert written == [3]
    # No scratch copies are left behind next to the published folder.
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_task_folder_prefers_the_whole_task_once_it_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path))
    monkeypatch.setattr(
        lmms_task, "write_task", lambda folder, *, count, image_size=None: pytest.fail("nothing should be written")
    )
    whole = lmms_task._published(lmms_task.QUESTIONS)
    whole.mkdir(parents=True)
    (whole / f"{lmms_task.TASK_NAME}.yaml").write_text("task: tokred_scenes\n")
    assert lmms_task.task_folder(limit=5) == whole
    assert lmms_task.task_folder() == whole


def test_a_process_that_loses_the_race_uses_the_winners_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path))
    target = lmms_task._published(2)

    def write_while_another_process_publishes(folder, *, count, image_size=None):
        target.mkdir(parents=True)
        (target / f"{lmms_task.TASK_NAME}.yaml").write_text("task: tokred_scenes\n")
        (target / "marker").write_text("the other process")
        (folder / "images").mkdir(parents=True, exist_ok=True)
        return folder

    monkeypatch.setattr(lmms_task, "write_task", write_while_another_process_publishes)
    assert lmms_task.task_folder(limit=2) == target
    assert (target / "marker").read_text() == "the other process"
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_the_module_prints_the_folder_for_lmms_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path))
    whole = lmms_task._published(lmms_task.QUESTIONS)
    whole.mkdir(parents=True)
    (whole / f"{lmms_task.TASK_NAME}.yaml").write_text("task: tokred_scenes\n")
    assert lmms_task.main() == 0
    assert capsys.readouterr().out == f"{whole}\n"


def test_the_task_is_registered_for_tokred_vlm_eval():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="tokred.eval_tasks") if e.name == lmms_task.TASK_NAME]
    assert entry.load() is lmms_task.task_folder


def test_images_are_png_files_of_the_requested_size(small_task):
    with Image.open(small_task / "images" / "00000.png") as image:
        assert image.format == "PNG" and image.size == (32, 32)
