"""Writers of tiny datasets in the real on-disk formats of SELF1E's training sets (real file names, folder layouts and
JSON / pickle keys; a few small images written with PIL), for the data loader tests.

Each writer returns what it wrote that a test needs to check the loaders against: the expected masks, the
sentences, the paths. `write_data_root` writes every set under one data root in the `build_dataset` layout.
"""

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask_utils


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    """An RGB image of random pixels, in the format of its suffix (JPEG for .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def box_polygon(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    """A COCO polygon (flat [x, y, ...]) around the box [x0, x1] x [y0, y1]."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """`uint8` [height, width] with ones on rows y0..y1-1, columns x0..x1-1."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    pixels = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in pixels:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def compressed_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE, `counts` as the `str` found in JSON files."""
    rle = coco_mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def inside_box(mask: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> bool:
    """Whether `mask` covers the inside of a polygon box (margin 1) and nothing farther than 1 pixel outside."""
    outside = np.ones_like(mask, dtype=bool)
    outside[max(y0 - 1, 0) : y1 + 2, max(x0 - 1, 0) : x1 + 2] = False
    return bool(mask[y0 + 1 : y1, x0 + 1 : x1].all() and not mask[outside].any())


# --- referring ---------------------------------------------------------------------------------------------------


def coco_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def write_refer_dataset(root: Path, dataset: str = "refcoco", split_by: str = "unc") -> dict:
    """A REFER-layout dataset under `root` (LISA's refer_seg/): `<dataset>/refs(<split_by>).p`,
    `<dataset>/instances.json` and two images.

    Image 1 (40x30) holds ann 11 (polygon box (4,5)-(20,15)) and ann 12 (uncompressed RLE, crowd); image 2
    (36x28) holds ann 21 (compressed RLE). Train refs: 100 -> ann 11 (2 sentences), 101 -> ann 12 (1 sentence);
    val ref: 200 -> ann 21.

    Returns `{"image_dir", "sizes": {image_id: (h, w)}, "boxes": {ann_id: box}, "masks": {ann_id: mask},
    "refs": [...]}`.
    """
    if dataset == "refclef":
        file_names = {1: "00/images/1.jpg", 2: "00/images/2.jpg"}
        image_dir = root / "images" / "saiapr_tc-12"
    else:
        file_names = {1: coco_file_name(1), 2: coco_file_name(2)}
        image_dir = root / "images" / "mscoco" / "images" / "train2014"
    sizes = {1: (30, 40), 2: (28, 36)}
    for image_id, (height, width) in sizes.items():
        write_image(image_dir / file_names[image_id], width, height, seed=image_id)
    boxes = {11: (4, 5, 20, 15)}
    masks = {12: box_mask(30, 40, 25, 2, 35, 12), 21: box_mask(28, 36, 3, 3, 12, 20)}
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [box_polygon(*boxes[11])]},
        {"id": 12, "image_id": 1, "category_id": 2, "iscrowd": 1, "segmentation": uncompressed_rle(masks[12])},
        {"id": 21, "image_id": 2, "category_id": 1, "iscrowd": 1, "segmentation": compressed_rle(masks[21])},
    ]
    write_coco(root / dataset / "instances.json", file_names, sizes, annotations, {1: "person", 2: "dog"})

    def ref(ref_id, ann_id, image_id, split, sentences):
        return {
            "ref_id": ref_id,
            "ann_id": ann_id,
            "image_id": image_id,
            "split": split,
            "category_id": 1,
            "file_name": f"{Path(file_names[image_id]).stem}_{ann_id}.jpg",
            "sent_ids": [ref_id * 10 + i for i in range(len(sentences))],
            "sentences": [
                {"sent": s, "raw": s.capitalize(), "tokens": s.split(), "sent_id": ref_id * 10 + i}
                for i, s in enumerate(sentences)
            ],
        }

    refs = [
        ref(100, 11, 1, "train", ["man on the left", "person in red"]),
        ref(101, 12, 1, "train", ["dog right"]),
        ref(200, 21, 2, "val", ["the small dog"]),
    ]
    (root / dataset / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    return {"image_dir": image_dir, "sizes": sizes, "boxes": boxes, "masks": masks, "refs": refs}


def write_coco(path: Path, file_names: dict, sizes: dict, annotations: list, categories: dict) -> Path:
    """A COCO-format JSON: `file_names` / `sizes` by image id, `categories` id -> name."""
    images = [
        {"id": image_id, "file_name": file_names[image_id], "height": height, "width": width}
        for image_id, (height, width) in sizes.items()
    ]
    return write_json(
        path,
        {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": name} for i, name in categories.items()],
        },
    )


def write_grefcoco(root: Path) -> dict:
    """gRefCOCO under `root` (refer_seg/): `grefcoco/grefs(unc).json`, `grefcoco/instances.json`, one COCO image
    (40x30) with anns 11, 12 (polygon boxes) and 13 (compressed RLE).

    Train refs: 1 -> [11, 12] (two targets), 2 -> no target (`ann_id: [-1]`, `no_target: true`), 3 -> [13];
    val ref 4 -> [11].
    """
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    write_image(image_dir / coco_file_name(1), 40, 30, seed=1)
    boxes = {11: (2, 2, 12, 10), 12: (20, 14, 34, 26)}
    masks = {13: box_mask(30, 40, 14, 3, 18, 8)}
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [box_polygon(*boxes[11])]},
        {"id": 12, "image_id": 1, "category_id": 1, "segmentation": [box_polygon(*boxes[12])]},
        {"id": 13, "image_id": 1, "category_id": 2, "segmentation": compressed_rle(masks[13])},
    ]
    categories = {1: "person", 2: "cup"}
    write_coco(root / "grefcoco" / "instances.json", {1: coco_file_name(1)}, {1: (30, 40)}, annotations, categories)

    def ref(ref_id, ann_ids, split, sentence, no_target=False):
        return {
            "ref_id": ref_id,
            "ann_id": ann_ids,
            "image_id": 1,
            "split": split,
            "category_id": [1],
            "file_name": coco_file_name(1),
            "no_target": no_target,
            "sentences": [{"sent": sentence, "raw": sentence, "tokens": sentence.split(), "sent_id": ref_id}],
        }

    refs = [
        ref(1, [11, 12], "train", "both people"),
        ref(2, [-1], "train", "the giraffe", no_target=True),
        ref(3, [13], "train", "the cup"),
        ref(4, [11], "val", "left person"),
    ]
    write_json(root / "grefcoco" / "grefs(unc).json", refs)
    return {"boxes": boxes, "masks": masks, "refs": refs}


