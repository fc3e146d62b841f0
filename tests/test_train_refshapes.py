"""examples/train_refshapes.py, the script that makes the shipped demo model: a short run writes a loadable model
folder with a model card carrying measured numbers (next to a colour-match baseline and the mask grid's ceiling)
and the command that made it; an interrupted run resumes from its own checkpoint to the same weights."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, TrainingArguments

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.data.refshapes import COLOURS, RefShapesDataset, RefShapesExample, scene_expressions
from modeling_selfie.evaluation import ReferringMetrics
from modeling_selfie.modeling_selfie import stitch_tiles

from .helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_refshapes.py"
TINY_RUN = ["--max-steps", "2", "--warmup-steps", "1", "--eval-size", "8", "--threads", "1", "--batch-size", "2"]


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


def run(script, *argv):
    threads = torch.get_num_threads()
    try:
        script.main([*TINY_RUN, *argv])
    finally:
        torch.set_num_threads(threads)


def colour_pixels(image, colour: str | None) -> np.ndarray:
    """Pixels painted in the colour's exact RGB value (any shape colour for `None`): RefShapes paints every shape in
    one exact colour on a pale background."""
    pixels = np.asarray(image)
    colours = [COLOURS[colour]] if colour else list(COLOURS.values())
    return np.any([(pixels == rgb).all(-1) for rgb in colours], axis=0)


def named_colour(query: str) -> str | None:
    return next((word for word in query.replace("?", " ").split() if word in COLOURS), None)


def test_unknown_warmup_kind_is_refused(script):
    with pytest.raises(SystemExit):
        script.main(["--warmup-kinds", "colour=1"])


def test_device_cuda_without_a_gpu_is_one_error_line(script, tmp_path, capsys):
    """`--device cuda` (the GPU lease's command) on a torch that sees no GPU: one `error:` line, before any work."""
    assert not torch.cuda.is_available()
    with pytest.raises(SystemExit) as stop:
        script.main(["--device", "cuda", "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "model")])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --device cuda: no GPU is visible to torch ") and not (tmp_path / "run").exists()


def test_opposite_pairs_with_an_odd_batch_size_are_refused(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.main(["--opposite-pairs", "--batch-size", "3", "--run-dir", str(tmp_path / "run")])
    assert "--opposite-pairs needs an even --batch-size" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_grid_the_tile_cannot_hold_is_refused(script, tmp_path):
    with pytest.raises(SystemExit):
        script.main(["--patch-size", "13", "--run-dir", str(tmp_path)])


def test_a_short_run_writes_a_loadable_model_with_its_card(script, tmp_path):
    output = tmp_path / "model"
    output.mkdir()
    chat = "## Chat\n\nWritten by hand: `model.chat(...)` answers in words.\n"
    (output / "README.md").write_text(f"# old card\n\n## How it was made\n\nold numbers\n\n{chat}")
    run(script, "--output", str(output), "--run-dir", str(tmp_path / "run"), "--downsample-ratio", "0.25",
        "--vision-width", "64", "--llm-width", "96", "--train-kinds", "position=1,no_target=2", "--device", "cpu")
    model = SelfieForSegmentation.from_pretrained(output)
    processor = SelfieProcessor.from_pretrained(output)
    assert processor.seg_token_id == model.config.seg_token_id
    assert model.config.downsample_ratio == 0.25 and processor.image_seq_length == 4  # 8x8 patches -> 2x2 tokens
    assert model.config.vision_config.hidden_size == 64 and model.config.text_config.hidden_size == 96
    image = np.zeros((112, 112, 3), np.uint8)
    assert model(**processor(images=[image], queries=["red circle"])).pred_masks[0].shape == (1, 32, 32)
    results = json.loads((output / "eval_results.json").read_text())
    assert results["overall"]["count"] == 8
    card = (output / "README.md").read_text()
    baseline, ceiling = results["colour_match_baseline"]["overall"], results["grid_ceiling"]["overall"]
    assert f"| overall | 8 | {results['overall']['cIoU']:.3f} | {results['overall']['gIoU']:.3f} " in card
    assert f"| {baseline['cIoU']:.3f} | {ceiling['cIoU']:.3f} / {ceiling['gIoU']:.3f} |" in card
    assert "--warmup-kinds colour_shape=2,multi_target=1" in card and "--downsample-ratio 0.25" in card
    assert "--train-kinds position=1,no_target=2" in card and "--vision-width 64 --llm-width 96" in card
    assert card.endswith(chat) and "old numbers" not in card  # a hand-written section survives the rewrite
    assert 0.9 < ceiling["cIoU"] < 1 and ceiling["count"] == 8  # the ground truth itself, at the mask grid's size

    test = RefShapesDataset("test", size=8, seed=0)
    no_target = [test[i] for i in range(8) if test[i]["expression_kind"] == "no_target"]
    present = [s for s in no_target if colour_pixels(s["image"], named_colour(s["query"])).any()]
    assert results["no_target_colour_present_count"] == len(present)
    assert not list(output.glob("*.py"))  # the package's own classes load it: no remote-code copies
    assert not list(tmp_path.glob(".*"))  # no staging folder left behind


def test_colour_match_baseline_takes_the_pixels_of_the_named_colour(script):
    test = RefShapesDataset("test", size=40, seed=0)
    expected = ReferringMetrics()
    for i in range(len(test)):
        sample = test[i]
        expected.update(torch.from_numpy(colour_pixels(sample["image"], named_colour(sample["query"]))),
                        torch.from_numpy(sample["masks"][0].astype(bool)))  # fmt: skip
    baseline = script.colour_match_baseline(test)
    assert baseline["overall"]["cIoU"] == pytest.approx(expected.compute()["cIoU"])
    assert baseline["overall"]["count"] == 40 and baseline["colour_shape"]["count"] > 0


class TargetOracle:
    """A stand-in model that answers each position or relation phrase with its target mask on that scene."""

    def __init__(self, dataset):
        self.masks = {}
        for i in range(len(dataset)):
            scene = dataset.example(i).scene
            for kind in ("position", "relation"):
                for expression in scene_expressions(scene, kind):
                    target = RefShapesExample(scene, expression).target_mask().astype(bool)
                    self.masks[scene.image.tobytes(), expression.text] = torch.from_numpy(target)

    def eval(self):
        return self

    def segment(self, processor, images, texts, query_kind):
        assert query_kind == "phrase"
        return [self.masks[image.tobytes(), text] for image, text in zip(images, texts)]


class WholeImage(TargetOracle):
    """A stand-in model that reads no word: every answer is the whole image."""

    def segment(self, processor, images, texts, query_kind):
        return [torch.ones_like(mask) for mask in super().segment(processor, images, texts, query_kind)]


def test_the_direction_check_tells_a_model_that_reads_direction_words_from_one_that_does_not(script):
    test = RefShapesDataset("test", size=60, seed=0, kind_weights={"position": 1, "relation": 1, "colour_shape": 0,
                            "size": 0, "multi_target": 0, "no_target": 0, "reasoning": 0})  # fmt: skip
    pairs = script.opposite_pairs(test)
    reads = script.opposite_answer_iou(TargetOracle(test), None, pairs, batch_size=7)
    blind = script.opposite_answer_iou(WholeImage(test), None, pairs, batch_size=7)
    assert set(reads) == set(blind) == {"position", "relation"}
    assert reads["position"] < 0.05 and reads["relation"] < 0.05  # other targets: (nearly) disjoint masks
    assert blind == {"position": 1.0, "relation": 1.0}


@pytest.fixture(scope="module")
def interrupted_run(script, tmp_path_factory):
    """A two-step run stopped by its time budget after the first step, then resumed: (run dir, output)."""
    folder = tmp_path_factory.mktemp("resumed")
    settings = ["--run-dir", str(folder / "run"), "--output", str(folder / "model"), "--curve-every", "1"]
    run(script, *settings, "--curve-size", "4", "--minutes", "0")
    assert (folder / "run" / "checkpoint-1").is_dir()
    run(script, *settings, "--curve-size", "4", "--resume")
    return folder / "run", folder / "model"


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(script, interrupted_run, tmp_path):
    run_dir, resumed = interrupted_run
    run(script, "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "model"))
    straight = load_file(tmp_path / "model" / "model.safetensors")
    again = load_file(resumed / "model.safetensors")
    assert straight.keys() == again.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)
    curve = [json.loads(line) for line in (run_dir / "curve.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in curve] == [1, 2]
    assert 0 < curve[0]["minutes"] < curve[1]["minutes"]  # the clock goes on from the checkpoint's
    card = (resumed / "README.md").read_text()
    assert "2 steps" in card
    table = card.split("## Learning curve")[1].splitlines()
    rows = [line.split(" | ") for line in table if line.startswith("| ") and not line.startswith("| step")]
    assert [row[:3] for row in rows] == [
        ["| " + str(entry["step"]), f"{entry['minutes']:.1f}", f"{entry['overall']:.3f}"] for entry in curve
    ]


def test_resuming_refuses_what_would_mix_runs(script, interrupted_run, tmp_path):
    run_dir, _ = interrupted_run
    with pytest.raises(SystemExit):  # nothing to resume
        script.main(["--resume", "--run-dir", str(tmp_path / "empty")])
    with pytest.raises(SystemExit):  # a fresh run into a folder holding another run's checkpoints
        script.main(["--run-dir", str(run_dir)])
    with pytest.raises(SystemExit):  # a run setting other than the run's own
        script.main(["--resume", "--run-dir", str(run_dir), "--patch-size", "7"])
    data_settings = (["--backgrounds", "dark"], ["--tiny-shapes"], ["--max-tiles", "6"], ["--directions", "left"],
                     ["--opposite-pairs"], ["--form-loss-weight", "1"])
    for setting in data_settings:  # what the images and expressions are drawn from is a run setting too
        with pytest.raises(SystemExit):
            script.main(["--resume", "--run-dir", str(run_dir), *setting])


def test_a_run_with_its_own_kind_mix_resumes_without_repeating_it(script, tmp_path):
    run_dir = tmp_path / "run"
    run(script, "--train-kinds", "colour_shape=1,relation=2", "--minutes", "0", "--run-dir", str(run_dir),
        "--output", str(tmp_path / "first"))  # fmt: skip
    assert [path.name for path in run_dir.glob("checkpoint-*")] == ["checkpoint-1"]  # stopped by the time budget
    run(script, "--resume", "--run-dir", str(run_dir), "--output", str(tmp_path / "model"))
    stages = json.loads((tmp_path / "model" / "eval_results.json").read_text())["training"]
    assert stages[0]["steps"] == 2 and "--train-kinds colour_shape=1,relation=2 " in stages[0]["command"]


def test_a_run_on_every_background_keeps_one_checkpoint_saved_by_the_clock(script, tmp_path):
    run_dir = tmp_path / "run"
    run(script, "--backgrounds", "all", "--tiny-shapes", "--max-tiles", "4", "--bce-loss-weight", "2",
        "--dice-loss-weight", "0.5", "--directions", "left,top", "--opposite-pairs", "--save-minutes", "0",
        "--save-steps", "1000", "--keep-checkpoints", "1", "--form-loss-weight", "1", "--other-shape-weight", "2",
        "--run-dir", str(run_dir), "--output", str(tmp_path / "model"))  # fmt: skip
    assert [path.name for path in run_dir.glob("checkpoint-*")] == ["checkpoint-2"]  # saved by time, not by steps
    settings = json.loads((run_dir / "run_settings.json").read_text())
    assert settings["backgrounds"] == "pale,dark,mid,saturated,gradient,noise,texture" and settings["tiny_shapes"]
    assert settings["max_tiles"] == 4 and (settings["bce_loss_weight"], settings["dice_loss_weight"]) == (2, 0.5)
    assert settings["directions"] == "left,top" and settings["opposite_pairs"] and settings["form_loss_weight"] == 1
    assert settings["other_shape_weight"] == 2
    assert "form_classifier.weight" in load_file(run_dir / "checkpoint-2" / "model.safetensors")  # resumable
    assert not any("form" in name for name in load_file(tmp_path / "model" / "model.safetensors"))  # training only
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["bce_loss_weight"], config["dice_loss_weight"]) == (2, 0.5)
    assert SelfieProcessor.from_pretrained(tmp_path / "model").image_processor.max_patches == 4
    stages = json.loads((tmp_path / "model" / "eval_results.json").read_text())["training"]
    command = stages[0]["command"]
    assert "--max-tiles 4 --bce-loss-weight 2 --dice-loss-weight 0.5 --backgrounds pale,dark,mid" in command
    assert "--tiny-shapes --directions left,top --opposite-pairs --form-loss-weight 1 " in command
    assert "--other-shape-weight 2 " in command
    card = (tmp_path / "model" / "README.md").read_text()
    assert "1 x a training-only form loss" in card and "2 x a training-only BCE on the pixels of the shapes" in card


def test_cell_forms_keep_the_cells_inside_one_shape():
    """A hand-written form map (0 background, 1 + FORMS index) read at 2x2 cells: a cell takes the form covering at
    least 60% of it, else -100 (ignored)."""
    form_map = torch.zeros(8, 8, dtype=torch.uint8)
    form_map[:4, :4] = 3  # top-left cell: all FORMS[2]
    form_map[4:, :] = 5  # bottom cells: FORMS[4], with a quarter of the right one FORMS[0]
    form_map[6:, 6:] = 1
    form_map[:4, 4:5] = 2  # top-right cell: a quarter FORMS[1], the rest background
    script = load_script(SCRIPT)
    assert script.cell_forms(form_map, (2, 2)).tolist() == [[2, -100], [4, 4]]
    assert script.cell_forms(form_map, (2, 2), cover=0.8).tolist() == [[2, -100], [4, -100]]


def test_the_form_loss_reads_each_image_of_a_batch_of_mixed_tile_grids(script, tmp_path):
    """Batched, the form loss is the cell-weighted mean of each sample's own: the pixel features are matched to
    their images although `predict_masks` groups images by tile grid."""
    model, processor = script.build_model_and_processor(0, vision_width=64, llm_width=64, max_tiles=3)
    script.add_form_classifier(model)
    data = RefShapesDataset("train", size=6, seed=3)
    samples = [data[i] for i in range(6)]
    grids = [tuple(processor.image_processor(images=[s["image"]])["tile_grid"][0]) for s in samples]
    assert len(set(grids)) > 1 and grids != sorted(grids)  # the batch order is not the grouped order
    args = TrainingArguments(str(tmp_path), remove_unused_columns=False, use_cpu=True, report_to=[])
    model.eval()
    trainer = script.FormLossTrainer(model=model, args=args, form_loss_weight=2.0)
    collate = script.FormCollator(processor)

    def form_loss_and_cells(batch_samples):
        """The form term of the loss (total minus the SELFIE loss, over the weight) and the cells it averaged."""
        trainer._form_totals.zero_()
        batch = collate(batch_samples)
        plain_inputs = {key: value for key, value in batch.items() if key != "form_maps"}
        with torch.no_grad():
            total = trainer.compute_loss(model, dict(batch))
            plain = script.SelfieTrainer.compute_loss(trainer, model, plain_inputs)
        return float(total - plain) / 2.0, float(trainer._form_totals[2])

    batched, batched_cells = form_loss_and_cells(samples)
    alone = [form_loss_and_cells([sample]) for sample in samples]
    assert batched_cells == sum(cells for _, cells in alone) > 0
    expected = sum(loss * cells for loss, cells in alone) / batched_cells
    assert batched == pytest.approx(expected, rel=1e-4)
    assert batched > 0


def test_the_other_shape_loss_is_the_bce_over_the_pixels_of_shapes_the_expression_does_not_name(script, tmp_path):
    """Hand-made: a 4x4 scene read at 2x2 logit cells. The target fills the top-left cell; another shape fills the
    bottom-right cell and half the top-right one. The loss is softplus (BCE towards 0) of those cells' logits,
    weighed by the share the other shape covers; a mask with no other shape in its scene does not count."""
    model, _ = script.build_model_and_processor(0, vision_width=64, llm_width=64)
    args = TrainingArguments(str(tmp_path), remove_unused_columns=False, use_cpu=True, report_to=[])
    trainer = script.FormLossTrainer(model=model, args=args, other_shape_weight=1.0)
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 5.0]]])
    label = torch.zeros(1, 4, 4, dtype=torch.uint8)
    label[0, :2, :2] = 1
    form_map = torch.zeros(4, 4, dtype=torch.uint8)
    form_map[:2, :2] = 1  # the target
    form_map[2:, 2:] = 4  # another shape: the bottom-right cell
    form_map[:2, 3] = 4  # and half the top-right one
    alone = torch.zeros(4, 4, dtype=torch.uint8)
    alone[:2, :2] = 1  # a scene of the target only
    softplus = torch.nn.functional.softplus
    expected = (0.5 * softplus(torch.tensor(2.0)) + softplus(torch.tensor(5.0))) / 1.5
    loss = trainer.other_shape_loss([logits, logits], [label, label], [form_map, alone])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert trainer._other_totals.tolist() == pytest.approx([expected.item(), 1])  # one mask counted
    assert trainer.other_shape_loss([logits], [label], [alone]).item() == 0


