"""Budget allocation across layers: multiple-choice knapsack over the profiled options, with per-layer caps."""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from rocket_deploy.config import RocketConfig

from .knapsack import InfeasibleBudget, Solution, capped_options, solve_mckp
from .profile import LayerOption, LayerProfile, Profile


@dataclasses.dataclass
class Allocation:
    choice: dict[str, LayerOption | None]   # None: layer kept dense
    budget_bytes: int
    total_bytes: int
    dense_bytes: int
    objective: str
    cap_alpha: float | None
    predicted_error: float

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the targeted dense bytes removed."""
        return 1.0 - self.total_bytes / self.dense_bytes


def resolve_objective(profile: Profile, objective: str) -> str:
    """``auto`` -> ``fisher`` when the profile measured output sensitivities (causal LMs), else ``rel-original``."""
    has_sens = os.path.isfile(os.path.join(profile.cache_dir, "sensitivity.safetensors"))
    if objective == "auto":
        return "fisher" if has_sens else "rel-original"
    if objective == "fisher" and not has_sens:
        raise ValueError("the 'fisher' objective needs output sensitivities, measured for causal LMs only; "
                         "use --objective rel-original")
    return objective


def option_error(opt: LayerOption, lp: LayerProfile, objective: str) -> float:
    if objective == "rel-original":
        return opt.rel_original
    if objective == "rel-whitened":
        return opt.rel_whitened
    if objective == "whitened-energy":
        return opt.whitened_sq
    if objective == "fisher":
        return opt.fisher
    raise ValueError(f"unknown objective {objective!r}")


def _dense_option(lp: LayerProfile) -> LayerOption:
    if getattr(lp, "dense_option", None) is not None:     # --quantize: the dense weight quantized, error measured
        return lp.dense_option
    return LayerOption(0, 0, lp.dense_bytes, lp.dense_params, 0.0, 0.0, 0.0, 0.0)


def pareto(options: list[LayerOption], errors: list[float]) -> list[int]:
    """Indices of options not dominated (another option both no larger and no worse, one strictly)."""
    order = sorted(range(len(options)), key=lambda i: (options[i].bytes, errors[i]))
    keep, best = [], np.inf
    for i in order:
        if errors[i] < best:
            keep.append(i)
            best = errors[i]
    return keep


def budget_bytes(profile: Profile, budget: float) -> int:
    return int(np.floor((1.0 - budget) * profile.dense_bytes))


def allocate(profile: Profile, config: RocketConfig, budget: float | None = None) -> Allocation:
    """Knapsack allocation: minimise the summed objective over layers within ``(1 - budget)`` of the dense bytes.

    Per-layer caps (the paper's): options whose error exceeds ``alpha * mean error at the target ratio`` are
    dropped, ``alpha`` the smallest value of ``config.cap_alphas`` that keeps the budget feasible.
    """
    budget = config.budget if budget is None else budget
    objective = resolve_objective(profile, config.objective)
    names = list(profile.layers)
    cap_bytes = budget_bytes(profile, budget)
    per_opts, per_err = [], []
    for n in names:
        lp = profile.layers[n]
        opts = lp.options + [_dense_option(lp)]
        errs = [option_error(o, lp, objective) for o in opts]
        idx = pareto(opts, errs)
        per_opts.append([opts[i] for i in idx])
        per_err.append([errs[i] for i in idx])
    # Reference error per layer at the uniform target ratio: the option whose byte fraction is closest to it.
    target_frac = 1.0 - budget
    reference = []
    for n, opts, errs in zip(names, per_opts, per_err):
        lp = profile.layers[n]
        j = min(range(len(opts)), key=lambda i: abs(opts[i].bytes / lp.dense_bytes - target_frac))
        reference.append(errs[j])
    sol, used_alpha = None, None
    for alpha in list(config.cap_alphas) + [None]:
        if alpha is None:
            allowed = [list(range(len(o))) for o in per_opts]
        else:
            # Never capped: the dense option -- or, when a quantized dense option (error > 0) was Pareto-dominated,
            # the layer's lowest-error option, so that no layer is left without options.
            keep = [[o.dense or (not any(x.dense for x in opts) and e == min(errs)) for o, e in zip(opts, errs)]
                    for opts, errs in zip(per_opts, per_err)]
            allowed = capped_options(per_err, reference, alpha, keep)
        costs = [[per_opts[g][o].bytes for o in allowed[g]] for g in range(len(names))]
        errs = [[per_err[g][o] for o in allowed[g]] for g in range(len(names))]
        try:
            s = solve_mckp(costs, errs, cap_bytes, config.knapsack_buckets)
        except InfeasibleBudget:
            continue
        sol = Solution(tuple(allowed[g][o] for g, o in enumerate(s.choice)), s.error, s.bytes)
        used_alpha = alpha
        break
    if sol is None:
        smallest = sum(min(o.bytes for o in opts) for opts in per_opts)
        raise InfeasibleBudget(
            f"budget {budget} leaves {cap_bytes} bytes for the targeted layers, but the smallest profiled options "
            f"need {smallest} bytes ({1 - smallest / profile.dense_bytes:.3f} is the largest feasible budget); "
            "lower --budget or add smaller byte fractions to the grid")
    choice = {n: (None if per_opts[g][o].dense else per_opts[g][o]) for g, (n, o) in enumerate(zip(names, sol.choice))}
    return Allocation(choice, cap_bytes, sol.bytes, profile.dense_bytes, objective, used_alpha, sol.error)