# --- reasoning ---------------------------------------------------------------------------------------------------


def write_reasonseg(root: Path, split: str = "train") -> dict:
    """ReasonSeg under `root`: `reason_seg/ReasonSeg/<split>/{a,b}.jpg` and their `.json`.

    a.jpg (48x32, sentence queries x2): target box (4,4)-(30,24) with an ignore box (10,10)-(16,16) inside it,
    and a "flag" box (36,4)-(44,12) that must not count. b.jpg (30x20, phrase query x1): target triangle.
    """
    folder = root / "reason_seg" / "ReasonSeg" / split
    write_image(folder / "a.jpg", 48, 32, seed=3)
    write_image(folder / "b.jpg", 30, 20, seed=4)

    def polygon(label, x0, y0, x1, y1):
        return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "shape_type": "polygon"}

    write_json(
        folder / "a.json",
        {
            "text": ["What in this kitchen keeps food cold?", "Which object would you open to get milk?"],
            "is_sentence": True,
            "shapes": [
                polygon("ignore", 10, 10, 16, 16),
                polygon("target", 4, 4, 30, 24),
                polygon("flag", 36, 4, 44, 12),
            ],
        },
    )
    triangle = {"label": "target", "points": [[2, 2], [20, 2], [2, 16]], "shape_type": "polygon"}
    write_json(folder / "b.json", {"text": ["the red cup"], "is_sentence": False, "shapes": [triangle]})
    return {"folder": folder, "target": (4, 4, 30, 24), "ignore": (10, 10, 16, 16), "flag": (36, 4, 44, 12)}


