"""Sharing and talking: remote-code checkpoints, push_to_hub with a card, chat, presence scores, the pipeline."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList, pipeline

from modeling_selfie.hub import model_card, push_to_hub
from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS, random_image

WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys, json, torch, numpy as np
    from PIL import Image

    class Block:  # the package must not be importable: everything comes from the checkpoint folder
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_selfie":
                raise ImportError("modeling_selfie is blocked in this process")
    sys.meta_path.insert(0, Block())
    """
)
REMOTE_CHECK = WITHOUT_PACKAGE + textwrap.dedent(
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    folder = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(sys.argv[2]).convert("RGB")
    inputs = processor(images=[image], queries=["red circle"])
    with torch.no_grad():
        logits = model(**inputs).pred_masks[0]
    print(json.dumps({"module": type(model).__module__, "logits": logits.flatten().tolist()}))
    """
)


def test_saved_checkpoint_loads_as_remote_code_without_the_package(tmp_path):
    model, processor = tiny_model_and_processor(WORDS)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_selfie.SelfieForSegmentation"
    assert {"modeling_selfie.py", "configuration_selfie.py", "processing_selfie.py"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()
    }
    assert_remote_code_segments_as(model, processor, tmp_path / "ckpt", tmp_path)


def assert_remote_code_segments_as(model, processor, folder, workdir):
    """Load `folder` with `trust_remote_code` in a fresh process that cannot import this package: the classes come
    from the folder, and the mask logits of one query equal `model`'s."""
    image = random_image(80, 64)
    image.save(workdir / "image.png")
    script = workdir / "check.py"
    script.write_text(REMOTE_CHECK)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(workdir / "image.png")],
        capture_output=True, text=True, cwd=workdir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.")
    inputs = processor(images=[image], queries=["red circle"])
    with torch.no_grad():
        ours = model(**inputs).pred_masks[0].flatten()
    torch.testing.assert_close(torch.tensor(remote["logits"]), ours, atol=1e-5, rtol=1e-5)


def test_push_to_hub_uploads_a_loadable_folder_with_a_card(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    model, processor = tiny_model_and_processor(WORDS)
    uploaded = {}

    def fake_create_repo(self, repo_id, **kwargs):
        uploaded["repo"] = repo_id

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        import shutil

        shutil.copytree(folder_path, tmp_path / "uploaded")
        return f"https://hub.invalid/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    evaluation = {"dataset": "refshapes", "split": "test", "metrics": {"cIoU": 0.91, "gIoU": 0.88, "count": 5}}
    card = model_card("team/selfie-tiny", base_model="OpenGVLab/InternVL3-2B", datasets=["refshapes"],
                      evaluation=evaluation, training="Trained on RefShapes.")
    url = push_to_hub(model, processor, "team/selfie-tiny", card=card)

    assert uploaded["repo"] == "team/selfie-tiny" and url.endswith("/commit/0")
    readme = (tmp_path / "uploaded" / "README.md").read_text()
    assert "library_name: transformers" in readme and "pipeline_tag: image-segmentation" in readme
    assert "base_model: OpenGVLab/InternVL3-2B" in readme and "- cIoU" in readme and "| refshapes/test | 0.9100" in readme
    assert "model.segment(processor" in readme
    from transformers import AutoModelForImageTextToText, AutoProcessor

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "uploaded")
    loaded_processor = AutoProcessor.from_pretrained(tmp_path / "uploaded")
    image = random_image(80, 64)
    assert torch.equal(loaded.segment(loaded_processor, image, "red circle")[0],
                       model.segment(processor, image, "red circle")[0])


