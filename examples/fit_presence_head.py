"""Fit the presence head of a SELFIE model on RefShapes, and measure how well presence scores separate right from
wrong queries (AUROC), against the old score (the mask's most confident pixel).

    python examples/fit_presence_head.py                 # fit the shipped model's head, write it, measure (~8 min)
    python examples/fit_presence_head.py --no-fit        # measure the model as it is

The head (`SelfieConfig.presence_head`) is one linear map of the LLM hidden state that predicts `[SEG]`: a logistic
regression fitted, with the rest of the model frozen, on `--fit-size` validation scenes of `presence_probes` (right
expressions against absent targets; unknown words are left to `SelfieConfig.unk_token_id`). `--scenes any` (the
default) draws them on every background family with tiny shapes, as the shipped model was trained; `--scenes pale`
on RefShapes' first, pale scenes. Its bias is then moved
so that `--keep-right` of the right validation queries get a head logit of at least 0: the operating point at which
the head empties masks (the head's own ranking does not depend on it; a high share keeps right masks and leaves the
head mostly to ranking). Fitting writes the head, `unk_token_id` and
`query_normalization="words"` into `--model` (one atomic folder swap).

The measurement uses `--eval-size` scenes of the RefShapes test split with `--eval-seed` (the model was trained on
the train split; its card's held-out numbers use test seed 0): right expressions are positives, absent targets and
unknown-word queries negatives. It prints the AUROC of the presence score and of the max-pixel score, overall and
per kind of negative, and the share of each kind whose mask comes back empty.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from modeling_selfie import SelfieForSegmentation, SelfieProcessor
from modeling_selfie.cli import default_model_dir
from modeling_selfie.data.refshapes import presence_probes

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the script beside this one wrote the shipped folder
from train_refshapes import TOKENIZER_FILES, write_model_folder  # noqa: E402

FIT_SEED = 21
EVAL_SEED = 21
L2 = 1e-3  # weight decay of the logistic regression, on standardised features


def auroc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    greater = positives[:, None] > negatives[None]
    ties = positives[:, None] == negatives[None]
    return float((greater + 0.5 * ties).mean())


@torch.inference_mode()
def run_probes(model, processor, probes, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Forward every probe (one query per sample, batched by query kind). Returns `presence` and `max_pixel` logits
    `[N]` and, when the model has a presence head, the head's inputs `features` `[N, D]`, in probe order."""
    presence, max_pixel, features = np.zeros(len(probes)), np.zeros(len(probes)), {}
    captured = []
    hook = None
    if model.seg_head.presence is not None:
        hook = model.seg_head.presence.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    for query_kind in ("phrase", "instruction"):
        indices = [i for i, probe in enumerate(probes) if probe.query_kind == query_kind]
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            inputs = processor(images=[probes[i].image for i in batch], queries=[probes[i].text for i in batch],
                               query_kind=query_kind)
            captured.clear()
            out = model(**inputs, logits_to_keep=1)
            for k, i in enumerate(batch):
                presence[i] = float(out.presence_logits[k][0])
                max_pixel[i] = float(out.pred_masks[k][0].amax())
                if captured:
                    features[i] = captured[0][k].float().numpy()
    if hook is not None:
        hook.remove()
    result = {"presence": presence, "max_pixel": max_pixel}
    if features:
        result["features"] = np.stack([features[i] for i in range(len(probes))])
    return result


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, keep: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights `[1, D]` and bias `[1]` of an L2-regularised logistic regression (L-BFGS on standardised features,
    folded back into the raw features' scale) of `labels` in [0, 1] (soft targets allowed), the bias moved so that
    a share `keep` of the positives (label 1) get a logit of at least 0 (`None`: left as fitted)."""
    x = torch.tensor(features, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=1000, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, y) + L2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        shift = torch.quantile((x @ weight + bias)[y == 1], 1 - keep) if keep is not None else 0.0
        raw_weight = weight / std
        return raw_weight[None].float(), (bias - shift - (raw_weight * mean).sum())[None].float()


def write_model(model, processor, folder: Path) -> None:
    """Replace `folder` with the model and processor, keeping its card, evaluation and tokenizer files as they are."""
    write_model_folder(model, processor, folder, copy_from=folder, copy=("README.md", "eval_results.json",
                                                                         *TOKENIZER_FILES))


SCENES = {"any": {"backgrounds": "all", "tiny_shapes": True}, "pale": {"backgrounds": "pale", "tiny_shapes": False}}


def measure(model, processor, size: int, seed: int, scenes: str = "any") -> dict:
    """AUROC of the presence and max-pixel scores on `presence_probes("test", size, seed, **SCENES[scenes])`."""
    probes = presence_probes("test", size, seed, **SCENES[scenes])
    scores = run_probes(model, processor, probes)
    kinds = np.array([probe.kind for probe in probes])
    report = {"probes": {kind: int((kinds == kind).sum()) for kind in ("right", "absent", "unknown")}}
    for name in ("presence", "max_pixel"):
        right = scores[name][kinds == "right"]
        report[name] = {
            "auroc": auroc(right, scores[name][kinds != "right"]),
            "auroc_absent": auroc(right, scores[name][kinds == "absent"]),
            "auroc_unknown": auroc(right, scores[name][kinds == "unknown"]),
            "empty": {kind: float((scores[name][kinds == kind] < 0).mean()) for kind in report["probes"]},
        }
    return report


def head_fit_parser(doc: str, fit_seed: int) -> argparse.ArgumentParser:
    """The options both head-fitting scripts take: `--model`, `--no-fit`, `--fit-size`, `--fit-seed`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model_dir(), help="model folder (default: shipped)")
    parser.add_argument("--no-fit", action="store_true", help="only measure the model as it is")
    parser.add_argument("--fit-size", type=int, default=1500, help="validation scenes to fit the head on")
    parser.add_argument("--fit-seed", type=int, default=fit_seed)
    return parser


