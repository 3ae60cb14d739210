"""The baseline engine runs of `fxpasses check`, kept and reused: one run per (checkpoint content,
engine settings) answers every check that compares against it.

A baseline run (no pass) depends only on the checkpoint and on what the engine is asked: TP size,
dtype, prompts, generated tokens, model length, KV cache, vLLM compilation settings and the extra
environment the caller gives both engines. `key` digests exactly those; the checkpoint enters by
content (config.json and the weight files' names, sizes and first and last MiB), never by path, so
two checks that each write the same tiny checkpoint into their own work directory share one run.
`load` / `store` keep the engine's result and log under `DIR/<key>/` (`fxpasses check
--baseline-cache DIR`, `check.run_check(baseline_cache=DIR)`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

#: bytes read from each end of a weight file for its digest (a file is digested whole below 2 x this)
EDGE_BYTES = 1 << 20
#: the spec entries that are paths of this run, not settings of the engine
_RUN_ONLY = ("model", "result", "measure")


def checkpoint_digest(model_dir: Path) -> str:
    """A digest of a checkpoint's content: config.json, and per weight file its name, size and first
    and last EDGE_BYTES (a re-written or re-quantised checkpoint changes them)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        if f.suffix not in (".json", ".safetensors", ".bin", ".pt"):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 2 * EDGE_BYTES:
                h.update(fh.read())
            else:
                h.update(fh.read(EDGE_BYTES))
                fh.seek(size - EDGE_BYTES)
                h.update(fh.read(EDGE_BYTES))
    return h.hexdigest()


def key(spec: dict, env: dict[str, str] | None) -> str:
    """The digest a baseline run is stored under: the checkpoint's content and every engine setting
    of `spec` (run_check's engine spec), plus the extra environment of both engines."""
    settings = {k: v for k, v in spec.items() if k not in _RUN_ONLY}
    payload = json.dumps({"checkpoint": checkpoint_digest(Path(spec["model"])), "spec": settings,
                          "env": dict(sorted((env or {}).items()))}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def load(cache_dir: str | Path, k: str) -> tuple[dict, str] | None:
    """(result, engine log text) of the stored run `k`, or None."""
    d = Path(cache_dir) / k
    result, log = d / "result.json", d / "engine.log"
    if not (result.is_file() and log.is_file()):
        return None
    return json.loads(result.read_text()), log.read_text(errors="replace")


def store(cache_dir: str | Path, k: str, result: dict, log_file: Path) -> None:
    """Keep a finished baseline run under `k` (written to a temporary name, then renamed: a reader
    never sees half a run)."""
    d = Path(cache_dir) / k
    tmp = Path(cache_dir) / f".{k}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(log_file, tmp / "engine.log")
    (tmp / "result.json").write_text(json.dumps(result))
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)
