"""The speed benchmark's --quick mode runs end to end, so that the script cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_speed_quick_writes_results(tmp_path):
    out = tmp_path / "quick.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--quick", "--device", "cpu", "--threads", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("machine", "model", "dtype", "settings", "load", "prefill", "decode", "bandwidth",
                "ratios", "goals", "transformers_attn_implementation"):
        assert key in r, key
    assert {"cpu_model", "cpu_cores", "torch", "transformers"} <= set(r["machine"])
    for which in ("ours", "transformers"):
        assert r["load"][which]["seconds"] > 0
        assert r["prefill"][which]["tokens_per_s"] > 0
    for variant in ("transformers", "matmuls_only", "bare", "ours_off", "ours_light", "ours_full"):
        v = r["decode"][variant]
        assert v["tokens_per_s"] > 0 and v["ms_per_token"] > 0
        assert len(v["tokens_per_s_all"]) == r["settings"]["repeats"]
    # Same weights, greedy: every variant of ours makes the same tokens.
    assert r["decode"]["greedy_tokens_agree_with_transformers"]["ours_variants_identical"]
    assert r["bandwidth"]["ceiling_GBps"] > 0
    assert "| decode variant |" in proc.stdout


def test_trace_cost_small_run_writes_results(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.trace_cost", "--tokens", "4", "--repeats", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for timing in (r, r["lockstep"]):  # per run, and the runs advancing in lockstep
        assert set(timing["median_tokens_per_s"]) == {"bare", "bare_again", "off", "light", "full"}
        for key in ("bare_again/bare", "off/bare", "light/off", "full/off"):
            assert timing["ratios"][key] > 0 and len(timing["per_round_ratios"][key]) == 2
    sizes = r["trace_bytes_on_disk"]
    assert 0 < sizes["light"] < sizes["full"]
    assert len(r["goals"]) == 2 and all(isinstance(v, bool) for v in r["goals"].values())


def test_benchmarks_readme_quotes_the_committed_results():
    """The results section is rendered from benchmarks/results/*.json (python -m benchmarks.report --write)."""
    from benchmarks import report

    assert report.README.read_text() == report.updated_readme(), "run: python -m benchmarks.report --write"
