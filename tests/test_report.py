"""The run report: renders from data, is self-contained, and opens in headless Chromium with every image loaded
and no console errors."""

import os
import shutil

import pytest

from factory.genome.references import reference_genomes
from factory.report import write_report
from factory.report.plots import layer_diagram, pareto_plot


def _report(tmp_path):
    g = reference_genomes()["lfm2-like"].to_dict()
    points = [
        {"kind": "evaluated", "val_bpb": 3.1, "params": 8e5, "cache_bytes": 4e4, "decode_ms": 0.4, "label": "a"},
        {"kind": "front", "val_bpb": 2.9, "params": 7e5, "cache_bytes": 2e4, "decode_ms": 0.3, "label": "b"},
        {"kind": "winner", "val_bpb": 2.85, "params": 7e5, "cache_bytes": 2e4, "decode_ms": 0.3, "label": "evolved"},
        {"kind": "baseline", "val_bpb": 2.9, "params": 9e5, "cache_bytes": 5e5, "decode_ms": 0.5, "label": "transformer++"},
    ]
    figures = {}
    for key, x in (("pareto_cache", "cache_bytes"), ("pareto_params", "params"), ("pareto_latency", "decode_ms")):
        assert pareto_plot(points, x, x, tmp_path / "figures" / f"{key}.png", key)
        figures[key] = f"figures/{key}.png"
    layer_diagram(g, tmp_path / "figures" / "arch.png", "evolved")
    return {
        "title": "test <report> & co",
        "target": {"name": "laptop-cpu", "threads": 4, "objectives": ["quality", "latency"]},
        "search": {"preset": "smoke", "evaluated": 8},
        "verdict": ["TIE: nothing beats the baselines beyond the seed spread."],
        "comparison": [
            {"name": "evolved-1", "role": "winner", "hash": "abc", "val_bpb_mean": 2.85, "val_bpb_std": 0.01,
             "seeds": 2, "params": 700000, "cache_bytes": 20000, "decode_ms_p50": 0.3, "decode_ms_p95": 0.4,
             "size_bytes": {"float32": 2800000, "int8": None}, "onnx_bpb": {"float32": 2.86, "int8": None}},
            {"name": "transformer++", "role": "baseline", "hash": "def", "val_bpb_mean": 2.9, "val_bpb_std": 0.02,
             "seeds": 2, "params": 900000, "cache_bytes": 500000},
        ],
        "figures": figures,
        "winners": [{"name": "evolved-1", "hash": "abc", "genome": g, "diagram": "figures/arch.png"}],
        "motifs": {"front": {"families": {"short_conv": 0.5}}},
        "artifacts": [{"name": "evolved-1", "export_dir": "exports/x", "parity": {"passed": True},
                       "commands": ["factory generate exports/x --prompt 'ROMEO:'"]}],
    }


def test_report_files_are_written_and_self_contained(tmp_path):
    paths = write_report(_report(tmp_path), tmp_path)
    html = paths["html"].read_text()
    md = paths["md"].read_text()
    assert html.count("data:image/png;base64,") == 4
    assert "src=\"figures/" not in html and "http://" not in html and "https://" not in html
    assert "test &lt;report&gt; &amp; co" in html  # escaped
    assert "![Quality vs cache bytes" in md and "| evolved-1 (winner) |" in md


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"), reason="chromium not installed (CI installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "CI must install Debian's chromium"
    paths = write_report(_report(tmp_path), tmp_path)
    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                  "--disable-background-networking"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(paths["html"].as_uri())
        page.wait_for_load_state("load")
        images = page.evaluate("() => Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        tables = page.evaluate("() => document.querySelectorAll('table').length")
        browser.close()
    assert len(images) == 4 and all(done and width > 0 for done, width in images), images
    assert tables >= 3
    assert errors == []
