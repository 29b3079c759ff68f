"""Multiple-choice knapsack: one option per layer, minimum summed error, total bytes within budget.

Solved exactly for the discretised problem by dynamic programming over byte buckets. Each option's bytes
are rounded UP to whole buckets, so any solution also fits the true budget in real bytes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np


class InfeasibleBudget(ValueError):
    """No choice of options fits the budget."""


@dataclasses.dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]     # option index per group
    error: float
    bytes: int


def solve_mckp(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], capacity: int,
               buckets: int = 20000) -> Solution:
    """Pick one option per group minimising sum(errors) with sum(costs) <= capacity.

    ``costs[g][o]`` are integer bytes, ``errors[g][o]`` floats. Exact for costs discretised to
    ``unit = capacity / buckets`` (rounded up).
    """
    if len(costs) != len(errors) or any(len(c) != len(e) or len(c) == 0 for c, e in zip(costs, errors)):
        raise ValueError("each group needs at least one option and matching costs / errors")
    min_total = sum(min(c) for c in costs)
    if min_total > capacity:
        raise InfeasibleBudget(f"the smallest options need {min_total} bytes, more than the budget {capacity}")
    unit = max(capacity / buckets, 1.0)
    cap = int(math.floor(capacity / unit + 1e-9))
    inf = np.inf
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    back = []
    for gc, ge in zip(costs, errors):
        w = [int(math.ceil(c / unit - 1e-9)) for c in gc]
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int32)
        for o, (wo, eo) in enumerate(zip(w, ge)):
            if wo > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[wo:] = dp[: cap + 1 - wo] + eo
            better = cand < new
            new[better] = cand[better]
            arg[better] = o
        dp = new
        back.append((arg, w))
    end = int(np.argmin(dp))
    if not np.isfinite(dp[end]):
        raise InfeasibleBudget("no combination of options fits the budget after discretisation; "
                               "raise the budget or the number of buckets")
    choice = []
    c = end
    for arg, w in reversed(back):
        o = int(arg[c])
        choice.append(o)
        c -= w[o]
    choice.reverse()
    total_bytes = sum(costs[g][o] for g, o in enumerate(choice))
    total_err = float(sum(errors[g][o] for g, o in enumerate(choice)))
    return Solution(tuple(choice), total_err, int(total_bytes))


def brute_force(costs, errors, capacity) -> Solution | None:
    """Exhaustive reference for tests (small instances only)."""
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        b = sum(costs[g][o] for g, o in enumerate(choice))
        if b > capacity:
            continue
        e = sum(errors[g][o] for g, o in enumerate(choice))
        if best is None or e < best.error - 1e-12:
            best = Solution(tuple(choice), float(e), int(b))
    return best


def capped_options(errors: Sequence[Sequence[float]], reference: Sequence[float], alpha: float,
                   keep_always: Sequence[Sequence[bool]]) -> list[list[int]]:
    """Indices of options kept under the per-layer cap: error <= alpha * mean(reference)
    (options flagged ``keep_always`` -- the uncompressed one -- are never dropped)."""
    limit = alpha * float(np.mean(reference))
    return [[o for o, e in enumerate(ge) if e <= limit or keep[o]] for ge, keep in zip(errors, keep_always)]
