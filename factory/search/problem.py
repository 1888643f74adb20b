"""The architecture search problem (pymoo style): the space, the objectives, the budgets (hard constraints).

It knows how to judge a genome statically (metrics, budget violation) and how to turn an evaluation record into
an objective vector. It does not know how candidates are varied (`operators`) or selected (`algorithm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from factory.errors import FactoryError
from factory.genome.metrics import static_metrics
from factory.genome.schema import Genome
from factory.genome.space import SearchSpace
from factory.search.config import Budgets, SearchConfig
from factory.search.objectives import EvalRecord, Objective, ObjectiveContext, resolve_objectives, stages_for


@dataclass(frozen=True)
class StaticCheck:
    static: dict  # StaticMetrics.to_dict()
    violation: float  # 0 when every budget is met
    reason: str

    @property
    def feasible(self) -> bool:
        return self.violation <= 0.0


class ArchitectureProblem:
    def __init__(self, space: SearchSpace, objectives: list[Objective], budgets: Budgets, context: ObjectiveContext,
                 constraints: list | None = None):
        self.space = space
        self.objectives = objectives
        self.budgets = budgets
        self.context = context
        self.constraints = constraints or []  # extra static checks (see objectives.register_constraint)
        self._static_cache: dict[str, dict] = {}
        self._check_cache: dict[str, StaticCheck] = {}

    @classmethod
    def from_config(cls, config: SearchConfig, measurements=None) -> "ArchitectureProblem":
        """`measurements`: the run's store (factory.search.latency.run_measurements), which constraints such as
        the latency prefilter read; None before the run's folder exists."""
        from factory.search.objectives import build_constraints
        from factory.search.seeding import build_space

        space = build_space(config)
        ctx = ObjectiveContext(metrics_context=config.context_for_metrics, dtype=config.dtype, target=config.target)
        return cls(space, resolve_objectives(config.objectives), config.budgets, ctx,
                   build_constraints(config, measurements))

    def preflight(self) -> None:
        for obj in self.objectives:
            if obj.preflight is not None:
                obj.preflight(self.context)

    def refresh(self) -> None:
        """Before a generation proposes children: let extra constraints update themselves (e.g. re-fit)."""
        for c in self.constraints:
            if hasattr(c, "refresh"):
                c.refresh()
        self._check_cache.clear()

    @property
    def n_obj(self) -> int:
        return len(self.objectives)

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def stages(self) -> list[str]:
        return stages_for(self.objectives)

    def static(self, genome: Genome) -> dict:
        key = genome.hash()
        if key not in self._static_cache:
            m = static_metrics(genome, self.context.metrics_context, self.context.dtype)
            self._static_cache[key] = m.to_dict()
        return self._static_cache[key]

    def check(self, genome: Genome) -> StaticCheck:
        key = genome.hash()
        if key not in self._check_cache:
            static = self.static(genome)
            violation, reason = self.budgets.violation(static)
            reasons = [reason] if reason else []
            for c in self.constraints:
                v, why = c.violation(genome)
                if v > 0:
                    violation += v
                    reasons.append(why)
            self._check_cache[key] = StaticCheck(static, violation, "; ".join(reasons))
        return self._check_cache[key]

    def objective_values(self, genome: Genome, record: EvalRecord) -> list[float]:
        values = []
        for obj in self.objectives:
            try:
                v = float(obj.fn(genome, record, self.context))
            except (KeyError, TypeError, ValueError):
                v = math.inf  # a failed or missing measurement: the candidate is infeasible anyway
            values.append(v if math.isfinite(v) else math.inf)
        return values

    def pymoo_problem(self):
        """A pymoo Problem of the right shape, for pymoo's survival operators (they ask it about constraints)."""
        from pymoo.core.problem import Problem

        return Problem(n_var=self.space.n_var, n_obj=self.n_obj, n_ieq_constr=1, xl=0,
                       xu=np.array(self.space.upper_bounds, dtype=float))

    # -- can the budgets be met at all? ---------------------------------------------------------------------------
    def check_achievable(self, probes: list[Genome], budget_repair) -> None:
        """Fail early (FactoryError, one line) when no genome of the space can meet the budgets together.

        `probes` are cheap genomes (the cheapest per family, adapted references, samples); the best few are pushed
        toward the budgets by `budget_repair`. Any feasible one proves the budgets achievable.
        """
        active = self.budgets.active()
        if not active:
            return
        lower_params = self._params_lower_bound()
        if self.budgets.max_params is not None and self.budgets.max_params < lower_params:
            raise FactoryError(
                f"--max-params {self.budgets.max_params:,} is below the smallest model of this space "
                f"({lower_params:,} parameters for the embedding and norms alone at width {self._d_model})")
        checks = sorted(((self.check(g), i) for i, g in enumerate(probes)), key=lambda t: (t[0].violation, t[1]))
        if checks and checks[0][0].feasible:
            return
        for check, i in checks[:6]:
            if budget_repair(probes[i], max_steps=40) is not None:
                return
        smallest = {}
        for key in active:
            metric, flag = Budgets.METRICS[key]
            smallest[key] = min(self.static(g)[metric] for g in probes)
        parts = [
            f"{Budgets.METRICS[k][1]} {active[k]:,} is below the smallest found ({smallest[k]:,} {Budgets.METRICS[k][0]})"
            for k in active if smallest[k] > active[k]
        ]
        if parts:
            raise FactoryError("impossible budget: " + "; ".join(parts) + " in this search space")
        raise FactoryError("impossible budgets: no genome of this search space was found that meets "
                           + ", ".join(f"{Budgets.METRICS[k][1]} {v:,}" for k, v in active.items()) + " together")

    @property
    def _d_model(self) -> int:
        return self.space.codec.decode(self.space.project([0] * self.space.n_var)).d_model

    def _params_lower_bound(self) -> int:
        from factory.ops.common import norm_params

        g = self.space.codec.decode(self.space.project([0] * self.space.n_var))
        emb = g.vocab_size * g.d_model * (1 if g.tie_embeddings else 2)
        return emb + (g.n_layers + 1) * norm_params(g.norm, g.d_model)
