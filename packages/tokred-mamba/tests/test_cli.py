"""`tokred mamba classify` and `tokred mamba eval`, end to end on a tiny model and images the test writes."""

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

from tokred.core.cli import main
from tokred.mamba import create_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Vim saved in the official training-container format."""
    torch.manual_seed(0)
    model = create_model("vim_test")
    path = tmp_path_factory.mktemp("ckpt") / "vim_test.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": argparse.Namespace(model="vim_test")}, path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of small coloured images, plus a file that is not an image."""
    root = tmp_path_factory.mktemp("data")
    for label, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        folder = root / f"class_{label}"
        folder.mkdir()
        for i in range(3):
            Image.new("RGB", (80 + 10 * i, 70), colour).save(folder / f"img_{i}.png")
    (root / "class_0" / "notes.txt").write_text("not an image")
    return root


def test_classify_dense_and_reduced(checkpoint, image_folder, capsys):
    images = [str(image_folder / "class_0" / "img_0.png"), str(image_folder / "class_1" / "img_1.png")]
    assert main(["mamba", "classify", "--model", "vim_test", "--checkpoint", str(checkpoint), *images]) == 0
    dense = capsys.readouterr().out
    assert "(dense, one-direction convention)" in dense
    assert all(path in dense for path in images)
    argv = [
        "mamba",
        "classify",
        "--model",
        "vim_test",
        "--checkpoint",
        str(checkpoint),
        "--top-k",
        "3",
        "--reducer",
        "mtr",
        "--flops-cut",
        "0.3",
        *images,
    ]
    assert main(argv) == 0
    reduced = capsys.readouterr().out
    assert re.search(r"\d+\.\d% less than dense", reduced)
    rows = [line for line in reduced.splitlines() if line.startswith(images[0])]
    assert len(rows[0].split("\t")[1].split(", ")) == 3


def test_eval_reports_accuracy_flops_throughput_and_skipped_files(checkpoint, image_folder, capsys):
    argv = [
        "mamba",
        "eval",
        "--model",
        "vim_test",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(image_folder),
        "--batch-size",
        "4",
        "--reducer",
        "tome",
        "--r",
        "2",
    ]
    with pytest.warns(UserWarning, match="notes.txt"):
        assert main(argv) == 0
    captured = capsys.readouterr()
    assert "6 evaluated, 1 skipped" in captured.out
    top1, top5 = map(float, re.search(r"top-1: ([\d.]+)%  top-5: ([\d.]+)%", captured.out).groups())
    assert 0 <= top1 <= top5 <= 100
    assert "images/s" in captured.out and "GFLOPs" in captured.out
    assert "6/6" in captured.err and "img/s" in captured.err, "a progress bar with its rate on stderr"


def test_eval_accuracy_matches_a_direct_computation(checkpoint, image_folder, capsys):
    from tokred.mamba import ImageFolder

    model = create_model("vim_test", checkpoint=checkpoint).eval()
    with pytest.warns(UserWarning):
        data = ImageFolder(image_folder, img_size=model.img_size)
    with torch.inference_mode():
        predictions = [int(model(image.unsqueeze(0)).argmax()) for image, _ in data]
    expected = 100 * sum(p == label for p, (_, label) in zip(predictions, data, strict=True)) / len(data)
    with pytest.warns(UserWarning):
        main(["mamba", "eval", "--model", "vim_test", "--checkpoint", str(checkpoint), "--data", str(image_folder)])
    assert f"top-1: {expected:.2f}%" in capsys.readouterr().out


def _one_line_error(capsys, argv):
    """Run the command; it must fail with status 2 and exactly one line on stderr, which is returned."""
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    return err[0]


def test_reducer_without_schedule_is_a_usage_error(checkpoint, image_folder, capsys):
    image = str(image_folder / "class_0" / "img_0.png")
    model = ["mamba", "classify", "--model", "vim_test", "--checkpoint", str(checkpoint)]
    assert "needs a schedule: --flops-cut CUT or --num-remove R" in _one_line_error(
        capsys, [*model, "--reducer", "mtr", image]
    )
    assert "need --reducer NAME" in _one_line_error(capsys, [*model, "--num-remove", "2", image])


