"""`python -m prefkd.report DIR... [--out OUT] [--metric M] [--title T]` (see :mod:`prefkd.report.cli`)."""

import sys

from prefkd.report.cli import main

sys.exit(main())
