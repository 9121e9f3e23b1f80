"""Entry point: ``python run.py --methods mma,coop --protocol all``; see benchmark/cli.py."""

import sys

from benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
