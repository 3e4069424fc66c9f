"""The toy recipe end to end: make the synthetic data, then `nebula run` the job config.

    python examples/toy/run.py [CONFIG]   (default: examples/toy/reversal.yaml)
    python examples/toy/run.py --data-only   (only write the data under runs/data, e.g.
                                              before `nebula submit examples/toy/quick.yaml`)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def main() -> int:
    os.chdir(ROOT)
    args = sys.argv[1:]
    data_only = "--data-only" in args
    args = [a for a in args if a != "--data-only"]
    config = args[0] if args else "examples/toy/reversal.yaml"
    from nebula.tasks.synthetic import make_split

    for task in ("addition", "reversal", "reversal_pref", "tooladd"):
        make_split(task, ROOT / "runs" / "data")
    if data_only:
        print(f"data in {ROOT / 'runs' / 'data'}")
        return 0
    from services.cli import app

    return app(["run", config], standalone_mode=False) or 0


if __name__ == "__main__":
    sys.exit(main())
