"""What a person sees: the MLflow UI (`mlflow ui` as the README starts it, 127.0.0.1, one worker)
on the store of a real micro run of the flows, in headless Chromium: the experiment page with the
study's trials and a two-trial compare page, screenshotted, their DOM checked for the trial names,
two mask-bit params and the objectives; the MLflow REST API for what the pages do not print (tags,
images, the trials table, the final model's folder). And Optuna's own dashboard on the study."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from browser import Browser

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCREENSHOT = ROOT / "docs" / "images" / "mlflow_compare.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(cmd: list[str], cwd: Path, ready_url: str, log: Path) -> subprocess.Popen:
    """Start a server in its own process group; wait (bounded) until `ready_url` answers."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    for _ in range(240):
        if proc.poll() is not None:
            raise AssertionError(f"{cmd[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(ready_url, timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise AssertionError(f"{cmd} did not answer {ready_url}:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def mlflow_ui(micro_project, tmp_path_factory):
    project, _ = micro_project
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow") / "ui.log"
    proc = serve([str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
                  "--workers", "1", "--host", "127.0.0.1", "--port", str(port)], project,
                 f"http://127.0.0.1:{port}/health", log)
    yield f"http://127.0.0.1:{port}", MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    stop(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("chromium") / "profile")
    yield b
    b.close()


def _trials(client: MlflowClient):
    exp = client.get_experiment_by_name("memcontrol")
    study = client.search_runs([exp.experiment_id], "tags.memcontrol_kind = 'study' and tags.memcontrol_name = 'memcontrol'")
    assert len(study) == 1
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{study[0].info.run_id}'",
                                  order_by=["attributes.run_name ASC"])
    # every child is a trial (the selection rule's references, the anchors, are trials too)
    assert [r.info.run_name for r in children if not r.info.run_name.startswith("trial-")] == []
    return exp, study[0], [r for r in children if r.info.run_name.startswith("trial-")]


def test_experiment_page_shows_the_study_and_its_trials(mlflow_ui, browser, tmp_path):
    url, client = mlflow_ui
    exp, study, trials = _trials(client)
    assert [t.info.run_name for t in trials] == ["trial-000", "trial-001", "trial-002"]
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "searchFilter": "tags.stage = 'search'"},
                                   quote_via=urllib.parse.quote)
    browser.goto(f"{url}/#/experiments/{exp.experiment_id}/runs?{query}")
    browser.wait_for("document.body.innerText.includes('study:memcontrol')")
    # a person expands the study's run to see its trials
    browser.eval("document.querySelectorAll('button[data-component-id*=\"runnamecellrenderer\"]').forEach(b => b.click())")
    browser.wait_for("['trial-000', 'trial-001', 'trial-002'].every(n => document.body.innerText.includes(n))")
    shot = browser.screenshot(tmp_path / "experiment.png")
    assert shot.stat().st_size > 10_000
    assert "study:memcontrol.random-seed0-pop2" in browser.text()  # the DVC experiment's study, its own run


def test_compare_page_shows_two_masks_and_their_objectives(mlflow_ui, browser, tmp_path):
    url, client = mlflow_ui
    exp, _, trials = _trials(client)
    first, second = trials[0], trials[1]
    runs = json.dumps([first.info.run_id, second.info.run_id])
    browser.goto(f"{url}/#/compare-runs?runs={urllib.parse.quote(runs)}&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}")
    bits = sorted(k for k in first.data.params if k.startswith("bit."))
    assert len(bits) >= 2
    browser.wait_for(f"document.body.innerText.includes({json.dumps(bits[1])})")
    browser.wait_for("document.body.innerText.includes('objective.kid')")
    text = browser.text()
    for name in ("trial-000", "trial-001", bits[0], bits[1], "objective.mem_mean_sim", "objective.kid", "lr"):
        assert name in text, name
    browser.eval("document.querySelectorAll('button[aria-label=\"Close\"]').forEach(b => b.click())")  # the assistant panel
    browser.resize(1400, 2000)  # parameters and metrics below the plot
    time.sleep(1)
    shot = browser.screenshot(tmp_path / "compare.png")
    browser.resize(1600, 1000)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    if os.environ.get("MEMCONTROL_UPDATE_SCREENSHOT"):  # refresh the README's picture on purpose only
        shutil.copy(shot, SCREENSHOT)
    assert SCREENSHOT.exists()


