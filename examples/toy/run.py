"""The toy recipe end to end: make the synthetic data, then `nebula run` the job config.

    python examples/toy/run.py [CONFIG]   (default: examples/toy/reversal.yaml)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def main() -> int:
    os.chdir(ROOT)
    config = sys.argv[1] if len(sys.argv) > 1 else "examples/toy/reversal.yaml"
    from nebula.tasks.synthetic import make_split

    for task in ("addition", "reversal", "reversal_pref", "tooladd"):
        make_split(task, ROOT / "runs" / "data")
    from services.cli import app

    return app(["run", config], standalone_mode=False) or 0


if __name__ == "__main__":
    sys.exit(main())
