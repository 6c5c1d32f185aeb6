"""The one way outputs are written: to a uniquely named temp file (or folder) in the target's own
folder, fsynced, then renamed into place. A crash or SIGKILL therefore never leaves half a file
under the real name (a file that exists is complete), two writers never share a temp name, and
the rename stays on one filesystem, where it is atomic.

Every writer in the package goes through `atomic_path` (for libraries that want a file name:
pandas, safetensors, faiss, matplotlib, numpy), `write_bytes`/`write_text`, or `atomic_dir` (model
folders). tests/test_atomic.py checks that no other module calls `os.replace` or names a fixed
temp file."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".tmp-"  # every temp name holds it, so leftovers of a killed writer can be recognised
# ... followed by the writer's pid: a later run removes the leftovers of writers that are gone
_WRITER = re.compile(re.escape(TEMP_MARK) + r"(\d+)-")
SKIP_DIRS = {".git", ".dvc", ".venv", ".prefect", "node_modules"}  # not ours to clean


def _mark() -> str:
    return f"{TEMP_MARK}{os.getpid()}-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once at import: os.umask can only be read by setting it


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """The rename itself is only durable once the folder holding it is synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path next to `path`; when the block ends without error, fsync it and
    `os.replace` it onto `path`. On error the temp file is removed and `path` is left as it was.
    The temp name keeps the suffix (savefig and to_parquet pick the format from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{_mark()}", suffix=path.suffix)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; an output gets the mode open() would give it
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:  # a failed write() (disk full) names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp folder next to `path` to fill; when the block ends without error, its
    files are fsynced and it takes `path`'s name. An existing `path` is first renamed aside and only
    deleted after the new folder is in place, so a kill at any moment leaves either the old folder,
    the new one, or the old one under its aside name (never a half-written folder under `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{_mark()}"))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes 0700
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync_file(f)
        aside = None
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old{_mark()}"))
            os.replace(path, aside / path.name)  # a rename, not a delete: the old model survives a kill here
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def leftovers(root: str | os.PathLike) -> list[Path]:
    """Temp files or folders a killed writer left under `root` (the fault benchmark counts them)."""
    return sorted(p for p in Path(root).rglob(f"*{TEMP_MARK}*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clean_leftovers(root: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left under `root`: temp files and folders whose writer (the pid in
    the name) is no longer running on this machine (a name without a pid, from older code, counts as
    gone). A model folder whose replacement was killed between its two renames is put back from its
    aside name. Returns what was removed or restored. Called by every `memcontrol` command at start."""
    done = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        here = Path(folder)
        for name in [*dirs, *files]:
            if TEMP_MARK not in name:
                continue
            m = _WRITER.search(name)
            if m and _alive(int(m.group(1))):
                continue
            p = here / name
            if name in dirs:
                dirs.remove(name)  # never walk into what is being removed
                old = name.split(".old" + TEMP_MARK)[0][1:] if ".old" + TEMP_MARK in name else None
                if old and (p / old).is_dir() and not (here / old).exists():
                    os.replace(p / old, here / old)  # the old model is back under its name
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            done.append(p)
    if done:
        _fsync_dir(Path(root))
    return done