def main(argv=None):
    parser = head_fit_parser(__doc__, FIT_SEED)
    parser.add_argument("--keep-right", type=float, default=0.999,
                        help="share of right validation queries whose head logit is at least 0 (default 0.999)")
    parser.add_argument("--eval-size", type=int, default=500, help="test scenes to measure on")
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    parser.add_argument("--scenes", choices=tuple(SCENES), default="any",
                        help="probe scenes: any background and tiny shapes (default), or pale RefShapes scenes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    processor = SelfieProcessor.from_pretrained(args.model)
    if args.no_fit:
        model = SelfieForSegmentation.from_pretrained(args.model).eval()
    else:
        model = SelfieForSegmentation.from_pretrained(
            args.model, presence_head=True, unk_token_id=processor.tokenizer.unk_token_id
        ).eval()
        processor.query_normalization = "words"
        probes = [probe for probe in presence_probes("validation", args.fit_size, args.fit_seed, **SCENES[args.scenes])
                  if probe.kind != "unknown"]
        features = run_probes(model, processor, probes)["features"]
        labels = np.array([probe.present for probe in probes], dtype=float)
        weight, bias = fit_logistic(features, labels, args.keep_right)
        with torch.no_grad():
            model.seg_head.presence.weight.copy_(weight)
            model.seg_head.presence.bias.copy_(bias)
        write_model(model, processor, args.model)
        print(f"fitted the presence head on {len(probes)} validation probes; wrote {args.model}", file=sys.stderr)
    report = measure(model, processor, args.eval_size, args.eval_seed, args.scenes)
    print(json.dumps(report, indent=1))
    print(f"AUROC presence score {report['presence']['auroc']:.3f} (absent {report['presence']['auroc_absent']:.3f}, "
          f"unknown words {report['presence']['auroc_unknown']:.3f}); max-pixel score "
          f"{report['max_pixel']['auroc']:.3f} (absent {report['max_pixel']['auroc_absent']:.3f}, unknown words "
          f"{report['max_pixel']['auroc_unknown']:.3f})")


if __name__ == "__main__":
    main()
