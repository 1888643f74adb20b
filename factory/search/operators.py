"""Variation operators on the integer genome vector (pymoo style: each one small and swappable).

- `RandomSampling`: valid random genomes of the space.
- `LayerClassCrossover`: STAR's recombination. Backbone genes are crossed with two cut points at layer boundaries
  (a layer's five genes travel together), and operator-genome class slots are swapped whole, each with
  probability `class_swap_rate`.
- `PerGeneMutation`: each free gene is redrawn (to a different value) with probability `rate`.
- `SpaceRepair`: `SearchSpace.repair`, applied after every variation, so every child is a valid canonical genome.
- `BudgetRepair`: greedy moves (single genes, a layer to another class, two layers tied) that lower the budget
  violation, so an over-budget child can often be pulled inside the budgets before it is rejected. Everything here is static: nothing is trained.

Randomness always comes from the `numpy.random.Generator` passed in, so a caller that derives it from
(seed, generation) replays the same children.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from factory.genome.schema import Genome, GenomeError
from factory.genome.space import SearchSpace


@dataclass(frozen=True)
class VectorLayout:
    """Where each part of the genome lives in the codec's vector."""

    class_blocks: tuple[tuple[int, ...], ...]
    layer_blocks: tuple[tuple[int, ...], ...]
    family_positions: tuple[int, ...]

    @classmethod
    def of(cls, space: SearchSpace) -> "VectorLayout":
        return _layout(space)

    @classmethod
    def build(cls, space: SearchSpace) -> "VectorLayout":
        names = [name for name, _ in space.codec.domains]
        classes = tuple(
            tuple(i for i, n in enumerate(names) if n.startswith(f"classes[{c}].")) for c in range(space.codec.n_classes)
        )
        layers = tuple(
            tuple(i for i, n in enumerate(names) if n.startswith(f"layers[{k}].")) for k in range(space.codec.n_layers)
        )
        return cls(classes, layers, tuple(i for i, n in enumerate(names) if n.endswith(".family")))


@lru_cache(maxsize=8)
def _layout(space: SearchSpace) -> VectorLayout:
    return VectorLayout.build(space)


class Sampling:
    def do(self, space: SearchSpace, n: int, rng: np.random.Generator) -> list[Genome]:
        raise NotImplementedError


class RandomSampling(Sampling):
    def do(self, space, n, rng):
        return [space.sample(int(s)) for s in rng.integers(0, 2**31 - 1, size=n)]


class Crossover:
    def do(self, space: SearchSpace, a: list[int], b: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
        raise NotImplementedError


class LayerClassCrossover(Crossover):
    def __init__(self, class_swap_rate: float = 0.5):
        self.class_swap_rate = class_swap_rate

    def do(self, space, a, b, rng):
        layout = VectorLayout.of(space)
        c1, c2 = list(a), list(b)
        n_layers = len(layout.layer_blocks)
        lo, hi = sorted(int(x) for x in rng.choice(n_layers + 1, size=2, replace=False))
        for k in range(lo, hi):
            for p in layout.layer_blocks[k]:
                c1[p], c2[p] = c2[p], c1[p]
        for block in layout.class_blocks:
            if rng.random() < self.class_swap_rate:
                for p in block:
                    c1[p], c2[p] = c2[p], c1[p]
        return c1, c2


class Mutation:
    def do(self, space: SearchSpace, v: list[int], rng: np.random.Generator) -> list[int]:
        raise NotImplementedError


class PerGeneMutation(Mutation):
    def __init__(self, rate: float = 0.1):
        self.rate = rate

    def do(self, space, v, rng):
        layout = VectorLayout.of(space)
        frozen = space.frozen_positions
        family_domain = space.codec.op_domains["family"]
        allowed_families = [family_domain.index(f) for f in space.families]
        out = list(v)
        for p, ub in enumerate(space.upper_bounds):
            draw = rng.random()  # drawn for every position, so the stream does not depend on the values
            if p in frozen or draw >= self.rate:
                continue
            choices = allowed_families if p in layout.family_positions else range(ub + 1)
            choices = [c for c in choices if c != out[p]]
            if choices:
                out[p] = int(choices[int(rng.integers(len(choices)))])
        return out


class Repair:
    def do(self, space: SearchSpace, v: list[int]) -> Genome:
        raise NotImplementedError


class SpaceRepair(Repair):
    def do(self, space, v):
        return space.repair(v)


class BudgetRepair:
    """Move an over-budget genome inside the budgets by greedy steps, each the move (see `_moves`) that lowers the
    violation most. Deterministic; returns None when it gets stuck or runs out of steps (the caller then rejects
    the genome and draws another)."""

    def __init__(self, problem, max_steps: int = 8):
        self.problem = problem
        self.max_steps = max_steps

    @cached_property
    def _free_positions(self) -> list[int]:
        space = self.problem.space
        return [p for p, ub in enumerate(space.upper_bounds) if p not in space.frozen_positions and ub > 0]

    @cached_property
    def _layer_fields(self) -> list[dict[str, int]]:
        names = [name for name, _ in self.problem.space.codec.domains]
        out = []
        for k in range(self.problem.space.codec.n_layers):
            prefix = f"layers[{k}]."
            out.append({n[len(prefix):]: i for i, n in enumerate(names) if n.startswith(prefix)})
        return out

    def _moves(self, vector: list[int]):
        """Neighbours of a vector: every free gene one index up or down; every layer moved to every class slot;
        every pair of layers of the same class tied together or sharing features (two genes at once, which
        single-gene moves cannot reach because one tied layer alone changes nothing)."""
        space = self.problem.space
        for p in self._free_positions:
            for delta in (-1, 1):
                w = list(vector)
                w[p] = (w[p] + delta) % (space.upper_bounds[p] + 1)
                yield w
        layers = self._layer_fields
        for f in layers:
            for slot in range(space.codec.n_classes):
                if abs(slot - vector[f["op_class"]]) > 1:
                    w = list(vector)
                    w[f["op_class"]] = slot
                    yield w
        share_on = {"share": space.codec.layer_domains["share"].index("tied"),
                    "features": space.codec.layer_domains["features"].index("reuse")}
        for i in range(len(layers)):
            for j in range(i + 1, len(layers)):
                fi, fj = layers[i], layers[j]
                if vector[fi["op_class"]] != vector[fj["op_class"]]:
                    continue
                for strategy, group in (("share", "tie_group"), ("features", "feature_group")):
                    w = list(vector)
                    w[fi[strategy]] = w[fj[strategy]] = share_on[strategy]
                    w[fj[group]] = w[fi[group]]
                    if w != vector:
                        yield w

    def __call__(self, genome: Genome, max_steps: int | None = None) -> Genome | None:
        space, problem = self.problem.space, self.problem
        current = problem.check(genome)
        if current.feasible:
            return genome
        if not problem.budgets.active():
            return genome
        try:
            vector = space.encode(genome)
        except GenomeError:
            return None
        for _ in range(self.max_steps if max_steps is None else max_steps):
            best, best_check = None, current
            for w in self._moves(vector):
                try:
                    g = space.repair(w)
                except GenomeError:
                    continue
                check = problem.check(g)
                if check.violation < best_check.violation:
                    best, best_check = g, check
            if best is None:
                return None
            genome, current, vector = best, best_check, space.encode(best)
            if current.feasible:
                return genome
        return None
