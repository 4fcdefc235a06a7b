"""The benchmark report of ``python -m fastema bench``: table arithmetic and plot."""
import json

import pytest

from fastema.cli import bench


def result(group, case, impl, median, nbytes, elements=None, device="cpu"):
    return {"group": group, "stats": {"median": median, "min": median},
            "extra_info": {"case": case, "impl": impl, "bytes": nbytes, "elements": elements, "device": device}}


@pytest.fixture
def results(tmp_path):
    g = "flat float32 (cpu)"
    data = {"datetime": "2026-11-22T10:00:00", "machine_info": {"cpu": {"brand_raw": "TestCPU", "count": 2},
                                                                 "gpu": "TestGPU"},
            "benchmarks": [
                result(g, "2^20", "fastema", 2e-3, 12 * 2 ** 20, 2 ** 20),
                result(g, "2^20", "torch.lerp_", 3e-3, 12 * 2 ** 20, 2 ** 20),
                result(g, "2^20", "copy (ceiling)", 1e-3, 8 * 2 ** 20, 2 ** 20),
                result(g, "2^24", "fastema", 1.0, 12 * 2 ** 24, 2 ** 24),
                result(g, "2^24", "copy (ceiling)", 0.5, 8 * 2 ** 24, 2 ** 24),   # the ceiling: most bytes
                result("two decays", "K=2", "fastema (one pass)", 1e-3, 0),
                result("two decays", "K=2", "torch x2", 4e-3, 0),
            ]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_table_has_speedups_and_share_of_the_copy_ceiling(results, tmp_path):
    text = bench.report(results, tmp_path / "out")
    ceiling = 8 * 2 ** 24 / 0.5
    assert f"cpu {ceiling / 1e9:.0f} GB/s" in text
    assert "TestCPU, 2 cores; GPU: TestGPU" in text
    lines = {tuple(c.strip() for c in ln.split("|")[1:-1]) for ln in text.splitlines() if ln.startswith("| ")}
    fast = 12 * 2 ** 20 / 2e-3
    assert ("flat float32 (cpu)", "2^20", "fastema", "2.000 ms", f"{fast / 1e9:.1f}",
            f"{100 * fast / ceiling:.0f}%", "") in lines
    assert ("flat float32 (cpu)", "2^20", "torch.lerp_", "3.000 ms", f"{12 * 2 ** 20 / 3e-3 / 1e9:.1f}",
            f"{100 * 12 * 2 ** 20 / 3e-3 / ceiling:.0f}%", "1.50x") in lines
    assert ("two decays", "K=2", "torch x2", "4.000 ms", "-", "-", "4.00x") in lines   # 'fastema ...' is ours
    assert any(r[2] == "copy (ceiling)" and r[-1] == "" for r in lines)
    assert (tmp_path / "out" / "bench.md").read_text() == text


def test_plot_is_written(results, tmp_path):
    pytest.importorskip("matplotlib")
    bench.report(results, tmp_path)
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_report_command_and_errors(results, tmp_path, capsys):
    assert bench.main(["--report", str(results), "--out", str(tmp_path / "r")]) == 0
    assert "fastema speed-up" in capsys.readouterr().out
    assert bench.main(["--report", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
