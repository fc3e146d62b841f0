"""`benchmarks/memory.py` end to end at `selfie-tiny` size: it writes the checkpoint, runs each mode in a subprocess of
its own and prints one table row per mode (the numbers are the benchmark's business; this checks what must hold)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory.py"


def test_memory_benchmark_reports_every_mode_against_fp32(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "selfie-tiny", "--modes", "fp32", "offload", "--threads", "1",
         "--device", "cpu", "--folder", str(tmp_path / "tiny")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in run.stdout.splitlines() if " | " in line}
    header = rows["mode"]
    column = {name: header.index(name) for name in ("vs fp32", "IoU (logit > 0)", "seg_head", "placement")}
    assert rows["fp32"][column["vs fp32"]] == "1.00x" and rows["fp32"][column["IoU (logit > 0)"]] == "1.0000"
    assert rows["offload"][column["IoU (logit > 0)"]] == "1.0000"  # offloading changes where weights wait, not values
    assert "disk" in rows["offload"][column["placement"]]
    assert all(rows[mode][column["seg_head"]] == "Tensor/torch.float32" for mode in ("fp32", "offload"))
    assert (tmp_path / "tiny" / "config.json").is_file()  # written once, kept for the next run