def test_every_mistake_is_one_line_and_status_two(checkpoint, image_folder, tmp_path, capsys):
    image = str(image_folder / "class_0" / "img_0.png")
    text = str(image_folder / "class_0" / "notes.txt")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    foreign = tmp_path / "foreign.pth"
    foreign.write_bytes(b"GIF89a not a checkpoint")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:300])
    out_file = tmp_path / "out.txt"
    out_file.write_text("a file")
    classify = ["mamba", "classify", "--model", "vim_test", "--checkpoint", str(checkpoint)]
    evaluate = ["mamba", "eval", "--model", "vim_test", "--checkpoint", str(checkpoint)]
    cases = {
        "does not exist": [*classify, str(tmp_path / "missing.png")],
        "is not a readable image": [*classify, text],
        "is a folder, not an image file": [*classify, str(image_folder)],
        "is a file; expected a folder": [*evaluate, "--data", image],
        "no class sub-folders": [*evaluate, "--data", str(flat)],
        "unknown model 'vim_tset'. Did you mean 'vim_test'": ["mamba", "classify", "--model", "vim_tset", image],
        "unknown reducer 'mrt'. Did you mean 'mtr'": [*classify, "--reducer", "mrt", "--flops-cut", "0.3", image],
        "argument --scan-backend: invalid choice: 'cuda'": [*classify, "--scan-backend", "cuda", image],
        "cannot be met": [*classify, "--reducer", "mtr", "--flops-cut", "0.95", image],
        "argument --flops-cut: expected a fraction in (0, 1)": [
            *classify,
            "--reducer",
            "mtr",
            "--flops-cut",
            "1.5",
            image,
        ],
        "argument --num-remove/--r: expected a positive integer": [
            *classify,
            "--reducer",
            "mtr",
            "--num-remove",
            "-3",
            image,
        ],
        "is empty (0 bytes)": ["mamba", "classify", "--model", "vim_test", "--checkpoint", str(empty), image],
        "is not a PyTorch checkpoint": [
            "mamba",
            "classify",
            "--model",
            "vim_test",
            "--checkpoint",
            str(foreign),
            image,
        ],
        "corrupted or truncated": ["mamba", "classify", "--model", "vim_test", "--checkpoint", str(truncated), image],
        "does not fit vim_small": ["mamba", "classify", "--model", "vim_small", "--checkpoint", str(checkpoint), image],
        "--out": [*evaluate, "--data", str(image_folder), "--out", str(out_file)],
        "has no bundled weights: give --checkpoint FILE": ["mamba", "classify", "--model", "vim_test", image],
        "cannot run on this": [*classify, "--reducer", "topk", "--flops-cut", "0.3", image],
        "has no effect": [*classify, "--reducer", "mtr", "--flops-cut", "0.3", "--reducer-arg", "num_keep=3", image],
        "give at least one image file": classify,
    }
    for expected, argv in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fixture folder's text file is skipped with a warning
            line = _one_line_error(capsys, argv)
        assert line.startswith("tokred mamba "), line
        if expected == "cannot run on this":
            expected = "which a Vision Mamba model cannot supply"
        assert expected in line, (expected, line)


def test_debug_shows_the_traceback(checkpoint, tmp_path):
    argv = ["mamba", "classify", "--model", "vim_test", "--checkpoint", str(checkpoint), str(tmp_path / "no.png")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([*argv, "--debug"])


def test_random_weights_must_be_asked_for(image_folder, capsys):
    image = str(image_folder / "class_0" / "img_0.png")
    assert main(["mamba", "classify", "--model", "vim_test", "--random-weights", image]) == 0
    assert image in capsys.readouterr().out


def test_eval_writes_results_and_predictions(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["mamba", "eval", "--model", "vim_test", "--checkpoint", str(checkpoint), "--data", str(image_folder)]
    with pytest.warns(UserWarning):
        assert main([*argv, "--out", str(out), "--no-progress", "--reducer", "mtr", "--flops-cut", "0.3"]) == 0
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 6 and results["skipped"] == 1 and 0 <= results["top1"] <= results["top5"] <= 1
    assert results["reducer"].startswith("MTR(") and results["schedule"]
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["class"] for r in rows} == {"class_0", "class_1"}
    assert sum(int(r["correct"]) for r in rows) / 6 == pytest.approx(results["top1"])
    assert "WARNING" in captured.err, "2 folder classes against a 10-class model is worth a loud warning"
    assert "the folder has 2 class sub-folders but the model has 10 classes" in captured.err


def test_models_listing_and_console_script(capsys):
    assert main(["mamba", "models", "vim_*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "package", "weights", "classes", "description"]
    names = {line.split()[0] for line in lines[2:]}
    assert {"vim_tiny", "vim_small", "vim_base", "vim_test"} <= names
    row = next(line for line in lines if line.startswith("vim_small "))
    assert "tokred-mamba" in row and "--checkpoint" in row and "Vim-S" in row
    exe = shutil.which("tokred", path=os.path.dirname(sys.executable))
    result = subprocess.run([exe, "mamba", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "classify" in result.stdout and "eval" in result.stdout
