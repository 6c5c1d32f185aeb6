"""End to end on the micro configuration: `dvc repro` runs every stage's real Prefect flow, which
fine-tunes real (tiny) diffusers models, searches with FAISS and logs to a real MLflow SQLite store."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(work: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["PREFECT_HOME"] = str(work / ".prefect")
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(work / ".prefect" / "storage")
    env.pop("PREFECT_API_URL", None)
    return env


def _run(cmd: list[str], work: Path, timeout: int = 900) -> str:
    r = subprocess.run(cmd, cwd=work, env=_env(work), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout + r.stderr


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    for d in ("memcontrol", "tasks", "flows"):  # dvc.yaml's code deps
        shutil.copytree(ROOT / d, work / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    # the project's params.yaml with the micro overrides: dvc.yaml names every section
    full = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                  yaml.safe_load((ROOT / "tests" / "micro_params.yaml").read_text()))
    (work / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    _run(["dvc", "init", "--no-scm", "-q"], work)
    _run(["dvc", "config", "core.analytics", "false"], work)
    out = _run(["dvc", "repro"], work)
    return work, out


def test_dvc_repro_builds_every_output(repro):
    work, _ = repro
    m = pd.read_parquet(work / "data/processed/manifest.parquet")
    assert set(m["split"]) == {"base", "train", "val", "test"}
    assert (m[m.split == "train"]["subset"] == "mem").sum() == 4  # data.demo.n_mem
    for comp in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        assert (work / "models/base" / comp).is_dir()
    th = json.loads((work / "data/reference/threshold.json").read_text())
    assert -1.0 <= th["threshold"] <= 1.0 and th["n_heldout"] == 12

    trials = pd.read_csv(work / "search/trials.csv")
    assert len(trials) == 3 and trials["pareto"].any()
    assert trials[["mem_mean_sim", "kid_vs_unmasked"]].notna().all().all()
    # the quality objective: KID over the KID of the anchor (every block on) at the trial's LR
    anchors = trials[trials["bits"].astype(str).str.fullmatch("1+")].set_index("lr")["quality.kid_mean"]
    assert len(anchors) == 2  # micro search.learning_rates
    assert trials["kid_vs_unmasked"].to_numpy() == pytest.approx(
        (trials["quality.kid_mean"] / trials["lr"].map(anchors)).to_numpy())
    sel = json.loads((work / "masks/selected.json").read_text())
    assert sel["method"] == "lora" and len(sel["bits"]) == len(sel["blocks"]) and sel["trainable_params"] > 0
    assert any(sel["bits"])
    metrics = json.loads((work / "reports/metrics.json").read_text())
    assert {"selected", "full", "base", "held-out"} <= set(metrics)
    assert metrics["full"]["trainable_pct"] == pytest.approx(100.0)
    assert 0 < metrics["selected"]["trainable_pct"] < 100
    for arm in ("selected", "full"):
        assert 0 <= metrics[arm]["mem.flagged_rate"] <= 1 and metrics[arm]["quality.kid_mean"] == metrics[arm]["quality.kid_mean"]
    assert (work / "models/final/seed0/adapter.safetensors").exists()
    assert "Selected mask vs full fine-tuning" in (work / "reports/compare.md").read_text()
    # Stage 2 (final + full) trains at final.batch_size, the trials at train.batch_size
    for d in ("models/final/seed0", "models/full/seed0"):
        key = json.loads((work / d / "metrics.json").read_text())["key"]
        assert key["batch_size"] == 6 and key["steps"] == 4
    trial_keys = [json.loads(f.read_text())["key"] for f in (work / "search/trials").glob("*/metrics.json")]
    assert len(trial_keys) == 3 and {k["batch_size"] for k in trial_keys} == {4}


def test_dvc_metrics_and_noop_repro(repro):
    work, _ = repro
    shown = _run(["dvc", "metrics", "show", "--json"], work)
    assert "mem.flagged_rate" in shown
    again = _run(["dvc", "repro"], work)
    assert "didn't change" in again or "up to date" in again.lower()


def test_mlflow_has_a_parent_per_study_and_a_child_per_trial(repro):
    import mlflow

    work, _ = repro
    client = mlflow.tracking.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("memcontrol")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("memcontrol_kind") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = sorted(r.data.tags["memcontrol_child"] for r in children)
    assert names == ["trial-000", "trial-001", "trial-002"]  # the anchors (the rule's references) are trials
    children = [r for r in children if r.data.tags["memcontrol_child"].startswith("trial-")]
    c = children[0]
    assert set("01") >= set(c.data.params["bits"]) and "lr" in c.data.params and "enabled_blocks" in c.data.params
    assert {"mem.flagged_rate", "quality.kid_mean", "trainable", "noise_norm.max"} <= set(c.data.metrics)
    arts = [a.path for a in client.list_artifacts(c.info.run_id)]
    assert "grid.png" in arts and "mask.json" in arts
    compare = [r for r in runs if r.data.tags.get("memcontrol_kind") == "compare"]
    assert len(compare) == 1


def test_prefect_recorded_completed_flow_runs(repro):
    work, _ = repro
    code = (
        "import asyncio\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        "        runs = await c.read_flow_runs()\n"
        "        print(sorted({(r.name and r.state_name) for r in runs}))\n"
        "        flows = {f.id: f.name for f in await c.read_flows()}\n"
        "        print(sorted({flows[r.flow_id] for r in runs if r.state_name == 'Completed'}))\n"
        "asyncio.run(main())\n"
    )
    out = _run([sys.executable, "-c", code], work)
    for name in ("prepare", "base", "reference", "search", "finetune", "compare"):
        assert name in out.splitlines()[-1]


def test_demo_reuses_finished_work_and_prints_the_summary(repro, tmp_path):
    work, _ = repro
    copy = tmp_path / "demo"
    shutil.copytree(work, copy, ignore=shutil.ignore_patterns(".prefect", ".dvc", "dvc.lock"))
    trials = pd.read_csv(copy / "search/trials.csv")
    out = _run(["memcontrol", "demo"], copy)
    t = json.loads((copy / "reports/demo_timings.json").read_text())
    assert t["order"] == ["prepare", "base", "reference", "search", "finetune", "compare"]
    assert all(t["seconds"][k] >= 0 for k in t["order"])
    assert t["wall_seconds"] > 0 and t["peak_rss_mb"] > 100  # the demo process's own peak, for the docs
    pd.testing.assert_frame_equal(pd.read_csv(copy / "search/trials.csv")[["number", "bits", "lr"]],
                                  trials[["number", "bits", "lr"]])
    for text in ("MemControl summary", "Chosen mask", "stage wall times", "per trial", "peak RSS"):
        assert text in out


def test_search_resumes_instead_of_restarting(repro):
    work, _ = repro
    before = pd.read_csv(work / "search/trials.csv")
    p = yaml.safe_load((work / "params.yaml").read_text())
    p["search"]["n_trials"] = 4
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    _run(["memcontrol", "search"], work)
    after = pd.read_csv(work / "search/trials.csv")
    assert len(after) == 4
    pd.testing.assert_frame_equal(after.iloc[:3][["number", "bits", "lr"]], before[["number", "bits", "lr"]])
