"""`tokred demo` and `tokred bench` end to end, on the reference models the packages ship (small settings)."""

import json

from tokred.core.cli import main


def test_demo_runs_both_reference_models_and_draws_their_plans(tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path), "--no-progress", "--limit", "16", "--vlm-scenes", "2"]
    assert main([*argv, "--mamba-scenes", "2", "--mamba-eval-scenes", "16"]) == 0
    out = capsys.readouterr().out
    assert "LLaVA" in out and "Vim" in out
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pictures == ["mamba-mtr.png", "vlm-apet.png"]
    for name in pictures:
        assert f"picture: {tmp_path / name}" in out
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_quick_measures_every_suite(tmp_path, capsys):
    assert main(["bench", "--quick", "--limit", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    for suite, must in (("vlm", {"apet", "apet (reference)", "random", "uniform"}), ("mamba", {"mtr", "tome"})):
        record = json.loads((tmp_path / f"{suite}.json").read_text())
        rows = record["results"]
        assert rows[0]["method"] == "dense" and rows[0]["retained"] == 1.0
        assert must <= {r["method"] for r in rows}
        assert all(r["examples"] == 8 for r in rows)
        assert (tmp_path / f"{suite}-accuracy.svg").exists() and (tmp_path / f"{suite}-speed.svg").exists()
    assert "tokred bench --quick --limit 8" in (tmp_path / "results.md").read_text()
