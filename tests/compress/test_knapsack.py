"""The multiple-choice knapsack is exact for the discretised problem: compare with brute force."""
import random

import pytest

from rocket_deploy.compress.knapsack import InfeasibleBudget, brute_force, capped_options, solve_mckp


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    groups = rng.randint(1, 5)
    costs = [[rng.randint(1, 40) for _ in range(rng.randint(1, 4))] for _ in range(groups)]
    errors = [[rng.random() for _ in c] for c in costs]
    cap = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
    # capacity below the bucket count -> unit of one byte -> the discretised problem is the real one
    sol = solve_mckp(costs, errors, cap, buckets=1000)
    ref = brute_force(costs, errors, cap)
    assert sol.bytes <= cap
    assert sol.error == pytest.approx(ref.error, abs=1e-12)


def test_discretised_solution_fits_real_bytes():
    rng = random.Random(7)
    costs = [[rng.randint(10_000, 90_000) for _ in range(6)] for _ in range(30)]
    errors = [[rng.random() for _ in c] for c in costs]
    cap = sum(sum(c) / len(c) for c in costs)
    sol = solve_mckp(costs, errors, int(cap), buckets=500)
    assert sol.bytes <= cap
    # optimal for the rounded-up costs: brute force is impossible here, but the result must beat a greedy pick
    greedy = sum(min(e) for e in errors)
    assert sol.error >= greedy - 1e-9


def test_infeasible():
    with pytest.raises(InfeasibleBudget):
        solve_mckp([[10, 20], [10]], [[0.1, 0.0], [0.0]], 15)


def test_caps_drop_only_bad_options():
    errors = [[0.9, 0.2, 0.0], [0.5, 0.1, 0.0]]
    keep = [[False, False, True], [False, False, True]]
    allowed = capped_options(errors, [0.4, 0.2], alpha=1.0, keep_always=keep)   # limit 0.3
    assert allowed == [[1, 2], [1, 2]]
