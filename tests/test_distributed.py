"""Distributed training on CPU (gloo, two processes): DDP ranks train the tiny model with `SelfieTrainer` and end
with the same weights; FSDP2, wrapped as `configuration/launch/fsdp.yaml` says, gives the unsharded loss, gradients
and, merged from the gathered state dict, masks; the launch configs are what `accelerate launch` expects.

Run as a script (`torchrun --nproc_per_node 2 tests/test_distributed.py {ddp,fsdp} OUT`) this file is the worker of
the distributed tests: each rank writes its results to OUT/rank{RANK}.json.
"""

import hashlib
import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "configuration" / "launch"
WORDS = ("segment", "the", "red", "square", "hello")


def parameter_digest(model: torch.nn.Module) -> dict:
    """sha256 of every parameter's bytes (in name order) and their float64 sum."""
    digest, total = hashlib.sha256(), 0.0
    for name, parameter in sorted(model.named_parameters()):
        data = parameter.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
        total += float(data.double().sum())
    return {"sha256": digest.hexdigest(), "sum": total}


def toy_sample(index: int) -> dict:
    """Samples 0, 1 (mod 4) segment a red square; samples 2, 3 (mod 4) are text-only chats."""
    if index % 4 >= 2:
        return {
            "image": None,
            "conversation": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello"}],
            "masks": np.zeros((0, 1, 1), np.uint8),
            "task": "vqa",
            "source": "chat",
        }
    from PIL import Image

    pixels = np.full((56, 56, 3), 90, np.uint8)
    masks = np.zeros((1, 56, 56), np.uint8)
    top = 14 * (index % 3)
    pixels[top : top + 28, 14:42] = (220, 30, 30)
    masks[0, top : top + 28, 14:42] = 1
    return {
        "image": Image.fromarray(pixels),
        "conversation": [
            {"role": "user", "content": "segment the red square"},
            {"role": "assistant", "content": "[SEG] ."},
        ],
        "masks": masks,
        "task": "referring",
        "source": "squares",
    }


def ddp_worker(output_dir: Path) -> None:
    """One rank: train 4 steps of DDP with activation checkpointing, then write the parameter digest and what this
    rank's batches held."""
    from transformers import TrainingArguments

    from modeling_selfie.presets import tiny_model_and_processor
    from modeling_selfie.training import SelfieDataCollator, SelfieTrainer

    torch.set_num_threads(1)
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    initial = parameter_digest(model)
    seen = {"images": 0, "seg": 0}

    class RecordingCollator(SelfieDataCollator):
        def __call__(self, samples):
            seen["images"] += sum(s["image"] is not None for s in samples)
            seen["seg"] += sum(len(s["masks"]) for s in samples)
            return super().__call__(samples)

    args = TrainingArguments(
        output_dir=str(output_dir / "run"),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        train_sampling_strategy="sequential",  # batches [0, 1], [4, 5], ... on rank 0 and [2, 3], ... on rank 1
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=True,
        ddp_backend="gloo",
        gradient_checkpointing=True,  # the Trainer would then turn DDP's find_unused_parameters off; ours keeps it
        seed=0,
    )
    trainer = SelfieTrainer(
        model=model.train(),
        args=args,
        data_collator=RecordingCollator(processor),
        train_dataset=[toy_sample(i) for i in range(16)],
        processing_class=processor,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    result = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "initial": initial,
        "final": parameter_digest(trainer.accelerator.unwrap_model(trainer.model)),
        "seen": seen,
        "logged_terms": sorted(key for key in logs[-1] if key.endswith("_loss")),
    }
    (output_dir / f"rank{result['rank']}.json").write_text(json.dumps(result))


