"""`tokred mamba eval` of the bundled reference Vim under torchrun writes what a single process writes.

The console script runs once in one process and once as two torchrun processes (Gloo, on the CPU) on held-out
scenes saved as PNG files in one folder per class; the single process is the oracle.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tokred.bench.scenes import make_scenes
from tokred.mamba import create_model

EXE = shutil.which("tokred", path=os.path.dirname(sys.executable))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python"]


def scene_folder(root, count):
    """``count`` test scenes as ``root/<class name>/<index>.png``, named by the model's own class names."""
    names = create_model("vim_scenes", pretrained=True).class_names
    scenes = make_scenes(count, split="test")
    for index, (image, label) in enumerate(zip(scenes.images, scenes.labels.tolist(), strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def run(*argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_two_processes_match_one_on_the_reference_model(tmp_path):
    scene_folder(tmp_path / "scenes", 24)
    argv = [EXE, "mamba", "eval", "--model", "vim_scenes", "--data", "scenes", "--no-progress"]
    run(*argv, "--out", "one", cwd=tmp_path)
    many = run(*TORCHRUN, *argv, "--out", "two", cwd=tmp_path)
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["images"] == 24
    assert (two["images"], two["top1"], two["top5"]) == (one["images"], one["top1"], one["top5"])
    timing = {"images_per_second", "processes"}
    assert {k: v for k, v in two.items() if k not in timing} == {k: v for k, v in one.items() if k not in timing}
    assert one["top1"] > 0.5, "the trained reference model recognises most held-out scenes"
    rows = (tmp_path / "one" / "predictions.csv").read_text()
    assert (tmp_path / "two" / "predictions.csv").read_text() == rows
    assert len(rows.splitlines()) == 25
    assert many.stdout.count("top-1:") == 1, many.stdout
