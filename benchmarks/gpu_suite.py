"""Everything a lent GPU should measure, in one command with a global time budget.

    python benchmarks/gpu_suite.py OUTDIR            # one NVIDIA GPU: selfie-2b / selfie-8b, bf16, < 8 minutes
    python benchmarks/gpu_suite.py OUTDIR --smoke    # every part on the CPU with selfie-tiny, < 2 minutes

Writes `OUTDIR/gpu_suite.md` (report) and `OUTDIR/gpu_suite.json` (the same figures), rewritten after every part,
so a run that is cut short still leaves what it measured. Parts, in this order (random weights; the models need no
download):

* `speed`: SELFIE forward with masks at the original image size vs. plain InternVL prefill (the same weights), sdpa,
  batch 1 and 16, 1 and 6 tiles, plus eager attention at batch 1 / 1 tile: ms / image, images / s, ratio, peak memory
  and the difference (`benchmarks/speed.py` does the timing);
* `compiled`: the same under `torch.compile(mode="reduce-overhead")` (CUDA graphs), the headline shape first;
* `attention`: segmentation forwards with sdpa (dense `[B, 1, L, L]` mask) vs. flex_attention (block mask);
* `bf16_vs_fp32`: mask logits of the same model in bf16 and fp32 (max relative error, IoU of the binarised masks);
* `lora_step`: one LoRA training step at 2B size as the paper trains (batch 5, gradient checkpointing, LoRA on the
  LLM and the vision tower, rank 128): seconds per step and peak memory;
* `chat`: `model.chat` latency (generate a short answer, then segment its `[SEG]`).

Each part runs under its own time limit (its cap, or what is left of the budget); an error or a timeout is recorded
in the report and the next part runs.
"""

import argparse
import contextlib
import copy
import datetime
import gc
import json
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import build_models, forward_fns, make_inputs, measure_pair, time_once  # noqa: E402

from modeling_selfie import SegmentationLayout  # noqa: E402
from modeling_selfie.compat import enable_activation_checkpointing  # noqa: E402
from modeling_selfie.io_utils import atomic_output_file  # noqa: E402
from modeling_selfie.presets import variance_preserving_init_  # noqa: E402
from modeling_selfie.processing_selfie import post_process_masks  # noqa: E402

PARTS = ("speed", "compiled", "attention", "bf16_vs_fp32", "lora_step", "chat")


@dataclass
class SuiteConfig:
    """What one run measures: the GPU run, or the CPU smoke run that exercises every code path."""

    presets: tuple[str, ...]
    small_preset: str  # for the single-model parts (attention, bf16, LoRA, chat)
    device: str
    dtype: torch.dtype
    shapes: tuple[tuple[int, int], ...]  # (batch, tiles)
    compiled_shapes: tuple[tuple[int, int], ...]
    attention_shapes: tuple[tuple[int, int], ...]
    compile_kwargs: dict
    min_compile_s: float  # do not start compiling a shape with less time left in the part
    repeats: int
    warmup: int
    budget_s: float
    shares: dict = field(default_factory=dict)  # part -> at most this share of the budget


GPU = SuiteConfig(
    presets=("selfie-8b", "selfie-2b"),
    small_preset="selfie-2b",
    device="cuda",
    dtype=torch.bfloat16,
    shapes=((1, 1), (16, 1), (1, 6), (16, 6)),
    compiled_shapes=((1, 1), (16, 1), (1, 6), (16, 6)),
    attention_shapes=((1, 1), (16, 1), (1, 6), (16, 6)),
    compile_kwargs={"mode": "reduce-overhead", "dynamic": False},
    min_compile_s=45,
    repeats=10,
    warmup=3,
    budget_s=420,  # + start-up (imports, CUDA context): < 8 minutes in all
    shares={"speed": 0.23, "compiled": 0.34, "attention": 0.11, "bf16_vs_fp32": 0.08, "lora_step": 0.14, "chat": 0.07},
)
SMOKE = SuiteConfig(
    presets=("selfie-tiny",),
    small_preset="selfie-tiny",
    device="cpu",
    dtype=torch.float32,
    shapes=((1, 1), (4, 6)),
    compiled_shapes=((1, 1),),
    attention_shapes=((1, 1),),
    compile_kwargs={"backend": "eager", "dynamic": False},  # dynamo's tracing without inductor: fast on a CPU
    min_compile_s=2,
    repeats=2,
    warmup=1,
    budget_s=100,
    shares={"speed": 0.15, "compiled": 0.3, "attention": 0.3, "bf16_vs_fp32": 0.1, "lora_step": 0.15, "chat": 0.1},
)


