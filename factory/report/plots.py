"""Figures for the report: Pareto scatter plots with baselines marked, and layer diagrams of architectures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

FAMILY_COLORS = {
    "attention": "#d62728",
    "linear_attention": "#ff7f0e",
    "rwkv": "#8c564b",
    "mamba": "#9467bd",
    "short_conv": "#2ca02c",
    "long_conv": "#17becf",
    "glu": "#7f7f7f",
    "latent_cross": "#e377c2",
}


def pareto_plot(points: list[dict], x_key: str, x_label: str, path: Path, title: str, log_x: bool = True) -> Path | None:
    """points: dicts with x_key, "val_bpb", "kind" (evaluated | front | winner | baseline) and "label".

    Returns None when no point has both coordinates (e.g. no latency was measured).
    """
    usable = [p for p in points if p.get(x_key) is not None and p.get("val_bpb") is not None]
    if not usable:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    styles = {
        "evaluated": dict(c="#bbbbbb", s=14, marker="o", label="evaluated"),
        "front": dict(c="#1f77b4", s=30, marker="o", label="Pareto front"),
        "winner": dict(c="#2ca02c", s=80, marker="*", label="winner (retrained)"),
        "baseline": dict(c="#d62728", s=60, marker="s", label="baseline (retrained)"),
    }
    for kind, style in styles.items():
        pts = [p for p in usable if p.get("kind") == kind]
        if pts:
            ax.scatter([p[x_key] for p in pts], [p["val_bpb"] for p in pts], zorder=3 if kind != "evaluated" else 2, **style)
            if kind in ("winner", "baseline"):
                for p in pts:
                    ax.annotate(p.get("label", ""), (p[x_key], p["val_bpb"]), fontsize=7, xytext=(4, 4),
                                textcoords="offset points")
    if log_x and min(p[x_key] for p in usable) > 0:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _form(spec: dict) -> str:
    """The family, or the name of its form where forms differ in kind (the convolution's short_conv, long_conv)."""
    from factory.ops import registry
    from factory.ops.base import OpSpec

    try:
        return registry.form(OpSpec.from_dict(spec))
    except ValueError:  # a family this version does not know: its name as written
        return spec["family"]


def layer_diagram(genome: dict, path: Path, title: str = "") -> Path:
    """One box per layer coloured by operator family; arcs for tied weights (above) and shared features (below)."""
    layers = genome["layers"]
    classes = genome["classes"]
    latents = genome["global"].get("latents", 0)
    n = len(layers)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * n + 1.0), 2.2), dpi=110)
    for i, g in enumerate(layers):
        spec = classes[g["op_class"]]
        family = "latent_cross" if latents and i == 0 else _form(spec)
        ax.add_patch(Rectangle((i, 0), 0.8, 1, color=FAMILY_COLORS.get(family, "#cccccc"), alpha=0.85))
        label = family.replace("_", "\n")
        extras = []
        if spec.get("differential"):
            extras.append("diff")
        if spec.get("shortcut"):
            extras.append("+sc")
        if family == "attention" and spec.get("kv_repeat", 1) > 1:
            extras.append(f"gqa{spec['kv_repeat']}")
        if family == "attention" and spec.get("window"):
            extras.append(f"w{spec['window']}")
        ax.text(i + 0.4, 0.5, label + ("\n" + " ".join(extras) if extras else ""), ha="center", va="center",
                fontsize=6.5, color="white")
    _arcs(ax, layers, "share", "tied", "tie_group", above=True, color="#333333")
    _arcs(ax, layers, "features", "reuse", "feature_group", above=False, color="#1f77b4")
    ax.set_xlim(-0.2, n)
    ax.set_ylim(-0.9, 1.9)
    ax.axis("off")
    ax.set_title(title + ("  (arcs: tied weights above, shared K/V below)" if title else ""), fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _arcs(ax, layers, strategy, active, group, above: bool, color: str) -> None:
    first: dict[tuple, int] = {}
    for i, g in enumerate(layers):
        if g.get(strategy) != active:
            continue
        key = (g["op_class"], g.get(group, 0))
        if key in first:
            j = first[key]
            y = 1.0 if above else 0.0
            arc = FancyArrowPatch((j + 0.4, y), (i + 0.4, y), connectionstyle=f"arc3,rad={-0.4 if above else 0.4}",
                                  arrowstyle="-|>", mutation_scale=8, color=color, lw=1)
            ax.add_patch(arc)
        else:
            first[key] = i
