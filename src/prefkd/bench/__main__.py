"""`python -m prefkd.bench`: see :mod:`prefkd.bench`."""

from prefkd.bench import main

main()
