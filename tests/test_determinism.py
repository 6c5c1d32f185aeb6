"""Issue 12 item 10: the same seed gives the same result on CPU. The micro configuration's search
(`memcontrol search`, the real CLI and Prefect flow, 3 trials) runs twice from one prepared
workdir; the two trials.csv agree byte for byte once the columns that measure time are dropped
(wall_seconds and the like: they measure the machine, not the result), and so does the mask chosen."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from memcontrol.base_model import base
from memcontrol.config import load_params
from memcontrol.prepare import prepare
from memcontrol.reference import reference
from memcontrol.workdir import Layout

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "_time", "timing")  # a column whose name holds one of these measures the clock


def _search(work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_HOME": str(work / ".prefect"), "PREFECT_LOCAL_STORAGE_PATH": str(work / ".prefect" / "s")}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", "search", "-p", str(work / "params.yaml"), "--root",
                           str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def without_timing(csv: Path) -> str:
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    out = io.StringIO()
    df[[c for c in df.columns if not any(t in c for t in TIMING)]].to_csv(out, index=False)
    return out.getvalue()


def test_same_seed_same_trials_csv_on_cpu(tmp_path):
    first = tmp_path / "a"
    first.mkdir()
    shutil.copy(ROOT / "tests" / "micro_params.yaml", first / "params.yaml")
    p, layout = load_params(first / "params.yaml"), Layout(first)
    prepare(p, layout)
    base(p, layout)
    reference(p, layout)
    second = tmp_path / "b"
    shutil.copytree(first, second)
    runs = [_search(w) for w in (first, second)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-4000:]
    a, b = (without_timing(w / "search" / "trials.csv") for w in (first, second))
    assert len(pd.read_csv(first / "search" / "trials.csv")) == p.search.n_trials
    assert a == b
    assert (first / "masks" / "selected.json").read_bytes() == (second / "masks" / "selected.json").read_bytes()
