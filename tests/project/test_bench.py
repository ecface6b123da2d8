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


@pytest.mark.slow
def test_scale_bench_measures_every_configuration_in_its_own_process(tmp_path):
    """bench/scale.py on its tiny size: it writes the checkpoint, runs each configuration under /usr/bin/time,
    and peftc's first QLoRA loss equals HF PEFT + bitsandbytes' on the same checkpoint."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--sizes", "tiny", "--export", "tiny",
                           "--work", str(tmp_path / "work"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((tmp_path / "scale.json").read_text())["tiny"]
    for name in ("peftc compile lora", "peftc compile qlora", "peftc step lora", "hf step lora", "peftc step qlora",
                 "hf step qlora", "peftc export lora"):
        assert row[name]["rc"] == 0 and row[name]["peak_bytes"] > 0, (name, row[name])
    # NF4 bit-identical to bitsandbytes and the LoRA B at zero: the first loss is the quantized base's
    assert abs(row["peftc step qlora"]["loss"] - row["hf step qlora"]["loss"]) < 5e-4 * row["hf step qlora"]["loss"]
    assert "| tiny |" in (tmp_path / "SCALE.md").read_text()
    assert (tmp_path / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
