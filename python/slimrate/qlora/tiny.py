"""The driver's offline default model: a tiny randomly initialised Mistral and a character tokenizer.

It exists so ``slimrate qlora train`` runs end to end in minutes on a laptop CPU with nothing to
download.  It knows nothing: its numbers say that the pipeline works, not how a real model fares.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Mistral-style special tokens; [INST] … [/INST] wrap user (and system) turns as in Mistral's template.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]"]
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]  # printable ASCII and newline; anything else is <unk>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}[INST]{{ message['content'] }}[/INST]{% endif %}{% endfor %}"
)
TINY_NOTE = ("TINY MODEL: a randomly initialised 2-layer Mistral (hidden 64) with a character tokenizer; LoRA and "
             "its output head trained on a small generated data set. Its numbers show that the pipeline runs; they "
             "mean nothing about real models.")


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (one token per character, Mistral-style specials,
    a chat template); built in code, saved and reloaded like any transformers tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    backend.decoder = decoders.Fuse()  # join characters without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        additional_special_tokens=["[INST]", "[/INST]"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_mistral(vocab_size: int, seed: int = 0, *, hidden: int = 64, layers: int = 2, max_positions: int = 1024):
    """A randomly initialised ``MistralForCausalLM``: hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads
    (a config small enough for CPU tests, with the char vocabulary) in float32."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                           tie_word_embeddings=False)
    torch.manual_seed(seed)
    return MistralForCausalLM(config)


def save_tiny_base(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build the tokenizer and the tiny model and save both to ``out_dir`` (a model folder that
    ``load_4bit`` reads like any other).  Returns the folder."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_mistral(len(tokenizer), seed)
    folder = Path(out_dir)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
