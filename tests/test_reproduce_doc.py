"""docs/reproduce.md names only commands and flags that exist: every command of its shell blocks is asked for
`--help` (run in this process, as `python -m` / `python FILE` would run it), and each flag the page gives it must be
in that help."""

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reproduce.md"
FLAG = re.compile(r"(?<!\S)(--[a-z][a-z0-9-]*)")


def documented_commands() -> dict[tuple[str, ...], set[str]]:
    """{command prefix (e.g. ("-m", "modeling_selfie.evaluate")): flags the page passes it}."""
    commands: dict[tuple[str, ...], set[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#")[0].strip().removeprefix("for split in val testA testB; do").strip())
            if len(words) < 2 or words[0] != "python":
                continue
            prefix = tuple(words[1:3]) if words[1] == "-m" else (words[1],)
            commands.setdefault(prefix, set()).update(FLAG.findall(" ".join(words)))
    return commands


COMMANDS = documented_commands()


def test_the_page_documents_the_evaluation_conversion_and_training_commands():
    modules = {prefix[1] for prefix in COMMANDS if prefix[0] == "-m"}
    assert {"modeling_selfie.convert", "modeling_selfie.evaluate", "modeling_selfie.evaluate_vqa"} <= modules
    assert "modeling_selfie.training" in modules
    assert any(prefix[0].startswith("processing/check_") for prefix in COMMANDS)


@pytest.mark.parametrize("prefix", sorted(COMMANDS), ids=" ".join)
def test_every_documented_flag_exists(prefix, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [prefix[-1], "--help"])
    with pytest.raises(SystemExit) as exit_info:
        if prefix[0] == "-m":
            runpy.run_module(prefix[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(str(ROOT / prefix[0]), run_name="__main__")
    help_text = capsys.readouterr().out
    assert exit_info.value.code in (0, None) and "usage" in help_text.lower()
    missing = sorted(flag for flag in COMMANDS[prefix] if flag not in help_text)
    assert not missing, f"{' '.join(prefix)} has no {missing}"