def test_runs_carry_stage_images_tables_and_the_final_model(mlflow_ui, micro_project):
    _, client = mlflow_ui
    project, _ = micro_project
    exp, study, trials = _trials(client)
    assert study.data.tags["stage"] == "search" and {t.data.tags["stage"] for t in trials} == {"search"}
    trial = trials[0]
    for objective in ("mem_mean_sim", "kid"):
        assert f"objective.{objective}" in trial.data.metrics
    bits = trial.data.params["bits"]
    assert set(bits) <= {"0", "1"} and len(bits) == int(trial.data.params["n_blocks"])
    assert sum(k.startswith("bit.") for k in trial.data.params) == len(bits)
    images = [a.path for a in client.list_artifacts(trial.info.run_id, "images")]
    assert any("samples_over_nearest" in p for p in images)  # grid.png: generations over their nearest
    assert any("heldout_samples" in p for p in images)  # samples.png: the held-out prompts' generations
    assert {"grid.png", "samples.png"} <= {a.path for a in client.list_artifacts(trial.info.run_id)}
    tables = [a.path for a in client.list_artifacts(study.info.run_id, "tables")]
    assert "tables/trials.json" in tables
    table = json.loads(Path(client.download_artifacts(study.info.run_id, "tables/trials.json")).read_text())
    assert len(table["data"]) == 3 and "mem_mean_sim" in table["columns"]
    assert any("pareto_front" in a.path for a in client.list_artifacts(study.info.run_id, "images"))
    final = client.search_runs([exp.experiment_id], "tags.memcontrol_kind = 'final'")
    assert len(final) == 1 and final[0].data.tags["stage"] == "final"
    model = {a.path for a in client.list_artifacts(final[0].info.run_id, "model")}
    assert {"model/README.md", "model/unet", "model/model_index.json", "model/pytorch_lora_weights.safetensors"} <= model
    compare = client.search_runs([exp.experiment_id], "tags.memcontrol_kind = 'compare'")
    assert compare and all(r.data.tags["stage"] == "final" for r in compare)
    release = client.search_runs([exp.experiment_id], "tags.memcontrol_kind = 'release'")
    assert release[0].data.tags["stage"] == "audit"
    assert "README.md" in {a.path for a in client.list_artifacts(release[0].info.run_id)}


def test_optuna_dashboard_opens_the_study(micro_project, tmp_path):
    """The README's optuna-dashboard command, on a free port; its API lists both studies of the run
    with their trial counts and directions."""
    project, _ = micro_project
    port = free_port()
    proc = serve([str(BIN / "optuna-dashboard"), f"sqlite:///{project / 'search/study.db'}", "--host", "127.0.0.1",
                  "--port", str(port)], project, f"http://127.0.0.1:{port}/api/studies", tmp_path / "dashboard.log")
    api = f"http://127.0.0.1:{port}/api/studies"
    try:
        summaries = json.loads(urllib.request.urlopen(api, timeout=30).read())["study_summaries"]
        details = {s["study_name"]: json.loads(urllib.request.urlopen(f"{api}/{s['study_id']}", timeout=60).read())
                   for s in summaries}
    finally:
        stop(proc)
    assert set(details) == {"memcontrol", "memcontrol.random-seed0-pop2"}
    for name, n in (("memcontrol", 3), ("memcontrol.random-seed0-pop2", 4)):
        assert details[name]["directions"] == ["minimize", "minimize"]
        scored = [t for t in details[name]["trials"] if t["state"] == "Complete"
                  and "duplicate_of" not in {a["key"] for a in t["user_attrs"]}]  # not answered repeats
        assert len(scored) == n
        assert details[name]["best_trials"]  # the Pareto front the dashboard draws
