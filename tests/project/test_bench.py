"""The benchmark harness runs from its documented command and writes its three outputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_writes_results_table_json_and_chart(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--models", "tiny-llama", "--repeats", "2",
                           "--groups", "compile,infer", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "RESULTS.md").read_text()
    assert "## tiny-llama" in table and "| compile: cached second compile / first |" in table
    assert "inference (torch, 1×128): merged vs base" in table
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {row["what"]: row for row in data["rows"]}
    cached = rows["compile: cached second compile / first"]
    assert cached["goal"] == "≤ 0.2" and isinstance(cached["met"], bool)
    times = data["raw"]["tiny-llama"]["compile"]["times"]
    assert len(times["cold"]["samples"]) == 2 and times["cold"]["min"] <= times["cold"]["median"] <= times["cold"]["max"]
    assert abs(cached["ratio"] - times["cached"]["median"] / times["cold"]["median"]) < 1e-12
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
