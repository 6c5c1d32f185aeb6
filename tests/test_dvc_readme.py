"""DVC as a newcomer types it: the README's DVC commands, run as written through bash on a fresh
clone with no venv on PATH (micro configuration): `dvc repro compare`, `dvc metrics show`, an
experiment with another sampler, `dvc exp show`, `dvc plots diff`; and the user's own dataset
versioned with `dvc add`."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import yaml

from memcontrol.search import completed
from micro_project import clone, readme_block, shell, user_dataset


def test_readme_dvc_block_runs_as_written(micro_project):
    project, out = micro_project
    assert "command not found" not in out
    for f in ("data/processed/manifest.parquet", "models/base/unet", "search/trials.csv", "masks/selected.json",
              "models/final/seed0/adapter.safetensors", "reports/metrics.json"):
        assert (project / f).exists(), f
    # `dvc metrics show`: the selected trial's objectives and the comparison
    assert "masks/selected_info.json" in out and "reports/metrics.json" in out
    assert "metrics.mem.mean_sim" in out and "selected.mem.flagged_rate" in out
    # the audit stages did not run: `compare` is the demo chain's target
    assert not (project / "reports/audit.md").exists() and not (project / "transfer").exists()


def test_dvc_experiment_searches_anew_with_the_random_sampler(micro_project):
    project, _ = micro_project
    url = f"sqlite:///{project / 'search/study.db'}"
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(url, include_best_trial=False)}
    assert set(studies) == {"memcontrol", "memcontrol.random-seed0-pop2"}
    random = optuna.load_study(study_name="memcontrol.random-seed0-pop2", storage=url)
    assert random.user_attrs["sampler"] == "random"
    assert len(completed(random)) == 4  # scored configurations (a repeated proposal is answered, not counted)
    original = optuna.load_study(study_name="memcontrol", storage=url)
    assert original.user_attrs["sampler"] == "nsga2"
    assert len(completed(original)) == 3
    assert len(pd.read_csv(project / "search/trials.csv")) == 4  # the workspace holds the experiment's result


def test_dvc_exp_show_lists_changed_params_and_the_selected_objectives(micro_project):
    project, out = micro_project
    shown = json.loads(shell("source scripts/env.sh\ndvc exp show --json 2>/dev/null", project))
    exps = [e for row in shown for e in (row.get("experiments") or [])]
    assert len(exps) == 1, shown
    data = exps[0]["revs"][0]["data"]  # the experiment's commit, not only the workspace
    assert data["params"]["params.yaml"]["data"]["search"]["sampler"] == "random"
    assert data["params"]["params.yaml"]["data"]["search"]["n_trials"] == 4
    selected = data["metrics"]["masks/selected_info.json"]["data"]
    trials = pd.read_csv(project / "search/trials.csv")
    row = trials[trials["number"] == selected["trial"]].iloc[0]
    assert selected["metrics"]["mem.mean_sim"] == row["mem.mean_sim"]
    assert selected["metrics"]["quality.kid_mean"] == row["quality.kid_mean"]
    # the README's `dvc exp show` printed the experiment's row (its table is as wide as the terminal)
    assert "random" in out and "nsga2" in out


def test_dvc_plots_diff_draws_the_pareto_front(micro_project):
    project, _ = micro_project
    html = (project / "dvc_plots" / "index.html").read_text()
    assert "datum.pareto" in html  # the front, drawn as a line (.dvc/plots/pareto.json)
    assert "mem_mean_sim" in html and "kid" in html
    spec = json.loads(shell("source scripts/env.sh\ndvc plots diff --json 2>/dev/null", project))["data"]
    plot = spec["search/trials.csv"]
    values = [v for v in plot[0]["content"]["data"]["values"] if v.get("rev", "workspace") == "workspace"]
    assert len(values) == 4 and {str(v["pareto"]) for v in values} & {"True", "true"}
    assert [layer["mark"]["type"] for layer in plot[0]["content"]["layer"]] == ["point", "line"]


def test_own_dataset_versioned_with_dvc_add(tmp_path):
    project = clone(tmp_path / "clone")
    csv, folder = user_dataset(project / "datasets" / "mine")
    shell(readme_block("**Your own dataset under DVC.**", "dvc add"), project)
    for f in ("datasets/mine/images.dvc", "datasets/mine/reports.csv.dvc"):
        assert (project / f).exists() and "md5" in (project / f).read_text()
    assert "/images" in (project / "datasets/mine/.gitignore").read_text()

    params = yaml.safe_load((project / "params.yaml").read_text())  # what the README's comments say to edit
    params["data"] = {**params["data"], "source": "csv", "csv": {
        "csv": "datasets/mine/reports.csv", "image_root": "datasets/mine", "n_mem": 4, "test_fraction": 0.25}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = yaml.safe_load((project / "dvc.yaml").read_text())
    stages["stages"]["prepare"]["deps"] += ["datasets/mine/images", "datasets/mine/reports.csv"]
    stages["stages"]["prepare"]["outs"].remove("data/demo")
    (project / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    shell("source scripts/env.sh\ndvc repro prepare", project)
    assert len(pd.read_parquet(project / "data/processed/manifest.parquet")) == 17

    rows = pd.read_csv(csv)
    rows.iloc[:-1].to_csv(csv, index=False)  # the user drops a row
    status = shell("source scripts/env.sh\ndvc status", project)
    assert "datasets/mine/reports.csv" in status and "modified" in status
    shell("source scripts/env.sh\ndvc repro prepare", project)
    assert len(pd.read_parquet(project / "data/processed/manifest.parquet")) == 16
    # `dvc repro` recorded the new version in reports.csv.dvc; git has v1 (the README's commit)
    assert "dataset v1" in shell("git log --oneline -1 -- datasets/mine/reports.csv.dvc", project)
    shell("git checkout datasets/mine/reports.csv.dvc\nsource scripts/env.sh\ndvc checkout --force datasets/mine/reports.csv",
          project)
    assert len(pd.read_csv(csv)) == 17
