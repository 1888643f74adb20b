"""Where the prefill latency model misses, layer by layer: onnxruntime's profiling trace mapped to layers.

For every genome measured by bench_latency.py (its --out folder: latency.json and exports/), the optimized prefill
graph runs with onnxruntime's profiling on (--runs timed runs after the protocol's warm-up runs, the target's prompt length,
--threads threads); each node's kernel time goes to the layer whose norm precedes it in the exported graph (the
raw graph's `pkg.torch.onnx.name_scopes`: `model.norms.i` starts layer i, `model.final_norm` the head). A layer's
time is its share of the kernel time times the genome's lowest measured prefill p50. Reports:

1. per family, each layer's time predicted from its own features (fixed cost, dispatched operations, FLOPs,
   traffic; non-negative least squares, 5-fold held out over layers): with each distinct attention mask counted in
   the first layer that uses it (how the exported graph runs it) and, beside it, in every layer that uses it;
2. operator types whose time appears in the first of two identical layers of a genome and not in the later one
   (work the graph does once for both);
3. masked attention layers: whether a Where over the mask ran in the layer (more than 1% of its time) agrees with
   "first layer using this mask".

    .venv/bin/python bench/research/latency_layer_profile.py --samples bench/out/latency --threads 1 [--runs 10]

Profiles are cached in <out>/layer_profile.json (a rerun profiles only what is new); the report is
<out>/layer_profile.md (default bench/out/latency-layer-profile/). Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def layer_of_node(raw_graph_path: Path) -> dict[str, int | str]:
    """{node name: layer index or "head"} in graph order, from the exporter's name scopes."""
    import onnx

    current: int | str = "head"
    out: dict[str, int | str] = {}
    for node in onnx.load(str(raw_graph_path), load_external_data=False).graph.node:
        for prop in node.metadata_props:
            if prop.key != "pkg.torch.onnx.name_scopes":
                continue
            for scope in ast.literal_eval(prop.value):
                if scope.startswith("model.norms."):
                    current = int(scope.split(".")[2])
                elif scope.startswith("model.final_norm"):
                    current = "head"
        out[node.name] = current
    return out


