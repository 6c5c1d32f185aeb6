"""Issue 12 item 6: one atomic write helper (memcontrol/atomic.py) that every output goes through: a
unique temp name in the target's folder, fsync, os.replace; model folders renamed into place with the
old one moved aside, never deleted first. Killed, failed and disk-full writes leave the old file."""

from __future__ import annotations

import ast
import os
import re
import resource
import signal
from pathlib import Path

import pytest

from memcontrol import atomic

ROOT = Path(__file__).resolve().parents[1]


def test_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic.write_text(target, "old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new" and atomic.leftovers(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "trials.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "old" and atomic.leftovers(tmp_path) == []


def test_temp_names_are_unique_and_keep_the_suffix(tmp_path):
    """Two writers of one file never share a temp name (a fixed `x.tmp` would); savefig, PIL and
    to_parquet choose the format from the suffix."""
    target = tmp_path / "pareto.png"
    with atomic.atomic_path(target) as a, atomic.atomic_path(target) as b:
        assert a != b and a.parent == b.parent == tmp_path and a.suffix == b.suffix == ".png"
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the outer block ends last and wins, whole


def _child(fn) -> int:
    """Run fn in a forked child; return its wait status (the child never returns to pytest)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_sigkill_mid_write_leaves_the_old_file_and_a_recognisable_temp(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": 1}')

    def write_and_die():
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"new": ')
            os.kill(os.getpid(), signal.SIGKILL)

    status = _child(write_and_die)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert target.read_text() == '{"old": 1}'
    assert [p.name.startswith(".metrics" + atomic.TEMP_MARK) for p in atomic.leftovers(tmp_path)] == [True]


def test_disk_full_mid_write_keeps_the_old_file(tmp_path):
    """A size-limited file (RLIMIT_FSIZE, in a child) stands for a disk that fills mid-write: the
    write fails with EFBIG, the old file is untouched and the temp file is gone."""
    target = tmp_path / "features.npy"
    target.write_bytes(b"old")
    result = tmp_path / "result.txt"

    def write_too_much():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the OSError, not the signal
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        try:
            atomic.write_bytes(target, b"x" * 100_000)
            outcome = "written"
        except OSError as e:
            outcome = f"OSError {e.errno}"
        except BaseException as e:
            outcome = repr(e)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        result.write_text(outcome)

    _child(write_too_much)
    assert result.read_text().startswith("OSError") and target.read_bytes() == b"old"
    assert atomic.leftovers(tmp_path) == []


def test_model_folder_is_replaced_whole_and_the_old_one_survives_a_failed_write(tmp_path):
    model = tmp_path / "models" / "base"
    with atomic.atomic_dir(model) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(model) as tmp:
            (tmp / "unet").mkdir()
            raise RuntimeError("save_pretrained failed")
    assert (model / "unet" / "weights").read_text() == "v1" and atomic.leftovers(tmp_path) == []
    with atomic.atomic_dir(model) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights").write_text("v2")
    assert (model / "unet" / "weights").read_text() == "v2" and atomic.leftovers(tmp_path) == []


def test_sigkill_between_the_two_renames_keeps_the_old_model(tmp_path, monkeypatch):
    """The old folder is renamed aside, never deleted, before the new one takes its name: a kill
    right after that first rename still leaves the old model on disk (under its aside name)."""
    model = tmp_path / "base"
    model.mkdir()
    (model / "weights").write_text("v1")
    real_replace = os.replace

    def write_and_die():
        def replace_then_die(src, dst):
            real_replace(src, dst)
            if Path(src) == model:
                os.kill(os.getpid(), signal.SIGKILL)
        monkeypatch.setattr(atomic.os, "replace", replace_then_die)
        with atomic.atomic_dir(model) as tmp:
            (tmp / "weights").write_text("v2")

    assert os.WIFSIGNALED(_child(write_and_die))
    kept = [p for p in tmp_path.rglob("weights") if p.read_text() == "v1"]
    assert len(kept) == 1 and atomic.TEMP_MARK in str(kept[0].relative_to(tmp_path))


def test_the_next_run_removes_what_killed_writers_left_and_restores_a_model_set_aside(tmp_path, monkeypatch):
    """A killed writer's temp file, and a model folder killed between its two renames (the old one
    only under its aside name), are cleaned by `clean_leftovers`; a live writer's temp is kept."""
    target = tmp_path / "reports" / "metrics.json"
    target.parent.mkdir()
    target.write_text('{"old": 1}')

    def write_and_die():
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"new": ')
            os.kill(os.getpid(), signal.SIGKILL)

    assert os.WIFSIGNALED(_child(write_and_die))
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "weights").write_text("v1")
    real_replace = os.replace

    def replace_aside_then_die():
        def replace(src, dst):
            real_replace(src, dst)
            if Path(src) == model:  # the old folder is aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
        monkeypatch.setattr(atomic.os, "replace", replace)
        with atomic.atomic_dir(model) as tmp:
            (tmp / "weights").write_text("v2")

    assert os.WIFSIGNALED(_child(replace_aside_then_die))
    assert not model.exists() and len(atomic.leftovers(tmp_path)) == 3  # temp file, new folder, aside folder
    with atomic.atomic_path(tmp_path / "reports" / "live.json") as live:  # this process's write, under way
        removed = atomic.clean_leftovers(tmp_path)
        assert live.exists() and live not in removed
        live.write_text("{}")
    assert len(removed) == 3 and atomic.leftovers(tmp_path) == []
    assert (model / "weights").read_text() == "v1" and target.read_text() == '{"old": 1}'


