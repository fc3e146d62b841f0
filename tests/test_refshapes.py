"""RefShapes: determinism, exact masks, the meaning of every expression kind, format and vocabulary."""

import numpy as np
import pytest
from PIL import Image

from modeling_selfie.data.refshapes import (
    BACKGROUND_DISTANCE,
    BACKGROUND_FAMILIES,
    COLOUR_RIDDLES,
    COLOURS,
    EXPRESSION_KINDS,
    FORM_RIDDLES,
    FORMS,
    PLURALS,
    Group,
    PlacedShape,
    RefShapesDataset,
    check_backgrounds,
    check_directions,
    RefShapesExample,
    curriculum_dataset,
    parse_kind_weights,
    opposite_expression,
    rasterise_shape,
    render_example_grid,
    render_scene,
    scene_expressions,
    split_words,
    vocabulary,
)
from modeling_selfie.data.sample import check_sample
from modeling_selfie.processing_selfie import (
    ANSWERS,
    LONG_QUESTIONS,
    SHORT_QUESTIONS,
    VALIDATION_ANSWER,
    segmentation_question,
)
from modeling_selfie.training import SelfieDataCollator

ITEMS_PER_KIND = 12
SINGULAR = {plural: form for form, plural in PLURALS.items()}
POSITION_WORDS = {
    "leftmost": "left", "left": "left", "rightmost": "right", "right": "right",
    "topmost": "top", "highest": "top", "top": "top", "bottommost": "bottom", "lowest": "bottom", "bottom": "bottom",
}  # fmt: skip
RELATION_WORDS = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}


def only_kind(kind: str, split: str = "validation", size: int = ITEMS_PER_KIND) -> RefShapesDataset:
    return RefShapesDataset(split, size=size, seed=7, kind_weights={k: float(k == kind) for k in EXPRESSION_KINDS})


@pytest.fixture(scope="module")
def examples_by_kind():
    """kind -> [(example, sample)] from datasets producing only that kind."""
    out = {}
    for kind in EXPRESSION_KINDS:
        dataset = only_kind(kind)
        out[kind] = [(dataset.example(i), dataset[i]) for i in range(len(dataset))]
    return out


@pytest.fixture(scope="module")
def mixed():
    dataset = RefShapesDataset("validation", size=80, seed=1)
    return [dataset[i] for i in range(len(dataset))]


def parse_group(phrase: str) -> Group:
    """The colour and form named in a noun phrase ("leftmost red shape" -> Group("red", None))."""
    words = split_words(phrase)
    colour = next((w for w in words if w in COLOURS), None)
    form = next((SINGULAR.get(w, w) for w in words if SINGULAR.get(w, w) in FORMS), None)
    return Group(colour, form)


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


def assert_same_sample(a: dict, b: dict):
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert np.array_equal(a["masks"], b["masks"])
    assert a["conversation"] == b["conversation"]
    assert (a["query"], a["expression_kind"]) == (b["query"], b["expression_kind"])


def test_same_seed_gives_identical_items_in_any_order():
    first = RefShapesDataset("train", size=8, seed=5)
    second = RefShapesDataset("train", size=8, seed=5)
    backwards = {i: second[i] for i in reversed(range(8))}
    for i in range(8):
        assert_same_sample(first[i], backwards[i])
    assert_same_sample(first[-1], first[7])


def test_splits_and_seeds_draw_different_items():
    def images(split, seed):
        dataset = RefShapesDataset(split, size=6, seed=seed)
        return [np.asarray(dataset[i]["image"]) for i in range(6)]

    reference = images("train", 0)
    for other in (images("validation", 0), images("test", 0), images("train", 1)):
        assert all(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(reference, other))


