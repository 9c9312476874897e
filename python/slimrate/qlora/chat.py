"""Chat-format JSONL: reading with line-numbered errors, rendering with the tokenizer's chat template,
labels on assistant tokens only, and padded batches.

One record per line: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
optionally with ``"answer": str`` (the expected exact answer of a held-out question).  Blank lines
are skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimrate.files import write_text_atomic

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # label of tokens that carry no loss (transformers' and torch's cross-entropy default)


def _check_record(record: Any, where: str, *, need_answer: bool) -> None:
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError(f"{where}: expected an object with a non-empty \"messages\" list, got {str(record)[:80]}")
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: messages[{i}]: expected {{\"role\": one of {list(ROLES)}, \"content\": str}}, "
                             f"got {str(message)[:80]}")
    if need_answer:
        if not isinstance(record.get("answer"), str):
            raise ValueError(f"{where}: expected an \"answer\" string (the exact answer of this question)")
        if record["messages"][-1]["role"] != "user":
            raise ValueError(f"{where}: a question's messages must end with the user's question, "
                             f"got a last role {record['messages'][-1]['role']!r}")
    elif not any(m["role"] == "assistant" for m in record["messages"]):
        raise ValueError(f"{where}: no assistant message, so nothing to learn or score")


def read_chat_jsonl(path: str | os.PathLike, *, need_answer: bool = False) -> list[dict[str, Any]]:
    """The records of a chat JSONL file, checked; errors name the file and the 1-based line.

    need_answer: records are held-out questions (messages ending with a user turn, plus "answer")
    instead of chats with at least one assistant message.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected chat JSONL: one {{\"messages\": [...]}} per line)")
    records = []
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            _check_record(record, where, need_answer=need_answer)
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records (expected one JSON object per line)")
    return records


def write_chat_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """Write records as JSONL, atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def render(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    """The chat template's text for ``messages`` (special tokens included as text)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tokenizer, messages: list[dict[str, str]], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and labels: the id on tokens inside assistant messages (and the
    end-of-turn text the template adds after them), IGNORE_INDEX elsewhere; cut to ``max_length``.

    Assistant spans are found as text: the rendering of messages[:i+1] minus that of messages[:i]
    with the generation prompt, so any template whose renderings of a conversation's prefixes are
    text prefixes works; a template that is not raises ValueError.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(tokenizer, messages[:i], generation_prompt=True), render(tokenizer, messages[:i + 1])
        start, end = len(before), len(through)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("tokenizer: its chat template renders a conversation's prefixes as text that is not a "
                             "prefix of the whole conversation, so assistant tokens cannot be located")
        spans.append((start, end))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"][:max_length]
    labels = [tok if any(s <= lo < e for s, e in spans) else IGNORE_INDEX
              for tok, (lo, _) in zip(ids, encoding["offset_mapping"], strict=False)]
    return ids, labels


@dataclass
class ChatBatches:
    """Tokenized chats and padded batches of them.  examples[i] = (ids, labels)."""

    examples: list[tuple[list[int], list[int]]]
    pad_id: int

    @classmethod
    def from_records(cls, tokenizer, records: list[dict[str, Any]], max_length: int) -> ChatBatches:
        examples = [encode_chat(tokenizer, r["messages"], max_length) for r in records]
        kept = [e for e in examples if any(label != IGNORE_INDEX for label in e[1])]
        if not kept:
            raise ValueError(f"max_length: {max_length} tokens cut off every assistant answer; raise it")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(kept, pad)  # padding is masked out and carries no loss: any id will do

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """{"input_ids", "attention_mask", "labels"}: (B, T) each, right-padded to the longest."""
        chosen = [self.examples[int(i)] for i in indices]
        length = max(len(ids) for ids, _ in chosen)
        input_ids = torch.full((len(chosen), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chosen), length), dtype=torch.long)
        for row, (ids, labs) in enumerate(chosen):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(labs)] = torch.tensor(labs)
            mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def prompt_of(record: dict[str, Any]) -> list[dict[str, str]]:
    """The messages before the last assistant message (the whole list for a question record)."""
    messages = record["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return messages[:last]


def reference_of(record: dict[str, Any]) -> str | None:
    """The last assistant message's content (None for a question record)."""
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return answers[-1] if answers else None
