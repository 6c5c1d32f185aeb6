"""Reuse of finished work: one mechanism, one key (docs/architecture.md, "Reuse of finished work").

Every expensive result (a fine-tuned and scored arm, its extraction attack, the base model's own
scores, the transfer dataset, a calibrated tile threshold) is a JSON record, written last and
atomically, that holds the `key` it was computed under. A rerun reuses the record when the key it
would compute now is equal, and recomputes otherwise. A key always covers three things:

- code: a digest of the library source the result depends on: the module that computes it and
  every `memcontrol` module it imports, transitively (`code_digest`), so an edit of that code never
  returns a stale result while an edit of, say, the report renderer keeps finished arms;
- params: a digest of the params.yaml sections the result reads (`params_digest`);
- inputs: content digests of the input files and folders (`file_digest`), plus the mask, rows,
  steps, seed and whatever else the caller names.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

from memcontrol.config import Params
from memcontrol.workdir import to_json

PACKAGE = "memcontrol"
# The source tree `code_digest` reads: this package. A module variable so that a test can point it
# at an edited copy of the package.
CODE_ROOT = Path(__file__).resolve().parent

# file_digest results by (path, (name, size, mtime) of every file): each input folder is read once
# per process as long as it is unchanged (the way git and DVC skip unchanged files).
_DIGESTS: dict[tuple, str] = {}


def _module_files(root: Path) -> dict[str, Path]:
    files = {}
    for f in root.rglob("*.py"):
        parts = (PACKAGE, *f.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return files


def _imports(path: Path, files: dict[str, Path]) -> set[str]:
    """The package modules `path` imports, at module or function level (ast, nothing executed)."""
    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {m for m in map(known, names) if m}
    return found


def code_modules(*entries: str) -> list[str]:
    """`entries` and every package module they import, transitively, with their parent packages."""
    files = _module_files(CODE_ROOT)
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        if module not in files:
            raise ValueError(f"code_modules: no module {module!r} under {CODE_ROOT}")
        seen.add(module)
        todo += _imports(files[module], files)
        todo += [p for p in (module.rpartition(".")[0],) if p]  # importing a.b runs a/__init__.py
    return sorted(seen)


def code_digest(*entries: str) -> str:
    """sha256 (16 hex) over the source of `code_modules(*entries)` (module names + bytes)."""
    files = _module_files(CODE_ROOT)
    h = hashlib.sha256()
    for module in code_modules(*entries):
        h.update(module.encode())
        h.update(files[module].read_bytes())
    return h.hexdigest()[:16]


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())


def file_digest(path: Path) -> str:
    """sha256 (16 hex) of a file, or of a folder's files (relative names + bytes)."""
    path = Path(path)
    files = _files(path)
    top = path.parent if path.is_file() else path
    stamp = (str(path.resolve()), tuple((str(f.relative_to(top)), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp in _DIGESTS:
        return _DIGESTS[stamp]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(top)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    _DIGESTS[stamp] = h.hexdigest()[:16]
    return _DIGESTS[stamp]


def params_digest(params: Params, *sections: str) -> str:
    """sha256 (12 hex) of the named top-level params sections."""
    dumped = params.model_dump(mode="json")
    return hashlib.sha256(json.dumps({s: dumped[s] for s in sections}, sort_keys=True).encode()).hexdigest()[:12]


def make_key(code: tuple[str, ...], params: Params, sections: tuple[str, ...], **inputs) -> dict:
    """The key of a result: the digest of the `code` modules (and what they import), the digest of
    the params `sections`, and the named inputs (JSON values; tuples become lists, so a key compares
    equal to its reloaded copy)."""
    key = {"code": code_digest(*code), "params": params_digest(params, *sections), **inputs}
    return json.loads(to_json(key))


def finished(path: Path, key: dict) -> dict | None:
    """The record at `path` if it was written under `key`, else None (missing or stale)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key else None
