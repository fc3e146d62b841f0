"""Peak memory of each way to load SELFIE in less memory, against float32, measured in one run.

    python benchmarks/memory.py                          # selfie-2b, random weights, on the GPU if there is one
    python benchmarks/memory.py --preset selfie-tiny     # a quick check of every mode
    python benchmarks/memory.py --modes fp32 bf16 offload --threads 1

A random-weight model of the preset is written once (transformers' `save_pretrained`, float32) to a temporary
folder (or `--folder`, kept and reused). Each mode then loads it in a subprocess of its own, so that each peak is that
mode's alone, and runs one segmentation forward (one 448 px tile, the validation prompt answered "[SEG].", as
`benchmarks/speed.py` builds it). The modes are transformers' own loading options (`MODES`); the SELFIE head stays
float32 in all of them (`SelfieForSegmentation._keep_in_fp32_modules`).

Reported per mode: seconds to load and to run the forward; on a CPU the process's peak resident memory (VmHWM) and
the peak of its anonymous memory, sampled every 10 ms (resident memory also counts file pages that safetensors and
the disk offload map in, which the kernel may drop when memory is short), each less what the imports alone hold; on a
GPU `torch.cuda.max_memory_allocated`; the ratio to float32; and the IoU of the binarised masks with float32's.
The quantized modes need the `quant` extra (`pip install -e ".[quant]"`); a mode that cannot run says why.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("fp32", "bf16", "offload", "bnb-8bit", "bnb-4bit", "torchao-int8")
RESULT = "RESULT "  # the line a worker prints its measurements on


def load_kwargs(mode: str, folder: Path, device: torch.device, offload_share: float) -> dict:
    """`from_pretrained` keyword arguments of a mode. Quantized modes keep the unquantized parts (embeddings,
    lm_head, norms) in bfloat16; `offload` keeps float32 and puts `offload_share` of the weights in memory (on the
    GPU, and as much again on the CPU), the rest on disk."""
    if mode == "fp32":
        kwargs = {"dtype": torch.float32}
    elif mode == "bf16":
        kwargs = {"dtype": torch.bfloat16}
    elif mode == "offload":
        config = json.loads((folder / "config.json").read_text())
        itemsize = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32").itemsize
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) * 4 // itemsize  # as float32
        budget = int(size * offload_share)
        max_memory = {"cpu": budget} if device.type == "cpu" else {device.index or 0: budget, "cpu": budget}
        return {"dtype": torch.float32, "device_map": "auto", "max_memory": max_memory,
                "offload_folder": str(folder / "offload")}
    elif mode.startswith("bnb-"):
        from transformers import BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_8bit=True) if mode == "bnb-8bit" else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
        kwargs = {"dtype": torch.bfloat16, "quantization_config": config}
    elif mode == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        kwargs = {"dtype": torch.bfloat16, "quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}
    else:
        raise ValueError(f"Unknown mode {mode!r}; choose from {MODES}.")
    return {**kwargs, "device_map": {"": "cpu" if device.type == "cpu" else device.index or 0}}


def memory_status() -> dict[str, int | None]:
    """This process's resident memory now (`VmRSS`, of it `RssAnon` and the file pages it maps, `RssFile`) and at its
    peak (`VmHWM`), in bytes, from Linux's `/proc/self/status` (`None` elsewhere)."""
    fields = dict.fromkeys(("VmRSS", "RssAnon", "RssFile", "VmHWM"))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                fields[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses that wrap others (torchao's quantized weights)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.nelement() * tensor.element_size()


def weights_in_memory(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers that are in memory (not waiting on the meta device for the disk)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"]
    return sum(tensor_bytes(t.data if isinstance(t, torch.nn.Parameter) else t) for t in tensors)


def write_checkpoint(preset: str, folder: Path, dtype: torch.dtype) -> None:
    """A random-weight model of `preset` (variance-preserving init: mask logits of order 1) saved in `dtype` in 1 GB
    shards. Built on the meta device and given memory once, in `dtype`, so that the writer holds one copy."""
    from modeling_selfie import SelfieForSegmentation
    from modeling_selfie.presets import preset_config, variance_preserving_init_

    torch.manual_seed(0)
    with torch.device("meta"):
        model = SelfieForSegmentation(preset_config(preset)).to(dtype)
    model.to_empty(device="cpu")
    model.initialize_weights()  # transformers' init of every module (norms, biases, embeddings, layer scales)
    variance_preserving_init_(model)
    model.save_pretrained(folder, max_shard_size="1GB")


def run_mode(mode: str, folder: Path, device: torch.device, offload_share: float) -> dict:
    """Load the checkpoint in `mode`, run one segmentation forward, save its mask logits next to the checkpoint, and
    return the measurements."""
    from speed import make_inputs  # benchmarks/ is on the path (this file's folder)

    from modeling_selfie import SegmentationLayout, SelfieForSegmentation

    imports = memory_status()
    begin = time.perf_counter()
    model = SelfieForSegmentation.from_pretrained(folder, **load_kwargs(mode, folder, device, offload_share)).eval()
    load_s = time.perf_counter() - begin
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    input_ids, _, pixel_values, tile_grid, _ = make_inputs(model.config, 1, 1, torch.device("cpu"), torch.float32)
    layout = SegmentationLayout.from_inputs(model.config, input_ids, None, tile_grid)
    begin = time.perf_counter()
    with torch.inference_mode():
        out = model(input_ids=input_ids.to(model.input_device), tile_grid=tile_grid, seg_layout=layout,
                    pixel_values=pixel_values.to(model.input_device, model.dtype), logits_to_keep=1)
    forward_s = time.perf_counter() - begin
    torch.save(out.pred_masks[0].float().cpu(), folder / f"masks-{mode}.pt")
    head = {p.dtype for p in model.seg_head.parameters()} | {type(p.data).__name__ for p in model.seg_head.parameters()}
    placement = sorted(set(getattr(model, "hf_device_map", {}).values()), key=str)
    result = {"mode": mode, "load_s": load_s, "forward_s": forward_s, "seg_head": sorted(map(str, head)),
              "placement": [str(p) for p in placement], "weights": weights_in_memory(model)}
    if device.type == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated()
    else:
        result.update(imports=imports, after=memory_status())
    return result


def mask_iou(mask: torch.Tensor, reference: torch.Tensor, threshold: float = 0.0) -> float:
    """IoU of the masks binarised at `threshold` (logit > threshold)."""
    from modeling_selfie.evaluation import ReferringMetrics

    metrics = ReferringMetrics()
    metrics.update(mask > threshold, reference > threshold)
    return metrics.compute()["cIoU"]


def worker(argv: list[str], folder: Path, timeout: float) -> tuple[dict | None, str]:
    """Run this script as a subprocess; its result, or `None` and the last line of what it printed on failure."""
    run = subprocess.run([sys.executable, __file__, *argv, "--folder", str(folder)], capture_output=True, text=True,
                         timeout=timeout)
    for line in run.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):]), ""
    lines = [line for line in (run.stderr + run.stdout).splitlines() if line.strip()]
    return None, (lines[-1] if lines else f"exit status {run.returncode}")


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def report(results: dict[str, dict], errors: dict[str, str], folder: Path, cuda: bool) -> None:
    """Print the table: memory of each mode against float32, and its masks' IoU with float32's."""
    reference = torch.load(folder / "masks-fp32.pt") if "fp32" in results else None
    median = None if reference is None else float(reference.median())

    def held(result):  # peak memory of the mode: the GPU's, or the process's resident memory less the imports'
        if cuda:
            return result["gpu_peak"]
        return result["after"]["VmHWM"] - result["imports"]["VmRSS"]

    base = {"peak": held(results["fp32"]), "weights": results["fp32"]["weights"]} if "fp32" in results else None
    memory = ["peak GPU memory GiB"] if cuda else ["peak RSS GiB", "resident after GiB"]
    print(" | ".join(["mode", "load s", "forward s", *memory, "vs fp32", "weights in memory GiB", "vs fp32",
                      "IoU (logit > 0)", "IoU (> fp32 median)", "seg_head", "placement"]))
    print("|".join(["---"] * (len(memory) + 9)))
    for mode in MODES:
        if mode in errors:
            print(f"{mode} | not run: {errors[mode]}")
        if mode not in results:
            continue
        result = results[mode]
        if cuda:
            memory = [gib(result["gpu_peak"])]
        else:
            imports, after = result["imports"], result["after"]
            memory = [gib(held(result)), gib(after["VmRSS"] - imports["VmRSS"])]
        ratios = ["-", "-"] if base is None else [f"{held(result) / base['peak']:.2f}x",
                                                  f"{result['weights'] / base['weights']:.2f}x"]
        ious = ["-", "-"]
        if reference is not None:
            masks = torch.load(folder / f"masks-{mode}.pt")
            ious = [f"{mask_iou(masks, reference):.4f}", f"{mask_iou(masks, reference, median):.4f}"]
        print(" | ".join([mode, f"{result['load_s']:.1f}", f"{result['forward_s']:.1f}", *memory, ratios[0],
                          gib(result["weights"]), ratios[1], *ious, "/".join(result["seg_head"]),
                          "/".join(result["placement"]) or "-"]))
    if not cuda and results:
        imports = next(iter(results.values()))["imports"]
        print(f"\nmemory above what the imports alone hold ({gib(imports['VmRSS'])} GiB resident); resident = "
              "anonymous + mapped file pages (safetensors maps the checkpoint)")
    if reference is not None:
        print(f"fp32 masks: {reference.shape[-2]} x {reference.shape[-1]}, {float((reference > 0).float().mean()):.3f} "
              f"of the pixels with logit > 0; median logit {median:.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="selfie-2b", help="a shipped preset (selfie-tiny for a quick check)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--folder", type=Path, help="where the checkpoint is written (kept), or read when present")
    parser.add_argument("--checkpoint-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype the checkpoint is written in (released InternVL3 / SELFIE checkpoints: bfloat16)")
    parser.add_argument("--offload-share", type=float, default=0.25,
                        help="offload: the share of the float32 weights kept in memory (per device), the rest on disk")
    parser.add_argument("--threads", type=int, help="CPU threads of each mode (torch.set_num_threads)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the subprocess of one mode ("write": the checkpoint)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "write":
        write_checkpoint(args.preset, args.folder, getattr(torch, args.checkpoint_dtype))
        print(RESULT + json.dumps({"written": str(args.folder)}))
        return
    if args.worker:
        print(RESULT + json.dumps(run_mode(args.worker, args.folder, device, args.offload_share)))
        return

    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch) / args.preset
        common = ["--preset", args.preset, "--device", str(device), "--offload-share", str(args.offload_share),
                  "--checkpoint-dtype", args.checkpoint_dtype,
                  *(["--threads", str(args.threads)] if args.threads else [])]
        if not (folder / "config.json").exists():
            begin = time.perf_counter()
            _, error = worker([*common, "--worker", "write"], folder, args.timeout)
            if error:
                raise SystemExit(f"error: writing the {args.preset} checkpoint failed: {error}")
            print(f"wrote {args.preset} (random weights, {args.checkpoint_dtype}) in {time.perf_counter() - begin:.0f} s")
        results, errors = {}, {}
        for mode in args.modes:
            result, error = worker([*common, "--worker", mode], folder, args.timeout)
            if result is None:
                errors[mode] = error
            else:
                results[mode] = result
                print(f"{mode}: done", flush=True)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"\n{args.preset}: {size / 2**30:.2f} GiB checkpoint ({args.checkpoint_dtype}) | device {device} | torch "
              f"{torch.__version__} | transformers {transformers.__version__} | threads {args.threads or 'default'}")
        report(results, errors, folder, device.type == "cuda")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # speed.py's input builder
    main()
