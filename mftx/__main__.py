"""``python -m mftx`` (and ``torchrun … -m mftx``): the `mftx` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
