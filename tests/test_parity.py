"""The converted released checkpoint computes what the authors' code computed (shared/reference fixture)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling_selfie import SelfieForSegmentation, SelfieImageProcessor
from modeling_selfie.convert import convert_checkpoint

from .helpers import FIXTURES, REFERENCE


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "selfie-tiny-reference"
    convert_checkpoint(REFERENCE / "checkpoint", out)
    return out


def reference_case(name):
    inputs = load_file(REFERENCE / name / "inputs.safetensors")
    outputs = load_file(REFERENCE / name / "outputs.safetensors")
    return inputs, outputs


def run(model, inputs, train=False):
    model.train(train)
    kwargs = dict(
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        attention_mask=inputs["attention_mask_2d"].long(),
        tile_grid=inputs["target_aspect_ratios"].flip(-1),  # the reference stores (cols, rows)
    )
    if train:
        n = inputs["input_ids"].shape[0]
        kwargs.update(labels=inputs["labels"], mask_labels=[inputs[f"gt_masks.{i}"].float() for i in range(n)])
    with torch.set_grad_enabled(train):
        return model(**kwargs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("scenario", ["basic", "square"])
def test_mask_logits_and_losses_match_reference(converted, scenario, attn):
    model = SelfieForSegmentation.from_pretrained(converted, attn_implementation=attn)
    inputs, expected = reference_case(scenario)

    out = run(model, inputs)
    diff = (out.pred_masks[0] - expected["pred_masks.0"]).abs().max().item()
    assert out.pred_masks[0].shape == expected["pred_masks.0"].shape
    assert diff <= 1e-4, f"max |pred_masks - reference| = {diff}"
    print(f"\n{scenario}/{attn}: max abs diff of mask logits {diff:.2e}")

    out = run(model, inputs, train=True)
    for ours, theirs in [("loss", "loss"), ("text_loss", "ce_loss"), ("mask_bce_loss", "mask_bce_loss"),
                         ("mask_dice_loss", "mask_dice_loss")]:
        ref = expected[f"loss.{theirs}"].item()
        rel = abs(getattr(out, ours).item() - ref) / abs(ref)
        assert rel <= 1e-4, f"{ours}: {getattr(out, ours).item()} vs reference {ref} (rel {rel:.2e})"
        print(f"  {ours}: relative difference {rel:.2e}")


def test_intermediate_states_match_reference(converted):
    """Bisect aid: the LLM's final-norm states and text logits equal the reference's at real positions."""
    model = SelfieForSegmentation.from_pretrained(converted).eval()
    inputs, expected = reference_case("square")
    out = model(
        input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
        attention_mask=inputs["attention_mask_2d"].long(), tile_grid=inputs["target_aspect_ratios"].flip(-1),
    )
    index = expected["dbg.llm_logits_text_index"]
    logits = out.logits[index[:, 0], index[:, 1]]
    assert (logits - expected["dbg.llm_logits_text"]).abs().max() <= 1e-4


@pytest.mark.parametrize("size", [56, 448])
def test_tiling_matches_reference(size):
    case = json.loads((REFERENCE / "preprocess" / "case.json").read_text())["cases"][str(size)]
    stored = load_file(REFERENCE / "preprocess" / f"load_image_{size}.safetensors")
    processor = SelfieImageProcessor(size={"height": size, "width": size}, max_patches=12)
    image = Image.open(REFERENCE / "preprocess" / "synthetic_700x400.png").convert("RGB")

    out = processor(image, return_tensors="pt")

    cols, rows = case["target_aspect_ratio_cols_rows"]
    assert out["tile_grid"].tolist() == [[rows, cols]]
    pixel_values = out["pixel_values"]
    assert list(pixel_values.shape) == case["pixel_values_shape"]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for t, png in enumerate(case["tile_pngs_row_major"]):
        tile = torch.from_numpy(np.array(Image.open(REFERENCE / "preprocess" / png).convert("RGB")))
        expected = (tile.permute(2, 0, 1).float() / 255 - mean) / std
        assert torch.equal(pixel_values[t], expected), f"tile {t} differs from the reference tile {png}"
    assert torch.equal(pixel_values[:, :, ::16, ::16], stored["pixel_values_stride16"])
    sums = pixel_values.double().sum(dim=(2, 3))
    assert torch.allclose(sums, stored["pixel_values_sum_per_tile_channel"], rtol=1e-6)


@pytest.mark.parametrize("size", [448, 56])
def test_tiles_of_a_portrait_image_equal_pillow_12_1_1s_bit_for_bit(size):
    """The installed Pillow (setup.py: >=12.1.1,<13) tiles as the authors' Pillow 12.1.1 did. Pillow 13 resizes
    this image differently (the authors' own 700x400 fixture happens not to show it); tiles made by
    `tests/fixtures/pillow_12_1_1/make_tiles.py` under Pillow 12.1.1."""
    folder = FIXTURES / "pillow_12_1_1"
    case = json.loads((folder / "case.json").read_text())["cases"][str(size)]
    processor = SelfieImageProcessor(size={"height": size, "width": size}, max_patches=case["max_tiles"])
    image = Image.open(folder / "portrait_300x640.png").convert("RGB")

    out = processor(image, return_tensors="pt")

    cols, rows = case["grid_cols_rows"]
    assert out["tile_grid"].tolist() == [[rows, cols]]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for t, png in enumerate(case["tiles"]):
        tile = torch.from_numpy(np.array(Image.open(folder / png).convert("RGB"))).permute(2, 0, 1)
        ours = (out["pixel_values"][t] * std + mean) * 255
        assert (ours.round() - tile).abs().max() == 0, f"tile {t} differs from Pillow 12.1.1's {png}"
        assert torch.equal(out["pixel_values"][t], (tile.float() / 255 - mean) / std)
