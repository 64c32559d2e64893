"""`python -m hyjax.train`: fine-tune a model (the command line is hyjax.cli.train)."""

import sys

from hyjax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
