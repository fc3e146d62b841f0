"""SELFIE forward (masks at the image's own size) vs. plain InternVL prefill, measured in one run.

    python benchmarks/speed.py                      # CPU: the tiny preset; GPU: selfie-2b and selfie-8b
    python benchmarks/speed.py --presets selfie-8b --batch-sizes 1 --tiles 1 --compile
    python benchmarks/speed.py --presets selfie-2b --batch-sizes 1 --tiles 1 --profile   # where the time goes

Both models share the same random weights (same compute as the real checkpoints): the plain model is
transformers' `InternVLForConditionalGeneration` built around SELFIE's vision tower, projector, LLM and lm_head.
The SELFIE input is the validation prompt answered "[SEG]." (one teacher-forced forward, given its
`SegmentationLayout` as `segment()` gives it); the plain input is the same sequence with "[SEG]" replaced by an
ordinary token. Latency is the median over interleaved repeats (CUDA
events on GPU),
peak memory is `torch.cuda.max_memory_allocated` (GPU only). Prints absolute numbers and SELFIE / plain ratios.
"""

import argparse
import contextlib
import statistics
import time

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from modeling_selfie import SegmentationLayout, SelfieForSegmentation
from modeling_selfie.presets import preset_config, variance_preserving_init_
from modeling_selfie.processing_selfie import post_process_masks

PROMPT_TOKENS = 28  # system + user turn + question around the image, as in the validation template
TILE_GRIDS = {1: (1, 1), 2: (1, 2), 4: (2, 2), 6: (2, 3), 12: (3, 4)}


def build_models(preset: str, device: torch.device, dtype: torch.dtype, attn: str):
    """SELFIE and a plain InternVL that share every weight but the SELFIE head."""
    config = preset_config(preset)
    with device:
        selfie = SelfieForSegmentation(config)
    if preset == "selfie-tiny":
        variance_preserving_init_(selfie)
    selfie = selfie.to(dtype).eval()
    selfie.set_attn_implementation(attn)
    plain_config = InternVLConfig(**{k: v for k, v in config.to_dict().items() if k in InternVLConfig.__dataclass_fields__})
    with torch.device("meta"):
        plain = InternVLForConditionalGeneration(plain_config)
    plain.model.vision_tower = selfie.model.vision_tower
    plain.model.multi_modal_projector = selfie.model.multi_modal_projector
    plain.model.language_model = selfie.model.language_model
    plain.lm_head = selfie.lm_head
    plain.config._attn_implementation = attn
    return selfie, plain.eval()


