"""The schedule study as a script: `python bench/study_schedules.py [--quick]`, same as
`slimrate study schedules`; writes bench/results/schedules_study.{md,png,json}."""

import sys

from slimrate.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "schedules", *sys.argv[1:]]))
