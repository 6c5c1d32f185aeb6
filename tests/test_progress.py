"""Progress a person can follow (issue 15 item 6): on a terminal, rich bars for every long step and
the search's own bar (trial k of n, the best front so far, an ETA from measured trial times), checked
on a real `memcontrol search` under a pseudo-terminal; without one (a log file, CI, `dvc repro`),
log lines with counts and an ETA, checked on the same search with its output piped."""

from __future__ import annotations

import logging
import re

import optuna

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

from tasks.progress import bars, report_search


def test_steps_log_periodic_lines_without_a_terminal(caplog, monkeypatch):
    monkeypatch.setenv("MEMCONTROL_PROGRESS_SECONDS", "3600")
    caplog.set_level(logging.INFO, logger="memcontrol.progress")
    with bars("trial ab12: ") as progress:
        for step in range(1, 11):
            progress("fine-tune", step, 10)
        for step in (32, 64, 87):
            progress("generate", step, 87)
    lines = [r.getMessage() for r in caplog.records if r.name == "memcontrol.progress"]
    assert len(lines) == 4, lines  # the first and the last update of each step, nothing between
    assert lines[0].startswith("trial ab12: fine-tune: 1/10 (10%)") and "ETA" in lines[0]
    assert lines[1].startswith("trial ab12: fine-tune: 10/10 (100%)") and lines[1].endswith("ETA done")
    assert lines[2].startswith("trial ab12: generate: 32/87 (37%)")
    assert lines[3].startswith("trial ab12: generate: 87/87 (100%)")


def test_search_line_names_the_trial_the_front_and_an_eta():
    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in ([0.5, 0.2], [0.4, 0.3], [0.6, 0.6]):  # the third is dominated
        trial = study.ask()
        study.tell(trial, values)
    line = report_search(study, 5, ("mem_mean_sim", "kid"))
    assert line.startswith("search: trial 3 of 5; Pareto front (2): #0 mem_mean_sim 0.5, kid 0.2; #1 mem_mean_sim 0.4")
    assert re.search(r"\d+s per trial, ETA \d+s$", line)


def test_a_real_run_logs_progress_lines(micro_project):
    """The README's DVC chain (stages as subprocesses, output piped: no terminal) printed the
    pretraining, each trial's fine-tune and generation, the search and Stage 2 as log lines."""
    _, out = micro_project
    for pattern in (r"base: VAE: 10/10 \(100%\)", r"base: UNet: 10/10 \(100%\)",
                    r"trial [0-9a-f]+: fine-tune: 4/4 \(100%\)", r"trial [0-9a-f]+: generate: \d+/\d+ \(100%\)",
                    r"search: trial 3 of 3; Pareto front \(\d+\): #\d+ mem_mean_sim", r"search: trial 4 of 4",
                    r"final seed0: fine-tune: 4/4 \(100%\)", r"ETA \d+s"):
        assert re.search(pattern, out), pattern


def test_a_terminal_shows_bars_for_the_search_its_trials_and_an_eta(micro_searched_tty):
    """`memcontrol search` on a pseudo-terminal: a live display (cursor control), the search's bar
    with the trial being trained, the front so far and the ETA, and each trial's fine-tune and
    generation bars; not the log-line form."""
    _, out = micro_searched_tty
    text = ANSI.sub("", out)
    assert "\x1b[" in out and "\x1b[?25l" in out  # rich hides the cursor while its live display is on
    assert re.search(r"search: trial 1/3 \| best front so far: - \| ETA \?", text), text[-3000:]
    assert re.search(r"search: trial 2/3 \|", text)
    assert re.search(r"search: trial 3/3 \| best front so far: \(\d\) #\d+ mem_mean_sim [\d.]+, kid_vs_unmasked [\d.e-]+.* \| ETA \d+s",
                     text), text[-3000:]
    assert re.search(r"trial [0-9a-f]+: fine-tune .*\d/4", text) and re.search(r"trial [0-9a-f]+: generate", text)
    assert not re.search(r"fine-tune: \d+/\d+ \(\d+%\)", text)  # LogLines' form: not on a terminal


def test_without_a_terminal_the_search_logs_periodic_lines(micro_searched):
    """The same search with its output piped: log lines, no live display and no bar."""
    _, _, out = micro_searched
    assert "\x1b[?25l" not in out and "best front so far" not in out
    for pattern in (r"trial [0-9a-f]+: fine-tune: 4/4 \(100%\), \S+ elapsed, ETA done",
                    r"trial [0-9a-f]+: generate: \d+/\d+ \(100%\)",
                    r"search: trial 2 of 3; Pareto front \(\d+\): #\d+ mem_mean_sim .*; \d+s per trial, ETA \d+s",
                    r"search: trial 3 of 3; Pareto front"):
        assert re.search(pattern, out), pattern
