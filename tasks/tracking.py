"""The one module that talks to MLflow: a parent run per study (or audit), a child run per trial
(or arm and seed), logging the mask as bits and block names, every metric and objective, and the
grids as MLflow images; every run carries its stage (search / final / audit) as the tag `stage`.
CSV files logged with a run are also MLflow tables, PNGs also MLflow images, so the UI shows them
(the trials table and Pareto plot on the study's run, the comparison table on `compare`)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
import sqlite3
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from memcontrol import atomic
from memcontrol.config import OBJECTIVES, RELATIVE

log = logging.getLogger("memcontrol.tracking")

# parent run kind -> the stage a person filters on
STAGES = {"study": "search", "compare": "final", "final": "final", "audit": "audit", "transfer": "audit",
          "release": "audit"}
IMAGE_KEYS = {"grid": "samples_over_nearest", "samples": "heldout_samples", "nearest": "nearest_neighbours",
              "pareto": "pareto_front"}


_READY: set[str] = set()  # SQLite stores checked (or built) by this process


def _schema(db: Path) -> tuple[str | None, int | None]:
    """(alembic revision, number of runs) of an MLflow SQLite file; None where the table is missing."""
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        rev = con.execute("select version_num from alembic_version").fetchone() if "alembic_version" in tables else None
        runs = con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else None
    return (rev[0] if rev else None), runs


def ensure_store(uri: str, root: Path) -> None:
    """Make a local SQLite tracking store whole before MLflow opens it. MLflow creates a fresh store
    in place (tables, then ~60 alembic migrations); a kill in between leaves a half-migrated file
    that the next run fails or hangs on ("Updating database tables"). So the store is built in a
    temp file in the same folder and renamed into place (memcontrol.atomic): mlflow.db is absent or
    complete. A half-migrated store from elsewhere that holds no runs is rebuilt the same way; one
    with runs is left to MLflow (`mlflow db upgrade`). The folder is locked while this runs."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri in _READY:
        return
    db = Path(uri[len(prefix):])
    from mlflow.store.db.utils import _get_latest_schema_revision

    db.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes never build it at once
        if db.exists():
            revision, runs = _schema(db)
            if revision == _get_latest_schema_revision() or runs:
                _READY.add(uri)
                return
            log.warning("%s: a half-created MLflow store (schema %s, no runs): rebuilding it", db, revision)
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        with atomic.atomic_path(db) as tmp:
            store = SqlAlchemyStore(f"{prefix}{tmp}", (root / "mlruns").resolve().as_uri())
            store.engine.dispose()
            SqlAlchemyStore._engine_map.pop(f"{prefix}{tmp}", None)  # MLflow's engine cache: the name is gone
        _READY.add(uri)
    finally:
        os.close(lock)  # releases the lock


def _client(uri: str, experiment: str, root: Path) -> tuple[MlflowClient, str]:
    ensure_store(uri, root)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # explicit artifact location: otherwise it is resolved from whatever the CWD is at creation;
        # the kind tag makes the MLflow UI open the experiment as model training (runs), not GenAI
        exp_id = client.create_experiment(experiment, artifact_location=(root / "mlruns").resolve().as_uri(),
                                          tags={"mlflow.experimentKind": "custom_model_development"})
    else:
        exp_id = exp.experiment_id
    return client, exp_id


