"""transformers causal LMs in the runtime: model_factory="hf:CONFIG_DIR" builds the model from the config.json in
a local folder, on the meta device (no weight is allocated until the weights stream in, nothing is downloaded).

Imports transformers only when such a model is built, so importing slimrate.runtime never imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimrate.checkpoints import local_model_folder

HF_PREFIX = "hf:"
EXAMPLE_TOKENS = 16  # sequence length of the random example input


def is_hf_factory(model_factory: object) -> bool:
    return isinstance(model_factory, str) and model_factory.startswith(HF_PREFIX)


def hf_config_dir(model_factory: str, argument: str = "model_factory") -> Path:
    """The folder of ``model_factory`` "hf:DIR"; ValueError naming ``argument`` unless DIR is a folder holding
    config.json."""
    return local_model_folder(model_factory[len(HF_PREFIX):], f"{argument} {model_factory!r}")


def build_hf_model(config_dir: Path) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` of the folder's config.json, every tensor on the meta device."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:
        raise ImportError("model_factory='hf:DIR' needs transformers; install it with "
                          "`pip install 'slimrate[hf]'`") from error
    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def hf_example(model: nn.Module, batch: int) -> torch.Tensor:
    """Random token ids of the model's vocabulary, int64 (batch, EXAMPLE_TOKENS)."""
    return torch.randint(0, model.config.vocab_size, (batch, EXAMPLE_TOKENS))
