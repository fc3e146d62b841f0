"""Convert a checkpoint folder of the authors' released SELF1E code (InternVL `internvl_chat` layout plus
`combine_decode_proj*`) into a complete transformers folder: model, config, generation config, tokenizer, image
processor and processor.

    python -m modeling_selfie.convert --input RELEASE_DIR --output OUT [--base-tokenizer BASE]

* Weights: `model.safetensors`, safetensors shards (with or without `model.safetensors.index.json`),
  `pytorch_model.bin` or its shards (read with `torch.load(weights_only=True)`); `training_args.bin` and the
  trainer's other files are never opened. They keep their dtype (a bf16 release stays bf16).
* An intermediate `checkpoint-N` folder (LoRA not merged: PEFT's `base_model.model.*`, `*.base_layer.*`,
  `*.lora_A.*` keys) is merged as PEFT merges it, W + (alpha / r) B @ A, with alpha from the folder's
  `adapter_config.json` or `--lora-alpha`; without either it is refused.
* Tokens: the authors save no tokenizer; their code adds `[SEG]` then `[SEGT]` to the base InternVL3 tokenizer
  (`add_tokens`) at every run. The converter does the same with `--base-tokenizer` (the base InternVL3 folder,
  original or `-hf`, or a tokenizer folder), or takes a tokenizer already in RELEASE_DIR, and checks the result
  against the checkpoint: embedding rows = tokenizer length. Tokens a `-hf` tokenizer holds beyond the original
  vocabulary (`<video>`) move after `[SEGT]`, so `[SEG]` keeps the authors' id.
* LLMs: Qwen2 (InternVL3), Qwen3 (InternVL3.5) and Llama, whose original tensors already carry transformers' names,
  and InternLM2 (InternVL2 / InternVL2.5), converted to Llama as transformers' InternVL conversion does it (names
  mapped, the packed `wqkv` split per key-value group); any other `llm_config` is refused. For an InternLM2 base,
  give the `-hf` folder as `--base-tokenizer` (the original tokenizer is remote code).
* Without any tokenizer, the token ids may come from the older `meta.json` side file or `--seg-token-id` /
  `--image-token-id`; the output then holds the model only (no processor).

Every refusal is a `ConversionError` (CLI: one `error: ...` line, exit 2); OUT is written atomically.

This module is the command line (also `selfie-convert`): it parses the arguments without torch, so that `--help`
answers at once, and the conversion ([`convert_checkpoint`], in `modeling_selfie.conversion`, importable from here)
loads torch and transformers when it runs.
"""


import argparse
import sys

# The names `modeling_selfie.conversion` defines, importable from here (loaded on first use).
CONVERSION_EXPORTS = ("ConversionError", "convert_checkpoint", "convert_state_dict", "merge_lora")


def __getattr__(name: str):
    if name not in CONVERSION_EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import conversion

    return getattr(conversion, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="the released checkpoint folder (config.json + weights)")
    parser.add_argument("--output", required=True, help="folder to write the transformers checkpoint to")
    parser.add_argument(
        "--base-tokenizer",
        help="the base InternVL3 folder (original or -hf) or its tokenizer folder; [SEG] and [SEGT] are added as the "
        "authors' code adds them (default: a tokenizer in --input)",
    )
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha, to merge an unmerged checkpoint-N folder")
    parser.add_argument("--seg-token-id", type=int, help="id of [SEG] when no tokenizer is given")
    parser.add_argument("--image-token-id", type=int, help="id of <IMG_CONTEXT> when no tokenizer is given")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .conversion import ConversionError, convert_checkpoint  # torch loads here, once the arguments parse

    try:
        convert_checkpoint(
            args.input,
            args.output,
            base_tokenizer=args.base_tokenizer,
            seg_token_id=args.seg_token_id,
            image_token_id=args.image_token_id,
            lora_alpha=args.lora_alpha,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileExistsError, OSError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
