"""`pipeline("referring-segmentation", model=...)`: image + phrase(s) -> masks, registered with transformers.

    >>> import modeling_selfie
    >>> from transformers import pipeline
    >>> segmenter = pipeline("referring-segmentation", model="path/to/selfie")
    >>> segmenter("shapes.png", text=["red circle", "blue star"])
    [{"mask": <PIL.Image L>, "score": 0.97, "label": "red circle"}, ...]
"""

import os

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .io_utils import read_image, rgb_image
from .processing_selfie import post_process_masks


class ReferringSegmentationPipeline(Pipeline):
    """Segments an image from one or more phrases (or instructions) with a SELFIE model.

    Call with `image` (PIL image, path or URL) and `text` (a phrase or a list). Options: `query_kind`
    (`"phrase"` or `"instruction"`), `mask_threshold` (logit, 0.0) and `presence_threshold` (0.5): a phrase
    whose presence score is below it gets an empty mask; words the model's vocabulary lacks are named in an
    `UnknownWordsWarning`. Returns one `{"mask", "score", "label"}` per phrase:
    `mask` a binary PIL image (mode "L", 0/255) at the image's size, `score` the presence score; a model with an
    IoU head (`config.iou_head`) adds `iou_score`, the mask's predicted IoU.
    """

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.processor.check_model(self.model.config)

    def _sanitize_parameters(self, text=None, query_kind=None, mask_threshold=None, presence_threshold=None):
        preprocess = {k: v for k, v in {"text": text, "query_kind": query_kind}.items() if v is not None}
        postprocess = {
            k: v
            for k, v in {"mask_threshold": mask_threshold, "presence_threshold": presence_threshold}.items()
            if v is not None
        }
        return preprocess, {}, postprocess

    def __call__(self, image, text=None, **kwargs):
        return super().__call__(image, text=text, **kwargs)

    def preprocess(self, image, text=None, query_kind: str = "phrase"):
        if text is None or (isinstance(text, list) and not text):
            raise ValueError("referring-segmentation needs text=: a phrase or a list of phrases to segment.")
        labels = [text] if isinstance(text, str) else list(text)
        if isinstance(image, Image.Image):
            image = rgb_image(image)
        elif isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
            image = read_image(image)  # as shown; transformers' load_image clips 16-bit images at 255
        else:
            image = load_image(image)  # a URL or base64 text
        inputs = self.processor(images=[image] * len(labels), queries=labels, query_kind=query_kind)
        self.processor.warn_unknown_words(labels, query_kind)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return {"inputs": inputs, "labels": labels, "size": (image.height, image.width)}

    def _forward(self, model_inputs):
        out = self.model(**model_inputs["inputs"])
        return {
            "pred_masks": out.pred_masks,
            "presence_logits": out.presence_logits,
            "iou_logits": out.iou_logits,
            "labels": model_inputs["labels"],
            "size": model_inputs["size"],
        }

    def postprocess(self, model_outputs, mask_threshold: float = 0.0, presence_threshold: float = 0.5):
        sizes = [model_outputs["size"]] * len(model_outputs["labels"])
        masks, scores = post_process_masks(
            model_outputs["pred_masks"], sizes, mask_threshold, True, model_outputs["presence_logits"],
            presence_threshold, return_scores=True,
        )
        results = []
        ious = model_outputs["iou_logits"] or [None] * len(masks)
        for label, mask, score, iou in zip(model_outputs["labels"], masks, scores, ious):
            pixels = (mask[0].cpu().numpy().astype(np.uint8)) * 255
            results.append({"mask": Image.fromarray(pixels, mode="L"), "score": float(score[0]), "label": label})
            if iou is not None:  # a model with an IoU head: the mask's predicted IoU
                results[-1]["iou_score"] = float(torch.sigmoid(iou[0].float()))
        return results


PIPELINE_REGISTRY.register_pipeline(
    "referring-segmentation",
    pipeline_class=ReferringSegmentationPipeline,
    pt_model=AutoModelForImageTextToText,
    type="multimodal",
)

__all__ = ["ReferringSegmentationPipeline"]
