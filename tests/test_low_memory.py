"""Loading SELFIE in less memory with transformers' own mechanisms: accelerate's `device_map="auto"` with CPU and disk
offload, `dtype=torch.bfloat16`, and the quantization configs (bitsandbytes 8-bit / 4-bit on its CPU backend, torchao
int8 weight-only). The SELFIE head stays float32 throughout (`_keep_in_fp32_modules`); masks are compared with the
float32 model's as the IoU of the binarised masks (`benchmarks/memory.py` measures the memory at selfie-2b size).

The checkpoint is written by transformers' `save_pretrained`; the quantized variants need the `quant` extra
(`pip install -e ".[quant]"`), and without it those tests skip saying so.
"""

import importlib.util

import pytest
import torch

from modeling_selfie import SelfieForSegmentation
from modeling_selfie.evaluation import ReferringMetrics
from modeling_selfie.presets import tiny_model_and_processor

from .helpers import WORDS, random_image

QUERIES = ["red circle", "the blue square", "green shape", "hello"]
# bitsandbytes' CPU 4-bit kernel packs weights in blocks of 64 input features: the tiny preset's 32-wide ViT is too
# narrow for it, so this model is 64 wide (and its MLPs 128) throughout.
WIDER = dict(vision_config={"hidden_size": 64, "intermediate_size": 128}, text_config={"intermediate_size": 128})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, processor): a tiny random SELFIE written by transformers' `save_pretrained`."""
    model, processor = tiny_model_and_processor(WORDS, seed=0, **WIDER)
    folder = tmp_path_factory.mktemp("selfie")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, processor


def mask_logits(model, processor) -> torch.Tensor:
    """`[len(QUERIES), H, W]` float32 mask logits, one query per image (two image sizes)."""
    images = [random_image(80, 64, seed=i) if i % 2 else random_image(64, 96, seed=i) for i in range(len(QUERIES))]
    logits = model.segment(processor, images[:1] * 2, QUERIES[:2], return_logits=True)
    logits += model.segment(processor, images[2:3] * 2, QUERIES[2:], return_logits=True)
    return torch.stack([mask.float() for mask in logits])


@pytest.fixture(scope="module")
def fp32_logits(checkpoint):
    """The float32 model's mask logits, loaded whole into memory; each mask is neither empty nor full (an IoU of
    trivial masks would say nothing)."""
    folder, processor = checkpoint
    logits = mask_logits(SelfieForSegmentation.from_pretrained(folder).eval(), processor)
    positive = (logits > 0).flatten(1).float().mean(1)
    assert ((positive > 0.05) & (positive < 0.95)).all(), positive
    return logits


def iou_with(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """IoU of the binarised masks over all queries (total intersection / total union)."""
    metrics = ReferringMetrics()
    metrics.update(logits > 0, reference > 0)
    return metrics.compute()["cIoU"]


def assert_head_is_float32(model) -> None:
    """Every SELFIE head weight is a plain float32 tensor in a plain `nn.Linear` (not converted, not quantized)."""
    for name, module in model.seg_head.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert type(module) is torch.nn.Linear, (name, type(module))
            assert type(module.weight.data) is torch.Tensor and module.weight.dtype == torch.float32, name


def test_device_map_auto_with_cpu_and_disk_offload_gives_the_float32_masks(checkpoint, fp32_logits, tmp_path):
    folder, processor = checkpoint
    size = (folder / "model.safetensors").stat().st_size  # float32 weights: half stay in memory, half on disk
    model = SelfieForSegmentation.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path / "offload"
    ).eval()
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}, model.hf_device_map
    assert any(p.device.type == "meta" for p in model.parameters())  # the disk part is not in memory
    assert model.input_device == torch.device("cpu")
    assert torch.equal(mask_logits(model, processor), fp32_logits)


def test_bfloat16_on_cpu_keeps_the_head_float32_and_masks_close(checkpoint, fp32_logits):
    folder, processor = checkpoint
    model = SelfieForSegmentation.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert model.model.language_model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.model.vision_tower.encoder.layer[0].attention.q_proj.weight.dtype == torch.bfloat16
    assert_head_is_float32(model)
    logits = mask_logits(model, processor)
    assert logits.dtype == torch.float32 and not torch.equal(logits, fp32_logits)  # bf16 did run
    assert iou_with(logits, fp32_logits) > 0.95


def quantization_config(name: str):
    """transformers' quantization config for `name`, or a skip naming the missing package."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    package = "torchao" if name == "torchao-int8" else "bitsandbytes"
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (the `quant` extra: pip install -e '.[quant]')")
    if name == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name == "bnb-4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


# The IoU floors: what each precision keeps of this 2-layer random model's masks (measured 0.983 / 0.887 / 0.983;
# bf16 0.993); masks of the same size drawn at random would give about 0.33.
@pytest.mark.parametrize(("name", "min_iou"), [("bnb-8bit", 0.95), ("bnb-4bit", 0.8), ("torchao-int8", 0.95)])
def test_quantized_loading_keeps_the_head_float32_and_segments(checkpoint, fp32_logits, name, min_iou):
    folder, processor = checkpoint
    model = SelfieForSegmentation.from_pretrained(folder, quantization_config=quantization_config(name)).eval()
    quantized = [model.model.language_model.layers[0].mlp.up_proj, model.model.vision_tower.encoder.layer[0].mlp.fc1]
    for module in quantized:  # bitsandbytes swaps the module class, torchao the weight's tensor class
        assert type(module) is not torch.nn.Linear or type(module.weight.data) is not torch.Tensor, (name, module)
    assert_head_is_float32(model)
    logits = mask_logits(model, processor)
    assert logits.dtype == torch.float32 and not torch.equal(logits, fp32_logits)
    assert iou_with(logits, fp32_logits) > min_iou