def profile_layers(export_dir: Path, threads: int, prompt_length: int, runs: int) -> dict[str, dict[str, float]]:
    """{layer: {operator type: median kernel ms over the runs}} of one prefill."""
    from profiles.runner import PREFILL_WARMUP, _token_ids, create_session, vocab_size

    layers = layer_of_node(export_dir / "prefill.onnx")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    tmp = tempfile.mkdtemp(prefix="factory-layerprof-")
    try:
        session, _ = create_session(str(export_dir / "optimized" / "prefill.onnx"), ["CPUExecutionProvider"], [{}],
                                    threads, os.path.join(tmp, "prefill"))
        feed = {"input_ids": _token_ids(vocab_size(manifest), prompt_length)}
        for _ in range(PREFILL_WARMUP + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[PREFILL_WARMUP:]
    per_run = [defaultdict(lambda: defaultdict(float)) for _ in windows]
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        run = next((k for k, (lo, hi) in enumerate(windows) if lo <= e["ts"] <= hi), None)
        if run is None:
            continue
        node = e["name"][: -len("_kernel_time")]
        # fused nodes keep the first fused node's name before a "/"; nodes onnxruntime adds map nowhere
        layer = layers.get(node, layers.get(node.split("/")[0], "head"))
        per_run[run][str(layer)][e["args"].get("op_name", "?")] += e["dur"] / 1000.0
    keys = {layer for r in per_run for layer in r}
    return {layer: {op: float(np.median([r[layer][op] for r in per_run])) for op in {o for r in per_run for o in r[layer]}}
            for layer in keys}


def held_out(x: np.ndarray, y: np.ndarray, folds: int = 5) -> np.ndarray:
    """Relative errors of a non-negative least-squares fit of y on x, each row predicted without it (k-fold)."""
    from profiles.latency_model import _held_out_errors, _nonneg_weighted_lstsq

    return _held_out_errors(y, folds, 0, lambda train, test: x[test] @ _nonneg_weighted_lstsq(x[train], y[train], 1e-6))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, required=True, help="a bench_latency.py --out folder")
    ap.add_argument("--target", default="laptop-cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("bench/out/latency-layer-profile"))
    args = ap.parse_args()
    if args.runs < 1 or (args.threads is not None and args.threads < 1):
        raise SystemExit("--runs and --threads must be positive integers")
    try:
        samples = json.loads((args.samples / "latency.json").read_text())["samples"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"--samples {args.samples}: no bench_latency.py results there ({e})") from None

    from factory.features import dispatched_ops, layer_family
    from factory.genome.metrics import layer_flops
    from factory.genome.schema import Genome
    from factory.ops import registry
    from targets import load_target

    target = load_target(args.target)
    threads = args.threads or target.threads
    prompt = target.prompt_length
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "layer_profile.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    setting = f"threads={threads}:prompt={prompt}:runs={args.runs}"
    for i, s in enumerate(samples):
        key = f"{s['hash']}:{setting}"
        if key not in cache:
            cache[key] = profile_layers(args.samples / "exports" / s["hash"], threads, prompt, args.runs)
            cache_path.write_text(json.dumps(cache))
        print(f"[{i + 1}/{len(samples)}] {s['hash'][:10]}", flush=True)

    rows, first_vs_later, mask_agree = [], defaultdict(lambda: [0.0, 0.0, 0]), [0, 0]
    for s in samples:
        profile = cache[f"{s['hash']}:{setting}"]
        genome = Genome.from_dict(json.loads((args.samples / "exports" / s["hash"] / "manifest.json").read_text())["genome"])
        total = sum(sum(ops.values()) for ops in profile.values())
        ops_count, flops = dispatched_ops(genome, prompt)["prefill"], layer_flops(genome, prompt)
        seen_masks, seen_specs = set(), {}
        for i in range(genome.n_layers):
            spec, ops = genome.layer_spec(i), profile.get(str(i), {})
            shared = registry.shared_elements(genome.d_model, spec, prompt)
            copies = 2 if spec.get("differential") else 1
            new = {k: v for k, v in shared.items() if k not in seen_masks}
            if shared:
                mask_agree[bool(new) == (ops.get("Where", 0.0) > 0.01 * sum(ops.values()))] += 1
            traffic = registry.traffic_elements(genome.d_model, spec, prompt)
            rows.append({"family": layer_family(genome, i), "ms": sum(ops.values()) / total * s["prefill_p50"],
                         "fixed": copies, "kops": ops_count["layers"][i] / 1000, "gflop": flops[i].prefill * prompt / 1e9,
                         "mb_once": (traffic + sum(new.values())) * 4 / 1e6,
                         "mb_every": (traffic + copies * sum(shared.values())) * 4 / 1e6})
            seen_masks.update(shared)
            if repr(spec) in seen_specs:  # a second identical layer: what did the first run that this one did not?
                first = seen_specs[repr(spec)]
                for op in set(first) | set(ops):
                    entry = first_vs_later[(spec.family, op)]
                    entry[0] += first.get(op, 0.0)
                    entry[1] += ops.get(op, 0.0)
                    entry[2] += 1
            else:
                seen_specs[repr(spec)] = ops

    lines = [f"# Prefill per layer on {target.name} ({threads} threads, prompt {prompt}, {args.runs} profiled runs)", "",
             f"`.venv/bin/python bench/research/latency_layer_profile.py --samples {args.samples} --threads {threads} --runs {args.runs}`",
             "", f"{len(samples)} genomes, {len(rows)} layers.", "",
             "## Each layer's time from its own features (5-fold over layers): within +-10% / mean relative error", "",
             "| family | layers | mean ms | masks counted once (first layer using each) | each layer counts its mask |",
             "|---|---|---|---|---|"]
    report = {"setting": setting, "families": {}, "first_vs_later": [], "mask_where_agreement": mask_agree}
    for family in sorted({r["family"] for r in rows}):
        rs = [r for r in rows if r["family"] == family]
        y = np.array([r["ms"] for r in rs])
        cells = []
        for traffic in ("mb_once", "mb_every"):
            errors = held_out(np.array([[r["fixed"], r["kops"], r["gflop"], r[traffic]] for r in rs]), y)
            cells.append((float(np.mean(errors <= 0.10)), float(errors.mean())))
        report["families"][family] = {"layers": len(rs), "mean_ms": float(y.mean()), "once": cells[0], "every": cells[1]}
        lines.append(f"| {family} | {len(rs)} | {y.mean():.3f} | {cells[0][0]:.0%} / {cells[0][1]:.1%} | "
                     f"{cells[1][0]:.0%} / {cells[1][1]:.1%} |")
    lines += ["", "## Operators the first of two identical layers runs and the later one mostly does not", "",
              "| family | operator | pairs | ms in the first | ms in the later |", "|---|---|---|---|---|"]
    for (family, op), (first, later, pairs) in sorted(first_vs_later.items()):
        if first > 0.3 and later < 0.6 * first:
            report["first_vs_later"].append({"family": family, "op": op, "pairs": pairs, "first_ms": first, "later_ms": later})
            lines.append(f"| {family} | {op} | {pairs} | {first:.2f} | {later:.2f} |")
    lines += ["", f"Masked attention layers where a Where over the mask ran exactly when the layer is the first to use "
                  f"its mask: {mask_agree[1]} of {sum(mask_agree)}."]
    (args.out / "layer_profile_report.json").write_text(json.dumps(report, indent=1))
    (args.out / "layer_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
