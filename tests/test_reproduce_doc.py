"""docs/reproduce.md names only commands and flags that exist, and they run: every command of its shell blocks is
asked for `--help` (run in this process, as `python -m` / `python FILE` would run it), each flag the page gives it
must be in that help, and every command whose inputs a test can write (a release folder written by hand, tiny
RefCOCO / gRefCOCO / ReasonSeg / VQAv2 files) runs as written, in a fresh process, on the folder the page's own
`convert` command writes."""

import json
import os
import re
import runpy
import shlex
import subprocess
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


# ----------------------------------------------------------------------------------------------------------------
# The page's commands, run as written where this test has their inputs
# ----------------------------------------------------------------------------------------------------------------

WRITTEN_DATASETS = {"refcoco", "grefcoco", "reasonseg"}  # what `workspace` writes under DATA
CHECKS = {"processing/check_refer.py": "refcoco", "processing/check_grefcoco.py": "grefcoco",
          "processing/check_reasonseg.py": "reasonseg"}  # fmt: skip
PATH_OPTIONS = ("--input", "--model", "--base-tokenizer", "--data", "--data-root", "--root")


def documented_lines() -> list[list[str]]:
    """Every `python ...` command of the page's shell blocks as words, in page order, a `for x in ...; do` loop
    expanded."""
    lines, loop = [], None
    for block in re.findall(r"```bash\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if match := re.fullmatch(r"for (\w+) in (.*); do", line):
                loop = (match[1], match[2].split())
                continue
            if line == "done":
                loop = None
                continue
            words = shlex.split(line)
            if not words or words[0] != "python":
                continue
            for value in loop[1] if loop else [None]:
                lines.append([word.replace(f"${loop[0]}", value) if loop else word for word in words])
    return lines


def option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def runnable(words: list[str], folder: Path) -> bool:
    """Whether `folder` holds what the command reads: its path arguments exist, and the data it names is written."""
    if any(option(words, name) is not None and not (folder / option(words, name)).exists() for name in PATH_OPTIONS):
        return False
    if words[1] == "-m" and words[2] == "modeling_selfie.evaluate":
        return option(words, "--dataset") in WRITTEN_DATASETS
    if words[1] == "-m":
        return words[2] in ("modeling_selfie.convert", "modeling_selfie.evaluate_vqa")
    return words[1] in CHECKS


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder named as the page names things: `SELF1E-2B` (a release folder written by hand), `InternVL3-2B` (its
    base, original layout), `InternVL3-2B-hf` (transformers' layout), `DATA` (RefCOCO with val / testA / testB,
    gRefCOCO, ReasonSeg val, as their loaders read them) and `vqav2_val.jsonl` (PIL images)."""
    import pickle

    import numpy as np
    from PIL import Image

    from .data_fixtures import write_grefcoco, write_reasonseg, write_refer_dataset
    from .internvl_artifacts import write_internvl3_hf_folder, write_original_internvl3_folder
    from .release_artifacts import write_release_folder

    folder = tmp_path_factory.mktemp("reproduce")
    write_release_folder(folder / "SELF1E-2B", write_original_internvl3_folder(folder / "InternVL3-2B"))
    write_internvl3_hf_folder(folder / "InternVL3-2B-hf")
    refs_file = folder / "DATA" / "refer_seg" / "refcoco" / "refs(unc).p"
    refs = write_refer_dataset(folder / "DATA" / "refer_seg")["refs"]
    extra = [{**ref, "ref_id": ref["ref_id"] + 1000 * k, "split": split} for k, split in ((1, "testA"), (2, "testB"))
             for ref in refs if ref["split"] == "val"]  # fmt: skip
    refs_file.write_bytes(pickle.dumps(refs + extra, protocol=2))
    write_grefcoco(folder / "DATA" / "refer_seg")
    write_reasonseg(folder / "DATA", "val")
    (folder / "images").mkdir()
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(folder / "images" / "a.png")
    question = {"image": "images/a.png", "question": "What is this?", "answers": ["box"] * 10}
    (folder / "vqav2_val.jsonl").write_text(json.dumps(question) + "\n")
    (folder / "processing").symlink_to(ROOT / "processing")
    return folder


def test_the_pages_commands_run_where_their_inputs_exist(workspace):
    """Each command of the page, in page order, as a user runs it from a fresh shell (the converted `selfie-2b`
    that the first command writes is the model of the others); every command whose inputs this test can write
    runs (the rest need the real data, the 8B release or a training run) and writes what the page says."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    ran = []
    for words in documented_lines():
        if not runnable(words, workspace):
            continue
        done = subprocess.run([sys.executable, *words[1:]], cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, f"{shlex.join(words)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran.append(words)
        if output := option(words, "--output"):
            written = json.loads((workspace / output).read_text()) if output.endswith(".json") else None
            assert written is None or written["count"] >= 1, shlex.join(words)
    commands = {" ".join(words[1:3]) if words[1] == "-m" else words[1] for words in ran}
    assert commands == {"-m modeling_selfie.convert", "-m modeling_selfie.evaluate", "-m modeling_selfie.evaluate_vqa",
                        *CHECKS}  # fmt: skip
    evaluated = {(option(words, "--dataset"), option(words, "--split")) for words in ran if "--dataset" in words}
    assert evaluated == {("refcoco", "val"), ("refcoco", "testA"), ("refcoco", "testB"), ("grefcoco", "val"),
                         ("reasonseg", "val")}  # fmt: skip
    assert (workspace / "selfie-2b" / "config.json").is_file()
    assert (workspace / "tab9" / "vqav2_internvl3.json").is_file()
