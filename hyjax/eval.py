"""`python -m hyjax.eval`: evaluate a model on held-out data (the command line is hyjax.cli.eval)."""

import sys

from hyjax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