def make_inputs(config, batch: int, tiles: int, device, dtype):
    """Synthetic token ids laid out like the validation prompt, random pixels, and the tile grid."""
    rows, cols = TILE_GRIDS[tiles]
    image_size = config.vision_config.image_size[0]
    vocab = config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(10, min(vocab, 1000), (n,), generator=generator)  # noqa: E731
    image = torch.full((config.image_seq_length * tiles,), config.image_token_id)
    sequence = torch.cat([words(PROMPT_TOKENS // 2), image, words(PROMPT_TOKENS // 2), torch.tensor([config.seg_token_id]), words(2)])
    input_ids = sequence.repeat(batch, 1).to(device)
    plain_ids = input_ids.clone()
    plain_ids[plain_ids == config.seg_token_id] = 11
    pixel_values = torch.randn(batch * tiles, 3, image_size, image_size, generator=generator).to(device, dtype)
    tile_grid = torch.tensor([[rows, cols]] * batch, device=device)
    original_sizes = [(rows * image_size, cols * image_size)] * batch
    return input_ids, plain_ids, pixel_values, tile_grid, original_sizes


def time_once(fn, device) -> float:
    """Seconds of one call of `fn` (CUDA events on GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def timed_pair(fns: dict, device, repeats: int, warmup: int) -> dict[str, tuple[float, float | None]]:
    """Median seconds of each function, calls interleaved so that load changes hit all of them alike: `(wall,
    process CPU time)` on a CPU (CPU time counts the work of all threads and not the waits for a shared machine's
    cores), `(CUDA-event time, None)` on a GPU."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    cpu_samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            begin = time.process_time()
            samples[name].append(time_once(fn, device))
            cpu_samples[name].append(time.process_time() - begin)
    cpu = device.type == "cpu"
    return {name: (statistics.median(samples[name]), statistics.median(cpu_samples[name]) if cpu else None)
            for name in fns}


def peak_memory(fn, device) -> float | None:
    """Peak GPU memory (GiB) of one call, or `None` on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


PROFILED_MODULES = ("vision_tower", "multi_modal_projector", "language_model", "lm_head", "pus_llm", "pus_vision",
                    "proj_out")


@contextlib.contextmanager
def module_ranges(model: torch.nn.Module):
    """Label the calls of the top-level parts (vision tower, projector, LLM, lm_head, the SELFIE head's MLPs) in a
    profile."""
    handles, open_ranges = [], []
    for name, module in model.named_modules():
        part = name.rsplit(".", 1)[-1]
        if part not in PROFILED_MODULES:
            continue

        def enter(module, args, part=part):
            open_ranges.append(torch.profiler.record_function(f"## {part}"))
            open_ranges[-1].__enter__()

        def leave(module, args, output):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def profile_pair(fns: dict, models: dict, repeats: int = 3, warmup: int = 1, top: int = 15) -> None:
    """Profile interleaved calls of each function (torch.profiler, CPU activities) and print where SELFIE's extra
    time goes: per top-level module (calls, ms) and per operator (self CPU ms), medians over `repeats` calls, sorted
    by SELFIE - plain."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    parts = {name: {} for name in fns}
    ops = {name: {} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            with module_ranges(models[name]), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
            ) as prof:
                begin = time.perf_counter()
                fn()
                total = time.perf_counter() - begin
            events = prof.key_averages()
            parts[name].setdefault("(whole call)", []).append((1, total * 1000))
            for e in events:
                table, key, ms = (parts, e.key[3:], e.cpu_time_total) if e.key.startswith("## ") else (
                    ops, e.key, e.self_cpu_time_total)
                table[name].setdefault(key, []).append((e.count, ms / 1000))
    median = lambda samples: (samples[0][0], statistics.median(ms for _, ms in samples))  # noqa: E731
    parts = {name: {k: median(v) for k, v in table.items()} for name, table in parts.items()}
    ops = {name: {k: median(v) for k, v in table.items()} for name, table in ops.items()}

    def print_rows(table, keys):
        for key in keys:
            (pc, pt), (sc, st) = table["plain"].get(key, (0, 0.0)), table["selfie"].get(key, (0, 0.0))
            print(f"{key} | {pc} | {pt:.1f} | {sc} | {st:.1f} | {st - pt:+.1f}")

    print(f"\nper module, median of {repeats} interleaved calls (calls, total ms; the rest of the whole call is "
          "embedding, masks, glue, post-processing):")
    print("module | plain calls | plain ms | selfie calls | selfie ms | selfie - plain ms")
    print_rows(parts, sorted(set(parts["plain"]) | set(parts["selfie"])))
    print(f"\nper operator, self CPU time, top {top} by SELFIE - plain:")
    print("op | plain calls | plain ms | selfie calls | selfie ms | selfie - plain ms")
    diff = lambda k: ops["selfie"].get(k, (0, 0.0))[1] - ops["plain"].get(k, (0, 0.0))[1]  # noqa: E731
    print_rows(ops, sorted(set(ops["plain"]) | set(ops["selfie"]), key=diff, reverse=True)[:top])


def forward_fns(selfie, plain, batch: int, tiles: int, device, dtype, compile_kwargs: dict | None = None) -> dict:
    """The two calls to compare, on the same inputs: `plain` (InternVL prefill) and `selfie` (SELFIE forward and
    its masks post-processed to the original image size). `compile_kwargs` runs both under `torch.compile`."""
    input_ids, plain_ids, pixel_values, tile_grid, sizes = make_inputs(selfie.config, batch, tiles, device, dtype)
    layout = SegmentationLayout.from_inputs(selfie.config, input_ids, None, tile_grid)  # as segment() does, untimed
    selfie_forward, plain_forward = selfie, plain
    if compile_kwargs is not None:
        selfie_forward = torch.compile(selfie, **compile_kwargs)
        plain_forward = torch.compile(plain, **compile_kwargs)

    @torch.inference_mode()
    def run_selfie():
        out = selfie_forward(input_ids=input_ids, pixel_values=pixel_values, seg_layout=layout, logits_to_keep=1)
        return post_process_masks(out.pred_masks, sizes)

    @torch.inference_mode()
    def run_plain():
        return plain_forward(input_ids=plain_ids, pixel_values=pixel_values, logits_to_keep=1)

    return {"plain": run_plain, "selfie": run_selfie}


def measure_pair(fns: dict, device, batch: int, repeats: int, warmup: int) -> dict:
    """Interleaved median latency, per-image figures and peak memory of each call (`timed_pair`, `peak_memory`)."""
    results = {}
    for name, (seconds, cpu_seconds) in timed_pair(fns, device, repeats, warmup).items():
        results[name] = {"ms": seconds * 1000, "ms_per_image": seconds * 1000 / batch, "images_per_s": batch / seconds,
                         "cpu_ms": None if cpu_seconds is None else cpu_seconds * 1000,
                         "peak_gib": peak_memory(fns[name], device)}
    return results


def measure(models, device, dtype, batch, tiles, compile_mode, repeats, warmup, profile=False):
    selfie, plain = models
    fns = forward_fns(selfie, plain, batch, tiles, device, dtype, None if compile_mode is None else {"mode": compile_mode})
    if profile:
        profile_pair(fns, {"plain": plain, "selfie": selfie}, repeats, warmup)
        return None
    return measure_pair(fns, device, batch, repeats, warmup)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", help="default: selfie-tiny on CPU, selfie-2b selfie-8b on GPU")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--tiles", nargs="+", type=int, default=[1, 6], choices=sorted(TILE_GRIDS))
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        help="also run under torch.compile (mode, e.g. reduce-overhead)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flex_attention"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile one call of each (torch.profiler) and print where the time goes")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    presets = args.presets or (["selfie-2b", "selfie-8b"] if device.type == "cuda" else ["selfie-tiny"])
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    warmup = args.warmup or (5 if device.type == "cuda" else 2)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    import transformers

    threads = f" | {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device: {name} | torch {torch.__version__} | transformers {transformers.__version__} | {dtype} | "
          f"{args.attn}{threads} | medians of {repeats} interleaved calls after {warmup} warm-up")
    header = ("preset", "mode", "batch", "tiles", "plain ms/img", "selfie ms/img", "ratio", "ratio (CPU time)",
              "plain GiB", "selfie GiB", "extra GiB", "selfie img/s")
    print(" | ".join(header))
    modes = [None] + ([args.compile] if args.compile else [])
    for preset in presets:
        models = build_models(preset, device, dtype, args.attn)
        for mode in modes:
            for batch in args.batch_sizes:
                for tiles in args.tiles:
                    r = measure(models, device, dtype, batch, tiles, mode, repeats, warmup, args.profile)
                    if r is None:
                        continue
                    plain, selfie = r["plain"], r["selfie"]
                    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
                    extra = None if plain["peak_gib"] is None else selfie["peak_gib"] - plain["peak_gib"]
                    cpu_ratio = None if plain["cpu_ms"] is None else selfie["cpu_ms"] / plain["cpu_ms"]
                    print(" | ".join([
                        preset, mode or "eager", str(batch), str(tiles), f"{plain['ms_per_image']:.2f}",
                        f"{selfie['ms_per_image']:.2f}", f"{selfie['ms'] / plain['ms']:.3f}x",
                        "n/a" if cpu_ratio is None else f"{cpu_ratio:.3f}x",
                        fmt(plain["peak_gib"]), fmt(selfie["peak_gib"]), fmt(extra), f"{selfie['images_per_s']:.1f}",
                    ]), flush=True)
        del models


if __name__ == "__main__":
    main()
