"""The early stop of `validated-alpha`'s grid scan checked on the committed runs: every merge's logged grid
(`calibrations[t].grid` of results/<suite>/runs/pm-validated-exact/seed*.json, scanned in full when they were made) is
scanned again as `scan` would, and the one-standard-error choice from the points it reaches is compared with the
choice from the whole grid. Prints the merges, how many choices agree and the mean number of points scanned.

    python scripts/validation_scan.py [--patience 1] [--stop-se 2]   (the defaults: the strategy's)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pm_hf.method.strategies.validated import ValidatedAlpha, one_se_choice, scan

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = {knob.name: knob.default for knob in ValidatedAlpha.knobs if not isinstance(knob, str)}
    parser.add_argument("--patience", type=int, default=defaults["validation_patience"])
    parser.add_argument("--stop-se", type=float, default=defaults["validation_stop_se"])
    args = parser.parse_args()
    merges = agree = points = 0
    for path in sorted(ROOT.glob("results/*/runs/pm-validated-exact/seed*.json")):
        for record in json.loads(path.read_text()).get("calibrations") or []:
            if not record or "grid" not in record:
                continue
            grid = {float(a): m for a, m in record["grid"].items()}
            if len(grid) < 11:  # a run made with the scan: its grid is already cut
                continue
            reached = scan(list(grid), grid.__getitem__, args.patience, args.stop_se)
            choice = one_se_choice(
                {a: m["estimate"] for a, m in reached.items()}, {a: m["se"] for a, m in reached.items()}
            )
            merges, agree, points = merges + 1, agree + (choice == record["alpha"]), points + len(reached)
    print(
        f"{merges} merges: {agree} choices as the whole grid's; {points / max(merges, 1):.1f} points scanned per merge"
    )


if __name__ == "__main__":
    main()
