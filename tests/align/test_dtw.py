"""DTW over token strings (docs/methods.md §6): hand-worked cases, the tie order, and the vectorised recurrence against
the naive double loop of the SPEC."""

from __future__ import annotations

import numpy as np
import pytest

from prefkd.align.dtw import accumulated_cost, backtrack, cost_matrix, dtw_align
from tests.helpers.references import naive_dtw


def test_word_split_into_two_student_tokens():
    """a = [Hello, world], b = [Hel, lo, world]. C = [[2, 3, 4], [4, 4, 0]] (Levenshtein).
    D row 0: 2, 5, 9. Row 1: D10 = 4 + 2 = 6, D11 = 4 + min(5, 6, 2) = 6, D12 = 0 + min(9, 6, 5) = 5.
    Back from (1,2): diag D01 = 5 < left D11 = 6 < up D02 = 9 → (0,1); then only left → (0,0)."""
    a, b = ["Hello", "world"], ["Hel", "lo", "world"]
    assert cost_matrix(a, b).tolist() == [[2, 3, 4], [4, 4, 0]]
    assert accumulated_cost(cost_matrix(a, b)).tolist() == [[2, 5, 9], [6, 6, 5]]
    assert dtw_align(a, b) == [(0, 0), (0, 1), (1, 2)]


def test_two_teacher_tokens_into_one_with_a_diagonal_tie():
    """a = [in, ter, net], b = [inter, net]. C = [[3, 3], [2, 2], [3, 0]].
    D row 0: 3, 6; row 1: 5, 2 + min(6, 5, 3) = 5; row 2: 8, 0 + min(5, 8, 5) = 5.
    Back from (2,1): diag D10 = 5 ties with up D11 = 5 → diagonal wins → (1,0); then only up → (0,0)."""
    a, b = ["in", "ter", "net"], ["inter", "net"]
    assert cost_matrix(a, b).tolist() == [[3, 3], [2, 2], [3, 0]]
    assert accumulated_cost(cost_matrix(a, b)).tolist() == [[3, 6], [5, 5], [8, 5]]
    assert dtw_align(a, b) == [(0, 0), (1, 0), (2, 1)]


def test_up_is_preferred_to_left_on_a_tie():
    """C = [[0,0,9],[0,9,0],[9,0,0]]: D = [[0,0,9],[0,9,0],[9,0,0]]. Back from (2,2): diag D11 = 9, up D12 = 0,
    left D21 = 0 → up → (1,2); there diag D01 = 0 → (0,1); then left → (0,0). The mirror path through (1,0),
    (2,1) costs the same 0 (C is symmetric): only the tie order decides."""
    cost = np.array([[0, 0, 9], [0, 9, 0], [9, 0, 0]])
    assert accumulated_cost(cost).tolist() == [[0, 0, 9], [0, 9, 0], [9, 0, 0]]
    assert backtrack(accumulated_cost(cost)) == [(0, 0), (0, 1), (1, 2), (2, 2)]


def test_all_equal_costs_take_the_diagonal_first():
    assert backtrack(accumulated_cost(np.zeros((3, 2), dtype=int))) == [(0, 0), (1, 0), (2, 1)]
    assert backtrack(accumulated_cost(np.zeros((2, 2), dtype=int))) == [(0, 0), (1, 1)]


def test_repeated_token_and_edge_shapes():
    """[a, b] vs [a, a, b]: C = [[0,0,1],[1,1,0]], D = [[0,0,1],[1,1,0]]; from (1,2) diag D01 = 0 → (0,1) → (0,0)."""
    assert dtw_align(["a", "b"], ["a", "a", "b"]) == [(0, 0), (0, 1), (1, 2)]
    assert dtw_align(["x"], ["p", "q", "r"]) == [(0, 0), (0, 1), (0, 2)]
    assert dtw_align(["p", "q"], ["x"]) == [(0, 0), (1, 0)]
    assert dtw_align([], ["a"]) == [] and dtw_align(["a"], []) == []


@pytest.mark.parametrize("seed", range(30))
def test_vectorised_recurrence_and_backtrack_equal_the_naive_loops(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 14, size=2)
    cost = rng.integers(0, 3, size=(n, m))  # few values: many ties
    d, path = naive_dtw(cost)
    assert accumulated_cost(cost).tolist() == d.astype(int).tolist()
    assert backtrack(accumulated_cost(cost)) == path


def test_path_is_monotone_and_covers_both_sequences():
    rng = np.random.default_rng(1)
    words = ["the", "Ġcat", "sat", "on", "mat", "", "x", "catalog"]
    a = [words[k] for k in rng.integers(0, len(words), 40)]
    b = [words[k] for k in rng.integers(0, len(words), 25)]
    path = dtw_align(a, b)
    assert path[0] == (0, 0) and path[-1] == (39, 24)
    for (i0, j0), (i1, j1) in zip(path, path[1:]):
        assert (i1 - i0, j1 - j0) in {(1, 1), (1, 0), (0, 1)}
