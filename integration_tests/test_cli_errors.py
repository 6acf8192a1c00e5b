"""The installed `tokred` command answers a user's mistake with one line on stderr and status 2, never a traceback.

Each command's own tests check every mistake in-process; these run the console script itself.
"""

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

EXE = shutil.which("tokred", path=os.path.dirname(sys.executable))


def run(*argv, **kwargs):
    return subprocess.run([EXE, *argv], capture_output=True, text=True, timeout=300, check=False, **kwargs)


def test_a_closed_pipe_is_one_line_not_a_traceback():
    # The reader is gone before the command writes anything (it spends seconds importing torch first).
    process = subprocess.Popen([EXE, "reducers", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=300) == 2
    assert err.strip().splitlines() == ["tokred reducers: the output pipe was closed before everything was written"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("mamba", "classify", "--model", "vim_test", "--random-weights", "no-such.png"), "does not exist"),
        (("bench", "--vlm-reducers", "nope"), "unknown reducer 'nope'"),
    ],
)
def test_mistakes_through_the_console_script(tmp_path, argv, expected):
    result = run(*argv, cwd=tmp_path)
    lines = [line for line in result.stderr.strip().splitlines() if "%|" not in line]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_warning_is_one_line_naming_the_command(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "data" / "cat" / "red.png")
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")
    argv = ("mamba", "eval", "--model", "vim_test", "--random-weights", "--data", "data", "--batch-size", "1")
    result = run(*argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if "%|" not in line]
    skipped = [line for line in lines if "notes.txt" in line]
    assert len(skipped) == 1 and skipped[0].startswith("tokred mamba eval: warning: "), result.stderr
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr
    debug = run(*argv, "--debug", cwd=tmp_path)
    assert "UserWarning" in debug.stderr  # Python's own format, with file and line


def test_debug_shows_the_traceback(tmp_path):
    result = run("mamba", "classify", "--model", "nope", "x.png", "--debug", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "UnknownModelError" in result.stderr