def test_a_run_can_start_from_the_weights_of_an_earlier_one(script, interrupted_run, tmp_path):
    _, earlier = interrupted_run
    output = tmp_path / "model"
    run(script, "--init-from", str(earlier), "--learning-rate", "0", "--max-steps", "1", "--output", str(output),
        "--run-dir", str(tmp_path / "run"))  # fmt: skip
    before, after = load_file(earlier / "model.safetensors"), load_file(output / "model.safetensors")
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)  # lr 0: the weights it started from
    stages = json.loads((output / "eval_results.json").read_text())["training"]
    assert [stage["steps"] for stage in stages] == [2, 1]
    card = (output / "README.md").read_text()
    assert "3 steps in 2 stages of 2 + 1 steps" in card and "--init-from MODEL_OF_THE_STAGE_BEFORE" in card
    with pytest.raises(SystemExit):  # weights of another design
        script.main(["--init-from", str(earlier), "--llm-width", "64", "--run-dir", str(tmp_path / "other")])


def test_a_stage_can_give_the_llm_a_finer_token_grid(script, interrupted_run, tmp_path):
    """`--init-from` a model with a 1/4 pixel shuffle into one with 1/2 (4x the LLM tokens per tile): the weights
    that follow the shuffle are re-laid so that F_V1^HQ and the `[SEG]` vector are what they were, and each mask cell
    of the features that bypass the LLM is the mean of the old cells it covers."""
    _, earlier = interrupted_run
    old = SelfieForSegmentation.from_pretrained(earlier).eval()
    new, processor = script.build_model_and_processor(0, downsample_ratio=0.5, vision_width=192, llm_width=128)
    script.init_from(new, earlier, parser=None)
    assert (old.config.unshuffle_factor, new.config.unshuffle_factor) == (4, 2) and processor.image_seq_length == 16
    vision_features = torch.randn(3, 64, 192)  # 3 tiles of 8x8 pre-shuffle ViT features
    old_hq, new_hq = old.model.get_image_features_hq(vision_features), new.model.get_image_features_hq(vision_features)
    torch.testing.assert_close(new_hq, old_hq, rtol=1e-4, atol=1e-4)
    seg_states = torch.randn(5, 128)
    torch.testing.assert_close(new.seg_head.seg_embeddings(seg_states), old.seg_head.seg_embeddings(seg_states))
    old_cells = old.seg_head._to_pixels(stitch_tiles(old.seg_head.pus_vision(old_hq), 1, 3))  # [1, 32, 96, C]
    new_cells = new.seg_head._to_pixels(stitch_tiles(new.seg_head.pus_vision(new_hq), 1, 3))  # [1, 16, 48, C]
    pooled = torch.nn.functional.avg_pool2d(old_cells.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(new_cells, pooled, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):  # no way back to a coarser grid
        run(script, "--init-from", str(earlier), "--downsample-ratio", "0.125", "--run-dir", str(tmp_path / "other"))


def test_a_stage_can_read_the_whole_image_as_one_larger_tile(script, interrupted_run, tmp_path):
    """`--init-from` a model on 112 px tiles into one whose single tile is the whole image at 224 px: the ViT's
    position embeddings are resized to the 16x16 patch grid and the stage runs, trains and writes a model whose
    processor makes one tile of every image."""
    _, earlier = interrupted_run
    output = tmp_path / "model"
    run(script, "--init-from", str(earlier), "--tile-size", "224", "--max-tiles", "1", "--downsample-ratio", "0.5",
        "--output", str(output), "--run-dir", str(tmp_path / "run"))  # fmt: skip
    processor = SelfieProcessor.from_pretrained(output)
    assert processor.image_processor.size["height"] == 224 and processor.image_processor.max_patches == 1
    assert processor.image_seq_length == 64  # 16x16 patches, 8x8 LLM tokens
    model = SelfieForSegmentation.from_pretrained(output)
    image = RefShapesDataset("test", size=1)[0]["image"]
    assert model.segment(processor, [image], ["red circle"])[0].shape == image.size[::-1]
    command = json.loads((output / "eval_results.json").read_text())["training"][-1]["command"]
    assert "--tile-size 224 --max-tiles 1 " in command


def test_position_embeddings_are_resized_as_a_smooth_map():
    """The position embeddings of an 8x8 grid, resized to 16x16, keep the class token's and average back (2x2) to
    what they were where the map is smooth."""
    script = load_script(SCRIPT)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing="ij")
    grid = torch.stack([torch.sin(xs), torch.cos(ys), xs * ys], -1).reshape(1, 64, 3)
    key = "model.vision_tower.embeddings.position_embeddings"
    embeddings = torch.cat([torch.full((1, 1, 3), 7.0), grid], 1)
    resized = script.resize_position_embeddings({key: embeddings}, 16)[key]
    assert resized.shape == (1, 257, 3) and torch.equal(resized[:, 0], embeddings[:, 0])
    pooled = torch.nn.functional.avg_pool2d(resized[0, 1:].reshape(16, 16, 3).permute(2, 0, 1), 2)
    torch.testing.assert_close(pooled.permute(1, 2, 0).reshape(64, 3), grid[0], atol=0.03, rtol=0)


