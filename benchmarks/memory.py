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
import threading
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
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
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


class AnonymousPeak:
    """The peak of this process's anonymous resident memory (`RssAnon`), sampled every `interval` s in a thread,
    with the peak resident memory (`VmHWM`). Linux `/proc`; on other systems both read `None`."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def status(field: str) -> int | None:
        """A `/proc/self/status` field in bytes."""
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.status("RssAnon") or 0)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.status("RssAnon") or 0)


def write_checkpoint(preset: str, folder: Path) -> None:
    """A random-weight model of `preset`, variance-preserving init (mask logits of order 1), saved as float32 in
    1 GB shards. Built on the meta device and then given memory once, so that the writer holds one copy."""
    from modeling_selfie import SelfieForSegmentation
    from modeling_selfie.presets import preset_config, variance_preserving_init_

    torch.manual_seed(0)
    with torch.device("meta"):
        model = SelfieForSegmentation(preset_config(preset))
    model.to_empty(device="cpu")
    model.initialize_weights()  # transformers' init of every module (norms, biases, embeddings, layer scales)
    variance_preserving_init_(model)
    model.save_pretrained(folder, max_shard_size="1GB")


def run_mode(mode: str, folder: Path, device: torch.device, offload_share: float) -> dict:
    """Load the checkpoint in `mode`, run one segmentation forward, save its mask logits next to the checkpoint, and
    return the measurements."""
    from speed import make_inputs  # benchmarks/ is on the path (this file's folder)

    from modeling_selfie import SegmentationLayout, SelfieForSegmentation

    imports_anon, imports_rss = AnonymousPeak.status("RssAnon"), AnonymousPeak.status("VmRSS")
    with AnonymousPeak() as sampler:
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
              "placement": [str(p) for p in placement]}
    if device.type == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated()
    else:
        result.update(peak_rss=AnonymousPeak.status("VmHWM"), peak_anon=sampler.peak, imports_anon=imports_anon,
                      imports_rss=imports_rss)
    return result


def mask_iou(mask: torch.Tensor, reference: torch.Tensor) -> float:
    """IoU of the binarised (logit > 0) masks."""
    from modeling_selfie.evaluation import ReferringMetrics

    metrics = ReferringMetrics()
    metrics.update(mask > 0, reference > 0)
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

    def own(result):  # the memory the mode itself holds at its peak
        if cuda:
            return result["gpu_peak"]
        return result["peak_anon"] - result["imports_anon"]

    base = own(results["fp32"]) if "fp32" in results else None
    if cuda:
        print("mode | load s | forward s | peak GPU memory GiB | vs fp32 | mask IoU vs fp32 | seg_head | placement")
    else:
        print("mode | load s | forward s | peak RSS GiB | peak anonymous GiB | anonymous above imports GiB | vs fp32 | "
              "mask IoU vs fp32 | seg_head | placement")
    print("|".join(["---"] * (8 if cuda else 10)))
    for mode in MODES:
        if mode in errors:
            print(f"{mode} | not run: {errors[mode]}")
        if mode not in results:
            continue
        result = results[mode]
        ratio = "-" if base is None else f"{own(result) / base:.2f}x"
        iou = "-" if reference is None else f"{mask_iou(torch.load(folder / f'masks-{mode}.pt'), reference):.4f}"
        memory = [gib(result["gpu_peak"])] if cuda else [gib(result["peak_rss"]), gib(result["peak_anon"]),
                                                         gib(own(result))]
        print(" | ".join([mode, f"{result['load_s']:.1f}", f"{result['forward_s']:.1f}", *memory, ratio, iou,
                          "/".join(result["seg_head"]), "/".join(result["placement"]) or "-"]))
    if not cuda and results:
        first = next(iter(results.values()))
        print(f"\nimports alone: {gib(first['imports_anon'])} GiB anonymous, {gib(first['imports_rss'])} GiB resident")
    if reference is not None:
        print(f"fp32 masks: {reference.shape[-2]} x {reference.shape[-1]}, {float((reference > 0).float().mean()):.3f} "
              "of the pixels positive")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="selfie-2b", help="a shipped preset (selfie-tiny for a quick check)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--folder", type=Path, help="where the checkpoint is written (kept), or read when present")
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
        write_checkpoint(args.preset, args.folder)
        print(RESULT + json.dumps({"written": str(args.folder)}))
        return
    if args.worker:
        print(RESULT + json.dumps(run_mode(args.worker, args.folder, device, args.offload_share)))
        return

    import transformers

    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch) / args.preset
        common = ["--preset", args.preset, "--device", str(device), "--offload-share", str(args.offload_share),
                  *(["--threads", str(args.threads)] if args.threads else [])]
        if not (folder / "config.json").exists():
            begin = time.perf_counter()
            _, error = worker([*common, "--worker", "write"], folder, args.timeout)
            if error:
                raise SystemExit(f"error: writing the {args.preset} checkpoint failed: {error}")
            print(f"wrote {args.preset} (random weights, float32) in {time.perf_counter() - begin:.0f} s")
        results, errors = {}, {}
        for mode in args.modes:
            result, error = worker([*common, "--worker", mode], folder, args.timeout)
            if result is None:
                errors[mode] = error
            else:
                results[mode] = result
                print(f"{mode}: done", flush=True)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"\n{args.preset}: {size / 2**30:.2f} GiB of float32 weights | device {device} | torch "
              f"{torch.__version__} | transformers {transformers.__version__} | threads {args.threads or 'default'}")
        report(results, errors, folder, device.type == "cuda")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # speed.py's input builder
    main()
