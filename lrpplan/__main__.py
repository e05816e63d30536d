"""``python -m lrpplan``: the same command line as the ``lrpplan`` script."""
from __future__ import annotations

import sys

from lrpplan.cli import main

if __name__ == "__main__":
    sys.exit(main())
