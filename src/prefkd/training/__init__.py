"""Training: one run from a composed config, and what it needs besides the losses.

- :mod:`prefkd.training.pipeline`: ``run(cfg, run_dir)``: config → models → data → trainer → checkpoint.
- :mod:`prefkd.training.trainer`: the training loop (Accelerate), dev evaluation, pre-emption.
- :mod:`prefkd.training.checkpoint`: atomic checkpoints, ``best``/``last`` links, resume.
- :mod:`prefkd.training.optim`: AdamW parameter groups and the schedule.
- :mod:`prefkd.training.tracking`: metrics.jsonl and wandb.
- :mod:`prefkd.training.run_info`: what a run is (its overrides, tokenizers, sweep label).
- :mod:`prefkd.training.datasets`: the composed config's datasets.
- :mod:`prefkd.training.loader`: the DataLoader of each optimizer step's micro-batches (workers, prefetch, resume).
- :mod:`prefkd.training.teacher_source`: the teacher's outputs in a step, from the live model or the cache.
- :mod:`prefkd.training.teacher_cache`: the offline teacher cache (top-k log-probs or last hidden states).
- :mod:`prefkd.training.evaluation`: evaluation protocols from a config (``prefkd.evaluate``, ``final_eval``).
"""
