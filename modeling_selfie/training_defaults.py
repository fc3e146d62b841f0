"""Training settings shared by the command line (`modeling_selfie.training`, no torch) and the trainer
(`modeling_selfie.trainer_selfie`): the default LoRA targets and the help of the vision tower's learning rate."""

LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")
VISION_LEARNING_RATE_HELP = (
    "learning rate of the vision tower's trainable weights (its own optimizer param group, on the same schedule); "
    "default: --learning-rate"
)
