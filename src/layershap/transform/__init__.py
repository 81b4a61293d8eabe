"""What is done to a pruned model after the choice: quantization (torchao) and healing (LoRA, merged back)."""
