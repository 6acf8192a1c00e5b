"""`tokred demo` and `tokred bench` end to end, on the reference models the packages ship (small settings)."""

import json

from tokred.core.cli import main


def test_demo_runs_both_reference_models_and_draws_their_plans(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--no-progress", "--limit", "16", "--scenes", "2", "--eval-scenes", "16"]
    argv.append("--no-speed")  # the README's demo, which CI runs, measures the speed-ups
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "LLaVA" in out and "Vim" in out
    assert "Loading weights" not in captured.err, "--no-progress silences transformers' loading bar too"
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pictures == [
        "mamba-mtr.png",
        "mamba-scene-0.png",
        "mamba-scene-1.png",
        "mamba-uniform.png",
        "vlm-apet.png",
        "vlm-divprune.png",
        "vlm-scene-0.png",
        "vlm-scene-1.png",
    ]
    assert "speed (random weights" not in out
    for name in ("mamba-mtr.png", "mamba-uniform.png", "vlm-apet.png", "vlm-divprune.png"):
        assert f"picture: {tmp_path / name}" in out
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "demo.json").read_text())
    assert [set(r) for r in record["vlm"]] == [{"image", "question", "truth", "dense", "reduced"}] * 2
    assert [set(r) for r in record["mamba"]] == [{"image", "truth", "dense", "reduced"}] * 2
    assert record["vlm"][0]["image"] == "vlm-scene-0.png" and set(record["vlm"][0]["reduced"]) == {"apet", "divprune"}
    assert set(record["mamba"][1]["reduced"]) == {"mtr", "uniform"}


def test_bench_quick_measures_every_suite(tmp_path, capsys):
    assert main(["bench", "--quick", "--limit", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    for suite, must in (("vlm", {"apet", "apet (reference)", "random", "uniform"}), ("mamba", {"mtr", "tome"})):
        record = json.loads((tmp_path / f"{suite}.json").read_text())
        rows = record["results"]
        assert rows[0]["method"] == "dense" and rows[0]["retained"] == 1.0
        assert must <= {r["method"] for r in rows}
        assert all(r["examples"] == 8 for r in rows)
        for plot in ("accuracy", "speed"):
            assert (tmp_path / f"{suite}-{plot}.svg").exists() and (tmp_path / f"{suite}-{plot}.png").exists()
    assert "tokred bench --quick --limit 8" in (tmp_path / "results.md").read_text()