# ----------------------------------------------------------------------------------------------------------------
# Running parts under a budget
# ----------------------------------------------------------------------------------------------------------------


class PartTimeout(BaseException):
    """Raised in the main thread when a part's time is up (a BaseException, so library `except Exception` blocks
    do not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `PartTimeout` after `seconds` of wall time (SIGALRM; checked between Python bytecodes)."""

    def expire(signum, frame):
        raise PartTimeout(f"time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Suite:
    """Runs parts in order under one deadline and rewrites the report and the JSON after each part."""

    def __init__(self, outdir: Path, config: SuiteConfig, environment: dict):
        self.outdir, self.config = outdir, config
        self.start = time.monotonic()
        self.deadline = self.start + config.budget_s
        self.results = {"environment": environment, "parts": {}}
        self.models: dict = {}  # preset -> (selfie, plain), built once and shared by the parts
        self.part_deadline = self.deadline

    def time_left(self) -> float:
        """Seconds left for the running part."""
        return self.part_deadline - time.monotonic()

    def run_part(self, name: str, fn, cap_s: float | None = None, min_seconds: float = 5) -> dict:
        """Run `fn(rows, notes)` within min(cap, time left), the cap being `cap_s` or the part's share of the
        budget; rows appended before an error or a timeout are kept."""
        left = self.deadline - time.monotonic()
        if cap_s is None:
            cap_s = self.config.shares.get(name, 1.0) * self.config.budget_s
        limit = min(cap_s, left)
        record = {"status": "ok", "seconds": 0.0, "limit_s": round(limit, 1), "rows": [], "notes": []}
        self.results["parts"][name] = record
        if limit < min_seconds:
            record["status"] = f"skipped: {max(left, 0):.0f} s of the budget left"
        else:
            begin = time.monotonic()
            self.part_deadline = begin + limit
            try:
                with time_limit(limit):
                    fn(record["rows"], record["notes"])
            except PartTimeout as error:
                record["status"] = f"timed out ({error}); rows so far are kept"
            except Exception as error:  # a failing part is reported, the suite goes on
                record["status"] = f"failed: {type(error).__name__}: {error}"[:500]
                record["traceback"] = traceback.format_exc()[-3000:]
            record["seconds"] = round(time.monotonic() - begin, 1)
        free_memory()
        self.write()
        print(f"[{time.monotonic() - self.start:6.1f} s] {name}: {record['status']}", flush=True)
        return record

    def write(self) -> None:
        self.results["environment"]["wall_s"] = round(time.monotonic() - self.start, 1)
        self.outdir.mkdir(parents=True, exist_ok=True)
        with atomic_output_file(self.outdir / "gpu_suite.json") as path:
            path.write_text(json.dumps(self.results, indent=2))
        with atomic_output_file(self.outdir / "gpu_suite.md") as path:
            path.write_text(render_report(self.results))

    def models_for(self, preset: str):
        """(selfie, plain) sharing weights, built on first use (sdpa, the suite's dtype)."""
        if preset not in self.models:
            self.models[preset] = build_models(preset, torch.device(self.config.device), self.config.dtype, "sdpa")
        return self.models[preset]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def rounded(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


# ----------------------------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------------------------


def speed_row(preset: str, mode: str, batch: int, tiles: int, results: dict) -> dict:
    plain, selfie = results["plain"], results["selfie"]
    extra = None if plain["peak_gib"] is None else selfie["peak_gib"] - plain["peak_gib"]
    return {
        "preset": preset, "mode": mode, "batch": batch, "tiles": tiles,
        "plain_ms_per_image": rounded(plain["ms_per_image"]), "selfie_ms_per_image": rounded(selfie["ms_per_image"]),
        "plain_images_per_s": rounded(plain["images_per_s"], 2), "selfie_images_per_s": rounded(selfie["images_per_s"], 2),
        "ratio": rounded(selfie["ms"] / plain["ms"]), "plain_peak_gib": rounded(plain["peak_gib"]),
        "selfie_peak_gib": rounded(selfie["peak_gib"]), "extra_gib": rounded(extra),
    }


def part_speed(suite: Suite, rows: list, notes: list) -> None:
    cfg, device = suite.config, torch.device(suite.config.device)
    notes.append("Uncompiled. `sdpa` rows: the LLM's sdpa (plain: is_causal; SELFIE: a dense additive mask with the "
                 "dual pathway); `eager-attn`: eager attention in both (the authors' code used eager). Peak memory "
                 "includes the weights; extra = SELFIE - plain.")
    for preset in cfg.presets:
        selfie, plain = suite.models_for(preset)
        for batch, tiles in cfg.shapes:
            fns = forward_fns(selfie, plain, batch, tiles, device, cfg.dtype)
            rows.append(speed_row(preset, "sdpa", batch, tiles, measure_pair(fns, device, batch, cfg.repeats, cfg.warmup)))
        selfie.set_attn_implementation("eager")
        plain.config._attn_implementation = "eager"
        try:
            batch, tiles = cfg.shapes[0]
            fns = forward_fns(selfie, plain, batch, tiles, device, cfg.dtype)
            rows.append(speed_row(preset, "eager-attn", batch, tiles,
                                  measure_pair(fns, device, batch, cfg.repeats, cfg.warmup)))
        finally:
            selfie.set_attn_implementation("sdpa")
            plain.config._attn_implementation = "sdpa"


def part_compiled(suite: Suite, rows: list, notes: list) -> None:
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    cfg, device = suite.config, torch.device(suite.config.device)
    for option in ("recompile_limit", "cache_size_limit"):  # one compiled graph per (model, shape)
        if hasattr(dynamo_config, option):
            setattr(dynamo_config, option, 64)
    notes.append(f"torch.compile({', '.join(f'{k}={v!r}' for k, v in cfg.compile_kwargs.items())}), sdpa; the first "
                 f"{cfg.warmup} calls (compilation, CUDA graph recording) are not timed. Graph breaks and "
                 "CUDA graph skips: dynamo's / inductor's counters during each model's first (compiling) call.")
    order = [(preset, batch, tiles) for batch, tiles in cfg.compiled_shapes for preset in cfg.presets]
    for preset, batch, tiles in order:
        # Starting a compilation that the part's timer would interrupt (perhaps while CUDA graphs are recorded) could
        # leave the device unusable for the parts after this one: only start with enough time left.
        if suite.time_left() < cfg.min_compile_s:
            rows.append({"preset": preset, "mode": "compiled", "batch": batch, "tiles": tiles,
                         "error": f"not started: {suite.time_left():.0f} s left in this part"})
            continue
        selfie, plain = suite.models_for(preset)
        compiled = {}  # model -> (graph breaks, cudagraph skips) of its first (compiling) call
        try:
            fns = forward_fns(selfie, plain, batch, tiles, device, cfg.dtype, cfg.compile_kwargs)
            for name, fn in fns.items():
                counters.clear()
                fn()
                skips = sum(n for key, n in counters["inductor"].items() if "cudagraph_skip" in key)
                compiled[name] = (sum(counters["graph_break"].values()), skips)
            row = speed_row(preset, "compiled", batch, tiles, measure_pair(fns, device, batch, cfg.repeats, cfg.warmup))
        except Exception as error:  # e.g. a shape CUDA graphs cannot take: record it, go on with the next shape
            row = {"preset": preset, "mode": "compiled", "batch": batch, "tiles": tiles,
                   "error": f"{type(error).__name__}: {error}"[:300]}
        for name, (breaks, skips) in compiled.items():
            row[f"{name}_graph_breaks"], row[f"{name}_cudagraph_skips"] = breaks, skips
        rows.append(row)


def part_attention(suite: Suite, rows: list, notes: list) -> None:
    cfg, device = suite.config, torch.device(suite.config.device)
    preset = cfg.small_preset
    selfie, _ = suite.models_for(preset)
    notes.append("SELFIE segmentation forward (masks at the image size) with the LLM on sdpa (dense mask) vs. "
                 "flex_attention (the dual pathway as a mask function -> block mask); vision tower on sdpa in both.")
    text_config = selfie.config.text_config
    for batch, tiles in cfg.attention_shapes:
        input_ids, _, pixel_values, tile_grid, sizes = make_inputs(selfie.config, batch, tiles, device, cfg.dtype)
        layout = SegmentationLayout.from_inputs(selfie.config, input_ids, None, tile_grid)
        times, logits = {}, {}
        for implementation in ("sdpa", "flex_attention"):
            text_config._attn_implementation = implementation
            try:

                @torch.inference_mode()
                def run():
                    out = selfie(input_ids=input_ids, pixel_values=pixel_values, seg_layout=layout, logits_to_keep=1)
                    post_process_masks(out.pred_masks, sizes)
                    return out

                for _ in range(cfg.warmup):
                    run()
                times[implementation] = statistics.median(time_once(run, device) for _ in range(cfg.repeats))
                logits[implementation] = torch.cat([m.float().flatten() for m in run().pred_masks])
            finally:
                text_config._attn_implementation = "sdpa"
        rows.append({
            "preset": preset, "batch": batch, "tiles": tiles,
            "sdpa_ms_per_image": rounded(times["sdpa"] * 1000 / batch),
            "flex_ms_per_image": rounded(times["flex_attention"] * 1000 / batch),
            "flex_over_sdpa": rounded(times["flex_attention"] / times["sdpa"]),
            "max_abs_logit_diff": rounded((logits["sdpa"] - logits["flex_attention"]).abs().max(), 5),
        })


def mask_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(max |other - reference| / max |reference|, IoU of the masks binarised at logit 0) of one `[H, W]` pair."""
    reference, other = reference.float(), other.float()
    rel = (other - reference).abs().max() / reference.abs().max().clamp(min=1e-30)
    a, b = reference > 0, other > 0
    union = (a | b).sum()
    iou = (a & b).sum() / union if union else torch.tensor(1.0)
    return float(rel), float(iou)


def part_bf16_vs_fp32(suite: Suite, rows: list, notes: list) -> None:
    cfg, device = suite.config, torch.device(suite.config.device)
    preset, batch = cfg.small_preset, 4
    fp32, _ = build_models(preset, device, torch.float32, "sdpa")
    variance_preserving_init_(fp32)  # mask logits of order 1 (the default init makes them ~0 at random)
    low = copy.deepcopy(fp32).to(cfg.dtype if cfg.dtype != torch.float32 else torch.bfloat16)
    matmul = torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None
    notes.append(f"{preset}, random weights drawn N(0, 1/fan_in) so that mask logits are O(1); batch {batch}, 1 tile, "
                 f"one [SEG] each; fp32 matmuls allow TF32: {matmul}. Relative error = max |bf16 - fp32| / max |fp32| "
                 "per mask; IoU of the masks binarised at logit 0, at mask resolution and at the image size.")
    masks = {}
    for name, model in (("fp32", fp32), ("bf16", low)):
        # the same inputs for both (make_inputs draws from a fixed seed)
        input_ids, _, pixel_values, tile_grid, sizes = make_inputs(model.config, batch, 1, device, model.dtype)
        with torch.inference_mode():
            out = model(input_ids=input_ids, pixel_values=pixel_values, tile_grid=tile_grid, logits_to_keep=1)
        masks[name] = (out.pred_masks, post_process_masks(out.pred_masks, sizes, binarize=False))
    del fp32, low
    for b in range(batch):
        rel, iou = mask_agreement(masks["fp32"][0][b][0], masks["bf16"][0][b][0])
        _, iou_full = mask_agreement(masks["fp32"][1][b][0], masks["bf16"][1][b][0])
        scale = masks["fp32"][0][b][0].abs().max()
        rows.append({"preset": preset, "sample": b, "max_rel_err": rounded(rel, 5), "iou": rounded(iou, 4),
                     "iou_image_size": rounded(iou_full, 4), "fp32_max_abs_logit": rounded(scale, 3)})


def training_batch(config, batch: int, turns: int, device) -> dict:
    """A SELF1E-style training batch: one 448 px tile per sample, `turns` question / "Sure, [SEG]." turns, the
    answers supervised, one random 0/1 mask per [SEG] at the image size."""
    generator = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(10, min(config.text_config.vocab_size, 1000), (n,), generator=generator)  # noqa: E731
    image = torch.full((config.image_seq_length,), config.image_token_id)
    pieces, supervised = [words(14), image], [torch.zeros(14 + config.image_seq_length, dtype=torch.bool)]
    for _ in range(turns):
        answer = torch.cat([words(2), torch.tensor([config.seg_token_id]), words(2)])
        pieces += [words(16), answer]
        supervised += [torch.zeros(16, dtype=torch.bool), torch.ones(len(answer), dtype=torch.bool)]
    sequence, supervised = torch.cat(pieces), torch.cat(supervised)
    input_ids = sequence.repeat(batch, 1)
    labels = torch.where(supervised, sequence, -100).repeat(batch, 1)
    size = config.vision_config.image_size[0]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = [torch.stack([((yy - size * (0.3 + 0.1 * k)) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2).float()
                          for k in range(turns)]) for _ in range(batch)]
    return {
        "input_ids": input_ids.to(device), "labels": labels.to(device),
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(device),
        "tile_grid": torch.ones(batch, 2, dtype=torch.long, device=device),
        "mask_labels": [m.to(device) for m in masks],
    }


def part_lora_step(suite: Suite, rows: list, notes: list) -> None:
    from modeling_selfie.training import apply_lora

    cfg, device = suite.config, torch.device(suite.config.device)
    preset, batch, turns, rank, steps = cfg.small_preset, 5, 3, 128, 4
    reset_peak(device)
    model, _ = build_models(preset, device, cfg.dtype, "sdpa")
    del _
    model = apply_lora(model, rank=rank, alpha=2 * rank, dropout=0.05, vision_lora=True)
    enable_activation_checkpointing(model, use_reentrant=False)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    inputs = training_batch(model.config, batch, turns, device)
    inputs["pixel_values"] = inputs["pixel_values"].to(cfg.dtype)
    weights_gib = peak_gib(device)
    notes.append(f"{preset}, {cfg.dtype}, LoRA rank {rank} alpha {2 * rank} on the LLM and the vision tower (seg head "
                 f"and both embeddings trained fully, as `apply_lora`), gradient checkpointing, AdamW; batch {batch}, "
                 f"1 tile, {turns} [SEG] turns per sample ({inputs['input_ids'].shape[1]} tokens); "
                 f"{sum(p.numel() for p in trainable) / 1e6:.1f}M trainable parameters. The first step is not timed.")
    seconds = []
    for step in range(steps):
        synchronize(device)
        begin = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step:
            seconds.append(time.perf_counter() - begin)
    rows.append({"preset": preset, "batch": batch, "s_per_step": rounded(statistics.median(seconds), 3),
                 "peak_gib": rounded(peak_gib(device)), "weights_gib": rounded(weights_gib),
                 "loss": rounded(loss.item(), 4)})


class ForcedAnswer:
    """A logits processor that makes `generate` write `answer_ids` (a fixed answer, so random weights still produce
    a `[SEG]` and `chat` runs its segmentation forward)."""

    def __init__(self, answer_ids: list[int], prompt_length: int):
        self.answer_ids, self.prompt_length = answer_ids, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = min(input_ids.shape[1] - self.prompt_length, len(self.answer_ids) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.answer_ids[step]] = 0
        return forced


def part_chat(suite: Suite, rows: list, notes: list) -> None:
    from PIL import Image
    from transformers import LogitsProcessorList

    from modeling_selfie.processing_selfie import SelfieImageProcessor, SelfieProcessor
    from modeling_selfie.tokenization import build_word_level_tokenizer

    cfg, device = suite.config, torch.device(suite.config.device)
    preset = cfg.small_preset
    model, _ = suite.models_for(preset)
    config = model.config
    size = config.vision_config.image_size[0]
    processor = SelfieProcessor(
        image_processor=SelfieImageProcessor(size={"height": size, "width": size}),
        tokenizer=build_word_level_tokenizer(["segment", "the", "red", "circle", "sure"]),
        image_seq_length=config.image_seq_length,
        system_message="",
    )
    ids = (config.image_token_id, config.seg_token_id)
    config.image_token_id, config.seg_token_id = processor.image_token_id, processor.seg_token_id
    try:
        image = Image.new("RGB", (640, 480), (200, 30, 30))
        messages = [{"role": "user", "content": "segment the red circle ."}]
        prompt = processor(images=[image], text=[processor.render_conversation(messages, add_generation_prompt=True)])
        prompt_length = prompt["input_ids"].shape[1]
        tok = processor.tokenizer.convert_tokens_to_ids
        answers = {"with [SEG] (generate + segmentation forward)": ["sure", ",", "[SEG]", ".", "<|im_end|>"],
                   "without [SEG] (generate only)": ["sure", ",", "the", ".", "<|im_end|>"]}
        notes.append(f"{preset}, {cfg.dtype}, one {size} px tile, prompt of {prompt_length} tokens, greedy; the answer "
                     "is forced by a logits processor (random weights), `<|im_end|>` ends it.")
        for label, answer in answers.items():
            processors = LogitsProcessorList([ForcedAnswer([tok(t) for t in answer], prompt_length)])

            def run():
                return model.chat(processor, image, messages, max_new_tokens=len(answer), logits_processor=processors)

            reply = run()
            seconds = statistics.median(time_once(run, device) for _ in range(max(cfg.repeats // 3, 2)))
            rows.append({"answer": label, "text": reply["text"], "new_tokens": len(answer),
                         "masks": list(reply["masks"].shape), "ms": rounded(seconds * 1000, 1)})
    finally:
        config.image_token_id, config.seg_token_id = ids


PART_FUNCTIONS = {
    "speed": part_speed, "compiled": part_compiled, "attention": part_attention,
    "bf16_vs_fp32": part_bf16_vs_fp32, "lora_step": part_lora_step, "chat": part_chat,
}


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> list[str]:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda v: "n/a" if v is None else str(v).replace("|", "/").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows
    ]


def render_report(results: dict) -> str:
    env = results["environment"]
    lines = ["# SELFIE GPU suite", ""]
    lines += [f"* {key}: {value}" for key, value in env.items()]
    for name, part in results["parts"].items():
        lines += ["", f"## {name}", "", f"status: {part['status']} ({part['seconds']} s of {part['limit_s']} s)", ""]
        lines += [f"{note}" for note in part["notes"]] + ([""] if part["notes"] else [])
        if part["rows"]:
            lines += markdown_table(part["rows"])
        if "traceback" in part:
            lines += ["", "```", part["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def environment(config: SuiteConfig, smoke: bool) -> dict:
    import transformers

    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "mode": "smoke (CPU, selfie-tiny)" if smoke else "gpu", "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("huggingface_hub", "peft", "accelerate"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            env[package] = "not installed"
    if config.device == "cuda":
        env["device"] = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    env["dtype"] = str(config.dtype).removeprefix("torch.")
    env["budget_s"] = config.budget_s
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="folder for gpu_suite.md and gpu_suite.json")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU with selfie-tiny (< 2 minutes)")
    parser.add_argument("--budget", type=float, help="total seconds for all parts (default: 420 on GPU, 100 smoke)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    args = parser.parse_args(argv)
    config = copy.deepcopy(SMOKE if args.smoke else GPU)
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device is visible; use --smoke to exercise the suite on the CPU", file=sys.stderr)
        return 2
    if args.budget is not None:
        if args.budget <= 0:
            print(f"error: --budget must be positive, got {args.budget}", file=sys.stderr)
            return 2
        config.budget_s = args.budget
    if args.outdir.exists() and not args.outdir.is_dir():
        print(f"error: {args.outdir} exists and is not a folder", file=sys.stderr)
        return 2
    if args.smoke:
        torch.set_num_threads(1)  # the tiny model gains nothing from threads; on a shared CPU they wait for each other
    torch.manual_seed(0)
    suite = Suite(args.outdir, config, environment(config, args.smoke))
    for name in args.parts:
        suite.run_part(name, lambda rows, notes, fn=PART_FUNCTIONS[name]: fn(suite, rows, notes))
    print(f"wrote {args.outdir / 'gpu_suite.md'} and {args.outdir / 'gpu_suite.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
