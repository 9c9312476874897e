"""`slimrate study NAME`: one sub-command per entry of slimrate.studies.STUDIES; each writes a table, a plot
and every run as JSON.  `slimrate study dmb` also takes its arms, seeds, network, device, run folders
and jobs."""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from pathlib import Path

from slimrate.cli.arguments import add_command, device_name, positive_int
from slimrate.cli.errors import UsageError
from slimrate.cli.paths import check_output_folder


def add_commands(commands: argparse._SubParsersAction) -> None:
    from slimrate.studies import STUDIES

    study = commands.add_parser("study", help="studies that write tables and plots")
    studies = study.add_subparsers(dest="study_command", required=True)
    for name, spec in STUDIES.items():
        add_command(studies, name, partial(add_arguments, stem=spec.stem, dmb=name == "dmb"), check, run,
                    help=spec.help)


def add_arguments(parser: argparse.ArgumentParser, stem: str, dmb: bool) -> None:
    parser.add_argument("--quick", action="store_true", help="a seconds-long version (tiny budgets, for tests)")
    parser.add_argument("-o", "--out", default="bench/results",
                        help=f"folder for {stem}.{{md,png,json}} (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: every run's weights, data and times derive "
                        "from it (default %(default)s)")
    if dmb:
        add_dmb_arguments(parser)


def seed_list(text: str) -> tuple[int, ...]:
    """'0,1,2' → (0, 1, 2)."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None


def add_dmb_arguments(parser: argparse.ArgumentParser) -> None:
    from slimrate.dmb.model import MODEL_PRESETS
    from slimrate.studies.dmb import ARM_SLUGS

    parser.add_argument("--arms", type=lambda text: tuple(text.split(",")), metavar="SLUG,...",
                        help=f"arms to run, comma-separated, among {', '.join(ARM_SLUGS)} (default: all)")
    parser.add_argument("--seeds", type=seed_list, metavar="S,...",
                        help="seeds added to --seed, comma-separated (default 0,1,2; --quick 0,1)")
    parser.add_argument("--model", choices=sorted(MODEL_PRESETS),
                        help="network preset (default small; another writes dmb_<model>.{md,png,json})")
    parser.add_argument("--steps", type=positive_int, metavar="N",
                        help="score steps per run (default 10000; another adds _<N>steps to the output name)")
    parser.add_argument("--runs-dir", metavar="DIR",
                        help="run folders, kept and reused when their settings match (default OUT/<stem>-runs)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="runs trained at once, one thread each (default %(default)s)")
    parser.add_argument("--device", type=device_name,
                        help="where the runs train and are evaluated: cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--no-train", dest="train_missing", action="store_false",
                        help="report only the runs whose folders are finished; list the others as not run")


def check(args: argparse.Namespace) -> None:
    check_output_folder("--out", args.out)
    if args.study_command == "dmb":
        from slimrate.studies.dmb import ARM_SLUGS

        unknown = [slug for slug in args.arms or () if slug not in ARM_SLUGS]
        if unknown:
            raise UsageError(f"--arms: unknown {', '.join(unknown)}; expected slugs among {', '.join(ARM_SLUGS)}")
        if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
            raise UsageError(f"--seeds: expected distinct seeds, got {','.join(map(str, args.seeds))}")


def dmb_config(config, args: argparse.Namespace):
    """The dmb study's config with the command line's arms, seeds, model, steps, device, run folders and jobs."""
    from slimrate.studies import STUDIES

    train = {k: v for k, v in {"model": args.model, "device": args.device, "steps": args.steps}.items()
             if v is not None}
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train))
    overrides = {"arms": args.arms, "seeds": args.seeds}
    config = dataclasses.replace(config, jobs=args.jobs, train_missing=args.train_missing,
                                 **{k: v for k, v in overrides.items() if v is not None})
    runs_dir = args.runs_dir or str(Path(args.out) / f"{STUDIES['dmb'].output_stem(config)}-runs")
    return dataclasses.replace(config, runs_dir=runs_dir)


def run(args: argparse.Namespace) -> int:
    from slimrate.studies import STUDIES, run_study

    study = STUDIES[args.study_command]
    config = dataclasses.replace(study.quick() if args.quick else study.config(), seed=args.seed)
    if args.study_command == "dmb":
        config = dmb_config(config, args)
    for path in run_study(args.study_command, config, args.out):
        print(f"wrote {path}")
    return 0
