"""Probe packs: a self-contained folder of candidates to measure on a board that has no factory and no torch.

    PACK_DIR/
      pack.json        target settings, protocol version, the candidate list
      runner.py        the measuring script (python runner.py . --out results.json)
      README.txt       how to run it
      <id>/            one candidate: manifest.json (only the chosen variant listed) + that variant's graphs
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

from factory.errors import FactoryError
from profiles import runner, store
from profiles.profiler import choose_variant, read_export
from targets import Target, load_target

RUNNER_SOURCE = Path(runner.__file__).resolve()
_ID_LENGTH = 16

README = """Probe pack for target {target} ({count} candidates), measurement protocol {protocol}.

On the device (Python 3.8+, numpy and onnxruntime; no torch, no factory checkout needed):

    python3 runner.py . --out results.json

Options: --threads N / --provider P override the target (recorded, and refused on import unless allowed),
--repeats N, --only ID, --top-ops N, --no-memory. Results are written after every candidate.

Back on the factory machine:

    factory profiles import results.json --target {target}
"""


def candidate_id(genome_hash: str) -> str:
    """A short, file-safe id from the genome hash."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "", genome_hash)
    if not safe:
        raise FactoryError(f"genome_hash {genome_hash!r} has no usable characters for a candidate id")
    return safe[:_ID_LENGTH]


def _copy_candidate(export_dir: Path, manifest: dict, variant: str, dest: Path) -> int:
    """Copy the variant's graphs (and external data) and a manifest listing only that variant; returns bytes."""
    prefill, decode = runner.variant_paths(str(export_dir), manifest, variant)
    total = 0
    for source in (Path(prefill), Path(decode)):
        relative = source.relative_to(export_dir)
        for path in (source, source.with_name(source.name + ".data")):
            if path.is_file():
                target_path = dest / relative.parent / path.name
                target_path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target_path)
                total += path.stat().st_size
    reduced = dict(manifest, variants={variant: manifest["variants"][variant]})
    (dest / "manifest.json").write_text(json.dumps(reduced, indent=2) + "\n", encoding="utf-8")
    return total


def make_pack(
    export_dirs: list[str | Path],
    target: Target | str,
    out_dir: str | Path,
    variant: str | None = None,
    repeats: int = runner.DEFAULT_REPEATS,
    force: bool = False,
) -> dict:
    """Build the pack folder atomically (a temp folder renamed into place); returns the pack.json content."""
    target = load_target(target)
    out = Path(out_dir)
    if not export_dirs:
        raise FactoryError("no export folders given")
    if repeats < 1:
        raise FactoryError(f"repeats must be a positive integer, got {repeats}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise FactoryError(f"{out} already exists; choose another folder or pass --force to replace it")

    chosen = []
    seen: dict[str, Path] = {}
    for export_dir in map(Path, export_dirs):
        manifest = read_export(export_dir)
        name = choose_variant(manifest, target, variant, export_dir)
        genome_hash = manifest.get("genome_hash")
        if not isinstance(genome_hash, str) or not genome_hash:
            raise FactoryError(f"{export_dir}: manifest.json has no genome_hash")
        cid = candidate_id(genome_hash)
        if cid in seen:
            raise FactoryError(f"{export_dir} and {seen[cid]} hold the same genome ({cid}); pack each genome once")
        seen[cid] = export_dir
        chosen.append((export_dir, manifest, name, genome_hash, cid))
        store.archive_genome(manifest)  # board results carry only the hash; keep the genome for the latency model

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a pack is meant to be copied around
    try:
        candidates = []
        for export_dir, manifest, name, genome_hash, cid in chosen:
            try:
                size = _copy_candidate(export_dir, manifest, name, staging / cid)
            except runner.MeasurementError as e:
                raise FactoryError(str(e)) from None
            candidates.append(
                {"id": cid, "genome_hash": genome_hash, "variant": name, "dir": cid, "file_bytes": size,
                 "source": str(export_dir.resolve())}
            )
        created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        pack = {
            "format": runner.PACK_FORMAT,
            "format_version": runner.FORMAT_VERSION,
            "protocol_version": runner.PROTOCOL_VERSION,
            "id": hashlib.sha256(f"{created_at}{socket.gethostname()}{[c['id'] for c in candidates]}".encode()).hexdigest()[:12],
            "created_at": created_at,
            "created_on": socket.gethostname(),
            "target": target.to_dict(),
            "target_fingerprint": target.fingerprint(),
            "settings": {
                "providers": list(target.providers),
                "provider_options": target.session_provider_options(),
                "threads": target.threads,
                "prompt_length": target.prompt_length,
                "decode_context": target.decode_context,
                "repeats": repeats,
            },
            "runner": "runner.py",
            "candidates": candidates,
        }
        shutil.copy2(RUNNER_SOURCE, staging / "runner.py")
        (staging / "README.txt").write_text(
            README.format(target=target.name, count=len(candidates), protocol=runner.PROTOCOL_VERSION), encoding="utf-8"
        )
        (staging / "pack.json").write_text(json.dumps(pack, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return pack
