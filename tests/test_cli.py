"""The `factory` CLI contract: --json prints exactly one JSON object; bad input is one line on stderr, exit 2."""

import json
import subprocess
import sys

import pytest

from factory.genome.references import reference_genomes


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "factory", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def one_json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # fails if stdout holds anything but one JSON document


def test_genome_list_json():
    data = one_json(run("genome", "list", "--json"))
    names = [g["name"] for g in data["genomes"]]
    assert names == list(reference_genomes())
    assert {"transformer++", "striped-hybrid", "lfm2-like", "perceiver-ar", "pangu-pi"} <= set(names)


def test_genome_show_json_keys_and_context_scaling():
    a = one_json(run("genome", "show", "transformer++", "--json", "--seq-len", "512"))
    b = one_json(run("genome", "show", "transformer++", "--json", "--seq-len", "1024", "--dtype", "float16"))
    for key in ("name", "hash", "d_model", "n_layers", "params", "cache_bytes", "flops_per_token"):
        assert key in a
    assert a["cache_bytes"] == b["cache_bytes"]  # twice the tokens, half the bytes per element
    assert a["params"] == b["params"]


def test_genome_random_is_seeded_and_validates(tmp_path):
    a = one_json(run("genome", "random", "--seed", "4", "--json"))
    b = one_json(run("genome", "random", "--seed", "4", "--json"))
    assert a["hash"] == b["hash"]
    path = tmp_path / "g.json"
    path.write_text(json.dumps(a["genome"]))
    ok = run("genome", "validate", str(path))
    assert ok.returncode == 0 and ok.stdout.startswith("ok")


def test_train_and_generate_round_trip(tmp_path):
    out = tmp_path / "ck"
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("to be or not to be, that is the question. " * 400)
    res = one_json(run("train", "lfm2-like", "--corpus", str(corpus), "--tokens", "4096", "--seq-len", "32",
                       "--batch-size", "4", "--out", str(out), "--json"))
    for key in ("val_loss", "val_bpb", "tokens", "wall_s", "status"):
        assert key in res
    assert res["status"] == "ok" and res["tokens"] == 4096
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "genome.json", "metrics.json"}
    gen = one_json(run("generate", str(out), "--prompt", "to be", "--max-new", "10", "--json"))
    assert gen["engine"] == "torch" and len(gen["text"]) > 0


def _bad_genome(tmp_path):
    d = json.loads(reference_genomes()["transformer++"].to_json())
    d["classes"][0]["heads"] = 3
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize(
    "args, needle",
    [
        (["genome", "show", "no-such-genome"], "unknown genome"),
        (["genome", "show", "transformer++", "--dtype", "int3"], "--dtype"),
        (["genome", "show", "transformer++", "--seq-len", "0"], "--seq-len"),
        (["genome", "validate", "{bad}"], "classes[0].heads"),
        (["genome", "validate", "{malformed}"], "not valid JSON"),
        (["train", "transformer++", "--corpus", "/no/such/corpus.txt", "--out", "{tmp}/o"], "corpus not found"),
        (["train", "transformer++", "--tokens", "-5", "--out", "{tmp}/o"], "--tokens"),
        (["train", "transformer++", "--seq-len", "100000", "--out", "{tmp}/o"], "context"),
        (["train", "{bad}", "--out", "{tmp}/o"], "classes[0].heads"),
        (["generate", "{tmp}/nothing", "--prompt", "x"], "not found"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, args, needle):
    malformed = tmp_path / "malformed.json"
    malformed.write_text("{oops")
    subst = {"{bad}": str(_bad_genome(tmp_path)), "{malformed}": str(malformed), "{tmp}": str(tmp_path)}
    resolved = []
    for a in args:
        for k, v in subst.items():
            a = a.replace(k, v)
        resolved.append(a)
    proc = run(*resolved)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
