"""``python -m prefkd.data fetch [NAME ...] [--dir DIR] [--from DIR]``: see :mod:`prefkd.data.fetch`."""

from __future__ import annotations

import sys

from prefkd.data.fetch import main

if __name__ == "__main__":
    sys.exit(main())
