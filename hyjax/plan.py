"""`python -m hyjax.plan`: will a run fit a TPU pod (the command line is hyjax.cli.plan)."""

import sys

from hyjax.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
