"""`python -m hyjax.generate`: answer a prompt (the command line is hyjax.cli.generate)."""

import sys

from hyjax.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