# --- semantic ----------------------------------------------------------------------------------------------------


def write_label_map(path: Path, labels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)
    return path


def write_ade20k(root: Path, folder: str = "training") -> dict:
    """ADE20K under `root`: `ADEChallengeData2016/{images,annotations}/<folder>/` with two images (32x24).

    ADE_train_00000001: label 3 (sky) on rows 0-7, 13 (person) on box (4,10)-(12,20), 150 (flag) on box
    (20,12)-(26,18), 0 (other) elsewhere. ADE_train_00000002: all 0 (no class).
    """
    base = root / "ADEChallengeData2016"
    labels = np.zeros((24, 32), dtype=np.uint8)
    labels[0:8] = 3
    labels[10:20, 4:12] = 13
    labels[12:18, 20:26] = 150
    for name, label_map, seed in (("ADE_train_00000001", labels, 5), ("ADE_train_00000002", np.zeros_like(labels), 6)):
        write_image(base / "images" / folder / f"{name}.jpg", 32, 24, seed=seed)
        write_label_map(base / "annotations" / folder / f"{name}.png", label_map)
    return {"labels": labels}


def write_cocostuff(root: Path, split: str = "train") -> dict:
    """COCO-Stuff under `root`: `cocostuff/<split>2017/000000000009.png` (stuffthingmaps values: COCO id - 1,
    255 unlabeled) and `coco/<split>2017/000000000009.jpg` (32x24).

    Values: 0 (person) box (2,2)-(10,12), 168 (tree) rows 14-23, 156 (sky-other: hyphenated, not asked),
    rows 0-1, 255 elsewhere.
    """
    labels = np.full((24, 32), 255, dtype=np.uint8)
    labels[0:2] = 156
    labels[2:12, 2:10] = 0
    labels[14:24] = 168
    write_label_map(root / "cocostuff" / f"{split}2017" / "000000000009.png", labels)
    write_image(root / "coco" / f"{split}2017" / "000000000009.jpg", 32, 24, seed=7)
    return {"labels": labels}


def write_pascal_part(root: Path) -> dict:
    """PASCAL-Part (VLPart release) under `root`: `vlpart/pascal_part/train.json` and
    `vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/2008_000001.jpg` (40x30).

    Categories 1 "dog:head", 2 "dog:torso", 3 "pottedplant:pot" (unused). Anns: two dog heads (boxes) and one
    torso. Image 2008_000002 has no annotation.
    """
    image_dir = root / "vlpart" / "pascal_part" / "VOCdevkit" / "VOC2010" / "JPEGImages"
    write_image(image_dir / "2008_000001.jpg", 40, 30, seed=8)
    write_image(image_dir / "2008_000002.jpg", 20, 20, seed=9)
    boxes = {1: (2, 2, 8, 8), 2: (20, 2, 26, 8), 3: (5, 12, 30, 26)}
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [box_polygon(*boxes[1])]},
        {"id": 2, "image_id": 1, "category_id": 1, "segmentation": [box_polygon(*boxes[2])]},
        {"id": 3, "image_id": 1, "category_id": 2, "segmentation": [box_polygon(*boxes[3])]},
    ]
    write_coco(
        root / "vlpart" / "pascal_part" / "train.json",
        {1: "2008_000001.jpg", 2: "2008_000002.jpg"},
        {1: (30, 40), 2: (20, 20)},
        annotations,
        {1: "dog:head", 2: "dog:torso", 3: "pottedplant:pot"},
    )
    return {"boxes": boxes}