def test_sincos_positions_tell_the_vit_where_each_patch_lies(script, interrupted_run, tmp_path):
    """`--sincos-positions 3` starts a stage with 2D sine-cosine position embeddings about half the patch
    embeddings' norm (transformers' initialisation leaves them ~75x smaller after training): patches of one row share
    the row half of the channels, patches of one column the column half, and the class token's embedding is kept."""
    _, earlier = interrupted_run
    output = tmp_path / "model"
    run(script, "--init-from", str(earlier), "--sincos-positions", "3", "--learning-rate", "0", "--max-steps", "1",
        "--output", str(output), "--run-dir", str(tmp_path / "run"))  # fmt: skip
    key = "model.vision_tower.embeddings.position_embeddings"
    before, after = load_file(earlier / "model.safetensors")[key], load_file(output / "model.safetensors")[key]
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=0)
    grid = after[0, 1:].reshape(8, 8, 192)
    rows, cols = grid[..., :96], grid[..., 96:]
    assert torch.equal(rows[:, 0], rows[:, 5]) and torch.equal(cols[0], cols[5])  # a row's / a column's half
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(cols[:, 0], cols[:, 1])
    torch.testing.assert_close(grid.norm(dim=-1), torch.full((8, 8), 3 * 96**0.5))
    command = json.loads((output / "eval_results.json").read_text())["training"][-1]["command"]
    assert "--sincos-positions 3 " in command


