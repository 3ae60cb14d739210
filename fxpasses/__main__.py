"""`python -m fxpasses` = the `fxpasses` console script."""
import sys

from fxpasses.cli import main

if __name__ == "__main__":
    sys.exit(main())
