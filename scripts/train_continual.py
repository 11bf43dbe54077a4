"""`accelerate launch scripts/train_continual.py --config configs/X.yaml [--<field> value ...]`.

The same command as `pm-hf train` (flags, errors and printed summary), as a script file for `accelerate launch`.
"""

import sys

from pm_hf.commands.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
