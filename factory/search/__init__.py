"""Architecture search (STAR-style): NSGA-II over hierarchical integer genomes of LIV operators.

Modules, each small: `config` (run settings, run.json), `objectives` (objective and evaluation-stage registries),
`problem` (space + objectives + budgets), `operators` (sampling, crossover, mutation, repair, budget repair),
`algorithm` (NSGA-II steps on pymoo's machinery), `seeding` (space, adapted references), `evaluate` (worker side),
`executors` (inline, process pool, Ray), `store` (SQLite), `run` (the loop, resume), `outputs`, `plots`,
`analysis` (motifs), `finalize` (longer retraining against the baselines), `latency` (the latency loop: the
profile stage, the prefilter and the run's measurement store).
"""

from factory.search.config import Budgets, SearchConfig
from factory.search.objectives import EvalRecord, Objective, ObjectiveContext, register_objective, register_stage


def start_search(*args, **kwargs):
    from factory.search.run import start_search as _start

    return _start(*args, **kwargs)


def resume_search(*args, **kwargs):
    from factory.search.run import resume_search as _resume

    return _resume(*args, **kwargs)


__all__ = ["Budgets", "EvalRecord", "Objective", "ObjectiveContext", "SearchConfig", "register_objective",
           "register_stage", "resume_search", "start_search"]
