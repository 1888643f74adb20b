"""The search loop: start a run, resume it, and keep DIR consistent at every moment.

Determinism: every random choice comes from a generator seeded by (seed, generation, purpose), the population
of each finished generation is in the database and offspring are consumed in the order they were proposed, so a
resumed run proposes exactly the children the uninterrupted run would have, finds the ones already evaluated in
the database and evaluates only the rest.

Successive halving (`SearchConfig.rungs` > 1): a generation's offspring are all trained at rung 0 (the run's token
budget); the best 1/eta of them by val bpb (`factory.fidelity.promote`) train again at rung 1 (tokens * eta), the best
1/eta of those at rung 2, and so on. Each rung's result is its own row (its own train config hash, with its rung
index and tokens), committed as it finishes; promotions are recomputed from the stored rows of the rung below, so a
resumed run promotes exactly the candidates the uninterrupted one did and trains only the rung results not stored.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from factory.errors import FactoryError
from factory.fidelity import promote, promoted_count
from factory.genome.schema import Genome
from factory.search.algorithm import NSGA2, Candidate, Member, hv_bounds, hypervolume, member_violation
from factory.search.config import RUN_FORMAT, SearchConfig
from factory.search.executors import make_executor
from factory.search.latency import board_data, run_measurements
from factory.search.objectives import EvalRecord, evaluation_request
from factory.search.operators import BudgetRepair, LayerClassCrossover, PerGeneMutation, RandomSampling, SpaceRepair
from factory.io import atomic_write, check_out_folder
from factory.search.outputs import (FAILED_STATUSES, comparable_rows, feasible_rows, summary,
                                    write_evaluations_csv, write_hypervolume_csv, write_pareto)
from factory.search.problem import ArchitectureProblem
from factory.search.progress import Progress
from factory.search.seeding import adapted_references, cheapest_probes
from factory.search.store import Store

PURPOSES = {"init": 0, "variation": 1, "survival": 2}


def rng_for(seed: int, generation: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng([seed, generation, PURPOSES[purpose]])


# -- run directory ---------------------------------------------------------------------------------------------------
def read_run(out: Path) -> SearchConfig:
    out = Path(out)
    path = out / "run.json"
    if not out.is_dir():
        raise FactoryError(f"{out}: no such search run directory")
    if not path.is_file():
        raise FactoryError(f"{out} is not a search run (it has no run.json)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FactoryError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != RUN_FORMAT:
        raise FactoryError(f"{path}: not a search run file (format {data.get('format') if isinstance(data, dict) else None!r})")
    return SearchConfig.from_dict(data["config"])


def write_run(out: Path, config: SearchConfig, extra: dict | None = None) -> None:
    data = {"format": RUN_FORMAT, "config": config.to_dict(), "train_config_hash": config.train_config_hash(),
            **(extra or {})}
    atomic_write(out / "run.json", json.dumps(data, indent=2) + "\n")


def space_fingerprint(config: SearchConfig) -> str:
    """Hash of the vector layout (every gene's domain, from the operator registry). Variation works on vectors, so
    a resumed run replays the same children only while this is unchanged."""
    import hashlib

    from factory.search.seeding import build_space

    space = build_space(config)
    blob = json.dumps([[name, [str(v) for v in domain]] for name, domain in space.codec.domains]
                      + [list(space.families)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_new_dir(out: Path) -> None:
    """A new run's folder: new, empty or holding other files (`factory run` writes job.json first), never a run."""
    check_out_folder(out, "a search run", ("run.json", "search.db"), others="allow", resume=f"--resume {out}")


def ladder_sizes(n: int, eta: int, rungs: int) -> list[int]:
    """How many of n offspring train at each rung when no result fails (`factory.fidelity.promoted_count`)."""
    sizes = [n]
    for _ in range(rungs - 1):
        sizes.append(promoted_count(sizes[-1], eta))
    return sizes


class DirLock:
    """One process per run directory (an advisory lock the kernel releases when the process dies, even kill -9)."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self.fd = None

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FactoryError(f"{self.path.parent} is in use by another search process") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


# -- the run -----------------------------------------------------------------------------------------------------
def build_algorithm(config: SearchConfig, problem: ArchitectureProblem) -> NSGA2:
    return NSGA2(
        problem,
        pop_size=config.population,
        sampling=RandomSampling(),
        crossover=LayerClassCrossover(config.class_swap_rate),
        mutation=PerGeneMutation(config.mutation_rate),
        repair=SpaceRepair(),
        budget_repair=BudgetRepair(problem),
        elitism=config.elitism,
    )


def check_budgets(config: SearchConfig, problem: ArchitectureProblem | None = None) -> None:
    """Fail early (one line) when no genome of the space can meet the budgets."""
    problem = problem or ArchitectureProblem.from_config(config)
    if not config.budgets.active():
        return
    probes = [g for _, g, _ in adapted_references(problem.space) if g is not None] + cheapest_probes(problem.space)
    rng = rng_for(config.seed, 0, "init")
    probes += RandomSampling().do(problem.space, 32, rng)
    problem.check_achievable(probes, BudgetRepair(problem))


class SearchRun:
    def __init__(self, out: Path, config: SearchConfig, progress: Progress | None = None, board: dict | None = None):
        self.out = Path(out)
        self.config = config
        self.progress = progress or Progress()
        # the run's measurement store: its own measurements in DIR, and the board data run.json records (`board`)
        self.board = board
        self.problem = ArchitectureProblem.from_config(config, run_measurements(config, self.out, board))
        self.algorithm = build_algorithm(config, self.problem)
        self.budgets = config.rung_budgets()  # training tokens per rung (one rung without multi-fidelity)
        self.tchs = config.rung_hashes()  # train config hash per rung; rung 0's is config.train_config_hash()
        self.store = Store(self.out / "search.db")
        self.executor = None
        self.stages = self.problem.stages
        self.references = adapted_references(self.problem.space)

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _counts(self, rows: list[dict]) -> dict:
        return {
            "done": sum(1 for r in rows if r["status"] != "rejected"),
            "failed": sum(1 for r in rows if r["status"] in FAILED_STATUSES),
            "rejected": sum(1 for r in rows if r["status"] == "rejected"),
        }

    def _best(self, rows: list[dict]) -> dict:
        ok = comparable_rows(rows)
        return {o: min((r["objectives"][o] for r in ok), default=math.nan) for o in self.config.objectives}

    def _report(self, generation: int, note: str = "") -> None:
        gens = self.store.generations()
        hv = gens[-1]["hypervolume"] if gens else math.nan
        rows = self.store.evaluations(self.tchs)
        self.progress.update(generation=generation, best=self._best(rows), hypervolume=hv, note=note,
                             **self._counts(rows))

    def _row_kwargs(self, genome: Genome, candidate: Candidate, generation: int, rung: int = 0) -> dict:
        return dict(hash=candidate.hash, train_config_hash=self.tchs[rung], generation=generation, rung=rung,
                    tokens=self.budgets[rung], origin=candidate.origin, name=genome.name, genome=genome.to_dict(),
                    seed=self.config.seed)

    def _on_reject(self, generation: int):
        def record(genome: Genome, check, origin: str) -> None:
            if self.store.find(genome.hash(), self.tchs[0]) is None:
                self.store.add_evaluation(
                    **self._row_kwargs(genome, Candidate(genome, origin), generation),
                    status="rejected", reason=f"over budget: {check.reason}", objectives={},
                    violation=check.violation, static=check.static, measurements={}, wall_s=0.0, timings={})
        return record

    def _commit(self, candidate: Candidate, generation: int, result: dict, rung: int = 0) -> None:
        genome = candidate.genome
        static = self.problem.static(genome)
        record = EvalRecord(candidate.hash, result["status"], result["reason"], static, result["measurements"])
        F = self.problem.objective_values(genome, record)
        status, reason = result["status"], result["reason"]
        if status == "ok" and not all(math.isfinite(f) for f in F):
            bad = [o for o, f in zip(self.config.objectives, F) if not math.isfinite(f)]
            status, reason = "error", f"objective {bad[0]} is not finite"
        budget_violation = self.problem.check(genome).violation  # 0: it was admitted within the budgets
        self.store.add_evaluation(
            **self._row_kwargs(genome, candidate, generation, rung), status=status, reason=reason,
            objectives=dict(zip(self.config.objectives, F)), violation=member_violation(status, F, budget_violation),
            static=static, measurements=result["measurements"], wall_s=result.get("wall_s", 0.0),
            timings=result.get("timings", {}))

    def _member(self, row: dict, rank: int | None = None, crowding: float | None = None) -> Member:
        m = Member(hash=row["hash"], genome=Genome.from_dict(row["genome"]),
                   F=[float(row["objectives"].get(o, math.inf)) for o in self.config.objectives],
                   violation=float(row["violation"]), status=row["status"], origin=row["origin"], rung=row["rung"])
        if rank is not None:
            m.rank, m.crowding = rank, (math.inf if crowding is None else crowding)
        return m

    # -- evaluation ----------------------------------------------------------------------------------------------
    def _reached(self, genome_hash: str) -> dict:
        """A genome's stored result at the highest rung it reached."""
        return self.store.find_highest(genome_hash, self.tchs)

    def _evaluate(self, generation: int, candidates: list[Candidate]) -> list[Member]:
        self.store.save_offspring(generation, candidates)
        pool = list(candidates)
        for rung in range(len(self.budgets)):
            if rung > 0:
                pool = self._promoted(pool, rung - 1)
            self._evaluate_rung(generation, pool, rung)
        return [self._member(self._reached(c.hash)) for c in candidates]

    def _promoted(self, pool: list[Candidate], rung: int) -> list[Candidate]:
        """The candidates of `pool` that advance past `rung`: the best 1/eta (at least one) of the pool by val bpb
        at that rung. Failed results rank last and never advance. Decided from stored rows only, so a resumed run
        promotes the same candidates; they keep their proposal order."""
        def score(row: dict) -> float:
            return row["objectives"]["quality"] if row["status"] == "ok" and row["violation"] <= 0 else math.inf

        scores = {c.hash: score(self.store.find(c.hash, self.tchs[rung])) for c in pool}
        winners = set(promote(list(scores.items()), eta=self.config.eta))
        return [c for c in pool if c.hash in winners and math.isfinite(scores[c.hash])]

    def _evaluate_rung(self, generation: int, candidates: list[Candidate], rung: int) -> None:
        """Evaluate at `rung`'s budget the candidates with no stored result there, committing each as it finishes."""
        todo: list[tuple[int, dict]] = []
        for i, c in enumerate(candidates):
            if self.store.find(c.hash, self.tchs[rung]) is None:
                todo.append((i, evaluation_request(self.config, c.hash, c.genome.to_dict(), self.stages,
                                                   tokens=self.budgets[rung], workdir=str(self.out / "work"),
                                                   measurements={"folder": str(self.out), "board": self.board})))
        if todo and not self.stages:  # static objectives only: nothing to run in a worker
            for i, _ in todo:
                self._commit(candidates[i], generation,
                             {"status": "ok", "reason": "", "measurements": {}, "timings": {}, "wall_s": 0.0}, rung)
        elif todo:
            if self.executor is None:
                c = self.config
                self.executor = make_executor(c.executor, c.evaluator, c.workers, c.ray_address)

            def on_result(k: int, result: dict) -> None:
                self._commit(candidates[todo[k][0]], generation, result, rung)  # committed before the next one
                self._report(generation)

            self.executor.map([request for _, request in todo], on_result)

    def _finish_generation(self, generation: int, survivors: list[Member]) -> None:
        rows = self.store.evaluations(self.tchs)
        bounds = self.store.get_meta("hv_bounds")
        ok = feasible_rows(rows)
        if bounds is None and ok:  # from every feasible result of generation 0, all rungs: the widest spread
            F0 = np.array([[r["objectives"][o] for o in self.config.objectives] for r in ok], float)
            bounds = hv_bounds(F0)
            self.store.set_meta("hv_bounds", bounds)
        ok = comparable_rows(rows)  # the hypervolume of the front: like with like, at the highest rung
        F = np.array([[r["objectives"][o] for o in self.config.objectives] for r in ok], float)
        hv = hypervolume(F, *bounds) if bounds else 0.0
        offspring = {r["hash"] for r in self.store.offspring(generation)}
        first_seen = {}
        for r in rows:
            first_seen.setdefault(r["hash"], r)
        this_gen = [r for r in rows if r["generation"] == generation]
        counters = {
            "evaluated": sum(1 for r in this_gen if r["status"] != "rejected"),
            "reused": sum(1 for h in offspring if h in first_seen and first_seen[h]["generation"] < generation),
            "failed": sum(1 for r in this_gen if r["status"] in FAILED_STATUSES),
            "rejected": sum(1 for r in this_gen if r["status"] == "rejected"),
        }
        self.store.save_generation(generation, survivors, hv, counters, self._best(rows))
        self.write_outputs(final=False)

    def write_outputs(self, final: bool = True) -> dict:
        write_evaluations_csv(self.out, self.store, self.config)
        write_hypervolume_csv(self.out, self.store)
        data = write_pareto(self.out, self.store, self.config)
        if final:
            from factory.search.analysis import write_motifs
            from factory.search.plots import write_plots

            write_plots(self.out, self.store, self.config, self.references)
            write_motifs(self.out, self.store, self.config)
        return data

    def run(self) -> dict:
        c = self.config
        last = self.store.last_generation()
        per_generation = sum(ladder_sizes(c.population, c.eta, c.rungs))  # trainings a full generation takes
        done_before = len(self.store.offspring()) * per_generation // c.population if last is not None else 0
        self.progress.start(total=per_generation * c.generations, done=done_before)
        try:
            if last is None:
                self._report(0, "initial population")
                self.progress.log(self._reference_note())
                candidates = self.algorithm.initial(self.references, rng_for(c.seed, 0, "init"), self._on_reject(0))
                if len(candidates) < 2:
                    raise FactoryError("could not find 2 distinct genomes within the budgets in this search space")
                members = self._evaluate(0, candidates)
                survivors = self.algorithm.survive(members, c.population, rng_for(c.seed, 0, "survival"))
                self._finish_generation(0, survivors)
                self._log_generation(0)
                last = 0
            for g in range(last + 1, c.generations):
                rows = self.store.population(g - 1)
                population = [self._member(self._reached(r["hash"]), r["rank"], r["crowding"]) for r in rows]
                self.problem.refresh()
                candidates = self.algorithm.offspring(population, c.population, rng_for(c.seed, g, "variation"),
                                                      self._on_reject(g))
                members = self._evaluate(g, candidates)
                survivors = self.algorithm.survive(population + members, c.population,
                                                   rng_for(c.seed, g, "survival"))
                self._finish_generation(g, survivors)
                self._log_generation(g)
            self.store.set_meta("complete", True)
            self.write_outputs(final=True)
        finally:
            self.progress.stop()
            if self.executor is not None:
                self.executor.close()
        return summary(self.store, c)

    def _reference_note(self) -> str:
        used = [f"{n} ({note})" for n, g, note in self.references if g is not None]
        left: dict[str, list[str]] = {}
        for n, g, note in self.references:
            if g is None:
                left.setdefault(note, []).append(n)
        text = "references adapted to the space: " + (", ".join(used) if used else "none")
        return text + "".join(f"; left out ({why}): {', '.join(names)}" for why, names in left.items())

    def _log_generation(self, g: int) -> None:
        gen = self.store.generations()[-1]
        values = {o: gen["best"].get(o) for o in self.config.objectives}
        best = " ".join(f"{k}={v:.4g}" for k, v in values.items() if v is not None and math.isfinite(v))
        self.progress.log(
            f"generation {g + 1}/{self.config.generations}: {gen['evaluated']} evaluated, {gen['reused']} reused, "
            f"{gen['failed']} failed, {gen['rejected']} rejected | best {best or '-'} | HV {gen['hypervolume']:.4f}")
        self._report(g)

    def close(self) -> None:
        self.store.close()


def start_search(config: SearchConfig, out: Path, progress: Progress | None = None) -> dict:
    """Validate, check the budgets, create DIR (run.json + search.db) and run to the end."""
    from factory.search.evaluate import load_corpus_cached

    config = config.validate()
    problem = ArchitectureProblem.from_config(config)  # unknown objective / family / width: fail before any file
    problem.preflight()  # e.g. a latency objective that can be neither measured nor predicted here
    corpus = load_corpus_cached(config.corpus)
    if len(corpus.val) <= config.seq_len + 1:
        raise FactoryError(f"corpus {corpus.name}: validation split too short for --seq-len {config.seq_len}")
    config = replace(config, corpus_sha256=corpus.sha256)
    check_budgets(config, problem)
    board = board_data(config) if "profile" in problem.stages else None
    out = Path(out)
    prepare_new_dir(out)
    with DirLock(out):
        write_run(out, config, {"created_at": time.time(), "space_fingerprint": space_fingerprint(config),
                                **({"board_data": board} if board is not None else {})})
        run = SearchRun(out, config, progress, board)
        try:
            return run.run()
        finally:
            run.close()


def resume_search(out: Path, progress: Progress | None = None, **execution) -> dict:
    """Continue a run from its database; `execution` may change workers / executor / ray_address / generations."""
    out = Path(out)
    config = read_run(out)
    with DirLock(out):
        changed = config.with_execution(**execution).validate()
        if changed.generations < config.generations:
            raise FactoryError(f"--generations {changed.generations}: a run cannot shrink "
                               f"(it was started with {config.generations})")
        written = json.loads((out / "run.json").read_text())
        stored = written.get("space_fingerprint")
        now = space_fingerprint(changed)
        if stored and stored != now and progress is not None:
            progress.log("warning: the operator registry changed since this run started (gene domains differ): "
                         "completed evaluations are reused, but later generations will not replay the original run")
        board = written.get("board_data")
        # a run started before runs recorded their board data records what it uses from now on
        recording = board is None and "profile" in ArchitectureProblem.from_config(changed).stages
        if recording:
            board = board_data(changed)
        if changed != config or recording:
            write_run(out, changed, {"resumed_at": time.time(), "space_fingerprint": stored or now,
                                     **({"board_data": board} if board is not None else {})})
        run = SearchRun(out, changed, progress, board)
        try:
            return run.run()
        finally:
            run.close()
