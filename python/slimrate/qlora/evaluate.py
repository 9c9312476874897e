"""What the driver measures after each phase: token loss, generated answers, the markdown-format
share and exact-answer accuracy.

Markdown check (``markdown_problems``; an answer is well-formed when the list is empty).  It is
strict on purpose: it accepts the subset of CommonMark an advising answer needs and rejects what a
renderer would silently turn into something else.
- The answer is not empty and has at least one heading or list item.
- Headings are ``#``…``######``, one space, then text (``##Plan``, ``## `` and ``#######`` fail); after
  the first heading, a heading is at most one level deeper than the one before.
- Bullet items are ``- text``, ``* text`` or ``+ text``; ordered items ``1. text``.  A line that starts
  with ``-``/``+`` must be an item or a rule (``---``); a line of only a marker (``-``, ``2.``) fails.
- A nested item's marker starts where its parent item's text starts (2 spaces under ``- ``, 3 under
  ``1. ``, as CommonMark nests them); no other line is indented and no line holds a tab.
- In one list (items at the same depth, blank lines allowed between them): one kind (bullets or
  numbers), one bullet character, and numbers 1, 2, 3, … in order.
- Outside fenced code blocks (``` lines, which must close), every line has an even number of ``**``
  and of backticks (bold and code spans close on their line).

Exact answers (``normalize_answer``): generated and expected answers are equal after stripping outer
whitespace and a trailing period, collapsing inner whitespace and case-folding.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimrate.qlora.chat import IGNORE_INDEX, ChatBatches, render

HEADING = re.compile(r"(#{1,6}) \S")
BULLET = re.compile(r"([-*+]) \S")
ORDERED = re.compile(r"(\d{1,9})\. \S")
RULE = re.compile(r"(-{3,}|\*{3,}|_{3,})")
BARE_MARKER = re.compile(r"([-*+]|\d{1,9}\.)\s*")


def markdown_problems(text: str) -> list[str]:
    """What makes ``text`` not well-formed markdown under the module's rules ([] when it is)."""
    problems: list[str] = []
    lines = text.strip("\n").split("\n")
    if not text.strip():
        return ["empty answer"]
    fenced = structure = False
    last_heading = 0
    lists: list[list] = []  # the open lists, outermost first: [kind ("-", "*", "+" or "1."), next number,
    #                         column of the marker, column of the item's text]
    for n, line in enumerate(lines, start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if "\t" in line:
            problems.append(f"line {n}: tab")
        if line.count("**") % 2 or line.replace("**", "").count("`") % 2:
            problems.append(f"line {n}: unclosed ** or `")
        stripped = line.lstrip(" ")
        bullet, ordered = BULLET.match(stripped), ORDERED.match(stripped)
        if not (bullet or ordered):
            if not stripped:
                continue  # a blank line: a list may go on after it (a loose list)
            lists.clear()
            if line != stripped:
                problems.append(f"line {n}: indented text that is not a list item")
            elif stripped.startswith("#"):
                heading = HEADING.match(stripped)
                if not heading:
                    problems.append(f"line {n}: malformed heading {stripped[:20]!r}")
                elif last_heading and len(heading.group(1)) > last_heading + 1:
                    problems.append(f"line {n}: heading level {len(heading.group(1))} after level {last_heading}")
                else:
                    last_heading, structure = len(heading.group(1)), True
            elif BARE_MARKER.fullmatch(stripped) or (stripped[0] in "-+" and not RULE.fullmatch(stripped)):
                problems.append(f"line {n}: malformed list item {stripped[:20]!r}")
            continue
        structure = True
        marker = bullet.group(1) if bullet else ordered.group(1) + "."
        problem = _list_item_problem(lists, len(line) - len(stripped), "1." if ordered else marker,
                                     int(ordered.group(1)) if ordered else 0, len(marker) + 1)
        if problem:
            problems.append(f"line {n}: {problem}")
    if fenced:
        problems.append("unclosed ``` code block")
    if not structure:
        problems.append("no heading and no list item")
    return problems


def _list_item_problem(lists: list[list], column: int, kind: str, number: int, width: int) -> str | None:
    """Place a list item whose marker is at ``column`` into the open ``lists`` (updated in place): a
    sibling at an open list's marker column, or a child at the innermost item's text column."""
    while lists and column < lists[-1][2]:
        lists.pop()
    if lists and column == lists[-1][2]:
        open_list = lists[-1]
        if open_list[0] != kind:
            return f"list marker {kind!r} in a list of {open_list[0]!r}"
        if kind == "1." and number != open_list[1]:
            return f"item numbered {number}, expected {open_list[1]}"
        open_list[1], open_list[3] = number + 1, column + width
        return None
    if column == (lists[-1][3] if lists else 0):
        if kind == "1." and number != 1:
            return f"item numbered {number}, expected 1 (a list starts at 1)"
        lists.append([kind, number + 1, column, column + width])
        return None
    expected = [0] if not lists else sorted({lst[2] for lst in lists} | {lists[-1][3]})
    return f"list item indented by {column} spaces, expected one of {expected}"


def is_wellformed_markdown(text: str) -> bool:
    """True when ``markdown_problems(text)`` finds nothing."""
    return not markdown_problems(text)


def normalize_answer(text: str) -> str:
    """Exact-answer normal form: outer whitespace and one trailing period off, whitespace runs → one
    space, case-folded."""
    text = " ".join(text.split())
    return text[:-1].rstrip().casefold() if text.endswith(".") else text.casefold()


@torch.no_grad()
def mean_token_loss(model: nn.Module, batches: ChatBatches, batch_size: int = 8) -> float:
    """Mean cross-entropy (nats) per labelled token over all examples of ``batches``."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(batches), batch_size):
        batch = batches.batch(list(range(start, min(start + batch_size, len(batches)))))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]  # token t predicts token t + 1
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to chat prompts (each a message list ending with a user turn), decoded
    without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(render(tokenizer, p, generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for p in prompts[start:start + batch_size]]
        length = max(map(len, encoded))
        ids = torch.tensor([[pad] * (length - len(e)) + e for e in encoded], device=device)  # left-padded (B, T)
        mask = torch.tensor([[0] * (length - len(e)) + [1] * len(e) for e in encoded], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers += tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
    return answers


def markdown_share(answers: list[str]) -> float:
    """Share of ``answers`` that are well-formed markdown."""
    return sum(map(is_wellformed_markdown, answers)) / len(answers)


def exact_accuracy(answers: list[str], expected: list[str]) -> float:
    """Share of answers equal to the expected ones after ``normalize_answer``."""
    hits = sum(normalize_answer(a) == normalize_answer(e) for a, e in zip(answers, expected, strict=True))
    return hits / len(answers)


def examples_table(prompts: list[Any], answers: list[str], limit: int = 3) -> list[dict[str, Any]]:
    """A few (question, answer, well-formed) rows for the summary."""
    return [{"question": p[-1]["content"], "answer": a, "markdown_problems": markdown_problems(a)}
            for p, a in zip(prompts[:limit], answers[:limit], strict=True)]
