"""Generation with images, with and without `[SEG]` in the prompt.

Every cache transformers offers for this model (static, offloaded static, offloaded) gives the tokens and logits of
the dynamic cache, for one query, a batch of equal-length queries and a padded batch, with greedy search, seeded
sampling and beam search, from `input_ids` and from `inputs_embeds`, with sdpa, eager and flex attention. Static-cache
generation hands the model a mask it prebuilt (`{"full_attention": None}` without padding, a 4-D mask with it, a
`BlockMask` with flex attention); the prefill of a `[SEG]` prompt must get the dual pathway from each. A compiled
(`fullgraph`) static-cache run gives the eager tokens and does not recompile for a shorter prompt; `model.chat` answers
the same with a static cache."""

import pytest
import torch
from transformers import CompileConfig

from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS, random_image

IMAGES = (random_image(80, 64), random_image(64, 48, seed=1))
LAYOUTS = {  # the [SEG] prompt ("What is {x} in this image? ... [SEG].") continued
    "one query": ["the red circle"],
    "equal lengths": ["red circle", "blue square"],  # a batch without padding
    "padded": ["the red circle", "shape"],
}
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, temperature=1.0),
    "beam search": dict(do_sample=False, num_beams=2),
}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers offloads a cache to CUDA only")
CACHES = ["static", pytest.param("offloaded_static", marks=NEEDS_CUDA), pytest.param("offloaded", marks=NEEDS_CUDA)]
NEW_TOKENS = 4


def seg_inputs(processor, layout):
    queries = LAYOUTS[layout]
    return processor(images=list(IMAGES[: len(queries)]), queries=queries)


def chat_inputs(processor, layout):
    """The same layouts without `[SEG]`: InternVL's chat prompt (causal attention, as InternVL)."""
    questions = {
        "one query": ["hello"], "equal lengths": ["hello", "describe"], "padded": ["describe the shape", "hello"]
    }
    text = [f"<|im_start|>user\n<IMG_CONTEXT>\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in questions[layout]]
    return processor(images=list(IMAGES[: len(text)]), text=text)


def as_embeddings(model, inputs):
    """`inputs` with `inputs_embeds` in place of `input_ids` (image and `[SEG]` tokens are found from them)."""
    inputs = dict(inputs)
    with torch.no_grad():
        inputs["inputs_embeds"] = model.get_input_embeddings()(inputs.pop("input_ids"))
    return inputs


def generate(model, inputs, seed=0, **kwargs):
    """Sequences (new tokens only) and per-step logits of `NEW_TOKENS` generated tokens."""
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0,
                             return_dict_in_generate=True, output_logits=True, **kwargs)
    new_tokens = out.sequences[:, -NEW_TOKENS:]
    assert out.sequences.shape[1] == NEW_TOKENS + (inputs["input_ids"].shape[1] if "input_ids" in inputs else 0)
    return new_tokens, torch.stack(out.logits)


def assert_same_generation(got, expected):
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def dynamic_results(tiny):
    """The dynamic cache's generation from `input_ids`, per (layout, mode): the reference."""
    model, processor = tiny
    results = {}

    def result(layout, mode):
        if (layout, mode) not in results:
            results[layout, mode] = generate(model, seg_inputs(processor, layout), **MODES[mode])
        return results[layout, mode]

    return result


@pytest.mark.parametrize("source", ["input_ids", "inputs_embeds"])
@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_cache_generates_what_the_dynamic_cache_does(tiny, dynamic_results, layout, mode, cache, source):
    model, processor = tiny
    inputs = seg_inputs(processor, layout)
    if source == "inputs_embeds":
        inputs = as_embeddings(model, inputs)
    got = generate(model, inputs, cache_implementation=cache, **MODES[mode])
    assert_same_generation(got, dynamic_results(layout, mode))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_without_seg_the_static_cache_generates_what_the_dynamic_cache_does(tiny, layout):
    model, processor = tiny
    inputs = chat_inputs(processor, layout)
    assert_same_generation(generate(model, inputs, cache_implementation="static"), generate(model, inputs))


@pytest.fixture(scope="module")
def attention_models():
    """Tiny models (the `tiny` weights) with another attention implementation than sdpa, by name."""
    models = {}

    def model_and_processor(implementation):
        if implementation not in models:
            models[implementation] = tiny_model_and_processor(WORDS, seed=0)
            models[implementation][0].set_attn_implementation(implementation)
        return models[implementation]

    return model_and_processor


