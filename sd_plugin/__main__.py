"""``python -m sd_plugin ...``: the commands of ``sd_plugin.cli``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
