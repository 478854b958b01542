"""ROUGE-L and exact match as in MiniLLM/DSKD (docs/methods.md §9).

For one example with prediction p and references r_1..r_k:

    rougeL(p) = max_j  F_LCS(p, r_j)          (rouge_score, rougeL, Porter stemmer)
    EM(p)     = max_j  [norm(p) == norm(r_j)]  (SQuAD normalisation: lower case, no punctuation,
                                                no articles a/an/the, single spaces)

with F_LCS = 2·P·R / (P + R), P = LCS/|p|, R = LCS/|r| over rouge_score's tokens (lower-cased
alphanumeric runs, stemmed). A corpus score is the mean over examples × 100.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache

References = str | Sequence[str]


def as_references(references: References) -> list[str]:
    """A single reference string or a list of them -> a list."""
    return [references] if isinstance(references, str) else list(references)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: References) -> float:
    """ROUGE-L F-measure in [0, 1], maximum over the references."""
    scorer = _scorer()
    return max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in as_references(references))


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: References) -> float:
    """1.0 when the normalised prediction equals some normalised reference, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in as_references(references)))


def score_corpus(predictions: Sequence[str], references: Sequence[References]) -> dict[str, float]:
    """Mean over examples × 100: ``{"rougeL": ..., "exact_match": ...}`` (0 for an empty corpus)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists.")
    n = max(len(predictions), 1)
    return {
        "rougeL": 100.0 * sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "exact_match": 100.0 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
    }
