"""NSGA-II over architecture genomes: initial population, tournament pairing, variation, survival, hypervolume.

pymoo provides the machinery: non-dominated sorting and crowding (`RankAndCrowding`, which also applies
constraint domination through `Survival`: feasible before infeasible, infeasible by violation), tournament
pairing (`TournamentSelection`, with the comparator below) and the hypervolume (`HV`). What is written here is
what pymoo's `NSGA2.minimize` loop cannot do for us: evaluations are expensive and stored, deduplicated by genome
hash, run in parallel and resumable, so the loop is ours (see `run.py`) and this module offers its steps.

Constraint domination: a member's violation is its relative excess over the budgets (always 0 here, since
over-budget genomes are repaired or rejected before training) plus 1 when its evaluation failed (diverged, OOM,
error). Feasible members are ranked by Pareto rank and crowding; infeasible ones only fill what is left.

Successive halving (multi-fidelity, `SearchConfig.rungs`): a member's objectives are its result at the highest rung
it reached, and members are ranked by that rung first, Pareto rank second (lexicographically): a member that
reached a higher rung ranks ahead of every member that stopped below it, and Pareto dominance and crowding only
compare members of the same rung. Why: val bpb after 3x the tokens is on another scale than after 1x (lower), so
comparing the two as if equal would either favour promoted members by an arbitrary margin or let an unpromoted
member's noisy short-budget score displace one that won its promotion like with like. `_objective_matrix`
implements the tiers by shifting every objective of a lower-rung member past the pool's whole range, so pymoo's
non-dominated sorting, crowding and tournaments work unchanged (within a rung the shift is a constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pymoo.core.population import Population
from pymoo.indicators.hv import HV
from pymoo.operators.selection.tournament import TournamentSelection
from pymoo.operators.survival.rank_and_crowding import RankAndCrowding

from factory.genome.schema import Genome, GenomeError
from factory.search.operators import BudgetRepair, Crossover, Mutation, Repair, Sampling
from factory.search.problem import ArchitectureProblem, StaticCheck

FAILED_VIOLATION = 1.0  # constraint violation of a candidate whose evaluation failed
UNRANKED = 10**9


@dataclass
class Candidate:
    """A genome proposed for evaluation, and where it came from."""

    genome: Genome
    origin: str  # "reference:<name>", "random", "offspring" (+ " budget-repaired")
    parents: tuple[str, ...] = ()

    @property
    def hash(self) -> str:
        return self.genome.hash()


@dataclass
class Member:
    """An evaluated candidate as the algorithm sees it."""

    hash: str
    genome: Genome
    F: list[float]
    violation: float
    status: str
    rank: int = UNRANKED
    crowding: float = 0.0
    origin: str = ""
    rung: int = 0  # successive-halving rung of the result in F (0 without multi-fidelity)

    @property
    def feasible(self) -> bool:
        return self.violation <= 0.0


def member_violation(status: str, F: list[float], budget_violation: float = 0.0) -> float:
    failed = status != "ok" or not all(math.isfinite(f) for f in F)
    return budget_violation + (FAILED_VIOLATION if failed else 0.0)


def _objective_matrix(members: list[Member]) -> np.ndarray:
    """Objectives as NSGA-II sees them: F, with every objective of a member `d` rungs below the pool's highest rung
    raised by d * (the pool's range of that objective + 1), so that any higher-rung member dominates it (see the
    module docstring). All members at one rung: F unchanged."""
    F = np.array([[f if math.isfinite(f) else np.inf for f in m.F] for m in members], dtype=float)
    rungs = np.array([m.rung for m in members], dtype=int)
    if len(members) == 0 or rungs.min() == rungs.max():
        return F
    span = np.ones(F.shape[1])
    for j in range(F.shape[1]):
        col = F[np.isfinite(F[:, j]), j]
        if len(col):
            span[j] += col.max() - col.min()
    return F + (rungs.max() - rungs)[:, None] * span[None, :]


def _population(members: list[Member]) -> Population:
    F = _objective_matrix(members)
    G = np.array([[m.violation] for m in members], dtype=float)
    return Population.new(X=np.arange(len(members))[:, None], F=F, G=G)


def _crowded_comparison(pop, P, random_state=None, **kwargs):
    """NSGA-II's binary tournament with constraint domination: smaller violation, then lower rank, then larger
    crowding distance; a random pick on a full tie."""
    winners = np.empty(len(P), dtype=int)
    for i, (a, b) in enumerate(P):
        ka = (pop[a].get("CV")[0], pop[a].get("rank"), -pop[a].get("crowding"))
        kb = (pop[b].get("CV")[0], pop[b].get("rank"), -pop[b].get("crowding"))
        if ka < kb:
            winners[i] = a
        elif kb < ka:
            winners[i] = b
        else:
            winners[i] = a if random_state.random() < 0.5 else b
    return winners


class NSGA2:
    def __init__(
        self,
        problem: ArchitectureProblem,
        pop_size: int,
        sampling: Sampling,
        crossover: Crossover,
        mutation: Mutation,
        repair: Repair,
        budget_repair: BudgetRepair,
        elitism: int = 2,
    ):
        self.problem = problem
        self.pop_size = pop_size
        self.sampling = sampling
        self.crossover = crossover
        self.mutation = mutation
        self.repair = repair
        self.budget_repair = budget_repair
        self.elitism = elitism
        self.selection = TournamentSelection(func_comp=_crowded_comparison, pressure=2)
        self._pm_problem = problem.pymoo_problem()

    # -- proposing candidates ---------------------------------------------------------------------------------
    def _admit(self, genome: Genome, origin: str, parents: tuple, seen: set, out: list, on_reject) -> None:
        """Add a genome unless it is a duplicate; repair it into the budgets or reject it (statically)."""
        h = genome.hash()
        if h in seen:
            return
        seen.add(h)
        check = self.problem.check(genome)
        if not check.feasible:
            repaired = self.budget_repair(genome)
            if repaired is None:
                on_reject(genome, check, origin)
                return
            genome, origin = repaired, origin + " budget-repaired"
            if genome.hash() in seen:
                return
            seen.add(genome.hash())
        out.append(Candidate(genome, origin, parents))

    def initial(self, references, rng: np.random.Generator, on_reject) -> list[Candidate]:
        """Adapted references first (in their fixed order), then random valid genomes up to the population size."""
        out: list[Candidate] = []
        seen: set[str] = set()
        for name, genome, _note in references:
            if genome is not None and len(out) < self.pop_size:
                self._admit(genome, f"reference:{name}", (), seen, out, on_reject)
        attempts = 0
        while len(out) < self.pop_size and attempts < 50 * self.pop_size:
            attempts += 1
            (genome,) = self.sampling.do(self.problem.space, 1, rng)
            self._admit(genome, "random", (), seen, out, on_reject)
        return out

    def offspring(self, population: list[Member], n: int, rng: np.random.Generator, on_reject) -> list[Candidate]:
        """n new, distinct children (none equal to a parent-population member); fewer if the space runs dry."""
        space = self.problem.space
        pop = _population(population)
        self._rank(pop)
        out: list[Candidate] = []
        seen = {m.hash for m in population}
        attempts = 0
        while len(out) < n and attempts < 50 * n:
            attempts += 1
            (a, b), = self.selection.do(self._pm_problem, pop, n_select=1, n_parents=2, to_pop=False,
                                        random_state=rng)
            pa, pb = population[int(a)], population[int(b)]
            for child in self.crossover.do(space, space.encode(pa.genome), space.encode(pb.genome), rng):
                child = self.mutation.do(space, child, rng)
                try:
                    genome = self.repair.do(space, child)
                except (GenomeError, ValueError):
                    continue
                if len(out) < n:
                    self._admit(genome, "offspring", (pa.hash, pb.hash), seen, out, on_reject)
        return out

    # -- survival ----------------------------------------------------------------------------------------------
    def _rank(self, pop: Population) -> None:
        """Pareto rank and crowding distance of every member (infeasible: unranked)."""
        RankAndCrowding().do(self._pm_problem, pop, n_survive=len(pop), random_state=np.random.default_rng(0))
        for ind in pop:
            if ind.get("rank") is None:
                ind.set("rank", UNRANKED)
                ind.set("crowding", 0.0)

    def survive(self, pool: list[Member], n: int, rng: np.random.Generator) -> list[Member]:
        """(mu + lambda) NSGA-II survival with constraint domination, plus explicit elitism: the `elitism` best
        members on the first objective (among those at the highest rung) always survive (crowding truncation could
        otherwise drop them when more than `n` members share the first front)."""
        if not pool:
            return []
        pop = _population(pool)
        chosen = list(RankAndCrowding().do(self._pm_problem, pop, n_survive=min(n, len(pool)),
                                           return_indices=True, random_state=rng))
        feasible = [i for i, m in enumerate(pool) if m.feasible]
        elites = sorted(feasible, key=lambda i: (-pool[i].rung, pool[i].F, pool[i].hash))[: self.elitism]
        for e in elites:
            if e not in chosen:
                for j in range(len(chosen) - 1, -1, -1):
                    if chosen[j] not in elites:
                        chosen[j] = e
                        break
        survivors = [pool[i] for i in chosen]
        ranked = _population(survivors)
        self._rank(ranked)
        for m, ind in zip(survivors, ranked):
            m.rank, m.crowding = int(ind.get("rank")), float(ind.get("crowding"))
        return survivors


# -- hypervolume -------------------------------------------------------------------------------------------------
def hv_bounds(F: np.ndarray) -> tuple[list[float], list[float]]:
    """Normalisation fixed once per run (from generation 0), so hypervolumes compare across generations:
    lower = min(0, best), upper = worst + 10% of the range (a point beyond it adds nothing)."""
    lo = np.minimum(0.0, F.min(axis=0))
    hi = F.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    return lo.tolist(), (hi + 0.1 * span).tolist()


def hypervolume(F: np.ndarray, lo: list[float], hi: list[float]) -> float:
    if len(F) == 0:
        return 0.0
    lo_, hi_ = np.asarray(lo, float), np.asarray(hi, float)
    norm = (np.asarray(F, float) - lo_) / np.where(hi_ - lo_ > 0, hi_ - lo_, 1.0)
    norm = norm[np.all(norm < 1.0, axis=1)]
    if len(norm) == 0:
        return 0.0
    return float(HV(ref_point=np.ones(norm.shape[1])).do(norm))


def non_dominated(F: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of F (minimisation)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if len(F) == 0:
        return np.array([], dtype=int)
    return np.asarray(NonDominatedSorting().do(np.asarray(F, float), only_non_dominated_front=True), dtype=int)


__all__ = ["NSGA2", "Candidate", "Member", "StaticCheck", "hypervolume", "hv_bounds", "non_dominated",
           "member_violation", "FAILED_VIOLATION"]