def test_the_gpu_lease_command_runs_on_the_cpu(script, tmp_path):
    """The docstring's command that continues the shipped model on a GPU, with the device, budget and sizes
    turned down (later flags win): it starts from the shipped weights, stops on its budget with a checkpoint to
    resume from, and writes a model whose card has the learning curve."""
    command = script.__doc__.split("in the next lease):")[1].split("\n\n")[1].replace("\\\n", " ").split()
    assert command[:3] == ["python", "examples/train_refshapes.py", "--device"] and "--init-from" in command
    argv = [str(SCRIPT.parents[1] / arg) if arg.startswith("modeling_selfie/") else arg for arg in command[2:]]
    output = tmp_path / "model"
    run(script, *argv, "--device", "cpu", "--minutes", "0", "--eval-size", "8", "--batch-size", "2",
        "--data-workers", "0", "--curve-every", "1", "--curve-size", "4", "--run-dir", str(tmp_path / "run"),
        "--output", str(output))  # fmt: skip
    assert (tmp_path / "run" / "checkpoint-1").is_dir()
    card = (output / "README.md").read_text()
    assert "## Learning curve" in card and "--init-from MODEL_OF_THE_STAGE_BEFORE" in card
    stages = json.loads((output / "eval_results.json").read_text())["training"]
    assert len(stages) >= 2 and stages[-1]["steps"] == 1


