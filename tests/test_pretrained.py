"""The committed tiny base model (memcontrol/models/pretrained.py): the demo's defaults select it,
it loads as the model it was trained as, and any other recipe pretrains instead."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from memcontrol.base_model import base, load_base
from memcontrol.config import load_params
from memcontrol.data.demo import build_demo
from memcontrol.models import pretrained
from memcontrol.prepare import prepare
from memcontrol.workdir import Layout, read_manifest, rows_of

ROOT = Path(__file__).resolve().parents[1]


def test_default_params_and_demo_data_select_the_committed_base(tmp_path):
    """If this fails, the defaults or the demo's base data changed: refresh the committed copy with
    `python scripts/pretrain_base.py` (the demo would otherwise pretrain for minutes)."""
    params = load_params(ROOT / "params.yaml")
    demo = params.data.demo.model_dump()
    df = build_demo(tmp_path, seed=params.seed, **{**demo, "n_train": 30, "n_val": 1, "n_test": 1, "n_mem": 1})
    key = pretrained.recipe(params, rows_of(df, "base"))
    assert pretrained.committed_recipe() == key
    bundle = pretrained.load_committed(params)
    assert next(bundle.unet.parameters()).dtype == torch.float32
    assert bundle.resolution == params.model.tiny.resolution
    assert bundle.vae.config.latent_channels == params.model.tiny.latent_channels


def test_base_uses_a_matching_committed_copy_and_pretrains_otherwise(tmp_path, monkeypatch):
    params = load_params(ROOT / "tests" / "micro_params.yaml")
    first = Layout(tmp_path / "first")
    prepare(params, first)
    base(params, first)  # no committed micro base: pretrains
    assert json.loads((first.base / "recipe.json").read_text())["source"] == "pretrained"

    # commit it (to a temporary folder standing in for the package's), then a fresh workdir loads it
    monkeypatch.setattr(pretrained, "COMMITTED", tmp_path / "committed")
    rows = rows_of(read_manifest(first), "base")
    pretrained.save_committed(load_base(first), pretrained.recipe(params, rows), {"pretrain_seconds": 0})
    second = Layout(tmp_path / "second")
    prepare(params, second)
    base(params, second)
    record = json.loads((second.base / "recipe.json").read_text())
    assert record["source"] == "committed" and record["recipe"] == pretrained.recipe(params, rows)
    a, b = load_base(first).unet.state_dict(), load_base(second).unet.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-2, rtol=1e-2) for k in a)  # fp16 round trip

    # --pretrain ignores the copy; another seed (so other weights) does not match it
    base(params, second, force_pretrain=True)
    assert json.loads((second.base / "recipe.json").read_text())["source"] == "pretrained"
    other = params.model_copy(update={"seed": 1})
    third = Layout(tmp_path / "third")
    prepare(other, third)
    base(other, third)
    assert json.loads((third.base / "recipe.json").read_text())["source"] == "pretrained"
