"""Rate-constrained LoRA adapters on the QLoRA driver's default model and data: adapter bytes and held-out loss.

    python bench/qlora_adapter_rate.py [--lams 0 300 1000] [--mode loss] [--steps 120]
                                       [--out bench/results/qlora_adapter_rate.md]

For each λ, ``slimrate.qlora.finetune`` runs both phases on the tiny random Mistral and the generated advising
data (what ``slimrate qlora train`` uses offline), with a BackSlash RateConstraint on the LoRA A/B matrices when
λ > 0.  Each phase's adapter is then loaded twice into a fresh 4-bit base: with peft's own loader from
adapter_model.safetensors and with ``slimrate.qlora.load_adapter`` from adapter.slim, and the mean loss per
assistant token on the held-out chats is measured for both.  Bytes: the files on disk (the .slim file's index
and symbol tables included).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from conftest import _cpu_model
from transformers import AutoTokenizer

from slimrate.files import write_text_atomic
from slimrate.qlora import FinetuneConfig, finetune, load_4bit, load_adapter
from slimrate.qlora.adapter import PEFT_ADAPTER_FILE, SLIM_ADAPTER_FILE
from slimrate.qlora.chat import ChatBatches, read_chat_jsonl
from slimrate.qlora.evaluate import mean_token_loss


def heldout_losses(out: Path, adapter: Path, max_length: int) -> tuple[float, float]:
    """Held-out loss of base + adapter loaded by peft (safetensors) and by load_adapter (.slim)."""
    tokenizer = AutoTokenizer.from_pretrained(out / "tiny-base")
    heldout = ChatBatches.from_records(tokenizer, read_chat_jsonl(out / "data" / "heldout.jsonl"), max_length)
    model = load_4bit(out / "tiny-base", adapter, compute_dtype=torch.float32).eval()
    peft_loss = mean_token_loss(model, heldout)
    load_adapter(model, adapter / SLIM_ADAPTER_FILE)
    return peft_loss, mean_token_loss(model, heldout)


def run(lam: float, mode: str, steps: int, folder: Path) -> list[dict]:
    config = FinetuneConfig(out_dir=str(folder), steps=steps, rate_lam=lam, rate_mode=mode, progress=False)
    start = time.perf_counter()
    summary = finetune(config)
    seconds = time.perf_counter() - start
    rows = []
    for phase in summary["phases"]:
        adapter = Path(phase["adapter"])
        peft_loss, slim_loss = heldout_losses(folder, adapter, config.max_length)
        rows.append({"lam": lam, "phase": phase["phase"], "peft_bytes": (adapter / PEFT_ADAPTER_FILE).stat().st_size,
                     "slim_bytes": (adapter / SLIM_ADAPTER_FILE).stat().st_size, "peft_loss": peft_loss,
                     "slim_loss": slim_loss, "seconds": seconds, "slim_step": config.slim_step})
    return rows


def report(rows: list[dict], mode: str, steps: int) -> str:
    default_steps = FinetuneConfig(out_dir="").steps
    budget = "the driver's default budget" if steps == default_steps else \
        f"{steps} steps per phase (the driver's default is {default_steps})"
    lams = sorted({r["lam"] for r in rows})
    lines = ["# Rate-constrained LoRA adapters (QLoRA driver, tiny model)", "",
             f"- `python bench/qlora_adapter_rate.py --lams {' '.join(f'{lam:g}' for lam in lams)} --mode {mode} "
             f"--steps {steps}`: {budget}, both phases, batch 8, AdamW + UBA, seed 0",
             f"- machine: {_cpu_model()}, nproc {os.cpu_count()}, torch {torch.__version__} (CPU); "
             f"{datetime.now(timezone.utc):%Y-%m-%d}",
             f"- BackSlash in {mode} mode on the LoRA A/B matrices only (ν and N pooled over them); adapter.slim: Δ = "
             f"{rows[0]['slim_step']:g} on every ≥ 2-D tensor, exp-Golomb (\"eg\") coded. Both files also hold the "
             "tiny model's fully trained lm_head copy (peft's modules_to_save), which the rate term does not touch",
             "- held-out loss: nats per assistant token on the driver's held-out chats, after loading the adapter "
             "into a fresh 4-bit base (peft's loader for the safetensors file, `slimrate.qlora.load_adapter` for "
             "the .slim file)",
             "- **the tiny model is random and knows nothing: these numbers show what the rate term does to an "
             "adapter file, not how a real model fares**", "",
             "| λ | phase | adapter_model.safetensors | adapter.slim | .slim vs safetensors "
             "| held-out loss (peft file) | held-out loss (.slim) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lam']:g} | {r['phase']} | {r['peft_bytes']:,} B | {r['slim_bytes']:,} B "
                     f"| {100 * (r['slim_bytes'] / r['peft_bytes'] - 1):+.1f}% | {r['peft_loss']:.4f} "
                     f"| {r['slim_loss']:.4f} |")
    seconds = sorted({round(r["seconds"]) for r in rows})
    lines += ["", f"Wall time per λ (both phases and their evaluation): {', '.join(f'{s} s' for s in seconds)}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.0, 300.0, 1000.0])
    parser.add_argument("--mode", choices=["loss", "decoupled"], default="loss")
    parser.add_argument("--steps", type=int, default=FinetuneConfig(out_dir="").steps)
    parser.add_argument("--out", default="bench/results/qlora_adapter_rate.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lam in args.lams:
            rows += run(lam, args.mode, args.steps, Path(tmp) / f"lam{lam:g}")
            print(report(rows, args.mode, args.steps), flush=True)
    write_text_atomic(args.out, report(rows, args.mode, args.steps))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
