"""How trials are chosen and stopped: the search algorithm and the early-stopping scheduler.

All of it is Ray Tune's own (``BasicVariantGenerator``, ``OptunaSearch`` with Optuna's TPE,
``MedianStoppingRule``, ``ASHAScheduler``); this module only maps the config onto them.
"""

from __future__ import annotations

import math
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher, SearchAlgorithm

from pml.schemas.config import TrainingApproach
from pml.tuning.search_space import to_param_space

# Ray Tune counts one step per ``tune.report``, i.e. per match of the objective's regex.
TIME_ATTR = "training_iteration"
# ASHA stops every trial at max_t; pml's trials end when their image does, so it is out of reach.
ASHA_MAX_T = 10**9
ASHA_REDUCTION_FACTOR = 3
# The median rule needs this many other trials' values at a step before it stops anyone.
MEDIAN_MIN_SAMPLES = 3


def bayesian_startup_trials(max_trials: int) -> int:
    """Random trials before TPE models the space: half the budget, at least 2, at most 10
    (Optuna's default of 10 is meant for budgets of hundreds)."""
    return max(2, min(10, max_trials // 2))


def search_algorithm(approach: TrainingApproach) -> SearchAlgorithm | Searcher:
    """The seeded search algorithm of the config's ``strategy``: same seed, same sequence."""
    if approach.strategy == "bayesian":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(
            seed=approach.seed, n_startup_trials=bayesian_startup_trials(approach.max_trials)
        )
        return OptunaSearch(sampler=sampler)
    # random and grid: Ray Tune's variant generator (grid_search domains for grid). It is no
    # Searcher, so Tune ignores TuneConfig.max_concurrent_trials for it: it limits itself.
    return BasicVariantGenerator(random_state=approach.seed, max_concurrent=approach.max_parallel_trials or 0)


def param_space(approach: TrainingApproach) -> dict[str, Any]:
    return to_param_space(approach.search_space, grid=approach.strategy == "grid")


def num_samples(approach: TrainingApproach) -> int:
    """Trials Ray Tune is asked for; a grid is expanded once (every combination, one trial each)."""
    return 1 if approach.strategy == "grid" else approach.max_trials


def scheduler(approach: TrainingApproach) -> TrialScheduler:
    """The early-stopping rule. Metric and mode come from the ``TuneConfig``."""
    if approach.early_stopping == "median":
        # min_time_slice = inf: never pause a trial for lack of samples (pausing a trial
        # without checkpoints restarts its image from scratch later).
        return MedianStoppingRule(
            time_attr=TIME_ATTR, grace_period=1, min_samples_required=MEDIAN_MIN_SAMPLES,
            min_time_slice=math.inf, hard_stop=True,
        )
    if approach.early_stopping == "asha":
        return ASHAScheduler(
            time_attr=TIME_ATTR, max_t=ASHA_MAX_T, grace_period=1, reduction_factor=ASHA_REDUCTION_FACTOR,
        )
    return FIFOScheduler()


def tune_config(approach: TrainingApproach) -> tune.TuneConfig:
    """Everything ``tune.TuneConfig`` takes from the config (objective, search, stopping)."""
    search = search_algorithm(approach)
    return tune.TuneConfig(
        metric="objective", mode=approach.objective.mode, search_alg=search, scheduler=scheduler(approach),
        num_samples=num_samples(approach),
        # A Searcher (Optuna) is wrapped in a ConcurrencyLimiter by Tune; None = what Ray can hold.
        max_concurrent_trials=approach.max_parallel_trials if isinstance(search, Searcher) else None,
    )


EARLY_STOPPING_RULES = {"median": "the median stopping rule", "asha": "ASHA (successive halving)"}
