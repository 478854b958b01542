"""`python -m prefkd.report DIR... [--out OUT] [--metric M] [--title T] [--note TEXT]...` (see
:mod:`prefkd.report.cli`)."""

import sys

from prefkd.report.cli import main

sys.exit(main())
