"""Evaluation: metrics on hand-made masks, open-vocab argmax and readers, the loops and the CLI end to end."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_selfie.data.open_vocab import (
    ADE150_CLASSES,
    ADE150Dataset,
    PascalContext459Dataset,
    VOC20Dataset,
    build_open_vocab_dataset,
)
from modeling_selfie.evaluate import main
from modeling_selfie.evaluation import (
    ReferringMetrics,
    authors_collate,
    SemanticMetrics,
    build_benchmark,
    chunked_argmax,
    evaluate_open_vocab,
    evaluate_referring,
    predict_open_vocab,
    segment_images,
)

from .data_fixtures import (
    box_polygon,
    coco_file_name,
    write_coco,
    write_grefcoco,
    write_image,
    write_reasonseg,
    write_refer_dataset,
)
from .helpers import WORDS, random_image

REPO_ROOT = Path(__file__).resolve().parents[1]


def mask(shape, *pixels):
    """bool mask of `shape` with the given (y, x) pixels set."""
    out = np.zeros(shape, dtype=bool)
    for y, x in pixels:
        out[y, x] = True
    return out


# --------------------------------------------------------------------------------------------- referring metrics


def test_ciou_and_giou_differ_on_a_large_and_a_small_object():
    metrics = ReferringMetrics()
    metrics.update(np.ones((4, 4), bool), np.ones((4, 4), bool))  # IoU 16/16
    metrics.update(mask((4, 4), (0, 0), (0, 1)), mask((4, 4), (0, 0)))  # IoU 1/2
    result = metrics.compute()
    assert result["cIoU"] == pytest.approx(17 / 18)
    assert result["gIoU"] == pytest.approx(0.75)
    assert result["count"] == 2
    assert "N-acc" not in result and "T-acc" not in result


def test_empty_targets_count_one_when_predicted_empty_and_give_n_acc_t_acc():
    empty = np.zeros((3, 3), bool)
    two = mask((3, 3), (1, 1), (2, 2))
    metrics = ReferringMetrics()
    metrics.update(empty, empty)  # no target, right: IoU 1
    metrics.update(mask((3, 3), (0, 0)), empty)  # no target, wrong: IoU 0
    metrics.update(empty, two)  # target missed: IoU 0
    metrics.update(two, two)  # target found: IoU 1
    result = metrics.compute()
    assert result["gIoU"] == pytest.approx(0.5)
    assert result["cIoU"] == pytest.approx(2 / 5)
    assert result["N-acc"] == pytest.approx(0.5)
    assert result["T-acc"] == pytest.approx(0.5)


def test_only_empty_samples_score_one_and_no_update_raises():
    metrics = ReferringMetrics()
    with pytest.raises(ValueError, match="update"):
        metrics.compute()
    metrics.update(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool))
    assert metrics.compute() == {"cIoU": 1.0, "gIoU": 1.0, "count": 1, "N-acc": 1.0}


def test_referring_batched_update_and_merge_match_sample_by_sample():
    rng = np.random.default_rng(0)
    preds, targets = rng.random((6, 5, 7)) > 0.5, rng.random((6, 5, 7)) > 0.6
    targets[2] = False
    one_by_one = ReferringMetrics()
    for pred, target in zip(preds, targets):
        one_by_one.update(pred, target)
    first, second = ReferringMetrics(), ReferringMetrics()
    first.update(preds[:4], targets[:4])
    second.update(torch.as_tensor(preds[4:]), torch.as_tensor(targets[4:]))
    merged = first.merge(second).compute()
    expected = one_by_one.compute()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        assert merged[key] == pytest.approx(value)


def test_ignored_pixels_are_left_out_of_both_masks():
    metrics = ReferringMetrics()
    target, pred = mask((2, 2), (0, 0), (0, 1)), mask((2, 2), (0, 0), (1, 1))
    metrics.update(pred, target, ignore=mask((2, 2), (0, 1), (1, 1)))
    assert metrics.compute()["gIoU"] == 1.0


def test_referring_update_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        ReferringMetrics().update(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


# --------------------------------------------------------------------------------------------- semantic metrics


def test_miou_on_a_hand_computed_confusion_with_ignore_and_absent_class():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 1, 2]])  # the prediction under 255 must not count
    metrics = SemanticMetrics(4, class_names=("a", "b", "c", "d"))
    metrics.update(pred, target)
    # confusion (rows target): a: [1, 1, 0], b: [0, 2, 0], c: [0, 1, 0]; d absent everywhere
    assert metrics.confusion[:3, :3].tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    result = metrics.compute()
    assert result["per_class_IoU"] == {"a": 0.5, "b": 0.5, "c": 0.0, "d": None}
    assert result["mIoU"] == pytest.approx(1 / 3)
    assert result["pixel_accuracy"] == pytest.approx(3 / 5)
    assert result["count"] == 1


def test_semantic_ignore_index_is_configurable_and_ranges_are_checked():
    metrics = SemanticMetrics(300, ignore_index=65535)
    metrics.update(torch.tensor([[299, 0]]), torch.tensor([[299, 65535]]))
    result = metrics.compute()
    assert result["mIoU"] == 1.0 and result["pixel_accuracy"] == 1.0
    with pytest.raises(ValueError, match="target holds class 5"):
        SemanticMetrics(3).update(np.zeros((1, 2)), np.array([[0, 5]]))
    with pytest.raises(ValueError, match="pred holds class 7"):
        SemanticMetrics(3).update(np.array([[7, 0]]), np.array([[0, 0]]))


def test_semantic_merge_adds_confusions():
    a, b, both = SemanticMetrics(3), SemanticMetrics(3), SemanticMetrics(3)
    x, y = np.array([[0, 1, 2]]), np.array([[0, 2, 2]])
    a.update(x, y)
    b.update(y, x)
    both.update(np.stack([x, y]), np.stack([y, x]))
    assert torch.equal(a.merge(b).confusion, both.confusion)
    assert a.compute() == both.compute()


# --------------------------------------------------------------------------------------------- open vocabulary


def test_chunked_argmax_equals_argmax_over_all_classes_including_ties():
    scores = torch.randint(0, 3, (6, 5, 4)).float()  # many ties
    chunks = [scores[:2], scores[2:5], scores[5:]]
    assert torch.equal(chunked_argmax(iter(chunks)), scores.argmax(0))


def test_predict_open_vocab_is_the_argmax_of_per_class_logits(tiny):
    model, processor = tiny
    image = random_image(40, 30, seed=3)
    names = ["red", "blue", "green", "circle", "square"]
    per_class = torch.cat(
        [segment_images(model, processor, [image], binarize=False, queries=[name])[0] for name in names]
    )
    pred = predict_open_vocab(model, processor, image, names, query_batch_size=2)
    assert pred.shape == (30, 40) and pred.dtype == torch.int64
    top2 = per_class.topk(2, dim=0).values
    decided = (top2[0] - top2[1]) > 1e-4  # pixels where batching noise cannot flip the winner
    assert decided.float().mean() > 0.9
    assert torch.equal(pred[decided], per_class.argmax(0)[decided])


def test_evaluate_open_vocab_on_in_memory_samples(tiny):
    model, processor = tiny
    names = ("red", "blue", "green")
    samples = [
        {"image": random_image(24, 20, seed=i), "label": np.random.default_rng(i).integers(0, 3, (20, 24)),
         "class_names": names}
        for i in range(2)
    ]  # fmt: skip
    samples[0]["label"][:5] = 255
    result = evaluate_open_vocab(model, processor, samples, query_batch_size=2, progress=False)
    expected = SemanticMetrics(3, class_names=names)
    for sample in samples:
        expected.update(predict_open_vocab(model, processor, sample["image"], names, 2), sample["label"])
    assert result == expected.compute()
    assert 0.0 <= result["mIoU"] <= 1.0 and result["count"] == 2


def write_ade150(root: Path, sizes=((20, 16), (12, 18))) -> Path:
    """A tiny ADE20K-150 validation set in the released layout: random images, labels 0..3 (0 = ignore)."""
    base = root / "ADEChallengeData2016"
    (base / "images" / "validation").mkdir(parents=True)
    (base / "annotations" / "validation").mkdir(parents=True)
    for i, (width, height) in enumerate(sizes):
        stem = f"ADE_val_{i + 1:08d}"
        random_image(width, height, seed=i).save(base / "images" / "validation" / f"{stem}.jpg")
        label = np.random.default_rng(i).integers(0, 4, (height, width), dtype=np.uint8)
        Image.fromarray(label).save(base / "annotations" / "validation" / f"{stem}.png")
    return root


def test_ade150_reader_maps_zero_to_ignore_and_shifts_classes(tmp_path):
    write_ade150(tmp_path)
    dataset = build_open_vocab_dataset("ade150", tmp_path)
    assert len(dataset) == 2 and dataset.ignore_index == 255
    sample = dataset[0]
    raw = np.asarray(Image.open(tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"))
    assert sample["label"].dtype == np.int64 and sample["label"].shape == (16, 20)
    assert np.array_equal(sample["label"], np.where(raw == 0, 255, raw.astype(np.int64) - 1))
    assert sample["image"].size == (20, 16) and sample["class_names"] == ADE150_CLASSES


def test_readers_name_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/validation.*annotations/validation"):
        ADE150Dataset(tmp_path)
    assert PascalContext459Dataset.expected_paths(tmp_path)[-1] == tmp_path / "pascal_ctx_d2" / "labels.txt"
    write_ade150(tmp_path)
    (tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_val_00000002.png"):
        ADE150Dataset(tmp_path)


def test_pc459_reads_16_bit_tiffs_and_class_names_file(tmp_path):
    base = tmp_path / "pascal_ctx_d2"
    (base / "images/validation").mkdir(parents=True)
    (base / "annotations_ctx459/validation").mkdir(parents=True)
    random_image(5, 4).save(base / "images/validation/2008_000001.jpg")
    label = np.full((4, 5), 458, dtype=np.uint16)
    label[0, 0] = 65535
    Image.fromarray(label).save(base / "annotations_ctx459/validation/2008_000001.tif")
    (base / "labels.txt").write_text("".join(f"{k}: class {k}\n" for k in range(1, 460)))
    dataset = PascalContext459Dataset(tmp_path)
    sample = dataset[0]
    assert dataset.ignore_index == 65535 and sample["class_names"][0] == "class 1" and len(sample["class_names"]) == 459
    assert sample["label"][0, 0] == 65535 and sample["label"][1, 1] == 458


def test_voc20_lists_samples_from_its_annotations(tmp_path):
    base = tmp_path / "VOC2012"
    (base / "JPEGImages").mkdir(parents=True)
    (base / "annotations_detectron2/val").mkdir(parents=True)
    for stem in ("2007_000033", "2007_000042"):  # the second is a training image, with no annotation
        random_image(6, 4).save(base / "JPEGImages" / f"{stem}.jpg")
    Image.fromarray(np.full((4, 6), 19, np.uint8)).save(base / "annotations_detectron2/val/2007_000033.png")
    dataset = VOC20Dataset(tmp_path)
    assert dataset.stems == ["2007_000033"] and dataset[0]["class_names"][19] == "tv monitor"


# --------------------------------------------------------------------------------------------- referring loop


def referring_samples():
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (25, 35), (30, 30), (50, 20), (20, 44)]
    samples = []
    for i, (width, height) in enumerate(sizes):
        masks = (rng.random((1, height, width)) > 0.7).astype(np.uint8)
        if i == 3:
            masks[:] = 0  # a no-target sample
        kind = "instruction" if i == 4 else "phrase"
        query = "describe the red shape" if kind == "instruction" else WORDS[i]
        samples.append({"image": random_image(width, height, seed=i), "masks": masks, "query": query,
                        "query_kind": kind})  # fmt: skip
        if kind == "instruction":  # a ReasonSeg-like sample with pixels to leave out
            samples[-1]["ignore_masks"] = (rng.random((1, height, width)) > 0.8).astype(np.uint8)
    return samples


def test_evaluate_referring_matches_metrics_recomputed_from_the_model(tiny):
    model, processor = tiny
    samples = referring_samples()
    result = evaluate_referring(model, processor, samples, batch_size=2, progress=False)
    assert result["count"] == len(samples)
    assert all(0.0 <= result[key] <= 1.0 for key in ("cIoU", "gIoU", "N-acc", "T-acc"))

    expected = ReferringMetrics()
    for start in range(0, len(samples), 2):  # the same batches, through the model's own API
        batch = samples[start : start + 2]
        conversations = [processor.segmentation_conversation(s["query"], s["query_kind"]) for s in batch]
        inputs = processor(images=[s["image"] for s in batch], conversations=conversations)
        with torch.no_grad():
            pred_masks = model(**inputs).pred_masks
        sizes = [(s["image"].height, s["image"].width) for s in batch]
        for sample, pred in zip(batch, processor.post_process_masks(pred_masks, sizes)):
            ignore = sample["ignore_masks"][0] if "ignore_masks" in sample else None
            expected.update(pred[0], sample["masks"][0], ignore)
    expected = expected.compute()
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value)


def test_evaluate_referring_names_a_sample_without_query(tiny):
    model, processor = tiny
    samples = referring_samples()[:2]
    del samples[1]["query"]
    with pytest.raises(ValueError, match="sample 1 lacks"):
        evaluate_referring(model, processor, samples, progress=False)


def test_referring_batches_group_an_images_expressions_through_a_subset_without_loading_them(tmp_path, monkeypatch):
    """Under self1e a forward pass is one image's expressions; the shares of several processes are made of these
    batches, read from the dataset's image ids, not from loaded samples."""
    from torch.utils.data import Subset

    from modeling_selfie.data.refer import ReferringDataset
    from modeling_selfie.evaluation import referring_batches

    write_refer_dataset(tmp_path / "refer_seg")
    dataset = ReferringDataset(tmp_path / "refer_seg", "refcoco", "train", by_image=True)  # image 1: 3 expressions
    monkeypatch.setattr(ReferringDataset, "build_sample", lambda *args: pytest.fail("a sample was loaded"))
    assert referring_batches(dataset, None) == [[0, 1, 2]]
    assert referring_batches(Subset(dataset, [1, 2]), None) == [[0, 1]]
    assert referring_batches(dataset, 2) == [[0, 1], [2]]
    samples = [{"image_id": 7}, {"image_id": 7}, {}, {"image_id": 7}]  # a list: ids read from the samples
    assert referring_batches(samples, None) == [[0, 1], [2], [3]]