def test_the_card_curve_shows_the_direction_check_where_the_run_measured_it(script, tmp_path):
    curve = tmp_path / "curve.jsonl"
    entries = [
        {"step": 200, "minutes": 4.0, "overall": 0.4, "position": 0.3, "no_target_empty_rate": 0.5},
        {"step": 400, "minutes": 8.0, "overall": 0.5, "position": 0.4, "no_target_empty_rate": 0.5,
         "position_opposite_iou": 0.25},
    ]  # fmt: skip
    curve.write_text(json.dumps(entries[0]) + "\n")
    assert "opposite" not in script.learning_curve_section(curve, 200)  # an older run: no direction column
    curve.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    table = [line for line in script.learning_curve_section(curve, 200).splitlines() if line.startswith("| ")]
    assert table[0].endswith("| position opposite IoU |")
    assert table[1] == "| 200 | 4.0 | 0.400 | 0.300 | 50% | - |"
    assert table[2] == "| 400 | 8.0 | 0.500 | 0.400 | 50% | 0.250 |"


def test_the_vision_tower_trains_at_its_own_learning_rate(script, interrupted_run, tmp_path, capsys):
    """`--vision-learning-rate` gives the vision tower its own rate: with the rest at 0, only the tower moves."""
    _, earlier = interrupted_run
    output = tmp_path / "model"
    run(script, "--init-from", str(earlier), "--learning-rate", "0", "--vision-learning-rate", "1e-2",
        "--warmup-steps", "0", "--max-steps", "1", "--output", str(output),
        "--run-dir", str(tmp_path / "run"))  # fmt: skip
    before, after = load_file(earlier / "model.safetensors"), load_file(output / "model.safetensors")
    moved = {name for name, tensor in before.items() if not torch.equal(after[name], tensor)}
    assert moved and all(".vision_tower." in f".{name}" for name in moved)
    stages = json.loads((output / "eval_results.json").read_text())["training"]
    assert "--vision-learning-rate 0.01 " in stages[-1]["command"]
    with pytest.raises(SystemExit):
        script.main(["--vision-learning-rate", "-1", "--run-dir", str(tmp_path / "other")])
    assert "--vision-learning-rate must be non-negative, got -1.0" in capsys.readouterr().err


