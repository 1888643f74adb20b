"""Render a run's report: `report.md` (figures linked) and `report.html` (self-contained: figures embedded as data
URIs, inline CSS, no scripts or network resources). Both come from one JSON-able dict, also kept as report.json.

Sections: the target and its budgets; what was searched and for how long; Pareto plots with the baselines
marked; the comparison table (winners and baselines, float32 and int8); each winner's layer diagram; the motif
analysis; the exported artifacts with their parity figures and the exact commands to run them.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from factory.io import atomic_write

FIGURE_TITLES = {
    "pareto_cache": "Quality vs cache bytes at the target context",
    "pareto_params": "Quality vs parameters",
    "pareto_latency": "Quality vs measured decode latency (onnxruntime, p50)",
}


def _fmt(value, kind: str = "") -> str:
    if value is None:
        return "n/a"
    if kind == "bytes":
        v = float(value)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if v < 1024 or unit == "GiB":
                return f"{v:,.1f} {unit}" if unit != "B" else f"{int(v)} B"
            v /= 1024
    if kind == "int":
        return f"{int(value):,}"
    if kind == "ms":
        return f"{float(value):.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bpb(row: dict) -> str:
    mean, std = row.get("val_bpb_mean"), row.get("val_bpb_std")
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


COLUMNS = [
    ("model", lambda r: f"{r['name']} ({r['role']})"),
    ("val bpb (mean ± sd, n seeds)", lambda r: f"{_bpb(r)} (n={r.get('seeds', 1)})"),
    ("params", lambda r: _fmt(r.get("params"), "int")),
    ("cache @ ctx", lambda r: _fmt(r.get("cache_bytes"), "bytes")),
    ("prefill p50 ms", lambda r: _fmt(r.get("prefill_ms_p50"), "ms")),
    ("decode p50 / p95 ms", lambda r: f"{_fmt(r.get('decode_ms_p50'), 'ms')} / {_fmt(r.get('decode_ms_p95'), 'ms')}"),
    ("peak RSS MB", lambda r: _fmt(r.get("peak_rss_mb"))),
    ("size fp32 / int8", lambda r: f"{_fmt((r.get('size_bytes') or {}).get('float32'), 'bytes')} / "
                                   f"{_fmt((r.get('size_bytes') or {}).get('int8'), 'bytes')}"),
    ("ORT bpb fp32 / int8", lambda r: f"{_fmt((r.get('onnx_bpb') or {}).get('float32'))} / "
                                      f"{_fmt((r.get('onnx_bpb') or {}).get('int8'))}"),
]


def _target_rows(target: dict) -> list[tuple[str, str]]:
    keys = ["name", "description", "device_class", "providers", "threads", "memory_limit_bytes", "prompt_length",
            "decode_context", "prefill_ms", "decode_ms_p95", "precision", "quantization", "isa", "objectives",
            "constraints"]
    return [(k, json.dumps(target[k]) if isinstance(target.get(k), (list, dict)) else _fmt(target.get(k))) for k in keys if k in target]


def _search_rows(search: dict) -> list[tuple[str, str]]:
    return [(k, json.dumps(v) if isinstance(v, (list, dict)) else _fmt(v)) for k, v in search.items() if k != "hypervolume"]


# -- markdown -----------------------------------------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_markdown(report: dict) -> str:
    parts = [f"# {report['title']}", "", f"Generated {report.get('generated_at', '')}.", ""]
    parts += ["## Target and budgets", "", _md_table(["setting", "value"], [list(r) for r in _target_rows(report["target"])]), ""]
    parts += ["## What was searched", "", _md_table(["", ""], [list(r) for r in _search_rows(report["search"])]), ""]
    parts += ["## Verdict", ""] + [f"- {line}" for line in report.get("verdict", [])] + [""]
    parts += ["## Comparison", "", _md_table([c[0] for c in COLUMNS], [[f(r) for _, f in COLUMNS] for r in report["comparison"]]), ""]
    parts += ["## Pareto plots", ""]
    for key, rel in report.get("figures", {}).items():
        parts += [f"![{FIGURE_TITLES.get(key, key)}]({rel})", ""]
    parts += ["## Winning architectures", ""]
    for w in report.get("winners", []):
        parts += [f"### {w['name']} (`{w['hash']}`)", "", f"![layers of {w['name']}]({w['diagram']})", "",
                  "```json", json.dumps(w["genome"], indent=1), "```", ""]
    parts += ["## Motif analysis", "", "```json", json.dumps(report.get("motifs", {}), indent=1), "```", ""]
    parts += ["## Exported artifacts", ""]
    for a in report.get("artifacts", []):
        parts += [f"### {a['name']}", "", f"Folder: `{a['export_dir']}`  ", f"Parity: `{json.dumps(a.get('parity', {}))}`", "", "```bash"]
        parts += a.get("commands", []) + ["```", ""]
    return "\n".join(parts)


# -- html ---------------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.86rem}
th,td{border:1px solid #ddd;padding:.3rem .55rem;text-align:left;vertical-align:top}
th{background:#f4f4f4} tr.baseline td{background:#fff6f6} tr.winner td{background:#f4fff4}
img{max-width:100%;border:1px solid #eee;margin:.3rem 0}
pre{background:#f7f7f7;padding:.6rem;overflow:auto;font-size:.8rem}
.verdict li{margin:.2rem 0} .figs{display:flex;flex-wrap:wrap;gap:1rem} .figs figure{margin:0;flex:1 1 480px}
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: dict, root: Path) -> str:
    e = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(report['title'])}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(report['title'])}</h1>",
           f"<p>Generated {e(report.get('generated_at', ''))}.</p>"]
    out += ["<h2>Target and budgets</h2>", _html_table(["setting", "value"], [list(r) for r in _target_rows(report["target"])])]
    out += ["<h2>What was searched</h2>", _html_table(["", ""], [list(r) for r in _search_rows(report["search"])])]
    out += ["<h2>Verdict</h2><ul class='verdict'>"] + [f"<li>{e(v)}</li>" for v in report.get("verdict", [])] + ["</ul>"]
    rows = report["comparison"]
    out += ["<h2>Comparison</h2>",
            _html_table([c[0] for c in COLUMNS], [[f(r) for _, f in COLUMNS] for r in rows], [r["role"] for r in rows])]
    out += ["<h2>Pareto plots</h2><div class='figs'>"]
    for key, rel in report.get("figures", {}).items():
        title = FIGURE_TITLES.get(key, key)
        out.append(f"<figure>{_img(root / rel, title)}<figcaption>{e(title)}</figcaption></figure>")
    out += ["</div><h2>Winning architectures</h2>"]
    for w in report.get("winners", []):
        out += [f"<h3>{e(w['name'])} <code>{e(w['hash'])}</code></h3>", _img(root / w["diagram"], f"layers of {w['name']}"),
                f"<details><summary>genome JSON</summary><pre>{e(json.dumps(w['genome'], indent=1))}</pre></details>"]
    out += ["<h2>Motif analysis</h2>", f"<pre>{e(json.dumps(report.get('motifs', {}), indent=1))}</pre>"]
    out += ["<h2>Exported artifacts</h2>"]
    for a in report.get("artifacts", []):
        out += [f"<h3>{e(a['name'])}</h3><p>Folder: <code>{e(a['export_dir'])}</code><br>Parity: "
                f"<code>{e(json.dumps(a.get('parity', {})))}</code></p>",
                f"<pre>{e(chr(10).join(a.get('commands', [])))}</pre>"]
    out.append("</body></html>")
    return "\n".join(out)


def write_report(report: dict, root: Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html under root (figure paths in `report` are relative to root)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {"json": root / "report.json", "md": root / "report.md", "html": root / "report.html"}
    atomic_write(paths["json"], json.dumps(report, indent=2, default=str))
    atomic_write(paths["md"], render_markdown(report))
    atomic_write(paths["html"], render_html(report, root))
    return paths
