"""What is done to a pruned model after the choice: quantization (torchao), healing (LoRA, merged back), and
writing a pruned GGUF from the GGUF it came from (`gguf_export`)."""
