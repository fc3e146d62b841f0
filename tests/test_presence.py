"""Prompts reach the model as it was trained, unknown words are named, and presence scores separate right from wrong
queries (issue 21.1-2)."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modeling_selfie.cli import default_model_dir, load_model
from modeling_selfie.data.refshapes import UNKNOWN_WORDS, presence_probes, vocabulary
from modeling_selfie.modeling_selfie import UNKNOWN_TOKEN_PRESENCE_PENALTY, largest_part_share, mask_quality
from modeling_selfie.presets import tiny_model_and_processor
from modeling_selfie.processing_selfie import UnknownWordsWarning, normalize_query, post_process_masks
from selfie_segment import main

from .helpers import ROOT, WORDS, load_script, random_image


@pytest.fixture(scope="module")
def demo():
    return load_model()


def scene(background, shapes) -> Image.Image:
    """A scene drawn with PIL: `shapes` of `(form, fill, (x0, y0, x1, y1))`, form "circle", "square" or
    "triangle"."""
    image = Image.new("RGB", (192, 128), background)
    draw = ImageDraw.Draw(image)
    for form, fill, (x0, y0, x1, y1) in shapes:
        if form == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif form == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


RED, BLUE, GREEN, YELLOW = (220, 30, 30), (30, 70, 220), (30, 160, 60), (240, 205, 30)
# Each scene: its shapes, a query whose target is there, queries whose target is not: a form the scene's colour
# lacks ("yellow star" beside a yellow circle, the example) or a colour the scene lacks. (A pair that mixes a
# present colour with a present form, "red square" beside a red circle and a blue square, is not separated.)
SCENES = [
    ([("circle", RED, (20, 30, 80, 90)), ("square", BLUE, (110, 40, 165, 95))], "red circle",
     ["red star", "yellow star", "green circle"]),
    ([("circle", YELLOW, (100, 20, 170, 90)), ("triangle", GREEN, (15, 40, 80, 105))], "yellow circle",
     ["yellow star", "red circle", "red square"]),
    ([("square", GREEN, (30, 30, 85, 85)), ("circle", BLUE, (115, 35, 170, 90))], "green square",
     ["green star", "purple circle", "red square"]),
]


@pytest.mark.parametrize("shapes, right, absent", SCENES)
def test_presence_ranks_the_right_query_above_absent_targets_on_drawn_scenes(demo, shapes, right, absent):
    model, processor = demo
    image = scene((245, 242, 235), shapes)
    masks, scores = model.segment(processor, image, [right, *absent], return_scores=True)
    assert all(scores[0] > score for score in scores[1:]), dict(zip([right, *absent], scores))
    for mask, score in zip(masks, scores):  # the mask is empty exactly when the score is below the threshold
        assert bool(mask.any()) == (score >= 0.5)


@pytest.mark.parametrize("written", ["Red Circle", "RED CIRCLE!", "red-circle", "  red \t circle. "])
def test_capitalised_and_punctuated_prompts_reach_the_model_as_trained(demo, written):
    model, processor = demo
    image = scene((250, 250, 250), SCENES[0][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        (mask, ours), (plain, theirs) = zip(*model.segment(processor, [image] * 2, [written, "red circle"],
                                                           return_scores=True))
    assert torch.equal(mask, plain) and ours == pytest.approx(theirs)


def test_the_shipped_processor_saves_its_normalisation(tmp_path):
    saved = json.loads((default_model_dir() / "processor_config.json").read_text())
    assert saved["query_normalization"] == "words" and saved["prompt_style"] == "internvl"
    model, processor = tiny_model_and_processor(WORDS)
    processor.query_normalization = "words"
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["query_normalization"] == "words"


@pytest.mark.parametrize("text, kind, expected", [
    ("Red-Circle!", "phrase", "red circle"),
    ("  LEFTMOST   blue_square ", "phrase", "leftmost blue square"),
    ("ＲＥＤ circle", "phrase", "red circle"),
    ("which SHAPE has three corners", "instruction", "Which shape has three corners?"),
    ("Describe the image.", "instruction", "Describe the image."),
])
def test_normalize_query_writes_plain_words(text, kind, expected):
    assert normalize_query(text, kind, "words") == expected
    assert normalize_query(text, kind, None) == text


def test_a_query_without_words_is_refused():
    with pytest.raises(ValueError, match="holds no word"):
        normalize_query("?!", "phrase", "words")


@pytest.mark.parametrize("query, unknown", [("the cat", "'cat'"), ("красный круг", "'красный', 'круг'"),
                                            ("smaller red circle", "'smaller'")])
def test_unknown_words_are_named_and_score_low(demo, query, unknown):
    model, processor = demo
    image = scene((245, 242, 235), SCENES[0][0])
    with pytest.warns(UnknownWordsWarning, match=unknown):
        (mask,), (score,) = model.segment(processor, image, query, return_scores=True)
    assert score < 0.5 and not mask.any()


def test_known_words_raise_no_warning(demo):
    model, processor = demo
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        model.segment(processor, scene((250, 250, 250), SCENES[0][0]), ["red circle", "leftmost shape"])


def test_cli_names_unknown_words_in_one_warning_line(tmp_path, capsys):
    image = tmp_path / "drawn.png"
    scene((245, 242, 235), SCENES[0][0]).save(image)
    code = main([str(image), "the cat", "red circle", "--no-images", "--json", str(tmp_path / "out.json"),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0
    assert [line for line in err.splitlines() if line.strip()] == [line for line in err.splitlines()
                                                                  if line.startswith("warning: ")]
    assert err.count("warning: ") == 1 and "'cat'" in err
    records = json.loads((tmp_path / "out.json").read_text())
    assert records[0]["presence_score"] < 0.5 <= records[1]["presence_score"]


def test_every_unknown_token_lowers_the_presence_logit_by_the_penalty():
    model, processor = tiny_model_and_processor(WORDS)
    model.config.unk_token_id = processor.tokenizer.unk_token_id
    inputs = processor(images=[random_image(64, 64)] * 2, queries=["red circle", "zebra red giraffe circle"])
    with torch.no_grad():
        out = model(**inputs)
    unknown = [0, 2]
    for masks, presence, count in zip(out.pred_masks, out.presence_logits, unknown):
        expected = masks.flatten(1).amax(1) - UNKNOWN_TOKEN_PRESENCE_PENALTY * count
        assert torch.allclose(presence, expected)


def test_a_presence_head_never_scores_above_the_mask(tmp_path):
    model, processor = tiny_model_and_processor(WORDS)
    model.config.presence_head = True
    model.save_pretrained(tmp_path)  # the head is not in this checkpoint: loading it initialises the head
    loaded = type(model).from_pretrained(tmp_path)
    with torch.no_grad():
        loaded.seg_head.presence.bias.fill_(100.0)  # the head alone would say "present" for everything
        inputs = processor(images=[random_image(64, 48)], queries=["red circle"])
        out = loaded(**inputs)
        assert torch.equal(out.presence_logits[0], out.pred_masks[0].flatten(1).amax(1))
        loaded.seg_head.presence.bias.fill_(-100.0)
        assert (loaded(**inputs).presence_logits[0] < -50).all()


def test_presence_probes_pair_every_absent_query_with_a_right_one():
    probes = presence_probes("test", 12, 3)
    kinds = [probe.kind for probe in probes]
    assert kinds.count("right") == kinds.count("absent") > 0 and kinds.count("unknown") == 12
    for probe in probes:  # only the unknown-word probes hold a word outside RefShapes' vocabulary
        words = set(probe.text.rstrip("?").split())
        assert (probe.kind == "unknown") == bool(words & set(UNKNOWN_WORDS)) == (not words <= set(vocabulary()))
    assert [p.text for p in presence_probes("test", 12, 3)] == [p.text for p in probes]
    corners = [np.asarray(p.image)[0, 0] for p in presence_probes("test", 12, 3, backgrounds="all", tiny_shapes=True)]
    assert min(int(corner.min()) for corner in corners) < 120  # scenes on other than pale backgrounds (grey 185+)


def fit_on_a_copy_of_the_shipped_model(script, tmp_path, *argv) -> Path:
    """Run a head-fitting script's `main` on a copy of the shipped model (it sets torch's threads: restored)."""
    folder = tmp_path / "model"
    shutil.copytree(default_model_dir(), folder)
    threads = torch.get_num_threads()
    try:
        script.main(["--model", str(folder), *argv])
    finally:
        torch.set_num_threads(threads)
    return folder


def test_fit_presence_head_writes_the_head_and_prints_both_aurocs(tmp_path, capsys):
    script = load_script(ROOT / "examples" / "fit_presence_head.py")
    folder = fit_on_a_copy_of_the_shipped_model(script, tmp_path, "--fit-size", "6", "--eval-size", "4")
    out = capsys.readouterr().out
    assert "AUROC presence score" in out and "max-pixel score" in out
    config = json.loads((folder / "config.json").read_text())
    assert config["presence_head"] is True and config["unk_token_id"] == 1
    for name in ("README.md", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (default_model_dir() / name).read_bytes()
    assert not list(folder.glob("*.py"))


def test_the_pipeline_names_unknown_words_and_scores_them_low():
    from transformers import pipeline

    segmenter = pipeline("referring-segmentation", model=str(default_model_dir()))
    image = scene((245, 242, 235), SCENES[0][0])
    with pytest.warns(UnknownWordsWarning, match="'cat'"):
        results = segmenter(image, text=["the cat", "Red Circle"])
    assert results[0]["score"] < 0.5 <= results[1]["score"] and results[1]["label"] == "Red Circle"


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 5), (16, 16), (300, 200)])
def test_post_processing_keeps_presence_and_mask_in_agreement_at_any_size(size):
    """Logits written by hand: one confident corner pixel (that a tiny image's resize misses), a flat map at the
    threshold itself, and a confident blob; a presence logit that says "present" for each."""
    corner = torch.full((8, 8), -6.0)
    corner[0, 0] = 6.0
    blob = torch.full((8, 8), -6.0)
    blob[1:7, 1:7] = 6.0
    logits = torch.stack([corner, torch.zeros(8, 8), blob])
    masks, scores = post_process_masks([logits], [size], presence_logits=[torch.full((3,), 4.0)], return_scores=True)
    assert masks[0].shape == (3, *size) and scores[0].shape == (3,)
    for mask, score in zip(masks[0], scores[0].tolist()):
        assert bool(mask.any()) == (score >= 0.5), (size, score)
    assert not masks[0][1].any() and scores[0][1] < 0.5  # nothing above the threshold: scored below it
    assert masks[0][2].any() and scores[0][2] > 0.9
    if size == (1, 1):  # the corner's peak is lost: no mask, and a low score with it
        assert not masks[0][0].any() and scores[0][0] < 0.5
    absent, absent_scores = post_process_masks([logits], [size], presence_logits=[torch.full((3,), -1.0)],
                                               return_scores=True)
    assert not absent[0].any() and (absent_scores[0] < 0.5).all()


@pytest.mark.parametrize("width, height", [(1, 1), (2, 2), (1, 3), (5, 2)])
def test_segment_scores_agree_with_masks_on_tiny_images(demo, width, height):
    model, processor = demo
    image = Image.new("RGB", (width, height), RED)
    masks, scores = model.segment(processor, [image] * 3, ["red circle", "shape", "blue star"], return_scores=True)
    for mask, score in zip(masks, scores):
        assert mask.shape == (height, width) and bool(mask.any()) == (score >= 0.5), (width, height, score)


def test_unknown_words_warning_names_the_words_not_the_prompt(demo):
    model, processor = demo
    long_word, prompt = "z" * 5000, "red circle " + " ".join(f"zz{i}" for i in range(1000))
    with pytest.warns(UnknownWordsWarning) as caught:
        model.segment(processor, scene((245, 242, 235), SCENES[0][0]), [f"red {long_word}", prompt])
    (message,) = [str(warning.message) for warning in caught if warning.category is UnknownWordsWarning]
    assert len(message) < 400 and "'zzzzz" in message and "'zz0', 'zz1'" in message and "and 991 more" in message


def test_mask_quality_is_high_for_one_sharp_confident_part_and_low_otherwise():
    one = torch.full((1, 12, 12), -10.0)
    one[0, 2:6, 2:6] = 10.0
    two = one.clone()
    two[0, 8:12, 8:12] = 10.0  # a second part as large as the first
    diagonal = torch.full((1, 4, 4), -10.0)
    diagonal[0, 0, 0] = diagonal[0, 1, 1] = 10.0  # corners touching only: two parts
    soft = one.clone()
    soft[0, 2:6, 2:6] = 0.5  # inside, but within the stability offset
    assert largest_part_share(one > 0).tolist() == [1.0]
    assert largest_part_share(two > 0).tolist() == [0.5]
    assert largest_part_share(diagonal > 0).tolist() == [0.5]
    assert largest_part_share(torch.zeros(1, 5, 5, dtype=torch.bool)).tolist() == [0.0]
    quality = mask_quality(torch.cat([one, two, soft, torch.full((1, 12, 12), -10.0)]))
    assert quality[0] == pytest.approx(1.0, abs=1e-4)
    assert quality[1] == pytest.approx(0.5, abs=1e-4)
    assert quality[2] == 0 and quality[3] == 0


def test_an_iou_head_calibrates_each_masks_quality_and_survives_saving(tmp_path):
    model, processor = tiny_model_and_processor(WORDS, iou_head=True)
    with torch.no_grad():
        model.seg_head.iou.weight.zero_()
        model.seg_head.iou.bias.fill_(1.5)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    images, queries = [random_image(64, 48), random_image(1, 1)], ["red circle", "blue square"]
    masks, scores, ious = loaded.segment(processor, images, queries, return_scores=True, return_iou_scores=True)
    assert [tuple(m.shape) for m in masks] == [(48, 64), (1, 1)]
    assert ious == pytest.approx([torch.tensor(1.5).sigmoid().item()] * 2)
    assert len(scores) == 2 and all(isinstance(score, float) for score in scores)
    with torch.no_grad():  # w = 1, b = 0: the logit is log(mask_quality) of the mask's own logits
        loaded.seg_head.iou.weight.fill_(1.0)
        loaded.seg_head.iou.bias.zero_()
        out = loaded(**processor(images=images[:1], queries=queries[:1]))
    expected = mask_quality(out.pred_masks[0]).clamp(min=1e-4).log()  # written out: the head's input by hand
    assert out.iou_logits[0].shape == (1,) and torch.allclose(out.iou_logits[0], expected)


def test_a_model_without_an_iou_head_returns_none_scores():
    model, processor = tiny_model_and_processor(WORDS)
    masks, ious = model.segment(processor, random_image(32, 32), ["red circle", "blue square"], return_iou_scores=True)
    assert len(masks) == 2 and ious == [None, None]
    assert model(**processor(images=[random_image(32, 32)], queries=["red circle"])).iou_logits is None


def test_fit_iou_head_writes_the_head_and_measures_it(tmp_path, capsys):
    script = load_script(ROOT / "examples" / "fit_iou_head.py")
    heldout = load_script(ROOT / "examples" / "score_heldout.py")
    script.build_items = lambda seed, pale, per_family: heldout.build_items(seed, 2, 2)  # a few scenes keep it short
    folder = fit_on_a_copy_of_the_shipped_model(script, tmp_path, "--fit-size", "12")
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 14 and {"auroc_iou_logit", "auroc_presence", "auroc_max_pixel"} <= set(report)
    config = json.loads((folder / "config.json").read_text())
    assert config["iou_head"] is True and config["presence_head"] is True
    reloaded = load_model(folder)[0]
    assert reloaded.seg_head.iou.weight.abs().sum() > 0  # fitted weights, not an initialisation
    for name in ("README.md", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (default_model_dir() / name).read_bytes()

