"""The main job: `selfie-segment IMAGE PROMPT [PROMPT ...]` and `--batch FILE` write masks, overlays and COCO RLE;
bad input gets one clear line and never costs the results of the good input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from modeling_selfie import cli
from modeling_selfie.cli import default_model_dir, resolve_device, resolve_dtype
from modeling_selfie.presets import tiny_model_and_processor
from selfie_segment import main

from .helpers import WORDS, png_claiming, random_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    model, processor = tiny_model_and_processor(WORDS)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def forwards(monkeypatch):
    """Counts the forward passes of every model `selfie-segment` loads; yields the loaded (model, processor)."""
    calls, loaded = [], []

    def counting_load_model(*args, **kwargs):
        model, processor = load_model(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: calls.append(len(output.pred_masks)))
        loaded.append((model, processor))
        return model, processor

    load_model = cli.load_model
    monkeypatch.setattr(cli, "load_model", counting_load_model)
    return calls, loaded


def read_mask(path) -> np.ndarray:
    mask = np.array(Image.open(path))
    assert set(np.unique(mask)) <= {0, 255}
    return mask > 0


def test_segments_an_image_and_writes_mask_and_overlay(model_dir, tmp_path, capsys):
    image_path = tmp_path / "scene.png"
    random_image(80, 64).save(image_path)
    code = main([str(image_path), "red circle", "--model", str(model_dir), "--output", str(tmp_path / "out")])
    assert code == 0
    mask = read_mask(tmp_path / "out_mask.png")
    overlay = Image.open(tmp_path / "out_overlay.png")
    assert mask.shape == (64, 80)
    assert overlay.size[0] == 80 and overlay.size[1] > 64  # caption band under the picture
    line = capsys.readouterr().out.strip()
    assert line.startswith("'red circle': mask of") and "out_mask.png" in line and "out_overlay.png" in line
    assert f"{int(mask.sum())} px" in line


def test_several_prompts_share_one_forward_and_get_a_mask_and_overlay_each(model_dir, tmp_path, forwards):
    calls, loaded = forwards
    image = random_image(80, 64)
    image.save(tmp_path / "scene.png")
    prompts = ["red circle", "the blue square left", "green"]
    code = main([str(tmp_path / "scene.png"), *prompts, "--model", str(model_dir), "--output", str(tmp_path / "o"),
                 "--json", str(tmp_path / "masks.json")])
    assert code == 0
    assert calls == [3]  # one forward pass holding the three prompts
    model, processor = loaded[0]
    records = json.loads((tmp_path / "masks.json").read_text())
    assert [r["prompt"] for r in records] == prompts
    for k, (prompt, record) in enumerate(zip(prompts, records), 1):
        alone = model.segment(processor, image, prompt)[0].numpy()  # the same prompt in a forward of its own
        mask = read_mask(tmp_path / f"o_{k}_mask.png")
        assert np.array_equal(mask, alone)
        assert record["mask"] == str(tmp_path / f"o_{k}_mask.png")
        assert Image.open(tmp_path / f"o_{k}_overlay.png").width == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["scene.png", "masks.json"] + [f"o_{k}_{kind}.png" for k in (1, 2, 3) for kind in ("mask", "overlay")]
    )


def test_json_holds_coco_rle_with_size_prompt_and_presence_score(model_dir, tmp_path):
    random_image(50, 70, seed=3).save(tmp_path / "tall.png")
    code = main([str(tmp_path / "tall.png"), "blue square", "--model", str(model_dir),
                 "--output", str(tmp_path / "t"), "--json", str(tmp_path / "out.json")])
    assert code == 0
    (record,) = json.loads((tmp_path / "out.json").read_text())
    assert record["image"] == str(tmp_path / "tall.png") and record["prompt"] == "blue square"
    assert record["segmentation"]["size"] == [70, 50]
    decoded = mask_utils.decode(record["segmentation"]).astype(bool)  # pycocotools reads it as the PNG mask
    assert np.array_equal(decoded, read_mask(tmp_path / "t_mask.png"))
    assert record["area"] == int(mask_utils.area(record["segmentation"])) == int(decoded.sum())
    assert 0.0 <= record["presence_score"] <= 1.0 and (record["presence_score"] >= 0.5) == bool(decoded.any())


def test_json_and_batch_records_carry_the_predicted_iou_of_a_model_with_an_iou_head(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"  # the shipped model given an IoU head by hand: a config flag and two tensors
    shutil.copytree(default_model_dir(), folder)
    config = json.loads((folder / "config.json").read_text())
    config["iou_head"] = True
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(folder / "model.safetensors")
    state["seg_head.iou.weight"] = torch.zeros(1, 1)
    state["seg_head.iou.bias"] = torch.tensor([2.0])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    random_image(40, 30, seed=1).save(tmp_path / "a.png")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "red circle"}) + "\n")
    for args in (["a.png", "red circle"], ["--batch", "jobs.jsonl"]):
        result = subprocess.run(["selfie-segment", *args, "--model", str(folder), "--no-images", "--json", "out.json"],
                                cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
        assert result.returncode == 0, result.stderr
        (record,) = json.loads((tmp_path / "out.json").read_text())
        assert record["iou_score"] == pytest.approx(float(torch.tensor(2.0).sigmoid()))
        assert (record["presence_score"] >= 0.5) == (record["area"] > 0)


def test_json_only_writes_no_pictures(model_dir, tmp_path):
    random_image(40, 40).save(tmp_path / "a.png")
    code = main([str(tmp_path / "a.png"), "red", "--model", str(model_dir), "--no-images",
                 "--json", str(tmp_path / "a.json"), "--output", str(tmp_path / "x")])
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png"]
    assert "mask" not in json.loads((tmp_path / "a.json").read_text())[0]


def test_batch_file_keeps_the_good_lines_when_some_are_bad(model_dir, tmp_path, capsys, forwards):
    calls, loaded = forwards
    images = {"one.png": random_image(80, 64, seed=1), "two.png": random_image(48, 72, seed=2)}
    for name, image in images.items():
        image.save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        json.dumps({"image": "one.png", "prompt": "red circle"}),  # 1
        json.dumps({"image": "missing.png", "prompt": "red"}),  # 2: no such file
        "{not json",  # 3
        "",  # blank lines are skipped
        json.dumps({"image": "two.png", "prompt": "   "}),  # 5: empty prompt
        json.dumps({"image": "two.png", "prompt": "blue square"}),  # 6
        json.dumps({"image": "broken.png", "prompt": "green"}),  # 7: unreadable
        json.dumps(["one.png", "red"]),  # 8: not an object
        json.dumps({"image": "one.png", "prompt": "green shape"}),  # 9
        json.dumps({"image": "bomb.png", "prompt": "red"}),  # 10: its header claims 10^10 pixels
        json.dumps({"image": "one.png", "prompt": 42}),  # 11: not text
    ]
    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
    code = main(["--batch", str(tmp_path / "jobs.jsonl"), "--batch-size", "2", "--model", str(model_dir),
                 "--output", str(tmp_path / "out") + "/", "--json", str(tmp_path / "out.json")])
    assert code == 2  # some lines failed
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    for number, reason in [(2, "image not found"), (3, "not JSON"), (5, "is empty"), (7, "cannot read image"),
                           (8, "needs an object"), (10, "is too large: 10,000,000,000 pixels"), (11, "42 is not text")]:
        assert any(f"jobs.jsonl line {number}: " in line and reason in line for line in errors), (number, errors)
    assert len(errors) == 7
    assert sum(calls) == 3 and max(calls) <= 2  # the 3 readable lines, at most 2 per forward

    model, processor = loaded[0]
    records = json.loads((tmp_path / "out.json").read_text())
    assert [(r["line"], r["image"], r["prompt"]) for r in records] == [
        (1, "one.png", "red circle"), (6, "two.png", "blue square"), (9, "one.png", "green shape")]
    for record in records:
        expected = model.segment(processor, images[record["image"]], record["prompt"])[0].numpy()
        stem = record["image"].removesuffix(".png")
        mask = read_mask(tmp_path / "out" / f"{stem}_{record['line']}_mask.png")
        assert np.array_equal(mask, expected) and record["segmentation"]["size"] == list(expected.shape)
        assert (tmp_path / "out" / f"{stem}_{record['line']}_overlay.png").is_file()


def test_output_naming_a_folder_writes_inside_it(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    random_image(32, 32).save(tmp_path / "pic.png")
    (tmp_path / "existing").mkdir()
    assert main(["pic.png", "red", "--model", str(model_dir), "--output", "new/"]) == 0
    assert main(["pic.png", "red", "--model", str(model_dir), "--output", "existing"]) == 0
    assert main(["pic.png", "red", "--model", str(model_dir), "--output", "prefix"]) == 0
    assert main(["pic.png", "red", "--model", str(model_dir)]) == 0
    for name in ("new/pic", "existing/pic", "prefix", "pic"):
        assert (tmp_path / f"{name}_mask.png").is_file() and (tmp_path / f"{name}_overlay.png").is_file()
    assert not (tmp_path / "new_mask.png").exists() and not (tmp_path / "existing_mask.png").exists()


@pytest.mark.parametrize("device", ["cuda:99", "foo", "meta", "mps", "xla"])
def test_unusable_device_is_one_short_error_line(tmp_path, capsys, device):
    random_image(8, 8).save(tmp_path / "ok.png")
    try:
        code = main([str(tmp_path / "ok.png"), "red", "--device", device])
    except SystemExit as exit:  # found before torch loads (mps off macOS)
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --device {device}") and "\n" not in err and len(err) < 160, err
    assert not list(tmp_path.glob("*_mask.png"))


def test_auto_device_and_dtype():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_auto_dtype_is_bfloat16_on_a_gpu_that_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32


def test_dtype_option_loads_the_model_in_that_dtype(model_dir, tmp_path, forwards):
    _, loaded = forwards
    random_image(40, 40).save(tmp_path / "a.png")
    code = main([str(tmp_path / "a.png"), "red", "--model", str(model_dir), "--dtype", "bfloat16",
                 "--device", "cpu", "--output", str(tmp_path / "a")])
    assert code == 0
    model, _ = loaded[0]
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert read_mask(tmp_path / "a_mask.png").shape == (40, 40)


def run_command(argv: list[str], cwd, **env) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -m selfie_segment ARGV` in a fresh interpreter, and the top-level modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "selfie_segment", *argv], capture_output=True,
                            text=True, cwd=cwd, env={**os.environ, **env}, timeout=300)
    lines = result.stderr.splitlines()
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    result.stderr = "".join(f"{line}\n" for line in lines if not line.startswith("import time:"))
    return result, modules


def test_help_and_argument_errors_answer_without_importing_torch(tmp_path):
    random_image(8, 8).save(tmp_path / "ok.png")
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"image": "ok.png", "prompt": "red"}) + "\n")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (tmp_path / "big.png").write_bytes(png_claiming(12_000, 12_000))
    (tmp_path / "notes.txt").write_text("not a picture")
    bad_input = [
        (["bomb.png", "red"], "bomb.png is too large: 10,000,000,000 pixels, more than the limit of 89,478,485"),
        (["big.png", "red"], "big.png is too large: 12000x12000 = 144,000,000 pixels, more than the limit of 89,4"),
        (["notes.txt", "red"], "cannot read image notes.txt: not an image file"),
        ([".", "red"], ". is a folder, not an image"),
        (["ok.png", "?!...,;"], "the prompt '?!...,;' holds no word"),  # the shipped model reads words
        (["ok.png", "red", "--model", "./runs/nothing/final"], "model folder not found: ./runs/nothing/final"),
        (["missing.png", "red circle"], "image not found: missing.png"),
        (["ok.png", "red", " "], "is empty"),
        (["none.jsonl", "red"], "image not found"),
        (["--batch", "none.jsonl"], "batch file not found"),
        (["ok.png", "red", "--output", "a_file/out/"], "a_file is a file, so the folder"),
        (["ok.png", "red", "--output", "a_file/deeper/prefix"], "--output a_file/deeper/prefix: "),
        (["ok.png", "red", "--json", "a_file/masks.json"], "--json a_file/masks.json: "),
        (["--batch", "jobs.jsonl", "--output", "a_file"], "--output a_file: "),  # with --batch, a folder
        (["ok.png", "red", "--model", "."], "not a model folder"),
    ]
    if sys.platform != "darwin":
        bad_input.append((["ok.png", "red", "--device", "mps"], "--device mps cannot be used here"))
    for argv, code in [(["--help"], 0), ([], 2), (["a.png"], 2), (["--batch", "x.jsonl", "a.png"], 2)] + [
        (argv, 2) for argv, _ in bad_input
    ]:
        result, modules = run_command(argv, tmp_path)
        assert result.returncode == code and not modules & {"torch", "transformers"}, (argv, result.stderr)
        if code:
            assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        message = dict((tuple(a), m) for a, m in bad_input).get(tuple(argv))
        assert message is None or message in result.stderr, (argv, result.stderr)
    inputs = {"a_file", "jobs.jsonl", "ok.png", "bomb.png", "big.png", "notes.txt"}
    assert {p.name for p in tmp_path.iterdir()} == inputs  # nothing written
    help_text = run_command(["--help"], tmp_path)[0].stdout
    assert "--batch" in help_text and "--json" in help_text and "--device" in help_text


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda d: None, ["missing.png", "red circle"], "image not found"),
        (lambda d: (d / "bad.png").write_bytes(b"not an image"), ["bad.png", "red circle"], "cannot read image"),
        (lambda d: None, ["ok.png", "red", "   "], "is empty"),
        (lambda d: (d / "empty_model").mkdir(), ["ok.png", "red", "--model", "empty_model"], "not a model folder"),
        (lambda d: (d / "j").mkdir(), ["ok.png", "red", "--json", "j"], "is a folder"),
        (lambda d: None, ["--batch", "none.jsonl"], "batch file not found"),
        (lambda d: (d / "e.jsonl").write_text("\n\n"), ["--batch", "e.jsonl"], "holds no usable line"),
        (lambda d: None, ["ok.png", "red", "--batch-size", "0"], "--batch-size must be at least 1"),
        (lambda d: None, ["ok.png"], "arguments are required"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path, monkeypatch, capsys, setup, args, message):
    monkeypatch.chdir(tmp_path)
    random_image(8, 8).save(tmp_path / "ok.png")
    setup(tmp_path)
    try:
        code = main(args)
    except SystemExit as exit:  # argument errors leave through argparse
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*_mask.png"))


def test_a_file_that_cannot_be_written_is_one_error_line(model_dir, tmp_path, capsys):
    random_image(16, 16).save(tmp_path / "ok.png")
    (tmp_path / "out_mask.png").mkdir()  # in the way of the mask: the write itself fails, after the forward
    code = main([str(tmp_path / "ok.png"), "red", "--model", str(model_dir), "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path / 'out_mask.png'}: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png", "out_mask.png"]  # no staging file left


def test_sixteen_bit_and_exif_rotated_images_are_segmented_as_shown(model_dir, tmp_path, forwards):
    _, loaded = forwards
    gray8 = np.random.default_rng(0).integers(0, 256, (24, 40), dtype=np.uint16)
    Image.fromarray(gray8 * 257).save(tmp_path / "gray16.png")  # 16-bit grayscale, written by PIL from numpy
    pixels = np.asarray(random_image(40, 24))
    exif = Image.Exif()
    exif[0x0112] = 8  # "turn 90 degrees anticlockwise to show"
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", format="JPEG", exif=exif)
    for name in ("gray16.png", "photo.jpg"):
        assert main([str(tmp_path / name), "red", "--model", str(model_dir), "--output", str(tmp_path / name)]) == 0
    model, processor = loaded[0]
    shown_gray = Image.fromarray(gray8.astype(np.uint8)).convert("RGB")
    expected = model.segment(processor, shown_gray, "red")[0].numpy()
    assert np.array_equal(read_mask(tmp_path / "gray16.png_mask.png"), expected)
    overlay = np.asarray(Image.open(tmp_path / "gray16.png_overlay.png").convert("RGB"))[:24]
    assert overlay.std() > 10  # the picture, not a white sheet

    stored = np.asarray(Image.open(tmp_path / "photo.jpg").convert("RGB"))
    shown_photo = Image.fromarray(np.ascontiguousarray(np.rot90(stored)))  # anticlockwise
    expected = model.segment(processor, shown_photo, "red")[0].numpy()
    assert expected.shape == (40, 24) and np.array_equal(read_mask(tmp_path / "photo.jpg_mask.png"), expected)
    assert Image.open(tmp_path / "photo.jpg_overlay.png").width == 24


def test_module_entry_point_reports_bad_input_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "selfie_segment", "missing.png", "red circle"], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == "error: image not found: missing.png\n"


def test_the_shipped_model_is_in_the_package():
    folder = default_model_dir()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "README.md").read_text().count("cIoU") >= 1
    assert sum(f.stat().st_size for f in folder.iterdir()) < 40 * 2**20  # issue 13: under 40 MB


def test_bad_batch_lines_are_skipped_and_the_rest_written(tmp_path):
    """As a user runs it, with the shipped model (which reads words): a decompression bomb, a prompt of punctuation,
    a prompt that is a number and an image too large to decode are each one error line; the good lines are written."""
    random_image(40, 32, seed=1).save(tmp_path / "one.png")
    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (tmp_path / "big.png").write_bytes(png_claiming(12_000, 12_000))
    lines = [{"image": "one.png", "prompt": "red circle"}, {"image": "bomb.png", "prompt": "red"},
             {"image": "one.png", "prompt": "?!...,;"}, {"image": "one.png", "prompt": 42},
             {"image": "big.png", "prompt": "red"}, {"image": "one.png", "prompt": "blue square"}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result, _ = run_command(["--batch", "jobs.jsonl", "--output", "out/", "--json", "masks.json", "--device", "cpu"],
                            tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and "Traceback" not in result.stderr
    for number, reason in [(2, "bomb.png is too large: 10,000,000,000 pixels, more than the limit of 89,478,485"),
                           (3, "the prompt '?!...,;' holds no word"), (4, "the prompt 42 is not text"),
                           (5, "big.png is too large: 12000x12000 = 144,000,000 pixels")]:
        assert any(line.startswith(f"error: jobs.jsonl line {number}: ") and reason in line for line in errors)
    records = json.loads((tmp_path / "masks.json").read_text())
    assert [(r["line"], r["prompt"]) for r in records] == [(1, "red circle"), (6, "blue square")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "one_1_mask.png", "one_1_overlay.png", "one_6_mask.png", "one_6_overlay.png"]
    assert "2 of 6 lines of jobs.jsonl segmented" in result.stdout


def test_a_line_the_model_refuses_costs_only_that_line(model_dir, tmp_path, monkeypatch, capsys, forwards):
    refusing = cli.segment_with_scores

    def segment_with_scores(model, processor, images, prompts, kind):
        if "square" in prompts:
            raise ValueError("no squares today")
        return refusing(model, processor, images, prompts, kind)

    monkeypatch.setattr(cli, "segment_with_scores", segment_with_scores)
    random_image(40, 32).save(tmp_path / "a.png")
    prompts = ["red", "square", "green"]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps({"image": "a.png", "prompt": p}) + "\n" for p in prompts))
    code = main(["--batch", str(tmp_path / "jobs.jsonl"), "--model", str(model_dir), "--no-images",
                 "--json", str(tmp_path / "out.json")])
    assert code == 2
    assert [r["prompt"] for r in json.loads((tmp_path / "out.json").read_text())] == ["red", "green"]
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tmp_path / 'jobs.jsonl'} line 2: no squares today"]


def test_many_prompts_go_through_the_model_batch_size_at_a_time(model_dir, tmp_path, forwards):
    calls, _ = forwards
    random_image(24, 24).save(tmp_path / "a.png")
    forms = ("circle", "square", "shape", "left", "hello")
    prompts = [f"{colour} {form}" for colour in ("red", "blue", "green", "the") for form in forms]
    code = main([str(tmp_path / "a.png"), *prompts, "--model", str(model_dir), "--no-images",
                 "--json", str(tmp_path / "out.json")])
    assert code == 0 and calls == [8, 8, 4]
    assert [r["prompt"] for r in json.loads((tmp_path / "out.json").read_text())] == prompts


def test_images_of_every_kind_are_segmented_as_shown(model_dir, tmp_path, forwards):
    """A GIF (its first frame), a CMYK JPEG, RGBA and palette PNGs with transparent parts (over white), written by
    PIL."""
    _, loaded = forwards
    pixels = np.asarray(random_image(32, 24, seed=3))
    opaque = np.zeros((24, 32), dtype=bool)
    opaque[4:20, 6:26] = True
    white = np.where(opaque[..., None], pixels, 255).astype(np.uint8)
    Image.fromarray(np.dstack([pixels, opaque * np.uint8(255)]), "RGBA").save(tmp_path / "rgba.png")
    palette = Image.fromarray(pixels).quantize(16)
    palette_pixels = np.asarray(palette.convert("RGB"))
    indices = np.asarray(palette).copy()
    indices[~opaque] = 15  # the 16th colour is the transparent one
    palette = Image.fromarray(indices, "P")
    palette.putpalette(Image.fromarray(pixels).quantize(16).getpalette())
    palette.save(tmp_path / "palette.png", transparency=15)
    shown_palette = np.where((indices != 15)[..., None], np.asarray(palette.convert("RGB")), 255).astype(np.uint8)
    frames = [Image.fromarray(pixels).quantize(64), Image.fromarray(255 - pixels).quantize(64)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK" and Image.open(tmp_path / "anim.gif").n_frames == 2
    assert not np.array_equal(palette_pixels, shown_palette)
    shown = {"rgba.png": white, "palette.png": shown_palette,
             "anim.gif": np.asarray(Image.open(tmp_path / "anim.gif").convert("RGB")),
             "cmyk.jpg": np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB"))}
    for name in shown:
        assert main([str(tmp_path / name), "red", "--model", str(model_dir), "--output", str(tmp_path / name)]) == 0
    model, processor = loaded[0]
    for name, expected_pixels in shown.items():
        expected = model.segment(processor, Image.fromarray(expected_pixels), "red")[0].numpy()
        assert np.array_equal(read_mask(tmp_path / f"{name}_mask.png"), expected), name
    overlay = np.asarray(Image.open(tmp_path / "rgba.png_overlay.png").convert("RGB"))[:24]
    assert overlay[0, 0].min() > 100  # the transparent corner is shown light (dimmed white), not black


def test_hub_ids_fail_fast_without_a_network(tmp_path):
    """A name shaped like a Hub id that is neither a folder here nor in the cache: one line at once, before torch,
    offline (`HF_HUB_OFFLINE=1`) and with a Hub that cannot be reached (one try)."""
    random_image(8, 8).save(tmp_path / "ok.png")
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    unreachable = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    for env, reason in [(offline, "HF_HUB_OFFLINE is set"), (unreachable, "the Hub cannot be reached")]:
        result, modules = run_command(["ok.png", "red", "--model", "owner/name"], tmp_path, **env)
        assert result.returncode == 2 and not modules & {"torch", "transformers"}
        assert result.stderr.startswith("error: no folder owner/name here, and the Hub model owner/name is not in "
                                        "the local cache") and reason in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


def test_a_hub_id_in_the_cache_loads_offline(model_dir, tmp_path):
    """A cached Hub snapshot (the cache's layout, written by hand) loads without the network."""
    repo = tmp_path / "hf" / "hub" / "models--owner--name"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    random_image(16, 16).save(tmp_path / "ok.png")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result, _ = run_command(["ok.png", "red", "--model", "owner/name", "--no-images", "--json", "out.json",
                             "--device", "cpu"], tmp_path, **env)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out.json").read_text())[0]["segmentation"]["size"] == [16, 16]
