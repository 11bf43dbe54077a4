"""`python -m pm_hf ...` is `pm-hf ...`: what `accelerate launch -m pm_hf train --config FILE.yaml` and
`torchrun --nproc_per_node N -m pm_hf train ...` run on every process."""

import sys

from pm_hf.commands.cli import main

sys.exit(main())
