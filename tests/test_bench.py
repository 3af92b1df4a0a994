"""`fedsim bench` (benchmarks/throughput.py): it runs the three modes on the tiny model and reports
positive figures. Timings themselves are not checked here (benchmarks measure, tests do not)."""
import json
import re

import pytest

from fedsim.cli import main


def test_bench_prints_a_row_per_mode_with_positive_figures(ray_local, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--clients", "2", "--batch", "2", "--seq", "32", "--steps", "1", "--rounds", "2",
                 "--fused-executors", "1", "--out", str(out), "--plot", str(tmp_path / "bench.png")]) == 0
    text = capsys.readouterr().out
    for mode, executors in (("actors", 2), ("pool", 2), ("fused", 1)):
        row = re.search(rf"^{mode}\s+(\d+)\s+([\d,.e+-]+)\s+([\d,.e+-]+)\s+([\d,.e+-]+)\s+n/a\s+([\d.]+) (MiB|GiB)\s+([\d.]+) %\s+(\d+)$",
                        text, re.M)
        assert row, (mode, text)
        assert int(row[1]) == executors
        assert float(row[2].replace(",", "")) > 0 and float(row[3].replace(",", "")) > 0 and float(row[4]) > 0
        assert float(row[5]) > 0 and 0 <= float(row[7]) <= 100 and 0 < int(row[8]) <= 32
    assert "MFU: n/a" in text
    assert f"plot: {tmp_path / 'bench.png'}" in text and (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["modes"]] == ["actors", "pool", "fused"]
    for r in result["modes"]:
        assert r["tokens_per_s"] > 0 and r["samples_per_s"] > 0 and r["peak_bytes"] > 0 and r["timed_rounds"] == 1
        assert r["flops_per_s"] > 0 and r["mfu"] is None


def test_bench_rejects_an_unknown_mode(capsys):
    assert main(["bench", "--modes", "actors,turbo"]) == 2
    assert "--modes 'actors,turbo': choose from actors, pool, fused" in capsys.readouterr().err


def _noise_tolerance():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "noise_tolerance.py"
    spec = importlib.util.spec_from_file_location("noise_tolerance", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_noise_tolerance_adds_noise_of_the_asked_size_and_scores_each_ratio(tmp_path, capsys):
    import torch
    nt = _noise_tolerance()
    initial = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    final = initial + 0.01
    for ratio in (0.5, 4.0):  # |noise| = ratio x |final - initial| = ratio x 0.01 x sqrt(2e5)
        n = nt.noisy(final, initial, ratio, seed=1) - final
        assert float(n.norm()) == pytest.approx(ratio * 0.01 * 200_000 ** 0.5, rel=0.01)
    out = tmp_path / "nt.json"
    nt.main(["--config", "configs/tiny.yaml", "--ratios", "0,1000", "--threads", "1", "--out", str(out)])
    r = json.loads(out.read_text())
    clean, drowned = r["points"]
    assert clean["diff_vs_clean"] == 0.0 and r["update_norm"] > 0 and r["entries"] > 0
    assert drowned["diff_vs_clean"] != 0.0  # noise 1000x the update moves the scores
    assert "| 1000 |" in capsys.readouterr().out