def tracking_uri(uri: str, root: Path) -> str:
    """A relative sqlite path in params.yaml is relative to the working directory `root`."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str((root / uri[len(prefix):]).resolve())
    return uri


def parent_run(uri: str, experiment: str, root: Path, *, kind: str, name: str, params: dict) -> str:
    """Find-or-create the parent run tagged (kind, name), so a resumed study logs under the same run."""
    client, exp_id = _client(uri, experiment, root)
    found = client.search_runs([exp_id], f"tags.memcontrol_kind = '{kind}' and tags.memcontrol_name = '{name}'",
                               max_results=1)
    if found:
        rid = found[0].info.run_id
        for k, v in params.items():  # params are immutable in MLflow: a changed one is kept as a tag
            if found[0].data.params.get(k, str(v)[:6000]) != str(v)[:6000]:
                client.set_tag(rid, f"rerun.{k}", str(v)[:5000])
        return rid
    run = client.create_run(exp_id, run_name=f"{kind}:{name}", tags={"memcontrol_kind": kind, "memcontrol_name": name,
                                                                   "stage": STAGES.get(kind, kind)})
    for k, v in params.items():
        client.log_param(run.info.run_id, k, str(v)[:6000])
    client.set_terminated(run.info.run_id, "RUNNING")
    return run.info.run_id


def log_child(uri: str, experiment: str, root: Path, parent_id: str, *, name: str, record: dict,
              artifacts: list[Path] = (), extra_params: dict | None = None) -> str:
    """One child run: mask bits and enabled block names as params, every metric, artifacts."""
    client, exp_id = _client(uri, experiment, root)
    # the record's own key (code, params, inputs: memcontrol/reuse.py) tells a rerun of the same
    # result, already logged, from a new result under the same name (e.g. a DVC experiment)
    digest = hashlib.sha256(json.dumps(record.get("key", record), sort_keys=True, default=str).encode()).hexdigest()[:16]
    found = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}' "
                                         f"and tags.memcontrol_record = '{digest}'", max_results=1)
    if found and found[0].info.status != "FINISHED":  # a kill between create_run and set_terminated:
        client.delete_run(found[0].info.run_id)  # its metrics or images may be missing; log it anew
        found = []
    if found:  # already logged by an earlier (interrupted) run of the flow
        rid = found[0].info.run_id
        logged_as = found[0].data.tags.get("memcontrol_child")
        if logged_as != name:  # under the number of a trial that a kill interrupted (Optuna failed it
            # and asked the configuration again): the same result, so the run takes the new name
            client.set_tag(rid, "memcontrol_child", name)
            client.update_run(rid, name=name)
            client.set_tag(rid, "memcontrol_logged_as", logged_as or "")
            _supersede(client, exp_id, parent_id, name, rid)
        return rid
    # a rerun under other settings or code: a new child run, and the earlier ones of the same name
    # are marked (memcontrol_current=false, superseded_by) so the UI can filter them out
    earlier = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}' and tags.memcontrol_child = '{name}'")
    kind = client.get_run(parent_id).data.tags.get("memcontrol_kind", "")
    run = client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": parent_id, "memcontrol_child": name,
                                                         "memcontrol_record": digest, "stage": STAGES.get(kind, kind),
                                                         "memcontrol_current": "true",
                                                         **({"memcontrol_rerun_of": earlier[0].info.run_id} if earlier else {})})
    rid = run.info.run_id
    _supersede(client, exp_id, parent_id, name, rid)
    mask = record["mask"]
    params = {
        "method": mask["method"], "mode": mask.get("mode", ""), "lr": mask["lr"],
        "bits": "".join(map(str, mask["bits"])),
        "enabled_blocks": ",".join(b for b, x in zip(mask["blocks"], mask["bits"]) if x) or "(none)",
        "n_blocks": len(mask["blocks"]), **(extra_params or {}),
    }
    for i, (b, x) in enumerate(zip(mask["blocks"], mask["bits"])):
        params[f"bit.{b}"] = x
    metrics = record["metrics"]
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    for objective, (key, _direction) in OBJECTIVES.items():  # under the names search.objectives uses
        if key in values and objective not in RELATIVE:  # a ratio to the anchor is the search's (trials.csv)
            values[f"objective.{objective}"] = values[key]
    # one request for all params and metrics (one per value took ~3 s a trial against a tracking
    # server on a busy machine: the search's serial bottleneck, benchmarks/lab_scale.py)
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in values.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(rid, json.dumps(mask, indent=2, sort_keys=True), "mask.json")
    _log(client, rid, artifacts)
    client.set_terminated(rid, "FINISHED")
    return rid


def _supersede(client: MlflowClient, exp_id: str, parent_id: str, name: str, current: str) -> None:
    """Mark the other child runs named `name` as superseded by `current`."""
    for old in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}' and tags.memcontrol_child = '{name}'"):
        if old.info.run_id != current:
            client.set_tag(old.info.run_id, "memcontrol_current", "false")
            client.set_tag(old.info.run_id, "memcontrol_superseded_by", current)


def _log(client: MlflowClient, run_id: str, files) -> None:
    """Each existing file as an artifact; a PNG also as an MLflow image, a CSV also as a table."""
    for f in map(Path, files):
        if not f.exists():
            continue
        client.log_artifact(run_id, str(f))
        if f.suffix == ".png":
            with Image.open(f) as image:
                client.log_image(run_id, image.convert("RGB"), key=IMAGE_KEYS.get(f.stem, f.stem), step=0)
        elif f.suffix == ".csv":
            client.log_table(run_id, pd.read_csv(f), artifact_file=f"tables/{f.stem}.json")


def log_files(uri: str, experiment: str, root: Path, run_id: str, files: list[Path], metrics: dict | None = None,
              finish: bool = False) -> None:
    client, _ = _client(uri, experiment, root)
    _log(client, run_id, files)
    for k, v in (metrics or {}).items():
        if isinstance(v, (int, float)) and v == v:
            client.log_metric(run_id, k, float(v))
    if finish:
        client.set_terminated(run_id, "FINISHED")


def log_final_model(uri: str, experiment: str, root: Path, *, name: str, folder: Path, record: dict) -> str:
    """The exported final model as the artifact folder `model/` (diffusers folder + model card) of a
    `final` run, with its mask and metrics; a re-export replaces the run's artifacts."""
    parent = parent_run(uri, experiment, root, kind="final", name=name,
                        params={"folder": str(folder), "method": record["mask"]["method"]})
    client, _ = _client(uri, experiment, root)
    for k, v in record["metrics"].items():
        if isinstance(v, (int, float)) and v == v:
            client.log_metric(parent, k, float(v))
    client.log_artifacts(parent, str(folder), artifact_path="model")
    client.set_terminated(parent, "FINISHED")
    return parent


os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
