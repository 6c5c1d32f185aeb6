"""Each stage on the micro configuration, in process (seconds): prepare, base, reference, one arm."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memcontrol.arms import final_rows, run_arm, search_rows
from memcontrol.base_model import base, block_list, load_base
from memcontrol.evaluate import EvalContext
from memcontrol.prepare import prepare
from memcontrol.reference import reference
from memcontrol.workdir import Layout
from memcontrol.config import load_params
from memcontrol.sample import generate, initial_noise, item_seed
from memcontrol.tuning import Mask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    shutil.copy(ROOT / "tests" / "micro_params.yaml", root / "params.yaml")
    p = load_params(root / "params.yaml")
    L = Layout(root)
    prepare(p, L)
    base(p, L)
    reference(p, L)
    return p, L


def test_prepare_writes_a_valid_manifest(work):
    p, L = work
    m = pd.read_parquet(L.manifest)
    assert len(m) == 24 + 8 + 30 + 12 + 12 and m["sha256"].is_unique  # base CT + codec, train, val, test
    assert (L.manifest.parent / m["path"].iloc[0]).exists()  # paths are relative to the manifest's folder


def test_base_folder_loads_in_diffusers_pipeline_and_matches_our_sampler(work):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    p, L = work
    bundle = load_base(L)
    pipe = StableDiffusionPipeline.from_pretrained(L.base, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    prompt = "No acute cardiopulmonary abnormality."
    seed = item_seed(1, 2, 3)
    c = bundle.unet.config
    noise = initial_noise((c.in_channels, c.sample_size, c.sample_size), [seed])
    theirs = pipe(prompt, num_inference_steps=3, guidance_scale=4.0, latents=noise.clone(), output_type="pt").images
    ours = generate(bundle, bundle.encode_prompts([prompt]), [seed], steps=3, guidance=4.0)
    assert theirs.shape == ours.shape == (1, 3, bundle.resolution, bundle.resolution)
    torch.testing.assert_close(theirs.float().cpu(), ours, atol=2e-3, rtol=0)
    assert (L.reports / "base_samples.png").exists()


def test_reference_threshold_and_self_retrieval(work):
    p, L = work
    th = json.loads((L.reference / "threshold.json").read_text())
    ids = json.loads((L.reference / "ids.json").read_text())
    ctx = EvalContext(p, L)
    sims, idx = ctx.index.search(ctx.train_feats[:5], k=1)
    assert (idx[:, 0] == np.arange(5)).all() and np.allclose(sims[:, 0], 1.0, atol=1e-4)
    assert len(ids["train"]) == 30 and len(ids["val"]) == th["n_val"] == 12 and th["n_heldout"] == 12
    # calibrated on val (conformal: with 12 images at q = 0.95 the threshold is val's max), floor on test
    val_sims = ctx.index.search(np.load(L.reference / "val_feats.npy"), k=1)[0][:, 0]
    test_sims = ctx.index.search(np.load(L.reference / "test_feats.npy"), k=1)[0][:, 0]
    assert th["calibrated_on"] == "val" and th["threshold"] == pytest.approx(float(val_sims.max()))
    assert th["heldout_flagged_rate"] == pytest.approx(float((test_sims > th["threshold"]).mean()))
    spread = th["heldout_floor_spread"]
    assert spread["n_splits"] == 200 and spread["n_images"] == 24
    assert 0 <= spread["p10"] <= spread["p50"] <= spread["p90"] <= 1 and spread["std"] > 0


def test_run_arm_trains_saves_and_reuses_finished_work(work):
    p, L = work
    ctx = EvalContext(p, L)
    blocks = block_list(p, L)
    mask = Mask(method="lora", blocks=blocks, bits=(1,) + (0,) * (len(blocks) - 1), lr=1e-3, options={"rank": 2})
    out = L.trials / mask.digest()
    rec = run_arm(p, L, ctx, mask, out, rows=search_rows(p, ctx), steps=3, seed=0)
    m = rec["metrics"]
    assert 0 < m["trainable"] and 0 < m["trainable_pct"] < 100
    assert 0 <= m["mem.flagged_rate"] <= 1 and m["mem.n"] == p.data.demo.n_mem * p.sample.mem_seeds
    assert np.isfinite([m["quality.kid_mean"], m["quality.fid"], m["noise_norm.max"]]).all()
    for f in ("adapter.safetensors", "mask.json", "metrics.json", "grid.png"):
        assert (out / f).exists()
    stamp = (out / "metrics.json").stat().st_mtime_ns
    again = run_arm(p, L, ctx, mask, out, rows=search_rows(p, ctx), steps=3, seed=0)
    assert again == json.loads((out / "metrics.json").read_text()) and (out / "metrics.json").stat().st_mtime_ns == stamp


def test_final_rows_follow_the_final_section(work):
    p, L = work
    ctx = EvalContext(p, L)
    train = ctx.df[ctx.df.split == "train"]
    n_orig, n_mem = int((train.subset == "original").sum()), int((train.subset == "mem").sum())
    for ratio, reps in ((0.5, 2), (1.0, 3)):
        q = p.model_copy(update={"final": p.final.model_copy(update={"data_size_ratio": ratio, "n_repeats": reps})})
        rows = final_rows(q, ctx)
        assert (rows.subset == "original").sum() == int(n_orig * ratio) and (rows.subset == "mem").sum() == n_mem * reps


def test_an_edited_library_module_recomputes_the_arm_and_an_unchanged_rerun_reuses_it(work, tmp_path, monkeypatch):
    """The arm's key covers the source of every module the arm imports: a real edit of a file in a
    copy of the package recomputes the arm; an edit of a module the arm does not import does not."""
    from memcontrol import reuse

    p, L = work
    code = tmp_path / "memcontrol"
    shutil.copytree(Path(reuse.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(reuse, "CODE_ROOT", code)
    ctx = EvalContext(p, L)
    blocks = block_list(p, L)
    mask = Mask(method="lora", blocks=blocks, bits=(0,) * (len(blocks) - 1) + (1,), lr=1e-3, options={"rank": 2})
    out = L.root / "code_change" / mask.digest()
    done = out / "metrics.json"

    def arm() -> dict:
        return run_arm(p, L, ctx, mask, out, rows=search_rows(p, ctx), steps=2, seed=0)

    first = arm()
    stamp = done.stat().st_mtime_ns
    assert arm() == first and done.stat().st_mtime_ns == stamp  # unchanged rerun: reused

    render = code / "audit" / "render.py"  # report rendering: not imported by an arm
    render.write_text(render.read_text() + "\n# edited\n")
    assert arm() == first and done.stat().st_mtime_ns == stamp

    train = code / "train.py"  # the inner loop: imported by every arm
    train.write_text(train.read_text().replace("beta 0.9/0.999", "betas 0.9/0.999"))
    assert train.read_text() != (Path(reuse.__file__).parent / "train.py").read_text()
    again = arm()
    assert done.stat().st_mtime_ns != stamp and again["key"]["code"] != first["key"]["code"]
    assert {k: v for k, v in again["key"].items() if k != "code"} == {k: v for k, v in first["key"].items() if k != "code"}
    assert again["metrics"]["mem.mean_sim"] == first["metrics"]["mem.mean_sim"]  # same seed, same numbers
    assert arm() == again  # and the recomputed record is reused in turn
