"""Reports over training runs and evaluation results: ``python -m prefkd.report DIR... --out OUT``.

- :mod:`prefkd.report.readers`: tolerant JSON, YAML and metrics.jsonl readers (problems become warnings).
- :mod:`prefkd.report.collect`: finding run directories and results.json files, reading them (``collect``).
- :mod:`prefkd.report.groups`: swept keys, row labels, pooling replicate seeds, sweep-plot figures.
- :mod:`prefkd.report.tables`: report.md, report.csv, nll.csv and training.csv.
- :mod:`prefkd.report.plots`: the PNG plots (matplotlib, Agg backend).
- :mod:`prefkd.report.cli`: the command line and ``write_report``.
"""