def test_samples_follow_the_format(mixed):
    for i, sample in enumerate(mixed):
        check_sample(sample, where=f"refshapes item {i}")
        image, masks = sample["image"], sample["masks"]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert masks.dtype == np.uint8 and masks.shape == (1, image.height, image.width)
        assert set(np.unique(masks)) <= {0, 1}
        assert (sample["task"], sample["source"]) == ("referring", "refshapes")
        assert sample["expression_kind"] in EXPRESSION_KINDS
        expected_kind = "instruction" if sample["expression_kind"] == "reasoning" else "phrase"
        assert sample["query_kind"] == expected_kind
        user, assistant = sample["conversation"]
        assert user == {"role": "user", "content": segmentation_question(sample["query"], expected_kind)}
        assert assistant == {"role": "assistant", "content": VALIDATION_ANSWER}


def test_train_prompts_are_sampled_templates_over_the_same_scenes():
    train = RefShapesDataset("test", size=30, seed=2, train=True)
    plain = RefShapesDataset("test", size=30, seed=2)
    questions, answers = set(), set()
    for i in range(len(train)):
        sample, reference = train[i], plain[i]
        assert np.array_equal(sample["masks"], reference["masks"]) and sample["query"] == reference["query"]
        user, assistant = (turn["content"] for turn in sample["conversation"])
        templates = LONG_QUESTIONS if sample["query_kind"] == "instruction" else SHORT_QUESTIONS
        assert user in {t.format(text=sample["query"]) for t in templates}
        assert assistant in ANSWERS and assistant.count("[SEG]") == 1
        questions.add(user.replace(sample["query"], "{text}"))
        answers.add(assistant)
    assert len(questions) > 2 and len(answers) > 2


def test_every_kind_occurs_in_the_default_mix(mixed):
    assert {sample["expression_kind"] for sample in mixed} == set(EXPRESSION_KINDS)


def test_aspect_ratios_and_sizes_vary(mixed):
    sizes = [sample["image"].size for sample in mixed]
    assert all(96 <= side <= 320 for size in sizes for side in size)
    aspects = [width / height for width, height in sizes]
    assert max(aspects) > 1.5 and min(aspects) < 1 / 1.5
    assert any(0.8 < aspect < 1.25 for aspect in aspects)
    assert len(set(sizes)) > len(sizes) // 2


@pytest.mark.parametrize("kind", EXPRESSION_KINDS)
def test_masks_are_exact(examples_by_kind, kind):
    for example, sample in examples_by_kind[kind]:
        scene = example.scene
        pixels = np.asarray(scene.image)
        width, height = scene.size
        assert scene.masks.sum(axis=0).max() <= 1  # visible masks are disjoint
        for shape, mask, area in zip(scene.shapes, scene.masks, scene.areas):
            assert mask.sum() == area > 0
            assert np.all(pixels[mask] == COLOURS[shape.colour])  # every visible pixel has the shape's colour
            assert not np.any(mask & ~rasterise_shape(shape, width, height))
        union = np.zeros((height, width), dtype=np.uint8)
        for index in example.expression.targets:
            union |= scene.masks[index]
        assert np.array_equal(sample["masks"][0], union)


def test_colour_shape_names_the_only_such_shape(examples_by_kind):
    for example, sample in examples_by_kind["colour_shape"]:
        group = parse_group(sample["query"])
        assert group.colour and group.form and group.singular == sample["query"]
        (target,) = group.members(example.scene)
        assert example.expression.targets == (target,)
        pixels = np.asarray(sample["image"])[sample["masks"][0].astype(bool)]
        assert len(pixels) and np.all(pixels == COLOURS[group.colour])


def test_position_picks_the_extreme_member_of_its_group(examples_by_kind):
    for example, sample in examples_by_kind["position"]:
        scene, expression = example.scene, example.expression
        (direction,) = {POSITION_WORDS[w] for w in split_words(sample["query"]) if w in POSITION_WORDS}
        group = parse_group(sample["query"]).members(scene)
        assert expression.group == group and len(group) >= 2
        axis = 0 if direction in ("left", "right") else 1
        coords = {i: centroid(scene.masks[i])[axis] for i in group}
        pick = min if direction in ("left", "top") else max
        assert expression.targets == (pick(coords, key=coords.get),)
        assert np.array_equal(sample["masks"][0], scene.masks[expression.targets[0]])


