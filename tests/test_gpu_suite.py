"""benchmarks/gpu_suite.py, the one command for a lent GPU: its CPU smoke mode runs every part, and a part that fails
or runs out of time is reported while the others still run."""

import copy
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import load_script

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
PARTS = ["speed", "compiled", "attention", "bf16_vs_fp32", "lora_step", "chat"]


def load_suite():
    return load_script(SUITE)


def test_smoke_run_reports_every_part(tmp_path):
    out = tmp_path / "report"
    # a larger budget than the default 100 s only so that a loaded CI machine does not time a part out
    result = subprocess.run([sys.executable, str(SUITE), str(out), "--smoke", "--budget", "400"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "gpu_suite.json").read_text())
    report = (out / "gpu_suite.md").read_text()
    assert list(data["parts"]) == PARTS
    for name, part in data["parts"].items():
        assert part["status"] == "ok", (name, part["status"], part.get("traceback"))
        assert part["rows"], name
        assert f"## {name}\n\nstatus: ok" in report
    assert data["environment"]["torch"] in report and "smoke" in data["environment"]["mode"]

    speed = data["parts"]["speed"]["rows"]
    assert {(r["mode"], r["batch"], r["tiles"]) for r in speed} == {("sdpa", 1, 1), ("sdpa", 4, 6),
                                                                      ("eager-attn", 1, 1)}
    for row in speed + data["parts"]["compiled"]["rows"]:
        assert row["ratio"] == pytest.approx(row["selfie_ms_per_image"] / row["plain_ms_per_image"], rel=0.01)
        assert row["selfie_images_per_s"] == pytest.approx(1000 / row["selfie_ms_per_image"], rel=0.01)
        assert row["plain_peak_gib"] is None  # no GPU memory figures on a CPU
    compiled = data["parts"]["compiled"]["rows"][0]
    assert compiled["mode"] == "compiled" and "selfie_graph_breaks" in compiled
    attention = data["parts"]["attention"]["rows"][0]
    assert attention["max_abs_logit_diff"] < 1e-3  # flex and sdpa compute the same masks
    for row in data["parts"]["bf16_vs_fp32"]["rows"]:
        assert 0 < row["max_rel_err"] < 0.25 and 0.5 < row["iou"] <= 1  # bf16 rounding, not a different model
    lora = data["parts"]["lora_step"]["rows"][0]
    assert lora["batch"] == 5 and lora["s_per_step"] > 0 and math.isfinite(lora["loss"])
    chat = {row["answer"].split(" (")[0]: row for row in data["parts"]["chat"]["rows"]}
    assert chat["with [SEG]"]["text"] == "sure , [SEG] ." and chat["with [SEG]"]["masks"] == [1, 480, 640]
    assert chat["without [SEG]"]["masks"] == [0, 480, 640]


def test_a_failing_or_slow_part_is_reported_and_the_next_part_runs(tmp_path):
    gpu_suite = load_suite()
    suite = gpu_suite.Suite(tmp_path, copy.deepcopy(gpu_suite.SMOKE), {"mode": "test"})

    def broken(rows, notes):
        rows.append({"case": "before the error"})
        raise RuntimeError("out of memory, say")

    def slow(rows, notes):
        rows.append({"case": "before the timeout"})
        time.sleep(30)

    suite.run_part("speed", broken)
    suite.run_part("compiled", slow, cap_s=1, min_seconds=0)
    suite.run_part("attention", lambda rows, notes: rows.append({"case": "ran"}))
    suite.run_part("chat", lambda rows, notes: None, cap_s=1)  # under min_seconds: not started

    parts = json.loads((tmp_path / "gpu_suite.json").read_text())["parts"]
    assert parts["speed"]["status"] == "failed: RuntimeError: out of memory, say"
    assert parts["speed"]["rows"] == [{"case": "before the error"}]
    assert parts["compiled"]["status"].startswith("timed out") and parts["compiled"]["seconds"] < 10
    assert parts["compiled"]["rows"] == [{"case": "before the timeout"}]
    assert parts["attention"]["status"] == "ok" and parts["attention"]["rows"] == [{"case": "ran"}]
    assert parts["chat"]["status"].startswith("skipped")
    report = (tmp_path / "gpu_suite.md").read_text()
    assert "RuntimeError: out of memory, say" in report and "before the timeout" in report


def test_without_a_gpu_the_gpu_mode_refuses_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SUITE), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no CUDA device") and len(result.stderr.strip().splitlines()) == 1
