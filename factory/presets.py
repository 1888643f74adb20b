"""The one preset table: named sizes and budgets for `factory search --preset` and `factory run --preset`.

A preset holds the search's settings (depth, width, context, population, generations, tokens per candidate,
sequence length, batch size, validation windows) and what `factory run` does after the search (front members
retrained, final budget multiplier, seeds, profile repetitions). `factory search` uses the search half;
`factory finalize` keeps its own flags (defaults in FINALIZE_DEFAULTS). Both commands mean the same by each name.

`quick` is `factory run`'s main job (the README's ~15 minutes on 2 cores): 6 layers, 65,536 tokens per candidate.
`tiny` is a smaller search (4 layers, 32,768 tokens) for trying a setting out. `star` (STAR's population and generations at the reference genomes' size) and `standard` (the same search at a
longer context and budget, for bigger machines) are kept as they were.

Stored runs do not depend on this table: run.json holds the whole search configuration and job.json the preset's
values as they were when the run started, so changing a preset here never changes a run being resumed.

Standard library only: the CLI reads its help text from here without importing the search machinery.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# SearchConfig's defaults where neither a preset, a target nor a flag says otherwise.
DEFAULTS = dict(
    n_layers=8, d_model=128, context=256, population=16, generations=18, tokens=200_000, seq_len=128,
    batch_size=16, lr=3e-3, seed=0, objectives=("quality", "cache"), executor="local", eval_windows=64,
    rungs=1, eta=3,
)
MAX_DEFAULT_WORKERS = 8  # default workers: one per core, up to this many
# `factory search finalize`'s defaults (a preset's own values apply in `factory run`).
FINALIZE_DEFAULTS = dict(top_k=4, multiplier=4, seeds=2)
DEFAULT_TARGET = "laptop-cpu"  # `factory run` without --target
DEFAULT_RUN_PRESET = "quick"  # `factory run` without --preset


@dataclass(frozen=True)
class Preset:
    about: str  # one line for --help
    n_layers: int
    d_model: int
    context: int
    population: int
    generations: int
    tokens: int  # per candidate during the search
    seq_len: int
    batch_size: int
    eval_windows: int
    top_k: int  # front members retrained in the final stage of `factory run`
    multiplier: int  # final budget = multiplier x search budget
    seeds: int
    profile_repeats: int  # prefill repetitions of the final measurements

    SEARCH_FIELDS = ("n_layers", "d_model", "context", "population", "generations", "tokens", "seq_len",
                     "batch_size", "eval_windows")

    def search_settings(self) -> dict:
        """The SearchConfig keyword arguments this preset sets."""
        return {k: getattr(self, k) for k in self.SEARCH_FIELDS}

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "about"}

    @classmethod
    def from_dict(cls, data: dict, about: str = "") -> "Preset":
        known = {f.name for f in fields(cls)}
        return cls(**{"about": about, **{k: v for k, v in data.items() if k in known}})


PRESETS: dict[str, Preset] = {
    "smoke": Preset(about="~3 min on 2 cores: proves the whole pipeline (tests use it)",
                    n_layers=4, d_model=48, context=128, population=4, generations=2, tokens=8_192, seq_len=64,
                    batch_size=8, eval_windows=8, top_k=1, multiplier=2, seeds=2, profile_repeats=5),
    "tiny": Preset(about="seconds per candidate: for trying the search and for its benchmark",
                   n_layers=4, d_model=64, context=128, population=8, generations=4, tokens=32_768, seq_len=64,
                   batch_size=8, eval_windows=64, top_k=2, multiplier=3, seeds=2, profile_repeats=30),
    "quick": Preset(about="~15 min on 2 cores: the README's main job on the embedded corpus",
                    n_layers=6, d_model=64, context=256, population=8, generations=3, tokens=65_536, seq_len=128,
                    batch_size=16, eval_windows=32, top_k=2, multiplier=3, seeds=2, profile_repeats=30),
    "star": Preset(about="hours on a CPU: STAR's population and generations at the reference genomes' size",
                   n_layers=8, d_model=128, context=256, population=16, generations=18, tokens=1_000_000,
                   seq_len=128, batch_size=16, eval_windows=64, top_k=4, multiplier=4, seeds=2, profile_repeats=30),
    "standard": Preset(about="bigger machines: STAR's population and generations at a longer context",
                       n_layers=8, d_model=128, context=512, population=16, generations=18, tokens=2_000_000,
                       seq_len=256, batch_size=16, eval_windows=64, top_k=8, multiplier=4, seeds=2,
                       profile_repeats=30),
}


def preset_help() -> str:
    """'name (about) | ...' for the --preset help text."""
    return " | ".join(f"{name} ({p.about.split(':')[0]})" for name, p in PRESETS.items())
