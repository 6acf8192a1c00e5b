"""`tokred mamba eval` under torchrun: the sharding, the environment, and 2 processes against 1 as the oracle."""

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
from tokred.core.errors import InvalidInputError
from tokred.mamba import distributed
from tokred.mamba.distributed import SINGLE_PROCESS, ProcessInfo, from_environment, shard, unshard

EXE = shutil.which("tokred", path=os.path.dirname(sys.executable))
TIMING = ("images_per_second", "processes")


@pytest.mark.parametrize(
    ("total", "world"), [(0, 1), (1, 1), (11, 1), (11, 2), (12, 3), (7, 4), (1, 2), (3, 8), (16, 16), (100, 7)]
)
def test_every_index_belongs_to_exactly_one_process(total, world):
    shares = [list(shard(total, rank, world)) for rank in range(world)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(total)), "every index once, none twice, none padded"
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    assert all(share == sorted(share) for share in shares)
    # unshard restores the original order from what each process computed for its own indices.
    assert unshard([[f"image {i}" for i in share] for share in shares], total) == [f"image {i}" for i in range(total)]


def test_more_processes_than_examples_leaves_some_with_nothing():
    assert [list(shard(1, rank, 2)) for rank in range(2)] == [[0], []]
    assert [len(shard(3, rank, 8)) for rank in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert unshard([["a"], []], 1) == ["a"]


def test_shard_and_unshard_refuse_inconsistent_input():
    for total, rank, world in [(-1, 0, 1), (4, 2, 2), (4, -1, 2), (4, 0, 0)]:
        with pytest.raises(InvalidInputError, match="cannot shard"):
            shard(total, rank, world)
    with pytest.raises(InvalidInputError, match="process 1 sent 1 results for its 2 examples"):
        unshard([[0, 2], [1]], 4)
    with pytest.raises(InvalidInputError, match="process 0 sent 3 results for its 2 examples"):
        unshard([[0, 2, 2], [1]], 3)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, SINGLE_PROCESS),
        ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}, SINGLE_PROCESS),
        ({"WORLD_SIZE": "1"}, SINGLE_PROCESS),
        ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, ProcessInfo(rank=2, local_rank=0, world_size=4)),
        ({"WORLD_SIZE": "2", "RANK": "1"}, ProcessInfo(rank=1, local_rank=1, world_size=2)),
        ({"WORLD_SIZE": " 16 ", "RANK": "15", "LOCAL_RANK": "7"}, ProcessInfo(rank=15, local_rank=7, world_size=16)),
    ],
)
def test_environment_parsing(environ, expected):
    info = from_environment(environ)
    assert info == expected
    assert info.distributed == (expected.world_size > 1)
    assert info.is_main == (expected.rank == 0)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"WORLD_SIZE": "2"}, "RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "rank 2, local rank 2, world size 2"),
        ({"WORLD_SIZE": "2", "RANK": "-1", "LOCAL_RANK": "0"}, "rank -1"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ],
)
def test_environment_mistakes_are_named(environ, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        from_environment(environ)


def test_the_environment_is_read_from_os_environ(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == ProcessInfo(rank=1, local_rank=1, world_size=3)


def test_each_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    two = ProcessInfo(rank=3, local_rank=1, world_size=4)
    assert distributed.local_device("cpu", two) == torch.device("cpu")
    assert distributed.local_device("cuda:1", SINGLE_PROCESS) == torch.device("cuda", 1)  # one process: as given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.local_device("cuda", two) == torch.device("cuda", 1)
    assert distributed.local_device("cuda:0", two) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InvalidInputError, match="local rank 1 has no GPU of its own"):
        distributed.local_device("cuda", two)


def test_a_single_process_needs_no_process_group():
    import torch.distributed as dist

    with distributed.process_group(SINGLE_PROCESS, torch.device("cpu")):
        assert distributed.gather_to_main([1, 2], SINGLE_PROCESS) == [[1, 2]]
        assert distributed.first_failure(None, SINGLE_PROCESS) is None
        assert distributed.first_failure(OSError("disk\n  full"), SINGLE_PROCESS) == (0, "disk full")
    assert not dist.is_initialized()


# ----- end to end: the oracle is the same command in a single process -----


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three classes, 11 noise and pattern images of different sizes (an odd count), and a file that is not one."""
    root = tmp_path_factory.mktemp("data")
    generator = torch.Generator().manual_seed(0)
    for label, count in enumerate([4, 4, 3]):
        folder = root / f"class_{label}"
        folder.mkdir()
        for i in range(count):
            noise = torch.randint(0, 256, (60 + 7 * i, 72, 3), generator=generator, dtype=torch.uint8)
            noise[:, :, label] //= 3  # a faint class colour cast
            height, width, _ = noise.shape
            Image.frombytes("RGB", (width, height), bytes(noise.flatten().tolist())).save(folder / f"img_{i}.png")
    (root / "class_1" / "notes.txt").write_text("not an image")
    return root


def _eval(data, out, *extra, processes=2):
    """``tokred mamba eval`` on a tiny random-weights Vim, under torchrun with ``processes`` processes."""
    command = [EXE, "mamba", "eval", "--model", "vim_test", "--random-weights", "--data", str(data), "--out", str(out)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return subprocess.run(
        [*launcher, "--no-python", *command, *extra], capture_output=True, text=True, timeout=600, check=False, env=env
    )


def _eval_in_one_process(data, out, *extra):
    """The oracle: the same command in this process (one thread, as the torchrun processes have)."""
    argv = ["mamba", "eval", "--model", "vim_test", "--random-weights", "--data", str(data), "--out", str(out)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the folder's text file is skipped with a warning
            assert main([*argv, *extra]) == 0
    finally:
        torch.set_num_threads(threads)


def _outputs(out):
    results = json.loads((out / "results.json").read_text())
    return {k: v for k, v in results.items() if k not in TIMING}, results, (out / "predictions.csv").read_text()


def _compare(image_folder, tmp_path, *extra, images):
    _eval_in_one_process(image_folder, tmp_path / "one", *extra)
    many = _eval(image_folder, tmp_path / "two", *extra)
    assert many.returncode == 0, many.stderr
    expected, one, rows = _outputs(tmp_path / "one")
    got, two, distributed_rows = _outputs(tmp_path / "two")
    assert got == expected, "top-1, top-5, images and everything else but the timing as in one process"
    assert distributed_rows == rows, "the same predictions.csv, row for row"
    assert one["processes"] == 1 and two["processes"] == 2
    assert expected["images"] == images == len(rows.splitlines()) - 1
    assert two["images_per_second"] > 0
    # Only rank 0 prints the summary; each warning appears once.
    for line in ("model vim_test:", "top-1:", "images:", "results:"):
        assert many.stdout.count(line) == 1, many.stdout
    assert "images/s on cpu (2 processes)" in many.stdout
    assert many.stderr.count("tokred mamba eval: WARNING: the folder has 3 class sub-folders") == 1, many.stderr
    assert many.stderr.count("notes.txt") == 1, many.stderr
    return many


@pytest.mark.slow
def test_two_processes_write_what_one_writes(image_folder, tmp_path):
    many = _compare(image_folder, tmp_path, "--batch-size", "4", images=11)
    assert len(re.findall(r"\| 0/11 \[", many.stderr)) == 1, "a single progress bar, rank 0's, counting all images"


@pytest.mark.slow
def test_two_processes_with_a_reducer(image_folder, tmp_path):
    many = _compare(
        image_folder, tmp_path, "--reducer", "mtr", "--flops-cut", "0.3", "--limit", "9", "--no-progress", images=9
    )
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["reducer"].startswith("MTR(") and results["schedule"]
    assert "%|" not in many.stderr


@pytest.mark.slow
def test_more_processes_than_images(image_folder, tmp_path):
    """Rank 1 gets no image: it only takes part in the gather, and the metrics are one process's."""
    _compare(image_folder, tmp_path, "--limit", "1", "--no-progress", images=1)


@pytest.mark.slow
def test_a_mistake_under_torchrun_is_reported_once(tmp_path):
    result = _eval(tmp_path / "missing", tmp_path / "out", "--no-progress")
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("tokred mamba eval:")]
    assert len(ours) == 1 and "does not exist" in ours[0], result.stderr
    assert not (tmp_path / "out").exists()
