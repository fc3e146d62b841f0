"""SELFIE as an lmms-eval model, `--model selfie`, registered through lmms-eval's plugin entry points (group
`lmms_eval.models`, see setup.py; install with `pip install -e ".[lmms]"`, docs/evaluation.md):

    lmms-eval --model selfie --model_args pretrained=DIR --tasks pope,mme --batch_size 1

`--model_args` (comma-separated `key=value`): `pretrained` (a SELFIE folder or a plain InternVL3 one), `device`
(`auto`, `cpu`, `cuda`, ...), `dtype` (`auto`, `bfloat16`, `float16`, `float32`), `max_tiles`, `system_message`.

Each request is answered by `model.chat` on the request's image (at most one) with the task's prompt as the user
turn: the answer is the one `python -m modeling_selfie.evaluate_vqa` and `model.chat` give. Generation follows the
task's `generation_kwargs`: `max_new_tokens`, `do_sample` with `temperature` / `top_p`, `num_beams`, and `until`
(the answer is cut before the first stop string). lmms-eval's log-likelihood and multi-round requests are not
supported (no task of the paper's tables uses them).
"""

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from .evaluation_vqa import load_model

MANIFEST = ModelManifest(model_id="selfie", simple_class_path=f"{__name__}.SelfieLMMS")
DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's usual task default


def generation_kwargs(task_kwargs: dict) -> tuple[dict, list[str]]:
    """`model.chat` keyword arguments from an lmms-eval task's `generation_kwargs` (greedy unless the task samples
    with a temperature above 0), and its stop strings."""
    until = task_kwargs.get("until") or []
    kwargs = {"max_new_tokens": int(task_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))}
    if task_kwargs.get("do_sample") and float(task_kwargs.get("temperature", 1.0)) > 0:
        kwargs.update(do_sample=True, temperature=float(task_kwargs.get("temperature", 1.0)))
        kwargs["top_p"] = float(task_kwargs.get("top_p") or 1.0)
    else:
        kwargs["do_sample"] = False
    if int(task_kwargs.get("num_beams", 1)) > 1:
        kwargs["num_beams"] = int(task_kwargs["num_beams"])
    return kwargs, [until] if isinstance(until, str) else list(until)


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the first of the stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


class SelfieLMMS(lmms):
    """A SELFIE checkpoint answering lmms-eval's `generate_until` requests through `model.chat`."""

    def __init__(
        self,
        pretrained: str,
        device: str = "auto",
        dtype: str = "auto",
        max_tiles: int | None = None,
        system_message: str | None = None,
        batch_size: int | str = 1,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown --model_args for selfie: {sorted(kwargs)} (see modeling_selfie.lmms_eval_model)")
        if int(batch_size) != 1:
            raise ValueError(f"selfie answers one request at a time (batch_size 1), got batch_size={batch_size}")
        max_tiles = int(max_tiles) if max_tiles is not None else None
        self.model, self.processor = load_model(pretrained, device, dtype, max_tiles, system_message)

    def answer(self, context: str, visuals: list, task_kwargs: dict) -> str:
        """The model's answer to one request: `context` about the only image in `visuals` (or none)."""
        if len(visuals) > 1:
            raise ValueError(f"selfie answers about one image per request, the task gives {len(visuals)}")
        kwargs, until = generation_kwargs(task_kwargs)
        image = visuals[0] if visuals else None
        reply = self.model.chat(self.processor, image, [{"role": "user", "content": context}], **kwargs)
        return cut_at_stop(reply["text"], until)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in requests:
            context, task_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            answers.append(self.answer(context, [visual for visual in visuals if visual is not None], task_kwargs))
            self.cache_hook.add_partial("generate_until", (context, task_kwargs), answers[-1])
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("selfie answers generate_until requests only (no log-likelihood tasks)")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("selfie answers generate_until requests only (no multi-round tasks)")