@pytest.mark.parametrize("source", ["input_ids", "inputs_embeds"])
@pytest.mark.parametrize(  # flex attention: a `BlockMask` with and without padding alike; its compiles are slow
    "implementation, layout", [*(("eager", layout) for layout in LAYOUTS), ("flex_attention", "padded")]
)
def test_the_static_cache_prefill_uses_the_dual_pathway_with_every_attention(
    attention_models, dynamic_results, implementation, layout, source
):
    """With eager attention the prebuilt mask is a float 4-D mask (or `None` without padding), with flex attention a
    `BlockMask`: the prefill's logits equal sdpa's with the dynamic cache, and differ from causal attention's. (The
    decoding steps of transformers' flex attention with a static cache differ from its dynamic cache's by up to 0.05
    on an unpadded batch, without `[SEG]` too, so only eager's whole generation is compared.)"""
    model, processor = attention_models(implementation)
    inputs = seg_inputs(processor, layout)
    if source == "inputs_embeds":
        inputs = as_embeddings(model, inputs)
    static, expected = generate(model, inputs, cache_implementation="static"), dynamic_results(layout, "greedy")
    torch.testing.assert_close(static[1][0], expected[1][0], atol=1e-5, rtol=1e-4)
    if implementation == "eager":
        assert_same_generation(static, expected)
    mode, model.config.seg_attention = model.config.seg_attention, "causal"
    try:
        causal = generate(model, inputs, cache_implementation="static")
    finally:
        model.config.seg_attention = mode
    assert not torch.allclose(causal[1][0], static[1][0], atol=1e-4)


def test_the_unknown_word_penalty_reads_a_prebuilt_mask(tiny):
    """The presence score's unknown-word count takes padding from a `[B, L]` mask only; static-cache generation's
    prebuilt one (a dict) is not read as one."""
    model, processor = tiny
    inputs = seg_inputs(processor, "padded")  # the prebuilt mask: {"full_attention": 4-D mask}
    assert processor.tokenizer.unk_token_id is not None
    model.config.unk_token_id = processor.tokenizer.unk_token_id
    try:
        assert_same_generation(generate(model, inputs, cache_implementation="static"), generate(model, inputs))
    finally:
        model.config.unk_token_id = None


@pytest.fixture
def compiled_model():
    """A fresh tiny model (generate keeps the compiled forward on it) and the compile settings generate uses on
    every device: `fullgraph` (a graph break fails), fixed shapes, the cheap eager backend."""
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    compile_config._compile_all_devices = True  # generate compiles on accelerators only, unless told so
    torch._dynamo.reset()
    yield model, processor, compile_config
    torch._dynamo.reset()


@pytest.mark.parametrize("source", ["input_ids", "inputs_embeds"])
@pytest.mark.parametrize("first, shorter", [(["the red circle"], ["shape"]), (LAYOUTS["padded"], ["red", "shape"])])
def test_compiled_static_cache_generation_does_not_recompile_for_a_shorter_prompt(
    compiled_model, first, shorter, source
):
    model, processor, compile_config = compiled_model
    runs = []
    for queries in (first, shorter):
        inputs = processor(images=list(IMAGES[: len(queries)]), queries=queries)
        if source == "inputs_embeds":
            inputs = as_embeddings(model, inputs)
        runs.append((inputs, generate(model, inputs)))
    assert runs[1][0]["attention_mask"].shape[1] < runs[0][0]["attention_mask"].shape[1]

    inputs, expected = runs[0]
    compiled = generate(model, inputs, cache_implementation="static", compile_config=compile_config)
    assert model._compiled_call is not None  # the decoding steps ran compiled
    assert_same_generation(compiled, expected)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames > 0
    inputs, expected = runs[1]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, inputs, cache_implementation="static", compile_config=compile_config)
    assert_same_generation(compiled, expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_chat_with_a_static_cache_answers_as_with_the_dynamic_one(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": "describe the red circle"}]
    image = random_image(80, 64)
    dynamic = model.chat(processor, image, messages, max_new_tokens=6)
    static = model.chat(processor, image, messages, max_new_tokens=6, cache_implementation="static")
    assert static["text"] == dynamic["text"] and dynamic["text"]
    assert torch.equal(static["masks"], dynamic["masks"])


def test_a_static_cache_forward_then_a_fullgraph_compiled_decoding_step(tiny):
    """A prefill into transformers' `StaticCache` gives the masks and logits of a forward without cache; the next
    decoding step reads no device value (it compiles with `fullgraph=True`) and gives the eager step's logits."""
    from transformers import StaticCache

    from modeling_selfie.compat import cache_kwargs

    model, processor = tiny
    inputs = seg_inputs(processor, "padded")
    batch, length = inputs["input_ids"].shape
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=length + 2)
    step_inputs = dict(attention_mask=torch.cat([inputs["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], 1),
                       position_ids=inputs["attention_mask"].sum(1, keepdim=True), use_cache=True, logits_to_keep=1,
                       **cache_kwargs(cache))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(**inputs)
        prefill = model(**inputs, use_cache=True, **cache_kwargs(cache))
        torch.testing.assert_close(prefill.logits, expected.logits)
        for got, want in zip(prefill.pred_masks, expected.pred_masks):
            torch.testing.assert_close(got, want)
        next_ids = prefill.logits[:, -1:].argmax(-1)
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")(input_ids=next_ids, **step_inputs)
        eager = model(input_ids=next_ids, **step_inputs)  # rewrites the same cache slot with the same values
    torch.testing.assert_close(compiled.logits, eager.logits)
