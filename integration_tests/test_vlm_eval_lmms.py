"""lmms-eval on the reference LLaVA and the shipped ``tokred_scenes`` task: the bench's answers, and many processes.

* ``tokred vlm eval --tasks tokred_scenes`` answers every question as ``tokred bench`` does (its
  ``evaluate``), dense and with ApET at the bench's 11 %;
* two processes under ``torchrun`` and under ``accelerate launch --multi_gpu`` (``ACCELERATE_USE_CPU=1``) give
  the metrics of one process;
* lmms-eval's own command line runs ``--model tokred`` from its entry point.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="the eval extra (tokred-vlm[eval]) is not installed")

from tokred.bench.lmms_task import TASK_NAME, task_folder
from tokred.bench.reference.llava import evaluate, load_reference_model
from tokred.bench.reference.questions import make_questions
from tokred.bench.suites.vlm import POSITIONS, schedule_for
from tokred.core.cli import main
from tokred.vlm import attach

BIN = os.path.dirname(sys.executable)
EXE = shutil.which("tokred", path=BIN)
KEEP = 28  # 11 % of the reference model's 256 visual tokens, the bench's smallest budget
ACCURACY = "accuracy,none"


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """Offline, with the task written into a fresh cache; the variables every process gets."""
    root = tmp_path_factory.mktemp("lmms")
    env = {
        "TOKRED_CACHE": str(root / "cache"),
        "HF_HOME": str(root / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    yield env
    patch.undo()


def run_eval(out, *extra):
    argv = ["vlm", "eval", "--model", "llava_scenes", "--tasks", TASK_NAME, "--out", str(out), "--no-progress"]
    assert main([*argv, *extra]) == 0
    report = json.loads((out / "results.json").read_text())
    answers = {}
    for label in ("tokred", "dense"):
        path = out / "samples" / f"{label}_{TASK_NAME}.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            answers[label] = [row["filtered_resps"][0] for row in sorted(rows, key=lambda r: r["doc_id"])]
    return report, answers


@pytest.mark.slow
def test_the_task_answers_as_the_bench(environment, tmp_path):
    count = 24
    report, answers = run_eval(tmp_path / "out", "--limit", str(count), "--num-keep", str(KEEP), "--compare")
    model, processor = load_reference_model()
    questions = make_questions(count, split="test", image_size=model.config.vision_config.image_size)
    dense = evaluate(model, processor, questions, batch_size=8)
    with attach(model, **schedule_for("apet", model, KEEP), positions=POSITIONS):
        reduced = evaluate(model, processor, questions, batch_size=8)
    assert answers["dense"] == dense.predictions
    assert answers["tokred"] == reduced.predictions
    assert report["dense"]["results"][TASK_NAME][ACCURACY] == pytest.approx(dense.accuracy)
    assert report["results"][TASK_NAME][ACCURACY] == pytest.approx(reduced.accuracy)
    assert dense.accuracy > 0.5, "the trained reference model answers most questions"
    stats = report["tokred"][TASK_NAME]
    assert (stats["samples"], stats["visual_tokens"], stats["kept_tokens"]) == (count, 256, [KEEP])
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["results.json", "samples", "summary.md"]


def _subprocess(argv, env, cwd):
    full = {**os.environ, **env, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(name, None)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, env=full, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(environment, tmp_path):
    args = ["vlm", "eval", "--model", "llava_scenes", "--tasks", TASK_NAME, "--limit", "9", "--average", "28"]
    one, answers = run_eval(tmp_path / "one", *args[6:])
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        "accelerate": [
            shutil.which("accelerate", path=BIN),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29533",
        ],
    }
    for name, launcher in launchers.items():
        out = tmp_path / name
        result = _subprocess(
            [*launcher, "--no-python", EXE, *args, "--out", str(out), "--no-progress"], environment, tmp_path
        )
        many = json.loads((out / "results.json").read_text())
        assert many["processes"] == 2, name
        assert many["results"][TASK_NAME][ACCURACY] == one["results"][TASK_NAME][ACCURACY], name
        assert many["n-samples"] == one["n-samples"] == {TASK_NAME: {"original": 9, "effective": 9}}
        rows = [json.loads(line) for line in (out / "samples" / f"tokred_{TASK_NAME}.jsonl").read_text().splitlines()]
        assert [r["filtered_resps"][0] for r in sorted(rows, key=lambda r: r["doc_id"])] == answers["tokred"], name
        for key in ("visual_tokens", "kept_tokens", "average_tokens", "samples"):
            assert many["tokred"][TASK_NAME][key] == one["tokred"][TASK_NAME][key], (name, key)
        assert result.stdout.count("results:") == 1, "only rank 0 reports"


@pytest.mark.slow
def test_the_stock_command_line_runs_the_plugin(environment, tmp_path):
    folder = task_folder(6)
    model_args = f"pretrained=llava_scenes,reducer=apet,num_keep={KEEP},device=cpu"
    argv = [sys.executable, "-m", "lmms_eval", "--model", "tokred", "--model_args", model_args]
    argv += ["--tasks", TASK_NAME, "--include_path", str(folder), "--limit", "6", "--batch_size", "1"]
    argv += ["--log_samples", "--output_path", str(tmp_path / "logs"), "--verbosity", "DEBUG"]
    _subprocess(argv, environment, tmp_path)
    (results_file,) = (tmp_path / "logs").rglob("*_results.json")
    results = json.loads(results_file.read_text())
    (samples_file,) = (tmp_path / "logs").rglob(f"*_samples_{TASK_NAME}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 6 and all(s["token_counts"][0]["kept_tokens"] == [KEEP] for s in samples)
    report, _ = run_eval(tmp_path / "ours", "--limit", "6", "--num-keep", str(KEEP))
    assert results["results"][TASK_NAME][ACCURACY] == report["results"][TASK_NAME][ACCURACY]