def test_the_cards_usage_code_reads_a_16_bit_image_as_it_is_shown(tmp_path):
    """The card's snippet, run as written (remote code, `image.png` in the working folder), hands the processor a
    16-bit grayscale PNG as it is shown: the same pixels as the 8-bit picture of it, not clipped to white."""
    import re

    from PIL import Image

    model, processor = tiny_model_and_processor(WORDS)
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    gray16 = np.linspace(0, 65535, 40 * 56).reshape(40, 56).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "image.png")  # mode I;16, written by Pillow
    shown = Image.fromarray(np.round(gray16 / 257).astype(np.uint8)).convert("RGB")
    (snippet,) = re.findall(r"```python\n(.*?)```", str(model_card(str(tmp_path / "ckpt"))), flags=re.S)
    report = 'print(json.dumps({"shape": list(mask.shape), "pixels": processor(images=[image], queries=["x"])' \
             '["pixel_values"].flatten().tolist()}))\n'
    (tmp_path / "card.py").write_text(WITHOUT_PACKAGE + snippet + report)
    result = subprocess.run([sys.executable, "card.py"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["shape"] == [40, 56]
    expected = processor(images=[shown], queries=["x"])["pixel_values"].flatten()
    torch.testing.assert_close(torch.tensor(remote["pixels"]), expected)


class ForceAnswer(LogitsProcessor):
    """Makes greedy decoding write the given token ids, then repeat the last one."""

    def __init__(self, prompt_length, answer_ids):
        self.prompt_length, self.answer_ids = prompt_length, answer_ids

    def __call__(self, input_ids, scores):
        step = min(input_ids.shape[1] - self.prompt_length, len(self.answer_ids) - 1)
        forced = torch.full_like(scores, -1e9)
        forced[:, self.answer_ids[step]] = 0
        return forced


def test_chat_generates_then_segments_each_seg_it_wrote():
    model, processor = tiny_model_and_processor(WORDS)
    image = random_image(80, 64)
    tokenizer = processor.tokenizer
    answer = tokenizer("Sure , [SEG] the [SEG] .<|im_end|>", add_special_tokens=False)["input_ids"]
    history = [
        {"role": "user", "content": "describe the shape"},
        {"role": "assistant", "content": "It is [SEG] ."},
        {"role": "user", "content": "segment the red circle and the blue square"},
    ]
    prompt = processor(images=[image], text=[processor.render_conversation(history, add_generation_prompt=True)])
    force = ForceAnswer(prompt["input_ids"].shape[1], answer)

    reply = model.chat(processor, image, history, max_new_tokens=10, logits_processor=LogitsProcessorList([force]))

    assert reply["text"].split() == ["Sure", ",", "[SEG]", "the", "[SEG]", "."]
    assert reply["masks"].shape == (2, 64, 80) and reply["masks"].dtype == torch.bool  # the history [SEG] is not returned
    assert reply["scores"].shape == (2,)
    # the masks are those of the teacher-forced forward over prompt + answer
    conversation = [*history, {"role": "assistant", "content": "Sure , [SEG] the [SEG] ."}]
    inputs = processor(images=[image], conversations=[conversation])
    with torch.no_grad():
        logits = model(**inputs).pred_masks[0][-2:]
    expected = processor.post_process_masks([logits], [(64, 80)])[0]
    assert torch.equal(reply["masks"], expected)

    words = tokenizer("hello .<|im_end|>", add_special_tokens=False)["input_ids"]
    prompt = processor(images=[image], text=[processor.render_conversation(history[:1], add_generation_prompt=True)])
    force = ForceAnswer(prompt["input_ids"].shape[1], words)
    plain = model.chat(processor, image, history[:1], max_new_tokens=5, logits_processor=LogitsProcessorList([force]))
    assert plain["text"].split() == ["hello", "."] and plain["masks"].shape == (0, 64, 80)


def test_presence_scores_empty_the_masks_of_absent_objects(tiny):
    model, processor = tiny
    inputs = processor(images=[random_image(80, 64)] * 2, queries=["red circle", "blue square"])
    with torch.no_grad():
        out = model(**inputs)
    for masks, presence in zip(out.pred_masks, out.presence_logits):
        assert presence.shape == (1,) and torch.equal(presence, masks.flatten(1).amax(1))
    _, scores = processor.post_process_masks(out.pred_masks, [(64, 80)] * 2, presence_logits=out.presence_logits,
                                             return_scores=True)  # capped again at the image's size
    scores = torch.cat(scores)
    assert (scores <= torch.cat(out.presence_logits).double().sigmoid()).all()
    cut = float(scores.min() + scores.max()) / 2  # keeps one, drops the other
    masks, cut_scores = processor.post_process_masks(out.pred_masks, [(64, 80)] * 2,
                                                     presence_logits=out.presence_logits, presence_threshold=cut,
                                                     return_scores=True)
    kept = [bool(m.any()) for m in masks]
    assert kept == [bool(s >= cut) for s in scores] and sorted(kept) == [False, True]
    assert torch.equal(torch.cat(cut_scores), scores)


def test_referring_segmentation_pipeline_from_a_folder(tmp_path):
    model, processor = tiny_model_and_processor(WORDS)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = random_image(80, 64)
    segmenter = pipeline("referring-segmentation", model=str(tmp_path))
    results = segmenter(image, text=["red circle", "blue square"])
    assert [r["label"] for r in results] == ["red circle", "blue square"]
    expected = model.segment(processor, [image, image], ["red circle", "blue square"])
    for result, mask in zip(results, expected):
        assert result["mask"].size == (80, 64) and 0 <= result["score"] <= 1
        assert (torch.from_numpy(np.array(result["mask"])) > 0).equal(mask)


def test_trainer_push_to_hub_uploads_the_merged_model(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    from transformers import TrainingArguments

    from modeling_selfie import SelfieForSegmentation
    from modeling_selfie.training import SelfieTrainer, apply_lora

    def fake_create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def fake_upload_folder(self, repo_id, folder_path, **kwargs):
        import shutil

        shutil.copytree(folder_path, tmp_path / "uploaded")
        return f"https://hub.invalid/{repo_id}/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    model, processor = tiny_model_and_processor(WORDS)
    peft_model = apply_lora(model, rank=4)
    image = random_image(80, 64)
    sample = {"image": image, "conversation": processor.segmentation_conversation("red circle"),
              "masks": np.ones((1, 64, 80), np.uint8), "task": "referring", "source": "test"}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", remove_unused_columns=False,
                             use_cpu=True, push_to_hub=True, hub_model_id="team/selfie-lora", disable_tqdm=True)
    trainer = SelfieTrainer(model=peft_model, args=args, train_dataset=[sample] * 4, processing_class=processor)
    trainer.train()
    peft_model.eval()  # LoRA dropout off
    with torch.no_grad():
        expected = peft_model(**processor(images=[image], queries=["red circle"])).pred_masks[0]

    url = trainer.push_to_hub()

    assert url.endswith("/commit/1")
    files = {p.name for p in (tmp_path / "uploaded").iterdir()}
    assert "adapter_config.json" not in files and {"model.safetensors", "README.md", "modeling_selfie.py"} <= files
    loaded = SelfieForSegmentation.from_pretrained(tmp_path / "uploaded")
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    with torch.no_grad():
        got = loaded(**processor(images=[image], queries=["red circle"])).pred_masks[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert any("lora" in name for name, _ in trainer.model.named_parameters())  # the trained model is untouched
