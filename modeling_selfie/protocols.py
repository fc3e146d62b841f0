"""The benchmark names and scoring protocols of `python -m modeling_selfie.evaluate`, shared by its argument parser
(`modeling_selfie.evaluate`, no torch) and the evaluation itself (`modeling_selfie.evaluation`).

Protocols ([`EvaluationProtocol`], `--protocol`). `default` is this project's scoring; `self1e` computes what the
SELF1E authors' evaluation computes (their loaders, batches, prompt and metric arithmetic); docs/evaluation.md lists
every difference and its effect.
"""

from dataclasses import dataclass

REFERRING_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco", "reasonseg", "custom_referring")
OPEN_VOCAB_DATASETS = ("ade150", "pc59", "pc459", "voc20", "custom_semantic")
REFER_DATASETS = ("refcoco", "refcoco+", "refcocog", "refclef", "grefcoco")  # the RefCOCO family
CUSTOM_DATASETS = ("custom_referring", "custom_semantic")  # your own data, read from `--annotations FILE`
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class EvaluationProtocol:
    """How a benchmark is scored: the settings that differ between protocols (docs/evaluation.md).

    Attributes:
        name: `"default"` or `"self1e"`.
        authors_arithmetic: score as the authors' `evaluate` does, in float32 meters updated once per batch: per
            expression IoU = I / (U + 1e-5) (1.0 when U = 0), gIoU = sum / (count + 1e-5), cIoU = sum I /
            (sum U + 1e-10); else float64 sums, IoU = I / U, gIoU = mean, cIoU = sum I / sum U (1.0 when 0 / 0).
        batch_by_image: one forward pass per image with all its expressions (the authors' validation batches);
            else `batch_size` expressions.
        zero_id_is_padding: rebuild each batch as the authors' `collate_fn` does: right-padded with id 0 and every
            id-0 token masked out of attention (in Qwen2's vocabulary id 0 is "!").
        reasonseg_first_query_only: ReasonSeg is scored on the first query of each image only.
        dropped_polygon_overlaps: datasets whose targets leave out the pixels covered by two or more polygons of one
            annotation (the authors' RefCOCO branch sums them; their gRefCOCO branch ORs them).
        lowercase_sentences: lowercase the RefCOCO-family sentences (the authors' loader).
        opencv_polygons: draw ReasonSeg polygons as the authors' loader (OpenCV on int32 points).
    """

    name: str
    authors_arithmetic: bool
    batch_by_image: bool
    zero_id_is_padding: bool
    reasonseg_first_query_only: bool
    dropped_polygon_overlaps: tuple[str, ...]
    lowercase_sentences: bool
    opencv_polygons: bool

    def dataset_options(self, dataset: str) -> dict:
        """Keyword arguments of the evaluation loader of `dataset` under this protocol."""
        if dataset == "reasonseg":
            return {"first_query_only": self.reasonseg_first_query_only, "opencv_polygons": self.opencv_polygons}
        if dataset in REFER_DATASETS:
            overlaps = "drop" if dataset in self.dropped_polygon_overlaps else "keep"
            return {"overlapping_polygons": overlaps, "lowercase": self.lowercase_sentences,
                    "by_image": self.batch_by_image}  # fmt: skip
        return {}

    def batch_size(self, requested: int | None) -> int | None:
        """Expressions per forward pass: `requested` (default `DEFAULT_BATCH_SIZE`), or `None` (one image's
        expressions) under a protocol that batches by image, which refuses a requested size (`ValueError`)."""
        if not self.batch_by_image:
            return DEFAULT_BATCH_SIZE if requested is None else requested
        if requested is not None:
            raise ValueError(
                f"protocol {self.name} scores the expressions of one image per forward pass, as the authors do; "
                f"batch size {requested} was asked for"
            )
        return None


PROTOCOLS = {
    "default": EvaluationProtocol(
        name="default", authors_arithmetic=False, batch_by_image=False, zero_id_is_padding=False,
        reasonseg_first_query_only=False, dropped_polygon_overlaps=(), lowercase_sentences=False,
        opencv_polygons=False,
    ),
    "self1e": EvaluationProtocol(
        name="self1e", authors_arithmetic=True, batch_by_image=True, zero_id_is_padding=True,
        reasonseg_first_query_only=True, dropped_polygon_overlaps=("refcoco", "refcoco+", "refcocog", "refclef"),
        lowercase_sentences=True, opencv_polygons=True,
    ),
}  # fmt: skip


def evaluation_protocol(protocol: "str | EvaluationProtocol") -> EvaluationProtocol:
    """The [`EvaluationProtocol`] named `protocol` (one of `PROTOCOLS`), or `protocol` itself."""
    if isinstance(protocol, EvaluationProtocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown evaluation protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    return PROTOCOLS[protocol]
