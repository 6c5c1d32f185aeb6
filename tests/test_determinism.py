"""Issue 12 item 10: the same seed gives the same result on CPU. The micro configuration's search
(`memcontrol search`, the real CLI and Prefect flow, 3 trials) runs twice from one prepared
workdir, once with its output piped and once on a pseudo-terminal (progress bars drawn); the two
trials.csv agree byte for byte once the columns that measure time are dropped (wall_seconds and the
like: they measure the machine, not the result), and so does the mask chosen."""

from __future__ import annotations

import pandas as pd

from memcontrol.config import load_params
from micro_workdir import without_timing


def test_same_seed_same_trials_csv_on_cpu(micro_searched, micro_searched_tty):
    (_, first, _), (second, _) = micro_searched, micro_searched_tty
    p = load_params(first / "params.yaml")
    a, b = (without_timing(w / "search" / "trials.csv") for w in (first, second))
    assert len(pd.read_csv(first / "search" / "trials.csv")) == p.search.n_trials
    assert a == b
    assert (first / "masks" / "selected.json").read_bytes() == (second / "masks" / "selected.json").read_bytes()
