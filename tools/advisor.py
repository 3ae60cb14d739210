"""Strategy advisor CLI (`fxpasses.commands.advise`): rank TP communication strategies by estimated
comm time and weight memory; `--help` lists the options. All numbers are MODEL ESTIMATES.

    .venv/bin/python tools/advisor.py --model deepseek-v3 --tp 16 --tokens 8192
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxpasses.commands.advise import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
