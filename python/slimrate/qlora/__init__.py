"""QLoRA: 4-bit NF4 base + LoRA adapters (fused layer, peft drop-in, two-phase fine-tuning driver)."""
