"""Generation with images, with and without `[SEG]` in the prompt: greedy, seeded sampling and beam search give the
same tokens with a static cache as with the dynamic one, a compiled forward gives those of the uncompiled one, and
`model.chat` answers the same with a static cache."""

import pytest
import torch

from .helpers import random_image

PROMPTS = {
    # InternVL's chat: no [SEG] anywhere (causal attention, as InternVL)
    "without [SEG]": dict(text=[f"<|im_start|>user\n<IMG_CONTEXT>\n{question}<|im_end|>\n<|im_start|>assistant\n"
                                for question in ("describe the shape", "hello")]),
    # the teacher-forced segmentation prompt ("... [SEG].") continued: the prefill uses the dual-pathway attention
    "with [SEG]": dict(queries=["the red circle", "shape"]),
}
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0, temperature=1.0),
    "beam search": dict(do_sample=False, num_beams=2),
}


def generate(model, inputs, seed=0, **kwargs):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, **kwargs)


@pytest.fixture(scope="module")
def batches(tiny):
    _, processor = tiny
    images = [random_image(80, 64), random_image(64, 48, seed=1)]
    return {name: processor(images=images, **prompt) for name, prompt in PROMPTS.items()}


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("mode", MODES)
def test_static_cache_generates_what_the_dynamic_cache_does(tiny, batches, prompt, mode):
    model, _ = tiny
    inputs = batches[prompt]
    dynamic = generate(model, inputs, **MODES[mode])
    static = generate(model, inputs, cache_implementation="static", **MODES[mode])
    assert dynamic.shape[1] == inputs["input_ids"].shape[1] + 4
    assert torch.equal(static, dynamic)


def test_the_prefill_of_a_seg_prompt_uses_the_dual_pathway_with_a_static_cache(tiny, batches):
    """The prebuilt mask static-cache generation passes gets the dual pathway too: the first-step logits equal the
    dynamic cache's, and differ from those of causal attention."""
    model, _ = tiny
    inputs = batches["with [SEG]"]

    def first_logits(**kwargs):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=1, output_logits=True, return_dict_in_generate=True, **kwargs)
        return out.logits[0]

    dynamic, static = first_logits(), first_logits(cache_implementation="static")
    torch.testing.assert_close(static, dynamic)
    mode, model.config.seg_attention = model.config.seg_attention, "causal"
    try:
        causal = first_logits(cache_implementation="static")
    finally:
        model.config.seg_attention = mode
    assert not torch.allclose(causal, dynamic)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_compiled_forward_generates_what_the_uncompiled_one_does(tiny, batches, prompt):
    model, _ = tiny
    inputs = batches[prompt]
    expected = generate(model, inputs)
    torch._dynamo.reset()
    eager_forward = model.forward
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        got = generate(model, inputs, cache_implementation="static")
    finally:
        model.forward = eager_forward
    assert torch.equal(got, expected)


def test_chat_with_a_static_cache_answers_as_with_the_dynamic_one(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": "describe the red circle"}]
    image = random_image(80, 64)
    dynamic = model.chat(processor, image, messages, max_new_tokens=6)
    static = model.chat(processor, image, messages, max_new_tokens=6, cache_implementation="static")
    assert static["text"] == dynamic["text"] and dynamic["text"]
    assert torch.equal(static["masks"], dynamic["masks"])


def test_a_static_cache_forward_then_a_fullgraph_compiled_decoding_step(tiny, batches):
    """A prefill into transformers' `StaticCache` gives the masks and logits of a forward without cache; the next
    decoding step reads no device value (it compiles with `fullgraph=True`) and gives the eager step's logits."""
    from transformers import StaticCache

    from modeling_selfie.compat import cache_kwargs

    model, _ = tiny
    inputs = batches["with [SEG]"]
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