def fsdp_worker(output_dir: Path) -> None:
    """One rank: forward and backward of a LoRA model before and after FSDP2 sharding (units as in fsdp.yaml); rank 0
    then merges the gathered full state dict and runs the merged model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from modeling_selfie.presets import tiny_model_and_processor
    from modeling_selfie.training import SelfieDataCollator, _unsharded_copy, apply_lora, merge_and_save

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model, processor = tiny_model_and_processor(WORDS, seed=0)
    model = apply_lora(model.train(), rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # a LoRA that changes the outputs, so that merging matters
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    batch = SelfieDataCollator(processor)([toy_sample(i) for i in (0, 1, 4, 5)])
    reference = model(**batch)
    reference.loss.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    wrapped = set(model._no_split_modules)  # the units accelerate makes under fsdp.yaml (see the launch test)
    for module in model.modules():
        if type(module).__name__ in wrapped:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = model(**batch)
    sharded.loss.backward()
    grad_error = max(
        float((p.grad.full_tensor() - reference_grads[n]).abs().max())
        for n, p in model.named_parameters()
        if p.requires_grad
    )
    result = {"reference_loss": float(reference.loss), "sharded_loss": float(sharded.loss), "grad_error": grad_error}

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        merged = merge_and_save(_unsharded_copy(model, state_dict), output_dir / "merged", processor).eval()
        with torch.no_grad():
            masks = merged(**batch).pred_masks
        result["mask_error"] = max(float((m - r).abs().max()) for m, r in zip(masks, reference.pred_masks, strict=True))
    (output_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(mode: str, output_dir: Path) -> list[dict]:
    """Run this file's `mode` worker on two processes with torchrun; the results of ranks 0 and 1."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        __file__,
        mode,
        str(output_dir),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads((output_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_ranks_end_with_identical_weights(tmp_path):
    """Rank 1 only sees text-only chats, so its vision tower and head get no gradient (unused parameters)."""
    ranks = run_workers("ddp", tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["seen"]["images"] > 0 and ranks[1]["seen"] == {"images": 0, "seg": 0}
    assert ranks[0]["initial"] == ranks[1]["initial"]
    assert ranks[0]["final"]["sha256"] != ranks[0]["initial"]["sha256"]
    assert ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["logged_terms"] == ["mask_bce_loss", "mask_dice_loss", "text_loss"]


def test_fsdp2_sharded_head_matches_unsharded(tmp_path):
    """The SELFIE head runs inside the sharded forward: same loss and gradients as unsharded, and the merged model
    built from the gathered full state dict gives the unsharded LoRA model's masks."""
    ranks = run_workers("fsdp", tmp_path)
    for rank in ranks:
        assert rank["sharded_loss"] == pytest.approx(rank["reference_loss"], abs=1e-5)
        assert rank["grad_error"] < 1e-5
    assert ranks[0]["mask_error"] < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# The training command under torchrun and accelerate launch (CPU processes, gloo)
# ----------------------------------------------------------------------------------------------------------------


def squares_data(root: Path, count: int = 16) -> Path:
    """`count` referring records in the custom format (hand-drawn PNG image and mask each) and a recipe."""
    from PIL import Image

    (root / "data" / "images").mkdir(parents=True)
    records = []
    for i in range(count):
        sample = toy_sample(4 * i)  # a red square at one of three heights
        sample["image"].save(root / "data" / "images" / f"{i}.png")
        Image.fromarray(sample["masks"][0] * 255).save(root / "data" / "images" / f"{i}_mask.png")
        records.append({"image": f"images/{i}.png", "expressions": ["the red square"], "mask": f"images/{i}_mask.png"})
    (root / "data" / "refs.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    recipe = {
        "name": "squares",
        "datasets": [{"name": "custom_referring", "annotations": "refs.jsonl", "rate": 1}],
        "training": {"lora_rank": 4, "lora_alpha": 8, "learning_rate": 1e-3, "per_device_train_batch_size": 2},
    }
    (root / "recipe.json").write_text(json.dumps(recipe))
    return root


def training_command(launcher: str, root: Path, *flags: str) -> list[str]:
    """`python -m modeling_selfie.training` on 2 CPU processes under torchrun or accelerate launch + ddp.yaml."""
    if launcher == "torchrun":
        prefix = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                  f"--master_port={free_port()}"]  # fmt: skip
    else:
        prefix = ["-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "ddp.yaml"), "--num_processes",
                  "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]  # fmt: skip
    script = ["-m", "modeling_selfie.training", "--model", "selfie-tiny", "--recipe", str(root / "recipe.json"),
              "--data-root", str(root / "data"), "--output-dir", str(root / "run"), "--save-steps", "2",
              "--logging-steps", "1", "--report-to", "none", "--disable-tqdm", "true"]  # fmt: skip
    return [sys.executable, *prefix, *script, *flags]


LAUNCH_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}


def test_two_cpu_processes_train_data_parallel_and_resume_after_a_kill(tmp_path):
    """torchrun with no device flag trains 2 gloo processes; killed after a checkpoint, `accelerate launch` with
    ddp.yaml and `--resume-from-checkpoint last` continues from it; only rank 0 prints and writes the results."""
    from modeling_selfie.training_defaults import last_complete_checkpoint

    root = squares_data(tmp_path)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(training_command("torchrun", root, "--max-steps", "1000"), cwd=REPO, env=LAUNCH_ENV,
                             stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        for _ in range(1200):  # up to 120 s for the first checkpoint
            if first.poll() is not None or last_complete_checkpoint(root / "run"):
                break
            time.sleep(0.1)
    finally:  # torchrun passes the signal on to its workers (which run in sessions of their own) and waits for them
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
        log.close()
    checkpoint = last_complete_checkpoint(root / "run")
    assert checkpoint, (tmp_path / "first.log").read_text()[-3000:]
    assert not (root / "run" / "final").exists()
    settings = json.loads((root / "run" / "settings.json").read_text())["settings"]
    assert settings["world_size"]["value"] == 2 and settings["use_cpu"] == {"value": True, "from": "derived: no GPU"}

    done = int(checkpoint.rsplit("-", 1)[1])
    second = subprocess.run(
        training_command("accelerate", root, "--max-steps", str(done + 2), "--resume-from-checkpoint", "last"),
        cwd=REPO, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert out.count(f"resuming from {checkpoint}") == 1 and out.count("SELFIE training settings (2 process(es))") == 1
    assert out.count("wrote ") == 1
    state = json.loads((root / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == done + 2
    assert state["epoch"] == pytest.approx((done + 2) / 4)  # 16 samples, 2 processes x 2 per step: 4 steps an epoch
    logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged[-2:] == [done + 1, done + 2]
    final = root / "run" / "final"
    assert {"model.safetensors", "README.md", "settings.json", "settings.md"} <= {p.name for p in final.iterdir()}
    from modeling_selfie import SelfieForSegmentation

    assert not any("lora" in n for n, _ in SelfieForSegmentation.from_pretrained(final).named_parameters())


# ----------------------------------------------------------------------------------------------------------------
# Launch configs
# ----------------------------------------------------------------------------------------------------------------


def accelerate_launch_env(config: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <config> -m modeling_selfie.training` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parsed = launch_command_parser().parse_args(
        ["--config_file", str(LAUNCH / config), "-m", "modeling_selfie.training"]
    )
    parsed, defaults, _ = _validate_launch_command(parsed)
    if parsed.use_deepspeed:
        parsed.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(parsed)[1]
    return prepare_multi_gpu_env(parsed)


def test_ddp_launch_config():
    """Precision is left to the training arguments (bf16 where the GPU has it), so CPU processes run in fp32."""
    env = accelerate_launch_env("ddp.yaml")
    assert env["ACCELERATE_MIXED_PRECISION"] == "no" and "ACCELERATE_USE_FSDP" not in env


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_launch_configs(stage, monkeypatch):
    monkeypatch.chdir(REPO)  # the yaml names its JSON relative to the repository root
    env = accelerate_launch_env(f"deepspeed_zero{stage}.yaml")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == str(stage == 3).lower()
    ds_config = json.loads(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read_text())
    assert ds_config["zero_optimization"]["stage"] == stage
    assert "optimizer" not in ds_config and "scheduler" not in ds_config  # the Trainer's AdamW and schedule
    if stage == 3:
        assert ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_pass_the_installed_deepspeed_schema(stage):
    """zero{2,3}.json with the "auto" values filled as the Trainer fills them (transformers' HfTrainerDeepSpeedConfig,
    for the shipped recipes' batch 5 x accumulation 8) are valid DeepSpeed configs; a misspelt key is not."""
    pytest.importorskip(
        "deepspeed", reason="deepspeed is an optional dependency (pip install deepspeed); its schema is checked where "
        "it is installed"
    )
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from modeling_selfie.presets import tiny_model_and_processor

    model = tiny_model_and_processor(WORDS)[0]  # before the config: a live ZeRO-3 config makes models partition
    args = TrainingArguments(output_dir="unused", per_device_train_batch_size=5, gradient_accumulation_steps=8,
                             use_cpu=True)  # fmt: skip
    try:
        filled = HfTrainerDeepSpeedConfig(str(LAUNCH / f"zero{stage}.json"))
        filled.trainer_config_process(args)
        filled.trainer_config_finalize(args, model, num_training_steps=100)
    finally:
        unset_hf_deepspeed_config()
    assert "auto" not in json.dumps(filled.config)
    config = DeepSpeedConfig(filled.config)
    assert (config.zero_optimization_stage, config.train_batch_size) == (stage, 40)
    assert config.gradient_accumulation_steps == 8
    misspelt = json.loads(json.dumps(filled.config))
    misspelt["zero_optimization"]["overlap_com"] = misspelt["zero_optimization"].pop("overlap_comm")
    with pytest.raises(pydantic.ValidationError, match="overlap_com"):
        DeepSpeedConfig(misspelt)


@pytest.mark.parametrize("text_model, decoder_layer", [("qwen2", "Qwen2DecoderLayer"), ("llama", "LlamaDecoderLayer")])
def test_fsdp_launch_config_wraps_model_layers(text_model, decoder_layer, monkeypatch):
    """fsdp.yaml names no class: accelerate wraps the model's `_no_split_modules`, which follow its text model."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from modeling_selfie.presets import tiny_model_and_processor
    from modeling_selfie.training import apply_lora

    env = accelerate_launch_env("fsdp.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model = tiny_model_and_processor(WORDS, text_config={"model_type": text_model})[0]
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(apply_lora(model, rank=2))  # what the trainer gives accelerate
    wrapped = set(plugin.transformer_cls_names_to_wrap)
    model_classes = {type(module).__name__ for module in model.modules()}
    assert wrapped == {"InternVLVisionLayer", decoder_layer} and wrapped <= model_classes


if __name__ == "__main__":
    {"ddp": ddp_worker, "fsdp": fsdp_worker}[sys.argv[1]](Path(sys.argv[2]))
