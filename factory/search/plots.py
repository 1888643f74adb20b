"""Pareto plots (PNG, matplotlib Agg): quality vs decode cache and quality vs parameters.

Every feasible evaluation is a grey dot, the 2-D non-dominated set of each plot is the red staircase, references
(as adapted to the space) are labelled. With successive halving only the results at the highest rung are drawn
(`outputs.comparable_rows`): bpb after different token budgets does not share an axis. Quality is val_bpb when the
run trains on the corpus, 1 - MAD accuracy for a MAD run, otherwise the first objective.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from factory.search.algorithm import non_dominated
from factory.search.config import SearchConfig
from factory.search.outputs import comparable_rows, rows_of_run, row_tokens
from factory.search.store import Store

PLOTS = (("cache_bytes", "decode cache at {ctx} tokens (bytes)", "pareto_quality_cache.png"),
         ("params", "parameters", "pareto_quality_params.png"))


def quality_axis(config: SearchConfig) -> tuple[str, str]:
    for name, label in (("quality", "validation bits per byte"), ("mad", "1 - MAD mean accuracy")):
        if name in config.objectives:
            return name, label
    return config.objectives[0], config.objectives[0]


def write_plots(out: Path, store: Store, config: SearchConfig, references=()) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparable_rows(rows_of_run(store, config))
    q_name, q_label = quality_axis(config)
    written = []
    for metric, x_label, filename in PLOTS:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        if rows:
            x = np.array([float(r["static"][metric]) for r in rows])
            y = np.array([float(r["objectives"][q_name]) for r in rows])
            at = f" at {row_tokens(rows[0], config):,} tokens" if config.fidelity else ""
            ax.scatter(x, y, s=14, c="0.65", label=f"evaluated{at} ({len(rows)})", zorder=1)
            front = non_dominated(np.column_stack([y, x]))
            order = front[np.argsort(x[front])]
            ax.step(x[order], y[order], where="post", c="tab:red", lw=1.2, zorder=2)
            ax.scatter(x[order], y[order], s=26, c="tab:red", label=f"front ({len(order)})", zorder=3)
            for r, xi, yi in zip(rows, x, y):
                if r["origin"].startswith("reference:"):
                    ax.scatter([xi], [yi], s=40, marker="s", facecolors="none", edgecolors="tab:blue", zorder=4)
                    ax.annotate(r["origin"].split(":", 1)[1].split(" ")[0], (xi, yi), fontsize=7,
                                xytext=(4, 4), textcoords="offset points", color="tab:blue")
            positive = x[x > 0]
            if len(positive) == len(x) and positive.max() / positive.min() > 20:
                ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no feasible evaluation yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(x_label.format(ctx=config.context_for_metrics))
        ax.set_ylabel(q_label)
        ax.set_title(f"{q_name} vs {metric} (seed {config.seed})", fontsize=10)
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = Path(out) / filename
        tmp = path.with_name(f".{filename}.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)
        written.append(path)
    return written
