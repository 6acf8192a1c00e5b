"""Follow docs/contributing/adding-a-model-family.md literally: write its files, install them, run their tests."""

import re
from pathlib import Path

from .walkthrough import install_walkthrough, run_python

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "contributing" / "adding-a-model-family.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.M | re.S)


def titled_blocks():
    blocks = {}
    for _, info, code in FENCE.findall(PAGE.read_text()):
        title = re.search(r'title="([^"]+)"', info)
        if title:
            blocks[title.group(1)] = code
    return blocks


def test_the_walkthrough_gives_a_working_seventh_family(tmp_path):
    files = titled_blocks()
    assert set(files) == {"src/tokred_llava_next_video/__init__.py", "pyproject.toml", "tests/test_llava_next_video.py"}
    env = install_walkthrough(files, tmp_path)
    result = run_python(tmp_path, env, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert re.search(r"\b4 passed\b", result.stdout), result.stdout[-2000:]

    # The family now shows up where users look: `tokred vlm models`, found through the entry point alone.
    listing = run_python(tmp_path, env, "-m", "tokred.core.cli.main", "vlm", "models", timeout=120)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("llava_next_video "))
    assert "LlavaNextVideoForConditionalGeneration" in row and "image+video" in row
