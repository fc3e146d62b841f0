"""`lmms-eval --model selfie` (modeling_selfie/lmms_eval_model.py) as users run it: the `lmms-eval` console script in
a fresh process, offline, on a local POPE-like task (a task YAML, its doc functions and a JSON Lines dataset with PNG
images written here) and a tiny random InternVL3 folder written by transformers' class. The answers lmms-eval logs
equal `model.chat`'s.

Runs where lmms-eval is installed (`pip install -e ".[lmms]" && pip install --no-deps lmms-eval==0.7.3`; .ci/run
does so in its own virtualenv), skipped elsewhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("lmms_eval")

from modeling_selfie.evaluation_vqa import load_model  # noqa: E402

from .internvl_artifacts import write_internvl3_hf_folder  # noqa: E402

LMMS_EVAL = Path(sys.executable).parent / "lmms-eval"
SHORT = "\nAnswer the question using a single word or phrase."
QUESTIONS = [("Is there a dog in the image?", "yes"), ("Is there a cat in the image?", "no"), ("Is it red?", "no")]

TASK_YAML = """\
task: pope_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function doc_functions.doc_to_visual
doc_to_text: !function doc_functions.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  until: ["\\n\\n"]
  temperature: 0
  do_sample: false
process_results: !function doc_functions.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

DOC_FUNCTIONS = f"""\
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + {SHORT!r}


def process_results(doc, results):
    return {{"exact_match": float(results[0].strip().lower() == doc["answer"])}}
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A task folder (YAML + doc functions) and its data: three questions about two PNGs written by PIL."""
    root = tmp_path_factory.mktemp("lmms_task")
    rng = np.random.default_rng(0)
    images = []
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / name)
        images.append(str(root / name))
    rows = [
        {"question_id": i, "question": question, "answer": answer, "image": images[i % 2]}
        for i, (question, answer) in enumerate(QUESTIONS)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "pope_local.yaml").write_text(TASK_YAML.format(data=root / "data.jsonl"))
    (root / "tasks" / "doc_functions.py").write_text(DOC_FUNCTIONS)
    return root, rows


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("internvl3")
    write_internvl3_hf_folder(folder, layout="saved")
    return folder


def run_lmms_eval(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(root / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([str(LMMS_EVAL), *args], capture_output=True, text=True, env=env, cwd=root, timeout=600)


def test_the_selfie_plugin_is_found_through_lmms_evals_entry_points():
    from lmms_eval.models import get_model

    from modeling_selfie.lmms_eval_model import SelfieLMMS

    assert get_model("selfie") is SelfieLMMS


def test_lmms_eval_runs_selfie_offline_and_its_answers_equal_model_chat(local_task, model_folder):
    root, rows = local_task
    result = run_lmms_eval(
        root, "--model", "selfie", "--model_args", f"pretrained={model_folder},device=cpu,dtype=float32",
        "--tasks", "pope_local", "--include_path", str(root / "tasks"), "--batch_size", "1",
        "--output_path", str(root / "out"), "--log_samples",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    samples = sorted((root / "out").rglob("*_samples_pope_local.jsonl"))
    assert len(samples) == 1, f"lmms-eval wrote no samples (a failed evaluation exits 0): {result.stderr[-3000:]}"
    logged = sorted((json.loads(line) for line in samples[0].read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [sample["doc_id"] for sample in logged] == [0, 1, 2]

    model, processor = load_model(str(model_folder), "cpu", "float32", None)
    for sample, row in zip(logged, rows):
        prompt = row["question"] + SHORT
        assert sample["input"] == prompt
        with Image.open(row["image"]) as image:
            reply = model.chat(processor, image.convert("RGB"), [{"role": "user", "content": prompt}],
                               max_new_tokens=6, do_sample=False)  # fmt: skip
        answer = sample["filtered_resps"]
        answer = answer[0] if isinstance(answer, list) else answer
        assert answer == reply["text"].split("\n\n")[0]
        assert sample["exact_match"] == float(answer.strip().lower() == row["answer"])
    results = sorted((root / "out").rglob("*_results.json"))
    assert len(results) == 1
    metrics = json.loads(results[0].read_text())["results"]["pope_local"]
    assert metrics["exact_match,none"] == pytest.approx(np.mean([s["exact_match"] for s in logged]))


def test_bad_model_args_are_refused(local_task, model_folder):
    root, _ = local_task
    result = run_lmms_eval(
        root, "--model", "selfie", "--model_args", f"pretrained={model_folder},device=cpu,beams=3",
        "--tasks", "pope_local", "--include_path", str(root / "tasks"), "--output_path", str(root / "bad"),
    )  # fmt: skip
    assert "unknown --model_args for selfie: ['beams']" in result.stdout + result.stderr
    assert not list((root / "bad").rglob("*_results.json"))
