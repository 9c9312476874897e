"""QLoRA: 4-bit NF4 base + LoRA adapters (fused layer, peft drop-in, two-phase fine-tuning driver).

- ``patch_peft`` / ``unpatch_peft``: run peft's LoRA layers over bitsandbytes ``Linear4bit`` through
  ``slimrate.ops.nf4_lora_linear`` (``slimrate.qlora.peft_patch``);
- ``load_4bit``: a local model in 4-bit NF4 with LoRA adapters; ``save_merged``: dequantized base +
  LoRA as a plain safetensors model (``slimrate.qlora.loading``);
- ``finetune`` / ``FinetuneConfig``: the two-phase driver behind ``slimrate qlora train``
  (``slimrate.qlora.driver``);
- ``load_adapter`` / ``save_adapter_slim`` / ``lora_rate_constraint``: adapters as entropy-coded .slim
  files, and BackSlash on the LoRA A/B matrices (``slimrate.qlora.adapter``).

transformers, peft and bitsandbytes are imported when used (``pip install slimrate[qlora,hf]``).
"""

from slimrate.qlora.adapter import is_lora_weight, load_adapter, lora_rate_constraint, save_adapter_slim
from slimrate.qlora.driver import FinetuneConfig, finetune, format_summary
from slimrate.qlora.evaluate import is_wellformed_markdown, markdown_problems, normalize_answer
from slimrate.qlora.loading import load_4bit, merged_state_dict, save_merged
from slimrate.qlora.peft_patch import (
    RepackedWeightError,
    patch_peft,
    patched_layers,
    prevent_cpu_repack,
    unpatch_peft,
)

__all__ = ["FinetuneConfig", "RepackedWeightError", "finetune", "format_summary", "is_lora_weight",
           "is_wellformed_markdown", "load_4bit", "load_adapter", "lora_rate_constraint", "markdown_problems",
           "merged_state_dict", "normalize_answer", "patch_peft", "patched_layers", "prevent_cpu_repack",
           "save_adapter_slim", "save_merged", "unpatch_peft"]