def test_evaluate_open_vocab_on_a_subset_keeps_the_datasets_ignore_index(tiny):
    """Your own label maps (custom_semantic) mark unnamed values -1; cut with a `Subset` (`--limit`, a process's
    share), the dataset's `ignore_index` still applies."""
    from torch.utils.data import Dataset, Subset

    class MinusOneIgnored(Dataset):
        ignore_index = -1

        def __len__(self):
            return 2

        def __getitem__(self, index):
            label = np.random.default_rng(index).integers(-1, 2, (20, 24))
            return {"image": random_image(24, 20, seed=index), "label": label, "class_names": ("red", "blue")}

    model, processor = tiny
    result = evaluate_open_vocab(model, processor, Subset(MinusOneIgnored(), [1]), progress=False)
    expected = SemanticMetrics(2, ignore_index=-1, class_names=("red", "blue"))
    sample = MinusOneIgnored()[1]
    expected.update(predict_open_vocab(model, processor, sample["image"], ("red", "blue")), sample["label"])
    assert result == expected.compute()


# --------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    from modeling_selfie.presets import tiny_model_and_processor

    model, processor = tiny_model_and_processor(WORDS, seed=0)
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "missing-model"}, "model directory missing-model does not exist"),
        ({"--dataset": "coco"}, "unknown dataset 'coco'"),
        ({"--data-root": "missing-data"}, "data root missing-data does not exist"),
        ({}, "ade150: missing"),
        ({"--data-root": None}, "--dataset ade150 needs --data-root"),
        ({"--dataset": "custom_referring"}, "--dataset custom_referring reads your own data: give --annotations"),
        ({"--dataset": "custom_semantic", "--annotations": "none.json"}, "annotation file none.json does not exist"),
        ({"--annotations": "refs.jsonl"}, "--annotations is for custom_referring and custom_semantic, not ade150"),
    ],
)
def test_cli_reports_bad_input_in_one_line_with_exit_code_2(tmp_path, saved_tiny, capsys, change, message):
    args = {"--model": str(saved_tiny), "--dataset": "ade150", "--data-root": str(tmp_path)} | change
    code = main([part for pair in args.items() if pair[1] is not None for part in pair])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_evaluates_ade150_end_to_end(tmp_path, saved_tiny):
    write_ade150(tmp_path / "data")
    output = tmp_path / "out" / "results.json"
    command = [
        sys.executable, "-m", "modeling_selfie.evaluate", "--model", str(saved_tiny), "--dataset", "ade150",
        "--data-root", str(tmp_path / "data"), "--batch-size", "150", "--device", "cpu", "--limit", "1",
        "--output", str(output),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ade150 val: mIoU ") and run.stdout.count("\n") == 1
    results = json.loads(output.read_text())
    assert results["dataset"] == "ade150" and results["split"] == "val" and results["count"] == 1
    assert results["model"] == str(saved_tiny) and results["time_s"] >= 0
    assert 0.0 <= results["metrics"]["mIoU"] <= 1.0
    assert len(results["metrics"]["per_class_IoU"]) == 150
    assert not [p for p in output.parent.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize(
    "dataset, split, write, count, keys",
    [
        ("refcoco", "val", lambda root: write_refer_dataset(root / "refer_seg"), 1, {"cIoU", "gIoU", "count"}),
        ("grefcoco", "train", lambda root: write_grefcoco(root / "refer_seg"), 3,
         {"cIoU", "gIoU", "count", "N-acc", "T-acc"}),
        ("reasonseg", "val", lambda root: write_reasonseg(root, "val"), 3, {"cIoU", "gIoU", "count"}),
    ],
)  # fmt: skip
def test_cli_evaluates_referring_datasets_from_the_registry(tmp_path, saved_tiny, capsys, dataset, split, write,
                                                           count, keys):  # fmt: skip
    write(tmp_path / "data")
    output = tmp_path / "results.json"
    code = main([
        "--model", str(saved_tiny), "--dataset", dataset, "--split", split, "--data-root", str(tmp_path / "data"),
        "--batch-size", "2", "--device", "cpu", "--output", str(output),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{dataset} {split}: cIoU ")
    results = json.loads(output.read_text())
    assert results["count"] == count and set(results["metrics"]) == keys
    assert all(0.0 <= value <= 1.0 for key, value in results["metrics"].items() if key != "count")


def test_boundary_iou_rewards_exact_contours_and_punishes_shifted_ones():
    from modeling_selfie.evaluation import boundary_iou, mask_boundary

    target = torch.zeros(50, 50, dtype=torch.bool)
    target[10:40, 10:40] = True
    band = mask_boundary(target, 2)
    assert band.sum() == 30 * 30 - 26 * 26  # a 2-pixel ring inside the square
    assert boundary_iou(target, target) == 1.0
    shifted = torch.roll(target, 3, dims=1)
    coarse = torch.zeros_like(target)
    coarse[8:42, 8:42] = True  # a mask with IoU 0.78 but no shared contour pixel
    assert boundary_iou(coarse, target, dilation_ratio=0.02) == 0.0
    assert 0 < boundary_iou(shifted, target) < 1
    assert boundary_iou(torch.zeros_like(target), torch.zeros_like(target)) == 1.0


# --------------------------------------------------------------------------------------------- protocols


def f32(value) -> np.float32:
    return np.float32(value)


def test_ciou_of_a_split_without_foreground_is_one_by_default_and_zero_as_the_authors_compute_it():
    empty = np.zeros((3, 3), bool)
    default, self1e = ReferringMetrics(), ReferringMetrics("self1e")
    for metrics in (default, self1e):
        metrics.update(np.stack([empty, empty]), np.stack([empty, empty]))  # one image, two expressions
    assert default.compute() == {"cIoU": 1.0, "gIoU": 1.0, "count": 2, "N-acc": 1.0}
    # theirs: cIoU 0 / (0 + 1e-10); gIoU (1 + 1) / (2 + 1e-5), in float32
    assert self1e.compute() == {"cIoU": 0.0, "gIoU": float(f32(2) / f32(2.00001)), "count": 2, "N-acc": 1.0}
    self1e.update(mask((3, 3), (0, 0), (1, 1), (2, 2)), empty)  # a false positive: union 3, intersection 0
    assert self1e.compute()["cIoU"] == 0.0 and self1e.compute()["gIoU"] == float(f32(2) / f32(3.00001))


def test_self1e_giou_of_three_empty_expressions_is_the_authors_0_9999967():
    """The issue's figure: the all-empty split of three expressions scores gIoU 0.9999967 in the authors' code
    (sum 3 over count + 1e-5), 1.0 under the default protocol."""
    empty = np.zeros((3, 5, 4), bool)
    for name, expected in (("default", 1.0), ("self1e", 0.9999967)):
        metrics = ReferringMetrics(name)
        for image in range(3):  # three images of one expression each
            metrics.update(empty[image], empty[image])
        assert round(metrics.compute()["gIoU"], 7) == expected


def test_self1e_metrics_are_the_authors_float32_arithmetic():
    metrics = ReferringMetrics("self1e")
    metrics.update(np.ones((4, 4), bool), np.ones((4, 4), bool))  # I 16, U 16
    metrics.update(mask((4, 4), (0, 0), (0, 1)), mask((4, 4), (0, 0)))  # I 1, U 2
    result = metrics.compute()
    assert result["cIoU"] == float(f32(17) / f32(18)) and result["cIoU"] != 17 / 18  # + 1e-10 is lost in float32
    iou_sum = f32(f32(16) / f32(16.00001)) + f32(f32(1) / f32(2.00001))
    assert result["gIoU"] == float(f32(iou_sum) / f32(2.00001)) and result["gIoU"] < 0.75
    with pytest.raises(ValueError, match="Unknown evaluation protocol 'lisa'"):
        ReferringMetrics("lisa")


def test_self1e_sums_each_batch_as_the_authors_meters():
    """Per batch (one image's expressions) the IoUs are summed, divided by n and multiplied back in float32."""
    pred = np.zeros((3, 2, 8), bool)
    pred[0, 0, :1], pred[1, 0, :3], pred[2, :, :7] = True, True, True
    target = np.zeros((3, 2, 8), bool)
    target[0, 0, :2], target[1, 0, :3], target[2, :, :6] = True, True, True
    metrics = ReferringMetrics("self1e")
    metrics.update(pred, target)  # one batch of three expressions: I 1, 3, 12; U 2, 3, 14
    ious = [f32(1) / f32(2.00001), f32(3) / f32(3.00001), f32(12) / f32(14.00001)]
    total = f32(f32(f32(ious[0] + ious[1]) + ious[2]) / f32(3)) * f32(3)
    assert metrics.iou_sum == float(f32(total)) and metrics.intersection == 16.0 and metrics.union == 19.0
    assert metrics.compute()["gIoU"] == float(f32(total) / f32(3.00001))


def test_authors_collate_pads_with_zero_and_masks_every_zero_id():
    # two prompts, left- or right-padded with the tokenizer's pad id 9; the second holds a token of id 0 ("!")
    input_ids = torch.tensor([[9, 9, 5, 6, 7], [5, 0, 6, 7, 8]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = authors_collate(input_ids, attention_mask)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 0, 6, 7, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]]


def test_reasonseg_under_self1e_keeps_the_first_query_of_each_image(tmp_path):
    write_reasonseg(tmp_path, "val")  # a.jpg: two sentence queries, b.jpg: one phrase query
    default = build_benchmark("reasonseg", "val", tmp_path)
    self1e = build_benchmark("reasonseg", "val", tmp_path, protocol="self1e")
    assert [sample["query"] for sample in default] == [
        "What in this kitchen keeps food cold?", "Which object would you open to get milk?", "the red cup"
    ]  # fmt: skip
    assert [(s["query"], s["query_kind"]) for s in self1e] == [
        ("What in this kitchen keeps food cold?", "instruction"), ("the red cup", "phrase")
    ]  # fmt: skip
    assert np.array_equal(self1e[0]["masks"], default[0]["masks"])
    assert np.array_equal(self1e[0]["ignore_masks"], default[0]["ignore_masks"])  # ignore regions: both protocols


def write_overlapping_polygons_image(root: Path, dataset: str) -> None:
    """An 8x8 COCO image for `dataset` (REFER layout) whose annotation 11 is two overlapping polygons: the boxes
    rows/cols 0..3 and 2..5 (16 pixels each, 4 shared)."""
    image_dir = root / "refer_seg" / "images" / "mscoco" / "images" / "train2014"
    write_image(image_dir / coco_file_name(1), 8, 8, seed=1)
    annotation = {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0,
                  "segmentation": [box_polygon(0, 0, 4, 4), box_polygon(2, 2, 6, 6)]}  # fmt: skip
    write_coco(root / "refer_seg" / dataset / "instances.json", {1: coco_file_name(1)}, {1: (8, 8)}, [annotation],
               {1: "person"})  # fmt: skip


def write_refcoco_with_overlapping_polygons(root: Path) -> None:
    """RefCOCO with one val ref on `write_overlapping_polygons_image`'s annotation."""
    write_overlapping_polygons_image(root, "refcoco")
    sentence = "The Man On The LEFT"
    ref = {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "category_id": 1, "sent_ids": [1],
           "file_name": "COCO_train2014_000000000001_11.jpg",
           "sentences": [{"sent": sentence, "raw": sentence, "tokens": sentence.split(), "sent_id": 1}]}  # fmt: skip
    (root / "refer_seg" / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([ref], protocol=2))


def test_refcoco_under_self1e_drops_pixels_where_polygons_of_one_annotation_overlap(tmp_path):
    write_refcoco_with_overlapping_polygons(tmp_path)
    default = build_benchmark("refcoco", "val", tmp_path)[0]
    self1e = build_benchmark("refcoco", "val", tmp_path, protocol="self1e")[0]
    union = np.zeros((8, 8), np.uint8)
    union[0:4, 0:4] = union[2:6, 2:6] = 1
    assert np.array_equal(default["masks"][0], union) and union.sum() == 28
    expected = union.copy()
    expected[2:4, 2:4] = 0  # covered twice: summed to 2 by the authors' loader, not target
    assert np.array_equal(self1e["masks"][0], expected) and expected.sum() == 24
    assert default["query"] == "The Man On The LEFT" and self1e["query"] == "the man on the left"
    # predicting the union: IoU 1 by default, 24 / 28 under self1e (the 4 doubly covered pixels are false positives)
    scores = {}
    for name, sample in (("default", default), ("self1e", self1e)):
        metrics = ReferringMetrics(name)
        metrics.update(union, sample["masks"][0])
        scores[name] = metrics.compute()["gIoU"]
    assert scores == {"default": 1.0, "self1e": float(f32(f32(24) / f32(28.00001)) / f32(1.00001))}


def test_self1e_refuses_a_batch_size(tiny):
    model, processor = tiny
    with pytest.raises(ValueError, match="self1e scores the expressions of one image per forward"):
        evaluate_referring(model, processor, referring_samples(), batch_size=2, progress=False, protocol="self1e")


def test_open_vocab_miou_counts_a_class_only_predicted_as_zero():
    # target a a / b b, prediction a c / b b: a IoU 1/2, b 2/2, c only predicted 0/1 -> (0.5 + 1 + 0) / 3
    metrics = SemanticMetrics(4, class_names=("a", "b", "c", "d"))
    metrics.update(np.array([[0, 2], [1, 1]]), np.array([[0, 0], [1, 1]]))
    result = metrics.compute()
    assert result["mIoU"] == pytest.approx(0.5)  # later detectron2 versions, leaving c out, would give 0.75
    assert result["per_class_IoU"] == {"a": 0.5, "b": 1.0, "c": 0.0, "d": None}
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)


def test_open_vocab_ignores_label_255_in_target_and_prediction():
    # the only "c" prediction lies on an ignored pixel: c is absent, a and b are perfect
    metrics = SemanticMetrics(3, class_names=("a", "b", "c"))
    metrics.update(np.array([[0, 1, 2]]), np.array([[0, 1, 255]]))
    result = metrics.compute()
    assert result["mIoU"] == 1.0 and result["per_class_IoU"] == {"a": 1.0, "b": 1.0, "c": None}
    assert int(metrics.confusion.sum()) == 2


def test_open_vocab_miou_comes_from_one_confusion_matrix_over_the_split_not_a_mean_over_images():
    metrics = SemanticMetrics(2)
    metrics.update(np.zeros((2, 2), int), np.zeros((2, 2), int))  # image 1: all a, right; its mIoU 1
    metrics.update(np.array([[1, 1]]), np.array([[0, 1]]))  # image 2: a 0/1, b 1/2; its mIoU 0.25
    result = metrics.compute()
    # split: a I 4 U 5, b I 1 U 2 -> (0.8 + 0.5) / 2 = 0.65 (the mean of the per-image mIoUs would be 0.625)
    assert result["mIoU"] == pytest.approx(0.65) and result["per_class_IoU"] == pytest.approx([0.8, 0.5])
    assert result["count"] == 2


def test_cli_self1e_on_reasonseg_scores_first_queries_one_by_one_with_a_progress_bar(tmp_path, saved_tiny, tiny,
                                                                                    capsys):  # fmt: skip
    write_reasonseg(tmp_path / "data", "val")
    output = tmp_path / "results.json"
    code = main([
        "--model", str(saved_tiny), "--dataset", "reasonseg", "--data-root", str(tmp_path / "data"),
        "--device", "cpu", "--protocol", "self1e", "--output", str(output),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith("reasonseg val: cIoU ") and "protocol self1e" in captured.out
    assert "referring" in captured.err and "100%" in captured.err and "2/2" in captured.err  # the tqdm bar
    results = json.loads(output.read_text())
    assert (results["protocol"], results["batch_size"], results["count"]) == ("self1e", None, 2)
    assert [record["query"] for record in results["expressions"]] == [
        "What in this kitchen keeps food cold?", "the red cup"
    ]  # fmt: skip

    model, processor = tiny  # the same weights as saved_tiny (preset, seed 0)
    expected = ReferringMetrics("self1e")
    for sample in build_benchmark("reasonseg", "val", tmp_path / "data", protocol="self1e"):
        conversation = processor.segmentation_conversation(sample["query"], sample["query_kind"])
        (pred,) = segment_images(model, processor, [sample["image"]], conversations=[conversation])
        expected.update(pred[0], sample["masks"][0], sample["ignore_masks"][0])
    for key, value in expected.compute().items():
        assert results["metrics"][key] == pytest.approx(value, abs=1e-6)


def test_cli_self1e_warns_when_pillow_is_not_the_authors_resize(tmp_path, saved_tiny, capsys, monkeypatch):
    import PIL

    write_reasonseg(tmp_path / "data", "val")
    args = ["--model", str(saved_tiny), "--dataset", "reasonseg", "--data-root", str(tmp_path / "data"), "--limit", "1"]
    monkeypatch.setattr(PIL, "__version__", "13.0.0")
    assert main(args + ["--protocol", "self1e"]) == 0
    assert "warning: Pillow 13.0.0 resizes some images differently" in capsys.readouterr().err
    assert main(args) == 0 and "warning" not in capsys.readouterr().err  # the default protocol does not promise it


def test_cli_refuses_a_batch_size_the_self1e_protocol_does_not_use(tmp_path, saved_tiny, capsys):
    write_refcoco_with_overlapping_polygons(tmp_path)
    code = main([
        "--model", str(saved_tiny), "--dataset", "refcoco", "--data-root", str(tmp_path), "--protocol", "self1e",
        "--batch-size", "4",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: --batch-size: protocol self1e scores the expressions of one image")
    assert "\n" not in err


# ------------------------------------------------------------------------ self1e: ids, padding, batches, targets

HAND_VOCAB = (
    "!", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "[SEG]",
    "\n", "system", "user", "assistant", ".", "?", "What", "is", "in", "this", "image", "Please", "output",
    "segmentation", "mask", "the", "red", "cup", "Red", "Cup", "You", "are", "an", "helpful",
)  # fmt: skip  -- "!" is id 0, as in Qwen2's vocabulary


@pytest.fixture(scope="module")
def hand_vocab():
    """A tiny model and its processor (the authors' system message and prompt style) over `HAND_VOCAB`, whose
    ids are the positions in that tuple."""
    from modeling_selfie import SelfieForSegmentation, SelfieImageProcessor, SelfieProcessor
    from modeling_selfie.presets import preset_config, variance_preserving_init_
    from modeling_selfie.tokenization import build_word_level_tokenizer

    tokenizer = build_word_level_tokenizer((), vocab={token: i for i, token in enumerate(HAND_VOCAB)})
    processor = SelfieProcessor(SelfieImageProcessor(size={"height": 56, "width": 56}), tokenizer, image_seq_length=4)
    config = preset_config("selfie-tiny", image_token_id=7, seg_token_id=9)
    config.text_config.vocab_size = len(HAND_VOCAB)
    torch.manual_seed(0)
    model = SelfieForSegmentation(config)
    variance_preserving_init_(model)
    return model.eval(), processor


def authors_ids(query: list[int]) -> list[int]:
    """By hand: `<|im_start|>system\\nYou are an helpful assistant.<|im_end|>\\n<|im_start|>user\\n<img>` + 4 x
    `<IMG_CONTEXT>` + `</img>\\n What is {query} in this image? Please output segmentation mask.<|im_end|>\\n
    <|im_start|>assistant\\n[SEG].<|im_end|>\\n`."""
    return [3, 11, 10, 30, 31, 32, 33, 13, 14, 4, 10, 3, 12, 10, 5, 7, 7, 7, 7, 6, 10, 16, 17, *query, 18, 19, 20, 15,
            21, 22, 23, 24, 14, 4, 10, 3, 13, 10, 9, 14, 4, 10]  # fmt: skip


def test_self1e_prompt_ids_keep_the_query_as_its_dataset_gives_it(hand_vocab):
    _, processor = hand_vocab
    image = random_image(40, 30)
    for query, ids in (("the Red Cup", [25, 28, 29]), ("  the red cup ", [25, 26, 27])):  # stripped, not lowercased
        inputs = processor(images=[image], conversations=[processor.segmentation_conversation(query)])
        assert inputs["input_ids"][0].tolist() == authors_ids(ids)


def test_self1e_masks_a_zero_id_token_out_of_attention_as_the_authors_collate_does(hand_vocab):
    model, processor = hand_vocab
    image = random_image(40, 30, seed=2)
    conversation = processor.segmentation_conversation("the cup !")
    inputs = processor(images=[image], conversations=[conversation])
    expected_ids = authors_ids([25, 27, 0])
    assert inputs["input_ids"][0].tolist() == expected_ids
    theirs = inputs["attention_mask"].clone()
    theirs[0, expected_ids.index(0)] = 0  # their mask: input_ids != 0, the "!" (id 0) masked like padding
    with torch.no_grad():
        logits = model(**{**inputs, "attention_mask": theirs}).pred_masks[0]
        correct = model(**inputs).pred_masks[0]
    size = [(30, 40)]
    authors = processor.post_process_masks([logits], size, binarize=False)[0]
    (self1e,) = segment_images(model, processor, [image], binarize=False, conversations=[conversation],
                               zero_id_is_padding=True)  # fmt: skip
    (default,) = segment_images(model, processor, [image], binarize=False, conversations=[conversation])
    assert torch.allclose(self1e, authors, atol=1e-6)
    assert torch.allclose(default, processor.post_process_masks([correct], size, binarize=False)[0], atol=1e-6)
    assert (self1e - default).abs().max() > 1e-3


def test_self1e_scores_one_image_per_forward_right_padded_with_zero(hand_vocab, monkeypatch):
    model, processor = hand_vocab
    images = {"a": random_image(40, 30, seed=3), "b": random_image(24, 36, seed=4)}
    rng = np.random.default_rng(0)
    samples = [
        {"image": images[key], "image_id": key, "query": query, "query_kind": "phrase",
         "masks": (rng.random((1, images[key].height, images[key].width)) > 0.5).astype(np.uint8)}
        for key, query in (("a", "the red cup"), ("a", "the cup"), ("b", "red"))
    ]  # fmt: skip
    batches = []
    original = model.forward

    def forward(**kwargs):
        batches.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))
        return original(**kwargs)

    monkeypatch.setattr(model, "forward", forward)
    result = evaluate_referring(model, processor, samples, progress=False, protocol="self1e")
    monkeypatch.undo()

    assert [ids.shape[0] for ids, _ in batches] == [2, 1]  # image a's two expressions, then image b's one
    first_ids, first_mask = batches[0]
    assert first_ids[1].tolist() == authors_ids([25, 27]) + [0]  # the shorter prompt right-padded with id 0
    length = len(authors_ids([25, 26, 27]))
    assert first_mask.tolist() == [[1] * length, [1] * (length - 1) + [0]]
    expected = ReferringMetrics("self1e")
    for key in ("a", "b"):  # the authors' meters: one update per image
        group = [sample for sample in samples if sample["image_id"] == key]
        preds = segment_images(model, processor, [s["image"] for s in group],
                               conversations=[processor.segmentation_conversation(s["query"]) for s in group])
        expected.update(torch.stack([p[0] for p in preds]), np.stack([s["masks"][0] for s in group]))
    assert result == expected.compute()


def write_grefcoco_with_overlapping_polygons(root: Path) -> None:
    """gRefCOCO with one val ref on `write_overlapping_polygons_image`'s annotation, and a no-target ref."""
    write_overlapping_polygons_image(root, "grefcoco")
    refs = [
        {"ref_id": 1, "ann_id": [11], "image_id": 1, "split": "val", "category_id": [1], "no_target": False,
         "sentences": [{"sent": "Both Boxes", "raw": "Both Boxes", "tokens": [], "sent_id": 1}]},
        {"ref_id": 2, "ann_id": [-1], "image_id": 1, "split": "val", "category_id": [], "no_target": True,
         "sentences": [{"sent": "a dog", "raw": "a dog", "tokens": [], "sent_id": 2}]},
    ]  # fmt: skip
    (root / "refer_seg" / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))


def test_grefcoco_under_self1e_keeps_pixels_where_polygons_of_one_annotation_overlap(tmp_path):
    write_grefcoco_with_overlapping_polygons(tmp_path)
    union = np.zeros((8, 8), np.uint8)
    union[0:4, 0:4] = union[2:6, 2:6] = 1  # their gRefCOCO branch ORs the polygon masks: 28 pixels
    for protocol in ("default", "self1e"):
        samples = build_benchmark("grefcoco", "val", tmp_path, protocol=protocol)
        assert np.array_equal(samples[0]["masks"][0], union) and not samples[1]["masks"].any()
    assert build_benchmark("grefcoco", "val", tmp_path, protocol="self1e")[0]["query"] == "both boxes"


def test_cli_names_a_bad_record_of_your_own_data(tmp_path, saved_tiny, capsys):
    (tmp_path / "refs.jsonl").write_text('{"image": "a.png", "expressions": ["the cup"]}\n')  # no mask
    code = main(["--model", str(saved_tiny), "--dataset", "custom_referring", "--annotations",
                 str(tmp_path / "refs.jsonl")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot read custom_referring from ") and "record 0" in err
    assert "'mask'" in err and "\n" not in err
