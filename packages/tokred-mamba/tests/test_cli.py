"""`tokred mamba classify` and `tokred mamba eval`, end to end on a tiny model and images the test writes."""

import argparse
import os
import re
import shutil
import subprocess
import sys

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
    assert "6/6 images" in captured.err, "a progress bar on stderr"


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


def test_reducer_without_schedule_is_a_usage_error(checkpoint, image_folder):
    image = str(image_folder / "class_0" / "img_0.png")
    with pytest.raises(SystemExit, match="--flops-cut or --r"):
        main(["mamba", "classify", "--model", "vim_test", "--reducer", "mtr", image])
    with pytest.raises(SystemExit, match="need --reducer"):
        main(["mamba", "classify", "--model", "vim_test", "--r", "2", image])


def test_models_listing_and_console_script(capsys):
    assert main(["mamba", "models", "vim_*"]) == 0
    names = capsys.readouterr().out.split()
    assert {"vim_tiny", "vim_small", "vim_base", "vim_test"} <= set(names)
    exe = shutil.which("tokred", path=os.path.dirname(sys.executable))
    result = subprocess.run([exe, "mamba", "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0 and "classify" in result.stdout and "eval" in result.stdout
