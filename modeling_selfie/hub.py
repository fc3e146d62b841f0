"""Sharing checkpoints on the Hub: a generated model card and one call that uploads model + processor + card."""

import json
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, get_token

CARD_TEMPLATE = """---
{card_data}
---

# {model_name}

A SELFIE (SELF1E) model: an InternVL3 MLLM that segments images from language with a single `[SEG]` token and
no mask decoder (*Rethinking MLLM Itself as a Segmenter with a Single Segmentation Token*, CVPR 2026).

## Usage

```python
import torch
from transformers import AutoModel, AutoProcessor
from PIL import Image

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)  # a SelfieForSegmentation
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
image = Image.open("image.png")  # any mode: the processor applies EXIF orientation and scales 16-bit images
mask = model.segment(processor, image, "the red circle")[0]  # bool [height, width]
```

With the `modeling-selfie` package installed, `import modeling_selfie` registers the classes and
`trust_remote_code` is not needed.

## Training

{training}

## Evaluation

{evaluation}
"""


def read_metrics(evaluation: dict | str | Path | None) -> dict:
    """Evaluation results as `{"dataset/split": {metric: value}}` from the JSON `modeling_selfie.evaluate` writes
    (or a list of them, or such a dict)."""
    if evaluation is None:
        return {}
    if isinstance(evaluation, (str, Path)):
        evaluation = json.loads(Path(evaluation).read_text())
    runs = evaluation if isinstance(evaluation, list) else [evaluation]
    return {
        f"{run['dataset']}/{run.get('split', 'val')}": {k: v for k, v in run["metrics"].items() if isinstance(v, float)}
        for run in runs
    }


def model_card(
    repo_id: str,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    evaluation: dict | str | Path | list | None = None,
    training: str = "Not documented.",
    license: str = "other",
) -> ModelCard:
    """A model card with YAML metadata (library, pipeline tag, base model, license, datasets, metrics), a usage
    snippet, how the model was trained and its evaluation results."""
    metrics = read_metrics(evaluation)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        base_model=base_model,
        license=license,
        datasets=datasets,
        metrics=sorted({name for values in metrics.values() for name in values}) or None,
        tags=["selfie", "self1e", "referring-segmentation", "internvl", "custom_code"],
    )
    rows = ["| dataset / split | " + " | ".join(sorted({n for v in metrics.values() for n in v})) + " |"]
    if metrics:
        names = sorted({n for v in metrics.values() for n in v})
        rows.append("|---" * (len(names) + 1) + "|")
        for key, values in sorted(metrics.items()):
            rows.append(f"| {key} | " + " | ".join(f"{values[n]:.4f}" if n in values else "" for n in names) + " |")
    evaluation_text = "\n".join(rows) if metrics else "Not evaluated yet."
    return ModelCard(
        CARD_TEMPLATE.format(
            card_data=data.to_yaml(),
            model_name=repo_id.split("/")[-1],
            repo_id=repo_id,
            training=training,
            evaluation=evaluation_text,
        )
    )


def check_push_access(token: str | None = None) -> str:
    """The Hub user a push would go out as; a one-line `ValueError` when it cannot go out: offline mode
    (`HF_HUB_OFFLINE`), no token (`token`, else the saved login or `HF_TOKEN`), or one the Hub does not accept or
    cannot be reached to check."""
    if constants.is_offline_mode():
        raise ValueError("--push-to-hub needs the network, but offline mode is on (HF_HUB_OFFLINE).")
    token = token or get_token()
    if not token:
        raise ValueError(
            "--push-to-hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN or give --hub-token."
        )
    try:
        return HfApi(token=token).whoami()["name"]
    except Exception as error:  # HTTP, connection and timeout errors alike: the push would fail the same way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--push-to-hub: the Hub did not accept the token or could not be reached ({reason})."
        ) from None


def push_to_hub(
    model,
    processor,
    repo_id: str,
    card: ModelCard | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload SELFIE model",
) -> str:
    """Upload model (with its remote-code files), processor and model card to `repo_id` in one commit.

    Returns the commit URL. The folder is assembled locally first, so nothing is uploaded half-written.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (card or model_card(repo_id)).save(Path(folder) / "README.md")
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(commit)


__all__ = ["check_push_access", "model_card", "push_to_hub", "read_metrics"]