def test_size_picks_the_largest_or_smallest_member_of_its_group(examples_by_kind):
    for example, sample in examples_by_kind["size"]:
        scene, expression = example.scene, example.expression
        words = split_words(sample["query"])
        group = parse_group(sample["query"]).members(scene)
        assert expression.group == group and len(group) >= 2
        areas = {i: int(scene.masks[i].sum()) for i in group}
        pick = min if {"smallest", "small"} & set(words) else max
        (target,) = expression.targets
        assert target == pick(areas, key=areas.get)
        assert int(sample["masks"].sum()) == areas[target]


def test_relation_target_is_the_only_one_on_that_side_of_the_anchor(examples_by_kind):
    for example, sample in examples_by_kind["relation"]:
        scene, expression = example.scene, example.expression
        subject, anchor_phrase = sample["query"].rsplit(" the ", 1)
        (relation,) = [w for w in split_words(subject) if w in RELATION_WORDS]
        (anchor,) = parse_group(anchor_phrase).members(scene)
        assert expression.anchor == anchor
        group = tuple(i for i in parse_group(subject).members(scene) if i != anchor)
        assert expression.group == group and len(group) >= 2
        axis, sign = RELATION_WORDS[relation]
        along = {i: sign * (centroid(scene.masks[i]) - centroid(scene.masks[anchor]))[axis] for i in group}
        (target,) = expression.targets
        assert along[target] > 0 and all(along[i] < 0 for i in group if i != target)


def test_multi_target_is_the_union_of_its_group(examples_by_kind):
    for example, sample in examples_by_kind["multi_target"]:
        scene = example.scene
        group = parse_group(sample["query"]).members(scene)
        assert example.expression.targets == group and len(group) >= 2
        if sample["query"].startswith("both"):
            assert len(group) == 2
        assert np.array_equal(sample["masks"][0], scene.masks[list(group)].any(axis=0))


def test_no_target_names_an_absent_shape_and_has_an_empty_mask(examples_by_kind):
    for example, sample in examples_by_kind["no_target"]:
        group = parse_group(sample["query"])
        assert group.colour and group.form and group.members(example.scene) == ()
        assert example.expression.targets == () and sample["masks"].sum() == 0
        assert sample["conversation"][1]["content"].count("[SEG]") == 1


def test_reasoning_questions_have_one_fitting_answer(examples_by_kind):
    form_of = {template.split("{subject}")[-1]: form for form, ts in FORM_RIDDLES.items() for template in ts}
    colour_of = {thing: colour for colour, thing in COLOUR_RIDDLES.items()}
    for example, sample in examples_by_kind["reasoning"]:
        query, scene = sample["query"], example.scene
        assert sample["query_kind"] == "instruction" and query.startswith("Which ") and query.endswith("?")
        (target,) = example.expression.targets
        shape = scene.shapes[target]
        form = next((f for ending, f in form_of.items() if query.endswith(ending)), None)
        thing = next((t for t in colour_of if query.endswith(f"colour of {t}?")), None)
        if form:
            assert shape.form == form
        elif thing:
            assert shape.colour == colour_of[thing]
        else:  # largest or smallest shape of the scene
            pick = max if "largest" in query or "biggest" in query else min
            assert target == pick(range(len(scene.shapes)), key=lambda i: scene.areas[i])


