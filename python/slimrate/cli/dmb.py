"""`slimrate dmb train|eval|sample`: Discrete Markov Bridge training, its bound in bits/char, and samples."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimrate.cli.arguments import (
    add_command,
    add_device_argument,
    add_parallel_argument,
    nonnegative_int,
    positive_finite_float,
    positive_int,
)
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_output_file, check_output_folder
from slimrate.files import write_bytes_atomic

RUN_FOLDER_HELP = "a run folder of `slimrate dmb train`"


def add_commands(commands: argparse._SubParsersAction) -> None:
    dmb = commands.add_parser("dmb", help="Discrete Markov Bridge: train, bound in bits/char, sample")
    dmb_commands = dmb.add_subparsers(dest="dmb_command", required=True)
    add_command(dmb_commands, "train", add_train_arguments, check_train, run_train,
                help="train DMB or a SEDD baseline (checkpoints, metrics, resume)")
    add_command(dmb_commands, "eval", add_eval_arguments, check_eval, run_eval,
                help="the bound in bits/char with its standard error (protocol ours or official)")
    add_command(dmb_commands, "sample", add_sample_arguments, check_sample, run_sample,
                help="print text samples, or write a PNG grid for images")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from slimrate.dmb.driver import METHODS, DMBConfig
    from slimrate.dmb.model import MODEL_PRESETS
    from slimrate.dmb.outer_loop import P0_DEFAULTS, PHASES, Q_OBJECTIVES

    defaults = DMBConfig(out_dir="")
    parser.add_argument("--data", default="text8", help="text8 (the embedded corpus), digits, a text file, or a "
                        "folder of CIFAR-10 python batches (default %(default)s)")
    parser.add_argument("--budget", type=positive_int, required=True, metavar="STEPS", help="score-learning steps")
    parser.add_argument("--out", required=True, metavar="DIR", help="run folder")
    parser.add_argument("--method", choices=METHODS, default=defaults.method, help="default %(default)s")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS), default=defaults.model,
                        help="network size (default %(default)s)")
    parser.add_argument("--batch", type=positive_int, default=defaults.batch, help="default %(default)s")
    parser.add_argument("--seq-len", type=positive_int, default=defaults.seq_len,
                        help="characters per window, text only (default %(default)s)")
    parser.add_argument("--lr", type=positive_finite_float, default=defaults.lr, help="default %(default)s")
    parser.add_argument("--schedule", choices=["loglinear", "geometric"], default=defaults.schedule,
                        help="noise schedule (default %(default)s)")
    parser.add_argument("--eval-every", type=nonnegative_int, default=defaults.eval_every,
                        help="bound every k steps (default: at the end only)")
    parser.add_argument("--scale-by-sigma", action=argparse.BooleanOptionalAction, default=None,
                        help="σ̄-scaled network output (default: on for sedd-absorb only, as the official codes)")
    parser.add_argument("--learn-q", action=argparse.BooleanOptionalAction, default=True,
                        help="DMB: matrix learning and p̂_0 re-estimation (--no-learn-q keeps Q at its init)")
    parser.add_argument("--phases", choices=PHASES, default=defaults.phases,
                        help="DMB's schedule of matrix and score learning: interleaved (a matrix phase of 50 steps "
                             "first and every 500 score steps) or official (the authors': --q-passes of matrix "
                             "steps first, then --score-passes of score steps and --q-passes of matrix steps per "
                             "outer iteration) (default %(default)s)")
    parser.add_argument("--q-passes", type=positive_finite_float, default=defaults.q_passes, metavar="PASSES",
                        help="--phases official: passes over the training windows per matrix phase "
                             "(default %(default)s)")
    parser.add_argument("--score-passes", type=positive_finite_float, default=defaults.score_passes,
                        metavar="PASSES", help="--phases official: passes of score steps per outer iteration "
                                               "(default %(default)s)")
    parser.add_argument("--q-objective", choices=Q_OBJECTIVES, default=defaults.q_objective,
                        help="DMB's matrix objective: prior (the prior KL) or bound (DWDSE + prior KL, the "
                             "network held fixed) (default %(default)s)")
    interleaved, official = P0_DEFAULTS["interleaved"], P0_DEFAULTS["official"]
    parser.add_argument("--p0-samples", type=positive_int, default=None, metavar="N",
                        help=f"DMB: sequences sampled per p̂_0 re-estimate (default {interleaved[0]} interleaved, "
                             f"{official[0]} official)")
    parser.add_argument("--p0-steps", type=positive_int, default=None, metavar="N",
                        help=f"DMB: Euler steps per p̂_0 sample (default {interleaved[1]} interleaved, "
                             f"{official[1]} official)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--checkpoint-every", type=positive_int, default=defaults.checkpoint_every, metavar="N",
                        help="checkpoint every N steps and at the end (default %(default)s)")
    parser.add_argument("--keep-checkpoints", type=positive_int, default=defaults.keep_checkpoints, metavar="K",
                        help="keep the newest K checkpoints (default %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out that verifies (an older one when the "
                             "newest is damaged, with a warning)")
    add_parallel_argument(parser)
    add_device_argument(parser, "train (the data and initial weights are the same on every device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_train(args: argparse.Namespace) -> None:
    if args.data not in ("text8", "digits") and not Path(args.data).exists():
        raise UsageError(f"--data: {args.data}: no such file or folder (or pass text8 or digits)")
    if not args.learn_q and args.method != "dmb":
        raise UsageError(f"--no-learn-q: only --method dmb learns Q; {args.method} has a fixed Q")
    check_output_folder("--out", args.out)


def run_train(args: argparse.Namespace) -> int:
    from slimrate.dmb.driver import DMBConfig, train_dmb

    manifest = train_dmb(DMBConfig(out_dir=args.out, data=args.data, method=args.method, steps=args.budget,
                                   batch=args.batch, seq_len=args.seq_len, model=args.model, lr=args.lr,
                                   schedule=args.schedule, eval_every=args.eval_every, seed=args.seed,
                                   checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                                   resume=args.resume, progress=not args.no_progress,
                                   scale_by_sigma=args.scale_by_sigma, learn_q=args.learn_q,
                                   phases=args.phases, q_objective=args.q_objective, q_passes=args.q_passes,
                                   score_passes=args.score_passes, p0_samples=args.p0_samples,
                                   p0_steps=args.p0_steps, parallel=args.parallel, device=args.device))
    final = manifest["final_eval"]
    print(f"{args.method} on {manifest['data']['name']}: bound {final['bits_per_token']:.4f} ± "
          f"{final['bits_per_token_se']:.4f} bits/token after {args.budget} steps; wrote {args.out}")
    return 0


def check_run_folder(folder: str) -> None:
    if not (Path(folder) / "dmb.json").is_file():
        raise UsageError(f"{folder}: no dmb.json here; pass the --out folder of a finished `slimrate dmb train` run")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help=RUN_FOLDER_HELP)
    parser.add_argument("--protocol", choices=["ours", "official"], default="ours",
                        help="ours: the bound with its Monte Carlo standard error; official: the DMB authors' test "
                             "loss, one uniform t per window, repeated (docs/dmb.md §7; default %(default)s)")
    parser.add_argument("--sequences", type=positive_int, default=256, help="evaluation windows (default 256)")
    parser.add_argument("--samples", type=int, default=8,
                        help="ours: Monte Carlo times per window, even, >= 2 (two per stratum of noise; default 8)")
    parser.add_argument("--repeats", type=int, default=20,
                        help="official: passes over the windows, >= 2 (default 20, the authors' test script)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser, "evaluate")


def check_eval(args: argparse.Namespace) -> None:
    check_run_folder(args.dir)
    if args.samples < 2 or args.samples % 2:
        raise UsageError(f"--samples: expected an even number >= 2 (two times in each stratum of t), "
                         f"got {args.samples}")
    if args.repeats < 2:
        raise UsageError(f"--repeats: expected >= 2 (the standard error needs two), got {args.repeats}")


def run_eval(args: argparse.Namespace) -> int:
    from slimrate.dmb.data import load_token_data
    from slimrate.dmb.driver import bound_of, load_model, official_bound_of

    model, config, _ = load_model(args.dir, args.device)
    data = load_token_data(config.data, config.seq_len)
    x_eval = data.eval_subset(args.sequences)
    if args.protocol == "ours":
        result = bound_of(model, x_eval, args.samples, args.seed)
    else:
        result = official_bound_of(model, x_eval, args.repeats, args.seed)
    unit = " (bits/token = bits per character)" if data.is_text else " (bits/token = bits per pixel value)"
    print(f"{config.method} on {data.name}: bound, protocol {args.protocol}: {result}{unit}")
    return 0


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help=RUN_FOLDER_HELP)
    parser.add_argument("-n", type=positive_int, default=8, help="samples (default 8)")
    parser.add_argument("--steps", type=positive_int, default=128, help="reverse steps (default 128)")
    parser.add_argument("--sampler", choices=["euler", "analytic"], default="euler",
                        help="analytic: SEDD's Tweedie step, baselines only (default %(default)s)")
    parser.add_argument("-o", "--output", help="PNG path for images (default DIR/samples.png)")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser, "sample")


def check_sample(args: argparse.Namespace) -> None:
    check_run_folder(args.dir)
    if args.output:
        check_output_file("--output", args.output)


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from slimrate.dmb.data import image_grid_png, load_token_data
    from slimrate.dmb.driver import load_model
    from slimrate.dmb.sampler import reverse_sample

    model, config, _ = load_model(args.dir, args.device)
    data = load_token_data(config.data, config.seq_len)
    torch.manual_seed(args.seed)  # seeds the CUDA generators too
    with torch.no_grad():
        tokens = reverse_sample(model.net, model.rates, model.noise, model.prior(), args.n, args.steps,
                                method=args.sampler).tokens.cpu()
    if data.is_text:
        for line in data.describe(tokens):
            print(line)
    else:
        png = image_grid_png(tokens, data)
        print(f"wrote {write_bytes_atomic(args.output or Path(args.dir) / 'samples.png', png)}")
    return 0