def write_paco_lvis(root: Path) -> dict:
    """PACO-LVIS under `root`: `vlpart/paco/annotations/paco_lvis_v1_train.json` over
    `coco/train2017/000000000139.jpg` (40x30). Categories 1 "cup", 2 "cup:handle", 3 "trash_can:lid"; one
    annotation each (polygon boxes)."""
    write_image(root / "coco" / "train2017" / "000000000139.jpg", 40, 30, seed=10)
    boxes = {1: (2, 2, 14, 20), 2: (14, 6, 18, 14), 3: (24, 4, 36, 10)}
    annotations = [
        {"id": i, "image_id": 139, "category_id": i, "segmentation": [box_polygon(*box)]} for i, box in boxes.items()
    ]
    write_coco(
        root / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json",
        {139: "train2017/000000000139.jpg"},
        {139: (30, 40)},
        annotations,
        {1: "cup", 2: "cup:handle", 3: "trash_can:lid"},
    )
    return {"boxes": boxes}


# --- VQA ---------------------------------------------------------------------------------------------------------


def write_llava_instruct(root: Path) -> dict:
    """LLaVA-Instruct-150k under `root`: `llava_dataset/llava_instruct_150k.json` (two records) over
    `coco/train2017/000000033471.jpg` and `000000052846.jpg`."""
    image_dir = root / "coco" / "train2017"
    write_image(image_dir / "000000033471.jpg", 32, 24, seed=11)
    write_image(image_dir / "000000052846.jpg", 24, 32, seed=12)
    records = [
        {
            "id": "000000033471",
            "image": "000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {
            "id": "000000052846",
            "image": "000000052846.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhere is the cat positioned in the image?"},
                {"from": "gpt", "value": "The cat is positioned on top of the back of the couch."},
            ],
        },
    ]
    write_json(root / "llava_dataset" / "llava_instruct_150k.json", records)
    return {"records": records}


def write_vqav2(root: Path, split: str = "train") -> dict:
    """VQAv2 jsonl under `root`: `vqav2/vqav2_<split>.jsonl` (InternVL form, image paths relative to `root`) over
    `coco/train2014/`. Line 1 has `answer`, line 3 only VQAv2 `answers` (majority "2"); line 2 is blank."""
    image_dir = root / "coco" / "train2014"
    write_image(image_dir / "COCO_train2014_000000000009.jpg", 32, 24, seed=13)
    write_image(image_dir / "COCO_train2014_000000000025.jpg", 28, 20, seed=14)
    records = [
        {"image": "coco/train2014/COCO_train2014_000000000009.jpg", "question": "What color is the cat?",
         "question_id": 9001, "answer": "black"},
        {"image": "coco/train2014/COCO_train2014_000000000025.jpg", "question": "How many giraffes are there?",
         "question_id": 25001, "answers": [{"answer": "3"}, {"answer": "2"}, {"answer": "2"}]},
    ]  # fmt: skip
    path = root / "vqav2" / f"vqav2_{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n", encoding="utf-8")
    return {"records": records, "path": path}


def write_data_root(root: Path) -> Path:
    """Every training set above under one data root, in the `build_dataset` layout."""
    for dataset in ("refcoco", "refcoco+", "refcocog", "refclef"):
        write_refer_dataset(root / "refer_seg", dataset, "umd" if dataset == "refcocog" else "unc")
    write_grefcoco(root / "refer_seg")
    write_reasonseg(root)
    write_ade20k(root)
    write_cocostuff(root)
    write_pascal_part(root)
    write_paco_lvis(root)
    write_llava_instruct(root)
    write_vqav2(root)
    return root


# --- prompts -----------------------------------------------------------------------------------------------------


def training_questions(text: str, kind: str = "phrase") -> set[str]:
    """Every user turn the training templates can make of `text`."""
    from modeling_selfie.processing_selfie import LONG_QUESTIONS, SHORT_QUESTIONS

    templates = LONG_QUESTIONS if kind == "instruction" else SHORT_QUESTIONS
    return {template.format(text=text) for template in templates}
