"""`--help` of every command line (training, evaluation, VQA evaluation, conversion, segmentation, the installed
`selfie-*` scripts and every `processing/check_*.py` script) answers without importing torch (the package is imported
without registering the Auto classes there, and loads them on first use). Run as a user runs them, in a fresh
interpreter; `-X importtime` lists every module the command imported."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK_SCRIPTS = sorted(str(path.relative_to(REPO)) for path in (REPO / "processing").glob("check_*.py"))
MODULES = ("training", "evaluate", "evaluate_vqa", "convert")
COMMANDS = [*(["-m", f"modeling_selfie.{module}"] for module in MODULES), ["-m", "selfie_segment"],
            *([script] for script in CHECK_SCRIPTS)]
# each installed script (setup.py's console_scripts) and an option its help names
SCRIPTS = {"selfie-train": "--recipe", "selfie-evaluate": "--protocol", "selfie-convert": "--base-tokenizer",
           "selfie-segment": "--batch"}


def imported_modules(command: list[str]) -> tuple[str, set[str]]:
    """The help text `python COMMAND --help` prints and the top-level modules it imported."""
    run = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in run.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return run.stdout, modules


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(command) for command in COMMANDS])
def test_help_answers_without_torch(command):
    text, modules = imported_modules(command)
    assert "--" in text and ("usage" in text or "Example" in text)
    assert "modeling_selfie" in modules and not modules & {"torch", "transformers", "peft"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_installed_script_help_answers_without_torch(name):
    script = shutil.which(name, path=str(Path(sys.executable).parent))
    assert script is not None, f"{name} is not installed next to this Python (pip install -e .)"
    text, modules = imported_modules([script])
    assert SCRIPTS[name] in text and not modules & {"torch", "transformers", "peft"}


def test_importing_the_package_elsewhere_still_registers_the_auto_classes():
    code = ("import sys, modeling_selfie\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "print('selfie' in CONFIG_MAPPING)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.stdout.strip() == "True", run.stderr[-2000:]