def test_vocabulary_covers_every_expression(examples_by_kind, mixed):
    words = set(vocabulary())
    assert all(split_words(word) == [word] for word in words)
    queries = [s["query"] for pairs in examples_by_kind.values() for _, s in pairs] + [s["query"] for s in mixed]
    assert {w for query in queries for w in split_words(query)} <= words


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="split"):
        RefShapesDataset("dev")
    with pytest.raises(ValueError, match="Unknown expression kinds"):
        RefShapesDataset(kind_weights={"colour": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        RefShapesDataset(kind_weights=dict.fromkeys(EXPRESSION_KINDS, 0.0))
    with pytest.raises(IndexError):
        RefShapesDataset(size=3)[3]


def test_render_example_grid_writes_a_png(tmp_path):
    path = tmp_path / "grid.png"
    sheet = render_example_grid(RefShapesDataset("validation", size=5, seed=0), 5, path, columns=3, cell_size=120)
    with Image.open(path) as written:
        assert written.format == "PNG" and written.size == sheet.size
    assert sheet.width == 3 * 120 and sheet.height > 2 * 120


def test_curriculum_puts_the_warmup_kinds_first():
    weights = parse_kind_weights("colour_shape=2, multi_target")
    assert weights["colour_shape"] == 2 and weights["multi_target"] == 1 and weights["position"] == 0
    data = curriculum_dataset(20, 0.5, weights, seed=0)
    kinds = [data[i]["expression_kind"] for i in range(20)]
    assert set(kinds[:10]) <= {"colour_shape", "multi_target"}
    assert len(set(kinds[10:])) > 2  # then the full mix
    with pytest.raises(ValueError, match="'colour'"):
        parse_kind_weights("colour=1")
    with pytest.raises(ValueError, match="warmup_fraction"):
        curriculum_dataset(20, 1.5, weights)


def test_curriculum_keeps_opposite_pairs_inside_even_batches():
    weights = {"colour_shape": 1.0}
    data = curriculum_dataset(20, 0.25, weights, kind_weights={"position": 1.0}, opposite_pairs=True)
    warmup, rest = data.datasets
    assert len(warmup) == 4 and len(rest) == 16  # 5 warmup items would shift every pair across a batch boundary
    assert rest.opposite_pairs and not warmup.opposite_pairs
    assert len(curriculum_dataset(20, 0.25, weights).datasets[0]) == 5  # without pairs the fraction is kept


def test_curriculum_draws_the_rest_from_the_given_mix():
    warmup, rest = parse_kind_weights("colour_shape"), parse_kind_weights("no_target")
    data = curriculum_dataset(20, 0.25, warmup, kind_weights=rest)
    kinds = [data[i]["expression_kind"] for i in range(20)]
    assert kinds == ["colour_shape"] * 5 + ["no_target"] * 15
    assert not any(data[i]["masks"].any() for i in range(5, 20))  # no target: empty masks


def test_multi_turn_items_ask_several_expressions_of_one_scene():
    single = RefShapesDataset("validation", size=6, seed=3)
    multi = RefShapesDataset("validation", size=6, seed=3, max_turns=3)
    for i in range(len(multi)):
        one, sample = single[i], multi[i]
        check_sample(sample, where=f"item {i}")
        assert np.array_equal(np.asarray(sample["image"]), np.asarray(one["image"]))
        assert sample["conversation"][:2] == one["conversation"] and sample["query"] == one["query"]
        turns = len(sample["conversation"]) // 2
        assert 1 < turns <= 3 and sample["masks"].shape[0] == turns
        assert np.array_equal(sample["masks"][0], one["masks"][0])
        scene = multi.example(i).scene
        everything = [e for kind in EXPRESSION_KINDS for e in scene_expressions(scene, kind)]
        asked = []
        for turn in range(turns):
            question = sample["conversation"][2 * turn]["content"]
            expression = next(
                e for e in everything if segmentation_question(e.text, e.query_kind) == question
            )  # the validation template quotes the expression
            target = RefShapesExample(scene, expression).target_mask()
            assert np.array_equal(sample["masks"][turn], target), (i, turn, expression.text)
            assert sample["conversation"][2 * turn + 1]["content"].count("[SEG]") == 1
            asked.append(expression.text)
        assert len(set(asked)) == turns  # no expression asked twice


def test_multi_turn_items_collate_with_one_mask_per_seg(tiny):
    _, processor = tiny
    data = RefShapesDataset("train", size=3, seed=0, max_turns=3)
    batch = SelfieDataCollator(processor)([data[i] for i in range(3)])
    for b, masks in enumerate(batch["mask_labels"]):
        assert masks.shape[0] == int((batch["input_ids"][b] == processor.seg_token_id).sum()) == len(data[b]["masks"])
    with pytest.raises(ValueError, match="max_turns"):
        RefShapesDataset(max_turns=0)


@pytest.mark.parametrize("family", BACKGROUND_FAMILIES)
def test_every_background_family_keeps_the_shapes_apart_from_the_background(family):
    dataset = RefShapesDataset("train", size=6, seed=4, backgrounds=(family,))
    for index in range(len(dataset)):
        scene = dataset.example(index).scene
        pixels = np.asarray(scene.image).astype(float)
        shapes = scene.masks.any(0)
        background = pixels[~shapes]
        if family in ("dark", "mid", "saturated", "texture"):  # flat colours, each far from every shape colour
            distance = np.min([np.linalg.norm(background - rgb, axis=-1) for rgb in COLOURS.values()], axis=0)
            assert distance.min() >= BACKGROUND_DISTANCE
        level = background.mean()
        assert {"dark": level < 90, "mid": 70 < level < 190, "pale": level > 170}.get(family, True)
        for shape, mask in zip(scene.shapes, scene.masks):
            assert np.all(pixels[mask] == COLOURS[shape.colour])


def test_the_default_background_is_pale_and_all_means_every_family():
    assert check_backgrounds("all") == BACKGROUND_FAMILIES and check_backgrounds("dark,noise") == ("dark", "noise")
    with pytest.raises(ValueError, match="lilac"):
        RefShapesDataset("train", size=1, backgrounds="lilac")
    pale = RefShapesDataset("test", size=4, seed=0)
    again = RefShapesDataset("test", size=4, seed=0, backgrounds=("pale",), tiny_shapes=False)
    for index in range(4):  # the options' defaults draw exactly what the splits held before they existed
        assert np.array_equal(np.asarray(pale[index]["image"]), np.asarray(again[index]["image"]))
    mixed = RefShapesDataset("train", size=40, seed=1, backgrounds="all")
    levels = [np.asarray(mixed.example(i).scene.image).mean() for i in range(40)]
    assert min(levels) < 90 < 170 < max(levels)


def test_directions_limit_position_and_relation_words_to_one_side_per_axis():
    """The first stage of a direction curriculum: "left,top" draws "leftmost" / "above", never "rightmost" / "below",
    and leaves the other kinds as they were."""
    mix = {kind: float(kind in ("position", "relation", "colour_shape")) for kind in EXPRESSION_KINDS}
    one_side = RefShapesDataset("train", size=60, seed=2, kind_weights=mix, max_turns=3, directions="left,top")
    relation_words = {"left": "left", "right": "right", "above": "top", "below": "bottom"}
    read = {"position": POSITION_WORDS, "relation": relation_words}
    named, kinds = set(), set()
    for index in range(len(one_side)):
        sample, example = one_side[index], one_side.example(index)
        assert example.expression.direction in (None, "left", "top")
        kinds.add(sample["expression_kind"])
        questions = [turn["content"] for turn in sample["conversation"] if turn["role"] == "user"]
        for question in questions:
            named |= {read[kind][word] for kind in read for word in split_words(question) if word in read[kind]}
    assert named == {"left", "top"} and kinds == {"position", "relation", "colour_shape"}
    every = RefShapesDataset("train", size=60, seed=2, kind_weights=mix, max_turns=3)
    again = RefShapesDataset("train", size=60, seed=2, kind_weights=mix, max_turns=3, directions="all")
    for index in range(0, 60, 7):  # "all" (the default) draws what the split held before the option existed
        assert_same_sample(every[index], again[index])
    assert check_directions("all") == ("left", "right", "top", "bottom")
    with pytest.raises(ValueError, match="sideways"):
        RefShapesDataset("train", size=1, directions="left,sideways")


def test_the_opposite_expression_asks_the_other_way_round_in_the_same_group():
    shapes = [PlacedShape("circle", "red", (30, 40), 12), PlacedShape("circle", "red", (150, 40), 12),
              PlacedShape("square", "blue", (90, 100), 14)]  # fmt: skip
    scene = render_scene(shapes, np.full((130, 180, 3), 230, np.uint8))
    leftmost = next(e for e in scene_expressions(scene, "position") if e.text == "leftmost red circle")
    assert leftmost.direction == "left" and leftmost.targets == (0,)
    rightmost = opposite_expression(scene, leftmost)
    assert (rightmost.text, rightmost.targets, rightmost.group) == ("rightmost red circle", (1,), (0, 1))
    assert opposite_expression(scene, rightmost).targets == (0,)
    assert opposite_expression(scene, leftmost, directions=("left", "top")) is None  # "right" is not asked
    (blue,) = [e for e in scene_expressions(scene, "colour_shape") if e.text == "blue square"]
    assert blue.direction is None and opposite_expression(scene, blue) is None


def test_opposite_pairs_put_both_directions_of_one_scene_in_a_batch():
    mix = {kind: float(kind in ("position", "colour_shape")) for kind in EXPRESSION_KINDS}
    plain = RefShapesDataset("train", size=40, seed=5, kind_weights=mix)
    paired = RefShapesDataset("train", size=40, seed=5, kind_weights=mix, opposite_pairs=True)
    opposites = 0
    for even in range(0, 40, 2):
        assert_same_sample(plain[even], paired[even])  # even items are drawn as without the option
        first, second = paired.example(even), paired.example(even + 1)
        if opposite_expression(first.scene, first.expression) is not None:
            opposites += 1
            words = [{POSITION_WORDS[w] for w in split_words(e.expression.text) if w in POSITION_WORDS}
                     for e in (first, second)]  # fmt: skip
            assert {*words[0], *words[1]} in ({"left", "right"}, {"top", "bottom"}) and words[0] != words[1]
            assert first.expression.group == second.expression.group
            assert not np.array_equal(first.target_mask(), second.target_mask())
            assert np.array_equal(np.asarray(paired[even]["image"]), np.asarray(paired[even + 1]["image"]))
        else:  # no opposite in the scene: the odd item is its own draw
            assert_same_sample(plain[even + 1], paired[even + 1])
    assert opposites >= 5


def test_tiny_shapes_are_about_one_patch_across_once_tiled():
    plain = RefShapesDataset("train", size=30, seed=2)
    tiny = RefShapesDataset("train", size=30, seed=2, tiny_shapes=True)

    def smallest(dataset):  # radius over the image's short side
        scenes = [dataset.example(i).scene for i in range(30)]
        return min(shape.radius / min(scene.size) for scene in scenes for shape in scene.shapes)

    assert smallest(plain) >= 0.11 - 1e-9 and smallest(tiny) < 0.09


def test_the_form_map_names_the_visible_form_of_each_pixel():
    """A star drawn over part of a ring: the overlap is the star's, the ring's hole and the rest are background."""
    shapes = [PlacedShape("ring", "red", (40, 40), 20), PlacedShape("star", "blue", (62, 40), 14)]
    scene = render_scene(shapes, np.full((80, 100, 3), 230, np.uint8))
    forms = scene.form_map()
    assert forms.shape == (80, 100) and forms.dtype == np.uint8
    ring, star = 1 + FORMS.index("ring"), 1 + FORMS.index("star")
    assert forms[40, 22] == ring and forms[40, 40] == 0 and forms[40, 62] == star and forms[5, 5] == 0
    assert (forms == ring).sum() == scene.areas[0] and (forms == star).sum() == scene.areas[1]
    item = RefShapesDataset("train", size=1, seed=0)[0]
    assert item["form_map"].shape == item["masks"].shape[1:] and item["form_map"].max() > 0
