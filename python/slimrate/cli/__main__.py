"""`python -m slimrate.cli`: the same as the `slimrate` console script."""

import sys

from slimrate.cli import main

sys.exit(main())
