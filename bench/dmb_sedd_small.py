"""Learned Q vs Q frozen at init, with SEDD-absorb beside them, at the size of SEDD's small text8 net.

    python bench/dmb_sedd_small.py --device cuda --steps 300 --out bench/results   # bench/gpu_check.sh's stage
    python bench/dmb_sedd_small.py --steps 2 --model tiny --out /tmp/check         # the code path in seconds

`slimrate study dmb` with the `sedd-small` preset (768 hidden, 12 blocks, ≈92M parameters; docs/dmb.md §12),
the arms 'dmb interleaved', 'dmb frozen at init' and 'sedd-absorb', one seed, --steps score steps each, and a
smaller final evaluation (64 held-out windows: 4 Monte Carlo times, 4 official passes) so that the three runs
fit a few minutes on a GPU.  Training, evaluation and sampling run on --device (default cuda when torch sees a GPU,
else cpu; on the CPU, 2 steps each took 9.7 minutes on 2 shared Zen cores).  Writes
OUT/dmb_sedd-small.{md,png,json} (the study's name for the preset); run folders go to a temporary folder.
"""

import argparse
import dataclasses

import torch

from slimrate.dmb import MODEL_PRESETS
from slimrate.studies import run_study
from slimrate.studies.dmb import DMBStudyConfig, study_training
from slimrate.train import check_device

ARMS = ("dmb-interleaved-prior", "dmb-frozen-init", "sedd-absorb")


def sedd_small_config(steps: int, model: str = "sedd-small", device: str = "cpu") -> DMBStudyConfig:
    """The three arms with the ``model`` preset for ``steps`` steps on ``device``, with the curve at two points."""
    train = dataclasses.replace(study_training(), model=model, device=device, steps=steps,
                                eval_every=max(1, steps // 2), eval_sequences=16, eval_samples=2,
                                log_every=max(1, steps // 10))
    return DMBStudyConfig(arms=ARMS, seeds=(0,), train=train, final_sequences=64, final_samples=4,
                          official_repeats=4, sample_count=2, sample_steps=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="score steps per run (default %(default)s)")
    parser.add_argument("--model", default="sedd-small", choices=sorted(MODEL_PRESETS),
                        help="network preset (default %(default)s; tiny checks the code path in seconds)")
    parser.add_argument("--out", default="bench/results", help="folder for the study's files (default %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the runs train: cpu, cuda or cuda:N (default %(default)s)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps: expected an integer > 0, got {args.steps}")
    try:
        device = check_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"dmb_sedd_small: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, training on "
          f"{args.device}{gpu}")
    for path in run_study("dmb", sedd_small_config(args.steps, args.model, args.device), args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
