"""The `slimrate` command line; the only module that parses arguments."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from slimrate.files import write_bytes_atomic, write_text_atomic


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_finite_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from slimrate.demo import DemoConfig
    from slimrate.studies import STUDIES

    parser = argparse.ArgumentParser(prog="slimrate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="BackSlash vs plain training of a digits classifier")
    defaults = DemoConfig()
    demo.add_argument("--lam", type=nonnegative_float, default=defaults.lam, help="rate weight λ (default %(default)s)")
    demo.add_argument("--steps", type=positive_int, default=defaults.steps, help="training steps per run")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--mode", choices=["decoupled", "grad"], default=defaults.mode,
                      help="decoupled: θ ← θ − λ∂R/∂θ after each optimizer step; grad: λ∂R/∂θ added to the gradient")
    demo.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    demo.add_argument("--out", metavar="DIR", help="write each run's metrics (JSONL, TensorBoard) under DIR")
    demo.add_argument("--wandb", action="store_true", help="also log to wandb, offline (needs --out and wandb)")
    schedules = commands.add_parser("schedules", help="learning-rate schedules: UBA and its baselines")
    schedule_commands = schedules.add_subparsers(dest="schedules_command", required=True)
    plot = schedule_commands.add_parser("plot", help="plot UBA for several φ beside the baselines to a PNG")
    plot.add_argument("--total", type=positive_int, default=1000, help="step budget (default %(default)s)")
    plot.add_argument("--phi", type=positive_finite_float, nargs="+", default=[0.5, 1.0, 2.0, 5.0],
                      help="UBA φ values, 2 = cosine (default %(default)s)")
    plot.add_argument("--warmup", type=nonnegative_int, default=0, help="warm-up steps, < --total (default 0)")
    plot.add_argument("-o", "--output", default="schedules.png", help="PNG path (default %(default)s)")
    study = commands.add_parser("study", help="studies that write tables and plots")
    study_commands = study.add_subparsers(dest="study_command", required=True)
    for name, spec in STUDIES.items():
        one = study_commands.add_parser(name, help=spec.help)
        one.add_argument("--quick", action="store_true", help="a seconds-long version (tiny budgets, for tests)")
        one.add_argument("-o", "--out", default="bench/results",
                         help=f"folder for {spec.stem}.{{md,png,json}} (default %(default)s)")
        one.add_argument("--seed", type=int, default=0, help="base seed: every run's weights, data and times "
                         "derive from it (default %(default)s)")
    compress = commands.add_parser("compress", help="entropy-code a safetensors checkpoint into a .slim file")
    compress.add_argument("checkpoint", help="a .safetensors file, or a folder holding model.safetensors")
    compress.add_argument("-o", "--output", required=True, help="the .slim file to write")
    step = compress.add_mutually_exclusive_group(required=True)
    step.add_argument("--step", type=positive_finite_float, help="quantization step Δ for float tensors with ≥ 2 dims")
    step.add_argument("--max-error", type=positive_finite_float, help="largest |θ − θ̂| allowed (Δ = 2·max-error)")
    compress.add_argument("--coder", choices=["eg", "eg-signed", "rans"], default="eg",
                          help="eg: frequency-sorted table + EG0 of ranks (paper); eg-signed: signed EG0, no table; "
                               "rans: rANS (default %(default)s)")
    inspect = commands.add_parser("inspect", help="per-tensor table of a .slim file: shape, bits/param, ratio")
    inspect.add_argument("slim", help="a .slim file")
    decompress = commands.add_parser("decompress", help="decode a .slim file into a .safetensors file")
    decompress.add_argument("slim", help="a .slim file")
    decompress.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    run = commands.add_parser("run", help="load a model with the runtime (dense vs sparse layers); --bench times it")
    run.add_argument("model", help="a .slim or .safetensors file")
    run.add_argument("--arch", required=True, choices=["digits", "charlm"],
                     help="the built-in architecture the weights belong to (sized from the weights)")
    run.add_argument("--bench", action="store_true", help="measure latency and weight memory, dense vs sparse")
    run.add_argument("--batch", type=positive_int, default=1, help="batch size of the random inputs (default 1)")
    run.add_argument("--min-sparsity", type=nonnegative_float, default=0.5,
                     help="layers with at least this share of zeros are candidates for sparse kernels (default 0.5)")
    run.add_argument("--repeats", type=positive_int, default=50, help="timed calls per measurement (default 50)")
    add_qlora_parser(commands)
    add_dmb_parser(commands)
    return parser


def add_dmb_parser(commands) -> None:
    from slimrate.dmb.driver import METHODS, DMBConfig
    from slimrate.dmb.model import MODEL_PRESETS

    defaults = DMBConfig(out_dir="")
    dmb = commands.add_parser("dmb", help="Discrete Markov Bridge: train, bound in bits/char, sample")
    dmb_commands = dmb.add_subparsers(dest="dmb_command", required=True)
    train = dmb_commands.add_parser("train", help="train DMB or a SEDD baseline (checkpoints, metrics, resume)")
    train.add_argument("--data", default="text8", help="text8 (the embedded corpus), digits, a text file, or a "
                       "folder of CIFAR-10 python batches (default %(default)s)")
    train.add_argument("--budget", type=positive_int, required=True, metavar="STEPS", help="score-learning steps")
    train.add_argument("--out", required=True, metavar="DIR", help="run folder")
    train.add_argument("--method", choices=METHODS, default=defaults.method, help="default %(default)s")
    train.add_argument("--model", choices=sorted(MODEL_PRESETS), default=defaults.model,
                       help="network size (default %(default)s)")
    train.add_argument("--batch", type=positive_int, default=defaults.batch, help="default %(default)s")
    train.add_argument("--seq-len", type=positive_int, default=defaults.seq_len,
                       help="characters per window, text only (default %(default)s)")
    train.add_argument("--lr", type=positive_finite_float, default=defaults.lr, help="default %(default)s")
    train.add_argument("--schedule", choices=["loglinear", "geometric"], default=defaults.schedule,
                       help="noise schedule (default %(default)s)")
    train.add_argument("--eval-every", type=nonnegative_int, default=defaults.eval_every,
                       help="bound every k steps (default: at the end only)")
    train.add_argument("--scale-by-sigma", action=argparse.BooleanOptionalAction, default=None,
                       help="σ̄-scaled network output (default: on for sedd-absorb only, as the official codes)")
    train.add_argument("--learn-q", action=argparse.BooleanOptionalAction, default=True,
                       help="DMB: matrix learning and p̂_0 re-estimation (--no-learn-q keeps Q at its init)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate = dmb_commands.add_parser("eval", help="the bound in bits/char with its Monte Carlo standard error")
    evaluate.add_argument("dir", help="a run folder of `slimrate dmb train`")
    evaluate.add_argument("--sequences", type=positive_int, default=256, help="evaluation windows (default 256)")
    evaluate.add_argument("--samples", type=int, default=8, help="Monte Carlo times per window, >= 2 (default 8)")
    evaluate.add_argument("--seed", type=int, default=0)
    sample = dmb_commands.add_parser("sample", help="print text samples, or write a PNG grid for images")
    sample.add_argument("dir", help="a run folder of `slimrate dmb train`")
    sample.add_argument("-n", type=positive_int, default=8, help="samples (default 8)")
    sample.add_argument("--steps", type=positive_int, default=128, help="reverse steps (default 128)")
    sample.add_argument("--sampler", choices=["euler", "analytic"], default="euler",
                        help="analytic: SEDD's Tweedie step, baselines only (default %(default)s)")
    sample.add_argument("-o", "--output", help="PNG path for images (default DIR/samples.png)")
    sample.add_argument("--seed", type=int, default=0)


def add_qlora_parser(commands) -> None:
    from slimrate.qlora.driver import FinetuneConfig
    from slimrate.qlora.loading import DTYPES

    defaults = FinetuneConfig(out_dir="")
    qlora = commands.add_parser("qlora", help="4-bit NF4 + LoRA fine-tuning")
    qlora_commands = qlora.add_subparsers(dest="qlora_command", required=True)
    train = qlora_commands.add_parser(
        "train", help="two-phase QLoRA fine-tuning of a local model (or a tiny random one) on chat JSONL",
        description="Phase 1, then phase 2 from phase 1's adapter; evaluation, adapters and summary.{json,md} "
                    "in --out. Without --model: a tiny random Mistral (its numbers mean nothing about real models); "
                    "without --phase1: a generated study-abroad advising data set.")
    train.add_argument("--model", metavar="PATH", help="local transformers model folder (default: tiny random model)")
    train.add_argument("--phase1", metavar="JSONL", help='chat JSONL, one {"messages": [...]} per line '
                       "(default: generated advising data)")
    train.add_argument("--phase2", metavar="JSONL", help="chat JSONL of phase 2 (needs --phase1)")
    train.add_argument("--eval-data", metavar="JSONL", help="held-out chats (default: 10%% of each phase file)")
    train.add_argument("--questions", metavar="JSONL",
                       help='held-out questions, {"messages": [...], "answer": "..."} per line, for exact accuracy')
    train.add_argument("--out", required=True, metavar="DIR", help="output folder")
    train.add_argument("--steps", type=positive_int, default=defaults.steps,
                       help="steps per phase (default %(default)s)")
    train.add_argument("--batch", type=positive_int, default=defaults.batch,
                       help="chats per step (default %(default)s)")
    train.add_argument("--lr", type=positive_finite_float, help="peak lr (default 2e-4; 1e-2 for the tiny model)")
    train.add_argument("--phi", type=positive_finite_float, default=defaults.phi, help="UBA φ (default 2 = cosine)")
    train.add_argument("--rank", type=positive_int, default=defaults.rank, help="LoRA r (default %(default)s)")
    train.add_argument("--alpha", type=positive_finite_float, default=defaults.alpha,
                       help="LoRA alpha (default %(default)s)")
    train.add_argument("--dropout", type=nonnegative_float, default=defaults.dropout,
                       help="LoRA dropout (default %(default)s)")
    train.add_argument("--max-length", type=positive_int, default=defaults.max_length,
                       help="tokens per chat (default %(default)s)")
    train.add_argument("--max-new-tokens", type=positive_int, default=defaults.max_new_tokens,
                       help="tokens generated per held-out answer (default %(default)s)")
    train.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N held-out chats and questions")
    train.add_argument("--dtype", choices=sorted(DTYPES), help="compute dtype (default float32 tiny, bfloat16 else)")
    train.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                       help="run LoRA layers through slimrate's fused nf4_lora_linear (default on)")
    train.add_argument("--backend", choices=["native", "triton", "reference"], help="nf4_lora_linear backend")
    train.add_argument("--merge", action="store_true", help="also write a merged model (dequantized base + LoRA)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    train.add_argument("--wandb", action="store_true", help="also log to wandb, offline")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_demo_command(args: argparse.Namespace) -> int:
    from slimrate.demo import DemoConfig, format_table, run_demo

    result = run_demo(DemoConfig(steps=args.steps, lam=args.lam, seed=args.seed, mode=args.mode, out_dir=args.out,
                                 wandb=args.wandb))
    print(format_table(result))
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def run_schedules_plot_command(args: argparse.Namespace) -> int:
    from slimrate.schedules import plot_schedules

    png = plot_schedules(args.total, args.phi, warmup_steps=args.warmup)
    print(write_bytes_atomic(args.output, png))
    return 0


def run_study_command(args: argparse.Namespace) -> int:
    from slimrate.studies import STUDIES, run_study

    study = STUDIES[args.study_command]
    config = dataclasses.replace(study.quick() if args.quick else study.config(), seed=args.seed)
    for path in run_study(args.study_command, config, args.out):
        print(f"wrote {path}")
    return 0


def checkpoint_file(path: str) -> Path | str:
    """The safetensors file of CHECKPOINT, or a message saying what is wrong with it."""
    file = Path(path)
    if file.is_dir():
        file = file / "model.safetensors"
    if file.suffix in {".pt", ".pth", ".bin", ".ckpt", ".pkl"}:
        return (f"{path}: pickle checkpoints are not read (loading one can run arbitrary code); convert it to "
                "safetensors first: safetensors.torch.save_file(torch.load(path, weights_only=True), "
                "'model.safetensors')")
    if not file.is_file():
        return f"{file}: no such file (expected a .safetensors file or a folder holding model.safetensors)"
    return file


def run_compress_command(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from slimrate.backslash import save_slim, slim_report

    save_slim(load_file(args.checkpoint), args.output, step=args.step, max_error=args.max_error, coder=args.coder)
    total = sum(row["bytes"] for row in slim_report(args.output))
    print(f"wrote {args.output}: {Path(args.output).stat().st_size} bytes ({total} in tensor payloads)")
    return 0


def format_slim_report(rows: list[dict], file_bytes: int) -> str:
    lines = [f"{'name':<40} {'shape':<18} {'dtype':<9} {'coder':<9} {'step':>9} {'bytes':>10} {'bits/param':>10} "
             f"{'ratio':>7}"]
    for row in rows:
        step = "-" if row["step"] is None else f"{row['step']:.3g}"
        lines.append(f"{row['name']:<40} {str(list(row['shape'])):<18} {row['dtype']:<9} {row['coder']:<9} {step:>9} "
                     f"{row['bytes']:>10} {row['bits_per_param']:>10.3f} {row['ratio']:>7.2f}")
    params = sum(math.prod(row["shape"]) for row in rows)
    lines.append(f"total: {len(rows)} tensors, {params} params, {file_bytes} bytes in the file "
                 f"({8 * file_bytes / max(params, 1):.3f} bits/param, ratio vs fp32 {4 * params / file_bytes:.2f})")
    return "\n".join(lines)


def run_inspect_command(args: argparse.Namespace) -> int:
    from slimrate.backslash import slim_report

    print(format_slim_report(slim_report(args.slim), Path(args.slim).stat().st_size))
    return 0


def run_decompress_command(args: argparse.Namespace) -> int:
    from safetensors.torch import save

    from slimrate.backslash import load_slim

    print(f"wrote {write_bytes_atomic(args.output, save(load_slim(args.slim)))}")
    return 0


def run_model_command(args: argparse.Namespace) -> int:
    import torch

    from slimrate import runtime
    from slimrate.sparse.linear import format_decisions

    dense = runtime.load(args.model, model_factory=args.arch, sparse=False)
    sparse = runtime.load(args.model, model_factory=args.arch, sparse=True, min_sparsity=args.min_sparsity,
                          batch_size=args.batch)
    print(format_decisions(sparse.sparsify_decisions))
    if args.bench:
        x = runtime.MODELS[args.arch].example(dense, args.batch)
        with torch.no_grad():
            err = (sparse(x) - dense(x)).abs().max().item()
        dense_us = runtime.latency_us(dense, x, args.repeats)
        sparse_us = runtime.latency_us(sparse, x, args.repeats)
        dense_bytes, sparse_bytes = runtime.weight_bytes(dense), runtime.weight_bytes(sparse)
        print(f"input {tuple(x.shape)} {x.dtype}; max |sparse − dense| = {err:.3g}")
        print(f"latency (median of {args.repeats}): dense {dense_us:.1f} µs, sparse {sparse_us:.1f} µs "
              f"({dense_us / sparse_us:.2f}× speed-up)")
        print(f"weight memory: dense {dense_bytes} bytes, sparse {sparse_bytes} bytes "
              f"({sparse_bytes / dense_bytes:.1%} of dense)")
    return 0


def run_qlora_command(args: argparse.Namespace) -> int:
    from slimrate.qlora.driver import FinetuneConfig, finetune, format_summary

    summary = finetune(FinetuneConfig(
        out_dir=args.out, model=args.model, phase1=args.phase1, phase2=args.phase2, eval_data=args.eval_data,
        questions=args.questions, steps=args.steps, batch=args.batch, lr=args.lr, phi=args.phi, rank=args.rank,
        alpha=args.alpha, dropout=args.dropout, max_length=args.max_length, max_new_tokens=args.max_new_tokens,
        eval_limit=args.eval_limit, dtype=args.dtype, fused=args.fused, backend=args.backend, merge=args.merge,
        seed=args.seed, device=args.device, wandb=args.wandb, progress=not args.no_progress))
    print(format_summary(summary))
    print(f"wrote {Path(args.out) / 'summary.json'} and summary.md")
    return 0


def qlora_input_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with `qlora train`'s paths, or None."""
    if args.phase2 and not args.phase1:
        return "--phase2: needs --phase1 (phase 2 starts from phase 1's adapter)"
    for flag in ("phase1", "phase2", "eval_data", "questions"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            return f"--{flag.replace('_', '-')}: {path}: no such file"
    if args.model and not Path(args.model).is_dir():
        return f"--model: {args.model}: no such folder (a local transformers model folder; nothing is downloaded)"
    return None


def run_dmb_command(args: argparse.Namespace) -> int:
    import torch

    from slimrate.dmb.driver import DMBConfig, bound_of, load_model, train_dmb

    if args.dmb_command == "train":
        manifest = train_dmb(DMBConfig(out_dir=args.out, data=args.data, method=args.method, steps=args.budget,
                                       batch=args.batch, seq_len=args.seq_len, model=args.model, lr=args.lr,
                                       schedule=args.schedule, eval_every=args.eval_every, seed=args.seed,
                                       resume=args.resume, progress=not args.no_progress,
                                       scale_by_sigma=args.scale_by_sigma, learn_q=args.learn_q))
        final = manifest["final_eval"]
        print(f"{args.method} on {manifest['data']['name']}: bound {final['bits_per_token']:.4f} ± "
              f"{final['bits_per_token_se']:.4f} bits/token after {args.budget} steps; wrote {args.out}")
        return 0
    from slimrate.dmb.data import image_grid_png, load_token_data
    from slimrate.dmb.sampler import reverse_sample

    model, config, manifest = load_model(args.dir)
    data = load_token_data(config.data, config.seq_len)
    if args.dmb_command == "eval":
        result = bound_of(model, data.eval_subset(args.sequences), args.samples, args.seed)
        unit = " (bits/token = bits per character)" if data.is_text else " (bits/token = bits per pixel value)"
        print(f"{config.method} on {data.name}: bound {result}{unit}")
        return 0
    torch.manual_seed(args.seed)
    with torch.no_grad():
        tokens = reverse_sample(model.net, model.rates, model.noise, model.prior(), args.n, args.steps,
                                method=args.sampler).tokens
    if data.is_text:
        for line in data.describe(tokens):
            print(line)
    else:
        png = image_grid_png(tokens, data)
        print(f"wrote {write_bytes_atomic(args.output or Path(args.dir) / 'samples.png', png)}")
    return 0


def dmb_input_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with a `dmb` command's paths, or None."""
    if args.dmb_command == "train":
        if args.data not in ("text8", "digits") and not Path(args.data).exists():
            return f"--data: {args.data}: no such file or folder (or pass text8 or digits)"
        if not args.learn_q and args.method != "dmb":
            return f"--no-learn-q: only --method dmb learns Q; {args.method} has a fixed Q"
        return None
    if not (Path(args.dir) / "dmb.json").is_file():
        return f"{args.dir}: no dmb.json here; pass the --out folder of a finished `slimrate dmb train` run"
    if args.dmb_command == "eval" and args.samples < 2:
        return f"--samples: expected >= 2 (the standard error needs two), got {args.samples}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.wandb and not args.out:
        parser.error("--wandb: needs --out DIR for wandb's offline files")
    if args.command == "schedules" and args.total < 2:
        parser.error(f"--total: expected an integer >= 2 (OneCycle needs a ramp and a decay), got {args.total}")
    if args.command == "schedules" and args.warmup >= args.total:
        parser.error(f"--warmup: expected an integer < --total ({args.total}), got {args.warmup}")
    if args.command == "compress":
        checkpoint = checkpoint_file(args.checkpoint)
        if isinstance(checkpoint, str):
            parser.error(checkpoint)
        args.checkpoint = str(checkpoint)
    if args.command in ("inspect", "decompress") and not Path(args.slim).is_file():
        parser.error(f"{args.slim}: no such file")
    if args.command == "run" and not Path(args.model).is_file():
        parser.error(f"{args.model}: no such file")
    if args.command == "qlora":
        problem = qlora_input_problem(args)
        if problem:
            parser.error(problem)
    if args.command == "dmb":
        problem = dmb_input_problem(args)
        if problem:
            parser.error(problem)
    commands = {"demo": run_demo_command, "schedules": run_schedules_plot_command, "study": run_study_command,
                "compress": run_compress_command, "inspect": run_inspect_command,
                "decompress": run_decompress_command, "run": run_model_command, "qlora": run_qlora_command,
                "dmb": run_dmb_command}
    try:
        return commands[args.command](args)
    except ValueError as e:  # SlimFormatError (a corrupt file) or save_slim's refusals (NaN, int32 overflow)
        print(f"slimrate {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
