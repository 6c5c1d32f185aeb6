"""Issue 12 item 10: the same seed gives the same result on CPU. The micro configuration's search
(`memcontrol search`, the real CLI and Prefect flow, 3 trials) runs twice from one prepared
workdir; the two trials.csv agree byte for byte once the columns that measure time are dropped
(wall_seconds and the like: they measure the machine, not the result), and so does the mask chosen."""

from __future__ import annotations

import shutil

import pandas as pd

from memcontrol.config import load_params
from micro_workdir import cli, without_timing


def test_same_seed_same_trials_csv_on_cpu(micro_searched, tmp_path):
    prepared, first = micro_searched
    second = tmp_path / "b"
    shutil.copytree(prepared, second)
    run = cli(second, "search")
    assert run.returncode == 0, run.stderr[-4000:]
    p = load_params(first / "params.yaml")
    a, b = (without_timing(w / "search" / "trials.csv") for w in (first, second))
    assert len(pd.read_csv(first / "search" / "trials.csv")) == p.search.n_trials
    assert a == b
    assert (first / "masks" / "selected.json").read_bytes() == (second / "masks" / "selected.json").read_bytes()