def _calls(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            base = node.func.value
            names.add(f"{base.id}.{node.func.attr}" if isinstance(base, ast.Name) else node.func.attr)
    return names


def test_no_other_rename_or_fixed_temp_name_in_the_code():
    """Only memcontrol/atomic.py renames files into place; no module builds a fixed temp name."""
    fixed_tmp = re.compile(r"""["'][^"'\n]*\.(tmp|staging|export)\b[^"'\n]*["']""")
    offenders = []
    for package in ("memcontrol", "flows", "tasks", "scripts", "benchmarks"):
        for f in sorted((ROOT / package).rglob("*.py")):
            if f == ROOT / "memcontrol" / "atomic.py":
                continue
            src = f.read_text()
            bad = _calls(ast.parse(src)) & {"os.replace", "os.rename", "shutil.move", "tempfile.mkstemp"}
            bad |= {m.group(0) for m in fixed_tmp.finditer(src)}
            if bad:
                offenders.append(f"{f.relative_to(ROOT)}: {sorted(bad)}")
    assert offenders == []


def test_outputs_get_the_usual_permissions(tmp_path):
    """mkstemp/mkdtemp make 0600/0700; an output must be readable as one written by open() is."""
    umask = os.umask(0o022)
    os.umask(umask)
    f = atomic.write_text(tmp_path / "a.json", "{}")
    with atomic.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w").write_text("x")
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask


def test_encoded_dataset_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors writes several metadata entries in a per-process hash order: two saves of the
    same encoded dataset differed in bytes, so the reference digest changed and every finished arm
    was recomputed after about half the reruns of `memcontrol reference` (found by benchmarks/faults.py)."""
    import subprocess
    import sys

    code = ("import torch, sys; from pathlib import Path; from memcontrol.encode import Encoded; "
            "z = lambda n: torch.zeros(n, 1); Encoded(['a', 'b'], z(2), z(2), ['p', 'q'], z(2), z(1)).save(Path(sys.argv[1]))")
    outs = []
    for i in range(4):  # separate processes: a separate hash seed each
        out = tmp_path / f"e{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, check=True)
        outs.append(out.read_bytes())
    assert len(set(outs)) == 1
    from memcontrol.encode import Encoded
    back = Encoded.load(tmp_path / "e0.safetensors")
    assert back.ids == ["a", "b"] and back.prompts == ["p", "q"]
