"""Convert a checkpoint of the authors' released SELF1E code (InternVL "internvl_chat" layout plus
`combine_decode_proj*`) into a transformers `SelfieForSegmentation` folder.

    python -m modeling_selfie.convert --input ORIGINAL_DIR --output HF_DIR

Token ids and loss weights, which the original code keeps outside config.json, come from `meta.json` in the input
folder (keys `seg_token_idx`, `img_context_token_id`, `loss_weights`) or from the flags.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configuration_selfie import SelfieConfig
from .io_utils import atomic_output_dir
from .modeling_selfie import SelfieForSegmentation


class ConversionError(ValueError):
    """The input is not an original SELF1E checkpoint we can convert; the message says what is wrong."""


# Original name (regex) -> transformers name. The ViT's fused qkv is split separately.
KEY_RULES = [
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.q_norm\.", r"model.vision_tower.encoder.layer.\1.attention.q_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.k_norm\.", r"model.vision_tower.encoder.layer.\1.attention.k_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^combine_decode_proj_all\.0\.", "seg_head.pus_llm.fc1."),
    (r"^combine_decode_proj_all\.2\.", "seg_head.pus_llm.fc2."),
    (r"^combine_decode_proj_ori\.0\.", "seg_head.pus_vision.fc1."),
    (r"^combine_decode_proj_ori\.2\.", "seg_head.pus_vision.fc2."),
    (r"^combine_decode_proj\.0\.", "seg_head.proj_out.fc1."),
    (r"^combine_decode_proj\.2\.", "seg_head.proj_out.fc2."),
]
QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split the ViT's qkv) of an original SELF1E state dict; unknown keys raise `ConversionError`."""
    converted, unknown = {}, []
    for key, tensor in original.items():
        qkv = QKV.match(key)
        if qkv:
            layer, kind = qkv.groups()
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"model.vision_tower.encoder.layer.{layer}.attention.{name}.{kind}"] = part.clone()
            continue
        for pattern, replacement in KEY_RULES:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                converted[new_key] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"Unknown tensors in the original checkpoint (not SELF1E layout?): {unknown[:8]}")
    return converted


def load_original_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards named in `model.safetensors.index.json`."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise ConversionError(f"{folder} holds no model.safetensors (or model.safetensors.index.json).")
    state = {}
    for shard in shards:
        state.update(load_file(folder / shard))
    return state


def build_config(original: dict, side: dict, state: dict[str, torch.Tensor]) -> SelfieConfig:
    """`SelfieConfig` from the original config.json, the side settings (meta.json / flags) and tensor shapes."""
    if original.get("model_type") != "internvl_chat":
        raise ConversionError(
            f"config.json has model_type={original.get('model_type')!r}; the original SELF1E layout has "
            "'internvl_chat'."
        )
    if original.get("ps_version", "v2") != "v2":
        raise ConversionError(f"ps_version={original['ps_version']!r} is not supported (transformers' InternVL is v2).")
    if "combine_decode_proj.0.weight" not in state:
        raise ConversionError("The checkpoint has no combine_decode_proj* tensors: it is not a SELF1E checkpoint.")
    for name in ("seg_token_id", "image_token_id"):
        if side.get(name) is None:
            raise ConversionError(f"{name} is unknown: give it in meta.json or with --{name.replace('_', '-')}.")
    vision, llm = original["vision_config"], dict(original["llm_config"])
    image_size = original.get("force_image_size") or vision["image_size"]
    ratio = original.get("downsample_ratio", 0.5)
    vision_config = {
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "image_size": [image_size, image_size],
        "patch_size": [vision["patch_size"], vision["patch_size"]],
        "attention_bias": vision.get("qkv_bias", True),
        "use_qk_norm": vision.get("qk_normalization", False),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "use_mean_pooling": True,
    }
    for key in ("architectures", "auto_map", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        llm.pop(key, None)
    weights = side.get("loss_weights", {})
    seg_hidden = state["combine_decode_proj.0.weight"].shape[1]
    return SelfieConfig(
        vision_config=vision_config,
        text_config=llm,
        image_token_id=side["image_token_id"],
        seg_token_id=side["seg_token_id"],
        image_seq_length=int((image_size // vision["patch_size"]) ** 2 * ratio**2),
        downsample_ratio=ratio,
        vision_feature_layer=original.get("select_layer", -1),
        seg_hidden_size=seg_hidden,
        tie_word_embeddings=llm.get("tie_word_embeddings", False),
        text_loss_weight=weights.get("ce_loss_weight", 1.0),
        bce_loss_weight=weights.get("bce_loss_weight", 2.0),
        dice_loss_weight=weights.get("dice_loss_weight", 0.5),
    )


def read_side_settings(folder: Path, seg_token_id: int | None, image_token_id: int | None) -> dict:
    """Token ids and loss weights from `meta.json` (if present), overridden by explicit values."""
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    kwargs = meta.get("model_init_kwargs_not_in_config", {})
    side = {
        "seg_token_id": meta.get("seg_token_id", kwargs.get("seg_token_idx")),
        "image_token_id": meta.get("img_context_token_id", kwargs.get("img_token_idx")),
        "loss_weights": meta.get("loss_weights", {}),
    }
    if seg_token_id is not None:
        side["seg_token_id"] = seg_token_id
    if image_token_id is not None:
        side["image_token_id"] = image_token_id
    return side


def convert_checkpoint(
    input_dir: str | Path,
    output_dir: str | Path,
    seg_token_id: int | None = None,
    image_token_id: int | None = None,
    overwrite: bool = False,
) -> SelfieForSegmentation:
    """Convert `input_dir` (original SELF1E layout) into `output_dir` (written atomically); returns the model."""
    folder = Path(input_dir)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json: point --input at an original SELF1E checkpoint folder.")
    original = json.loads((folder / "config.json").read_text())
    state = load_original_state_dict(folder)
    config = build_config(original, read_side_settings(folder, seg_token_id, image_token_id), state)
    model = SelfieForSegmentation(config)
    converted = convert_state_dict(state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ConversionError(f"Checkpoint does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}.")
    model.eval()
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder of the original checkpoint (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="folder to write the transformers checkpoint to")
    parser.add_argument("--seg-token-id", type=int, help="id of [SEG] (default: from meta.json)")
    parser.add_argument("--image-token-id", type=int, help="id of <IMG_CONTEXT> (default: from meta.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.input, args.output, args.seg_token_id, args.image_token_id, args.overwrite)
    except (ConversionError, FileExistsError, OSError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
