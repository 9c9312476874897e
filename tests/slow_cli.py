"""The slimrate command line with a pause after every training step, so that a test can SIGKILL a run mid-way
(tests/test_dmb_train.py); the pause changes no numbers.  Usage: python slow_cli.py SECONDS COMMAND...
"""

import sys

from train_script import SlowDown

import slimrate.train


def main() -> int:
    seconds, argv = float(sys.argv[1]), sys.argv[2:]
    train = slimrate.train.train

    def slow_train(*args, hooks=(), **kwargs):
        return train(*args, hooks=[*hooks, SlowDown(seconds)], **kwargs)

    slimrate.train.train = slow_train  # before the command imports its driver, which imports train from here
    from slimrate.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
