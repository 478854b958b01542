"""Dynamic time warping over two token-string sequences (MinED's sequence alignment, docs/methods.md §6).

For a = a_0 .. a_{n−1} (teacher) and b = b_0 .. b_{m−1} (student), with cost C[i, j] = lev(a_i, b_j) the
Levenshtein distance (markers already stripped by the caller):

    D[i, j] = C[i, j] + min(D[i−1, j], D[i, j−1], D[i−1, j−1]),   D[−1, −1] = 0, D[−1, j] = D[i, −1] = ∞.

The path runs from (n−1, m−1) back to (0, 0); at each step it moves to the smallest of
diagonal (i−1, j−1), up (i−1, j), left (i, j−1), ties preferring diagonal, then up, then left (the order
of FuseLLM's ``np.argmin([diag, up, left])``). Every i and every j lie on the path at least once.

Vectorised per row: with m_j = min(D[i−1, j], D[i−1, j−1]) and S the cumulative sum of row i of C, the
row recurrence x_j = C[i, j] + min(m_j, x_{j−1}) unrolls to

    x_j = S_j + min_{k ≤ j} (m_k − S_{k−1}),

one ``np.minimum.accumulate`` per row (exact in int64).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_INF = np.int64(1) << 50  # "infinity" that survives additions of edit distances without overflow


def cost_matrix(a: Sequence[str], b: Sequence[str], workers: int = 1) -> np.ndarray:
    """C (n×m int64): C[i, j] = Levenshtein distance between a[i] and b[j] (rapidfuzz ``cdist``)."""
    from prefkd.align.vocab_map import _rapidfuzz

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), dtype=np.int64)
    process, Levenshtein = _rapidfuzz()
    return process.cdist(list(a), list(b), scorer=Levenshtein.distance, dtype=np.int32,
                         workers=workers).astype(np.int64)


def accumulated_cost(cost: np.ndarray) -> np.ndarray:
    """D (n×m int64) of the module docstring from a non-negative integer cost matrix C (n×m)."""
    cost = np.asarray(cost, dtype=np.int64)
    n, m = cost.shape
    acc = np.empty((n, m), dtype=np.int64)
    prev = np.full(m + 1, _INF, dtype=np.int64)  # D[i−1, j−1] for j = 0 .. m, i.e. row i−1 shifted right
    prev[0] = 0  # D[−1, −1] = 0: the path starts at (0, 0)
    for i in range(n):
        best_prev = np.minimum(prev[1:], prev[:-1])  # m_j = min(D[i−1, j], D[i−1, j−1])
        csum = np.cumsum(cost[i])
        row = csum + np.minimum.accumulate(best_prev - (csum - cost[i]))
        acc[i] = row
        prev[0], prev[1:] = _INF, row
    return acc


def backtrack(acc: np.ndarray) -> list[tuple[int, int]]:
    """The warping path through D, from (0, 0) to (n−1, m−1), ties: diagonal, then up, then left."""
    n, m = acc.shape
    if n == 0 or m == 0:
        return []
    d = acc.tolist()
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = d[i - 1][j - 1] if i > 0 and j > 0 else _INF
        up = d[i - 1][j] if i > 0 else _INF
        left = d[i][j - 1] if j > 0 else _INF
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    return path


def dtw_align(a: Sequence[str], b: Sequence[str]) -> list[tuple[int, int]]:
    """Align two token-string sequences: the DTW path as (i, j) pairs, i into ``a``, j into ``b``, in order
    from (0, 0) to (len(a)−1, len(b)−1); ``[]`` if either is empty. Strip word-start markers first."""
    return backtrack(accumulated_cost(cost_matrix(a, b)))
