"""Evaluation (docs/methods.md §9, §10): ROUGE-L / exact match on instruction sets, dev ROUGE-L for checkpoint
selection, preference accuracy and reward margins, and the Open LLM Leaderboard through lm-eval.

- :mod:`prefkd.eval.metrics`: ``rouge_l``, ``exact_match``, ``score_corpus``.
- :mod:`prefkd.eval.generation`: ``Sampling`` (docs/methods.md §9 defaults) and batched left-padded ``generate``.
- :mod:`prefkd.eval.sets`: reading evaluation sets (``load_eval_set``, ``EvalSetError``).
- :mod:`prefkd.eval.instruct`: the instruction-set protocol with resumable generation files.
- :mod:`prefkd.eval.nll`: held-out NLL of the reference answers (nats per token, bits per byte).
- :mod:`prefkd.eval.dev_rouge`: ``dev_rouge`` for the trainer (3 samples, no_repeat_ngram_size 0).
- :mod:`prefkd.eval.preference`: DPO implicit-reward accuracy and margins, reward-model win rate.

The command line is ``python -m prefkd.evaluate`` (:mod:`prefkd.evaluate`).
"""
