"""The README's two TRL scripts (SFT, then GRPO on its result) run as written, on a tiny model saved to a folder:
only the placeholders (`DIR`, `image`, `mask`) are filled in, and the configs are told to run one step on the CPU."""

import re
import subprocess
import sys
from pathlib import Path

from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS

REPO = Path(__file__).resolve().parent.parent
CPU = 'use_cpu=True, bf16=False, report_to="none", max_steps=1'


def readme_scripts() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Fine-tune with TRL", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_trl_scripts_run(tmp_path):
    scripts = readme_scripts()
    assert len(scripts) == 2
    folder = tmp_path / "tiny"
    model, processor = tiny_model_and_processor([*WORDS, "triangle", "Which", "has", "three", "corners"], seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    preamble = (
        "import numpy as np, torch\nfrom PIL import Image\ntorch.set_num_threads(1)\n"
        "image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8))\n"
        "mask = np.pad(np.ones((20, 20), np.uint8), 18).tolist()\n"
    )
    code = "\n".join(scripts).replace('"DIR"', repr(str(folder)))
    for config, with_cpu in (('SFTConfig("runs/sft")', f'SFTConfig("runs/sft", {CPU})'),
                             ('SelfieGRPOConfig("runs/grpo", ', f'SelfieGRPOConfig("runs/grpo", {CPU}, ')):
        assert config in code
        code = code.replace(config, with_cpu)
    run = subprocess.run([sys.executable, "-c", preamble + code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "runs" / "grpo").is_dir()