VISION_SCRIPT = SCRIPT.parent / "train_vision_forms.py"


def test_vision_form_training_writes_the_model_with_only_its_tower_trained(interrupted_run, tmp_path, capsys):
    """`examples/train_vision_forms.py` from a shell, on a folder written by `train_refshapes.py`: the output loads
    with `AutoModel`, differs from the input in the vision tower only, and its training stages gain this one with
    the held-out checks; `--frozen` with `--output` is refused."""
    _, earlier = interrupted_run
    output = tmp_path / "towered"
    command = [sys.executable, str(VISION_SCRIPT), "--init-from", str(earlier), "--steps", "3", "--check-every", "2",
               "--check-size", "4", "--warmup-steps", "0", "--learning-rate", "1e-2", "--threads", "1"]  # fmt: skip
    done = subprocess.run([*command, "--output", str(output)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "held-out patch form accuracy" in done.stderr + done.stdout
    before, after = load_file(earlier / "model.safetensors"), load_file(output / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {name for name, tensor in before.items() if not torch.equal(after[name], tensor)}
    assert moved and all(name.startswith("model.vision_tower.") for name in moved)
    stages = json.loads((output / "eval_results.json").read_text())["training"]
    assert stages[:-1] == json.loads((earlier / "eval_results.json").read_text())["training"]
    assert stages[-1]["steps"] == 3 and [c["step"] for c in stages[-1]["patch_form_accuracy"]] == [0, 2, 3]
    assert 0 < stages[-1]["commonest_form"] <= 1
    assert type(AutoModel.from_pretrained(output)).__name__ == "SelfieForSegmentation"
    with pytest.raises(SystemExit):
        load_script(VISION_SCRIPT).parse_args(["--init-from", str(earlier), "--frozen", "--output", str(output)])
    assert "--frozen trains no tower weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_script(VISION_SCRIPT).parse_args(["--init-from", str(earlier), "--check-every", "0"])
    assert "--check-every must be at least 1, got 0" in capsys.readouterr().err


def test_patch_form_accuracy_counts_the_labelled_patches_only():
    """A tower whose patch features are the forms themselves (one-hot, after a class token) and an identity
    classifier: 3 of the 4 labelled patches are named right; unlabelled (-100) patches do not count."""
    vision = load_script(VISION_SCRIPT)
    forms = torch.tensor([[0, 1, 2, 3, 4, 5]])
    features = torch.nn.functional.one_hot(forms, 7).float()
    class_token = torch.zeros(1, 1, 7)

    def tower(pixel_values):
        return SimpleNamespace(last_hidden_state=torch.cat([class_token, features], 1))

    classifier = torch.nn.Linear(7, 7)
    with torch.no_grad():
        classifier.weight.copy_(torch.eye(7))
        classifier.bias.zero_()
    labels = torch.tensor([[0, 1, 2, 0, -100, -100]])
    assert vision.patch_form_accuracy(tower, classifier, None, labels) == 0.75
    assert vision.commonest_share(labels) == 0.5


PROBE_SCRIPT = SCRIPT.parent / "probe_seg_vector.py"


def test_the_seg_vector_probe_scores_a_trained_folder_from_a_shell(interrupted_run, tmp_path, capsys):
    """`examples/probe_seg_vector.py` from a shell on a folder written by `train_refshapes.py`: the three kinds of
    vector are scored on the second half of the expressions, and the JSON holds what the table prints."""
    _, earlier = interrupted_run
    command = [sys.executable, str(PROBE_SCRIPT), "--model", str(earlier), "--size", "4", "--fit-steps", "2",
               "--epochs", "1", "--threads", "1", "--json", str(tmp_path / "probe.json")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "probe.json").read_text())
    assert results["expressions_scored"] == 2
    for name in ("model", "colour + form", "per expression"):
        row = results[name]
        assert row["shared_count"] + row["own_count"] == 2
        assert all(row[key] is None or 0 <= row[key] <= 1 for key in ("shared_cIoU", "own_cIoU",
                                                                      "other_shape_covered"))
        assert f"| {name} | " in done.stdout
    with pytest.raises(SystemExit):
        load_script(PROBE_SCRIPT).parse_args(["--model", str(earlier), "--size", "1"])
    assert "--size must be at least 2 (half fit, half scored), got 1" in capsys.readouterr().err


def test_the_seg_vector_probe_counts_cells_the_target_or_other_shape_covers_half_of():
    """Hand-made 2x2 grids: a shared-colour item whose mask covers its target and half its other shape's cells,
    and an own-colour item whose mask misses half its target."""
    probe = load_script(PROBE_SCRIPT)
    shared = {"shared": True, "target": torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
              "other": torch.tensor([[0.0, 1.0], [0.6, 0.2]])}  # fmt: skip
    own = {"shared": False, "target": torch.tensor([[1.0, 1.0], [0.0, 0.0]]), "other": torch.zeros(2, 2)}
    logits = [torch.tensor([[3.0, 2.0], [-1.0, 4.0]]), torch.tensor([[1.0, -1.0], [-1.0, -1.0]])]
    result = probe.score([shared, own], logits)
    assert result["shared_count"] == result["own_count"] == 1
    assert result["shared_cIoU"] == pytest.approx(1 / 3)  # the target cell of the three masked cells
    assert result["own_cIoU"] == pytest.approx(1 / 2)
    assert result["other_shape_covered"] == pytest.approx(1 / 2)  # of the two cells the other shape half-covers
