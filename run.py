"""Entry point: ``python run.py --methods mma,coop --protocol all``; see benchmark/cli.py."""

import sys

from benchmark import stages

stages.import_begin()  # the command line's imports count as the process's imports (benchmark/stages.py)
from benchmark.cli import main  # noqa: E402

stages.import_end()

if __name__ == "__main__":
    sys.exit(main())
