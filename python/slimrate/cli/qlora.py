"""`slimrate qlora train`: two-phase 4-bit NF4 + LoRA fine-tuning on chat JSONL."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimrate.cli.arguments import add_command, nonnegative_float, positive_finite_float, positive_int
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_input_file, check_output_folder


def add_commands(commands: argparse._SubParsersAction) -> None:
    qlora = commands.add_parser("qlora", help="4-bit NF4 + LoRA fine-tuning")
    add_command(
        qlora.add_subparsers(dest="qlora_command", required=True), "train", add_arguments, check, run,
        help="two-phase QLoRA fine-tuning of a local model (or a tiny random one) on chat JSONL",
        description="Phase 1, then phase 2 from phase 1's adapter; evaluation, adapters and summary.{json,md} "
                    "in --out. Without --model: a tiny random Mistral (its numbers mean nothing about real models); "
                    "without --phase1: a generated study-abroad advising data set.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from slimrate.qlora.driver import FinetuneConfig
    from slimrate.qlora.loading import DTYPES

    defaults = FinetuneConfig(out_dir="")
    parser.add_argument("--model", metavar="PATH", help="local transformers model folder (default: tiny random model)")
    parser.add_argument("--phase1", metavar="JSONL", help='chat JSONL, one {"messages": [...]} per line '
                        "(default: generated advising data)")
    parser.add_argument("--phase2", metavar="JSONL", help="chat JSONL of phase 2 (needs --phase1)")
    parser.add_argument("--eval-data", metavar="JSONL", help="held-out chats (default: 10%% of each phase file)")
    parser.add_argument("--questions", metavar="JSONL",
                        help='held-out questions, {"messages": [...], "answer": "..."} per line, for exact accuracy')
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps,
                        help="steps per phase (default %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=defaults.batch,
                        help="chats per step (default %(default)s)")
    parser.add_argument("--lr", type=positive_finite_float, help="peak lr (default 2e-4; 1e-2 for the tiny model)")
    parser.add_argument("--phi", type=positive_finite_float, default=defaults.phi, help="UBA φ (default 2 = cosine)")
    parser.add_argument("--rank", type=positive_int, default=defaults.rank, help="LoRA r (default %(default)s)")
    parser.add_argument("--alpha", type=positive_finite_float, default=defaults.alpha,
                        help="LoRA alpha (default %(default)s)")
    parser.add_argument("--dropout", type=nonnegative_float, default=defaults.dropout,
                        help="LoRA dropout (default %(default)s)")
    parser.add_argument("--max-length", type=positive_int, default=defaults.max_length,
                        help="tokens per chat (default %(default)s)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=defaults.max_new_tokens,
                        help="tokens generated per held-out answer (default %(default)s)")
    parser.add_argument("--eval-limit", type=positive_int,
                        help="evaluate on the first N held-out chats and questions")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default float32 tiny, bfloat16 else)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                        help="run LoRA layers through slimrate's fused nf4_lora_linear (default on)")
    parser.add_argument("--backend", choices=["native", "triton", "reference"], help="nf4_lora_linear backend")
    parser.add_argument("--merge", action="store_true", help="also write a merged model (dequantized base + LoRA)")
    parser.add_argument("--rate-lam", type=nonnegative_float, default=defaults.rate_lam, metavar="L",
                        help="BackSlash λ on the LoRA A/B matrices (default 0: no rate constraint)")
    parser.add_argument("--rate-mode", choices=["loss", "decoupled"], default=defaults.rate_mode,
                        help="loss: λR through AdamW; decoupled: θ ← θ − λ∂R/∂θ after each step (default %(default)s)")
    parser.add_argument("--slim-step", type=positive_finite_float, default=defaults.slim_step, metavar="DELTA",
                        help="quantization step Δ of each phase's adapter.slim (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--wandb", action="store_true", help="also log to wandb, offline")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def check(args: argparse.Namespace) -> None:
    if args.phase2 and not args.phase1:
        raise UsageError("--phase2: needs --phase1 (phase 2 starts from phase 1's adapter)")
    for flag in ("phase1", "phase2", "eval_data", "questions"):
        if getattr(args, flag):
            check_input_file(getattr(args, flag), flag=f"--{flag.replace('_', '-')}")
    if args.model and not Path(args.model).is_dir():
        raise UsageError(f"--model: {args.model}: no such folder (a local transformers model folder; nothing is "
                         "downloaded)")
    check_output_folder("--out", args.out)


def run(args: argparse.Namespace) -> int:
    from slimrate.qlora.driver import FinetuneConfig, finetune, format_summary

    summary = finetune(FinetuneConfig(
        out_dir=args.out, model=args.model, phase1=args.phase1, phase2=args.phase2, eval_data=args.eval_data,
        questions=args.questions, steps=args.steps, batch=args.batch, lr=args.lr, phi=args.phi, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
        eval_limit=args.eval_limit, dtype=args.dtype, fused=args.fused, backend=args.backend, merge=args.merge,
        seed=args.seed, device=args.device, wandb=args.wandb, progress=not args.no_progress, rate_lam=args.rate_lam,
        rate_mode=args.rate_mode, slim_step=args.slim_step))
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'summary.json'} and summary.md")
    return 0
