"""Data layer: demo builder, manifest, ingest validation, image loading, DRR findings, prompts."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from memcontrol import assets
from memcontrol.data import card, drr, reports
from memcontrol.data.demo import DRR_MIX, build_demo, drr_label
from memcontrol.data.images import load_images, read_dicom, save_png
from memcontrol.data.manifest import (
    COLUMNS,
    DataError,
    image_paths,
    ingest_csv,
    load_manifest,
    memorization_training_set,
    save_manifest,
)

MICRO = dict(n_base=8, n_codec=6, n_train=24, n_val=6, n_test=8, n_mem=4, image_size=32)

# what each label's prompt must say (independent of the selection regexes in reports.py)
_LOBE_WORDS = {
    "rul": r"right upper lobe|right apex|right apical",
    "rml": r"right middle lobe",
    "rll": r"right lower lobe|right (lung )?bas",
    "lul": r"left upper lobe|lingula",
    "lll": r"left lower lobe|left (lung )?bas|retrocardiac",
}


def prompt_agrees(label: str, prompt: str) -> bool:
    p = prompt.lower()
    if label == "normal":
        return bool(re.search(r"normal|clear|no acute|negative|unremarkable", p)) and "enlarged" not in p.replace("not enlarged", "")
    if label.startswith("consolidation_"):
        return bool(re.search(_LOBE_WORDS[label[-3:]], p) and re.search(r"consolid|airspace|air space|pneumonia|infiltrat|opacit", p))
    if label.startswith("effusion_"):
        side = label.split("_")[1]
        other = "left" if side == "right" else "right"
        finding = [s for s in re.split(r"(?<=\.)\s", p) if "effusion" in s and not re.search(r"\bno\b", s)]
        return len(finding) == 1 and side in finding[0] and other not in finding[0]
    if label == "cardiomegaly":
        return bool(re.search(r"cardiomegaly|enlarged", p))
    if label.startswith("nodule_"):
        return "nodule" in p and bool(re.search(_LOBE_WORDS[label[-3:]], p))
    if label == "pneumonia":
        return bool(re.search(r"pneumonia|consolidation|airspace|air space|infiltrate", p))
    if label == "nodules":
        return bool(re.search(r"nodules|metasta", p))
    raise AssertionError(f"unknown label {label}")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_a")
    return root, build_demo(root, seed=0, **MICRO)


@pytest.fixture(scope="module")
def micro_same_seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_b")
    return root, build_demo(root, seed=0, **MICRO)


@pytest.fixture(scope="module")
def micro_other_seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_c")
    return root, build_demo(root, seed=1, **MICRO)


# ----------------------------------------------------------------------------- demo builder


def test_demo_counts_splits_and_subsets(micro):
    root, df = micro
    assert list(df.columns) == COLUMNS
    base = df[df["split"] == "base"]
    assert (base["subset"] == "").sum() == MICRO["n_base"]
    assert (base["subset"] == "codec").sum() == MICRO["n_codec"]
    for split in ("train", "val", "test"):
        assert (df["split"] == split).sum() == MICRO[f"n_{split}"]
    train = df[df["split"] == "train"]
    assert (train["subset"] == "mem").sum() == MICRO["n_mem"]
    assert (train["subset"] == "original").sum() == MICRO["n_train"] - MICRO["n_mem"]
    assert (df.loc[df["split"].isin(["val", "test"]), "subset"] == "").all()
    # the base UNet's world is CT slices; the fine-tuning world (and the VAE's codec rows) radiographs
    assert (base.loc[base["subset"] == "", "source"] == "ct-axial").all()
    assert base.loc[base["subset"] == "", "label"].str.startswith("ct_axial_").all()
    assert base.loc[base["subset"] == "codec", "source"].str.startswith("drr").all()
    assert df.loc[df["split"] != "base", "source"].str.startswith("drr").all()


def test_memorization_prompts_are_their_images_alone(micro):
    _, df = micro
    mem = df[df["subset"] == "mem"]
    counts = df["prompt"].value_counts()
    assert (mem["prompt"].map(counts) == 1).all()


def test_demo_images_match_manifest(micro):
    root, df = micro
    assert df["sha256"].is_unique
    for p, sha in zip(image_paths(df, root), df["sha256"]):
        data = p.read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha
        with Image.open(p) as im:
            assert im.size == (MICRO["image_size"], MICRO["image_size"]) and im.mode == "L"
    assert all(not Path(p).is_absolute() and p.startswith("images/") for p in df["path"])


def test_demo_prompts_agree_with_labels(micro):
    _, df = micro
    drr_rows = df[df["source"].str.startswith("drr")]
    for label, prompt in zip(drr_rows["label"], drr_rows["prompt"]):
        assert prompt.strip() and len(prompt.split()) <= reports.MAX_WORDS
        assert prompt_agrees(label, prompt), (label, prompt)
    ct = df[df["source"] == "ct-axial"]
    for label, prompt in zip(ct["label"], ct["prompt"]):
        assert prompt.startswith("Axial contrast-enhanced chest CT") and label.split("_")[-1] in prompt


def test_demo_is_deterministic(micro, micro_same_seed):
    a, b = micro[1], micro_same_seed[1]
    pd.testing.assert_frame_equal(a, b)


def test_other_seed_gives_other_data(micro, micro_other_seed):
    a, b = micro[1], micro_other_seed[1]
    drr_a = set(a.loc[a["source"].str.startswith("drr"), "sha256"])
    drr_b = set(b.loc[b["source"].str.startswith("drr"), "sha256"])
    assert not drr_a & drr_b
    assert list(a["prompt"]) != list(b["prompt"])


def test_build_demo_rejects_more_memorization_rows_than_train_rows(tmp_path):
    with pytest.raises(ValueError, match="n_mem <= n_train"):
        build_demo(tmp_path, n_base=2, n_codec=0, n_train=3, n_val=2, n_test=2, n_mem=5, image_size=32)


# ----------------------------------------------------------------------------- prompts


def test_drr_prompts_agree_for_every_finding():
    bank = reports.sentence_bank(reports.load_iu_reports())
    rng = np.random.default_rng(0)
    for kind, where, _ in DRR_MIX:
        for _ in range(25):
            prompt, finding, _real = reports.drr_prompt(kind, where, bank, rng)
            assert (finding.kind, finding.where) == (kind, where)
            assert 0.0 <= finding.severity <= 1.0
            assert len(prompt.split()) <= reports.MAX_WORDS
            assert prompt_agrees(drr_label(kind, where), prompt), (kind, where, prompt)


def test_severity_follows_the_text():
    rng = np.random.default_rng(0)
    small = [reports._severity("Small left pleural effusion.", "effusion", rng) for _ in range(20)]
    large = [reports._severity("Large left pleural effusion.", "effusion", rng) for _ in range(20)]
    assert max(small) < min(large)
    assert reports._severity("There is a 3.2 cm nodule in the right upper lobe.", "nodule", rng) == pytest.approx(1.0)


def test_real_label_reports_exist_and_agree():
    iu = reports.load_iu_reports()
    assert len(iu) == 3955
    for label in reports.REAL_LABELS:
        cands = reports.report_candidates(iu, label)
        assert cands, label
        for _, text in cands:
            assert "XXXX" not in text and len(text.split()) <= reports.MAX_WORDS
            assert prompt_agrees(label, text), (label, text)
    assert len(reports.report_candidates(iu, "pneumonia")) >= 8
    bank = reports.sentence_bank(iu, frozenset({"CXR1"}))
    assert not any("CXR1" in s for s in bank.normal)


# ----------------------------------------------------------------------------- DRR renderer


@pytest.fixture(scope="module")
def phantom():
    return drr.load_phantom()


def _diff(ph, finding, seed=3, size=64):
    base = drr.render(ph, drr.Finding("normal"), np.random.default_rng(seed), size)
    return drr.render(ph, finding, np.random.default_rng(seed), size) - base


def test_drr_is_a_chest_radiograph(phantom):
    img = drr.render(phantom, drr.Finding("normal"), np.random.default_rng(0), 64)
    assert img.shape == (64, 64) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    # aerated lungs (either side of the mediastinum, mid height) are darker than the mediastinum
    lungs = img[20:36, 8:22].mean() + img[20:36, 42:56].mean()
    assert lungs / 2 < img[20:36, 28:36].mean()


@pytest.mark.parametrize("finding, viewer_side", [
    (drr.Finding("consolidation", "rll", 0.9), "left"),   # patient's right = viewer's left
    (drr.Finding("consolidation", "lul", 0.9), "right"),
    (drr.Finding("effusion", "right", 0.8), "left"),
    (drr.Finding("effusion", "left", 0.8), "right"),
    (drr.Finding("cardiomegaly", "", 1.0), "right"),      # the heart grows towards the patient's left
])
def test_finding_brightens_the_right_side(phantom, finding, viewer_side):
    d = _diff(phantom, finding)
    left, right = d[:, :32].mean(), d[:, 32:].mean()
    assert max(left, right) > 0.01
    assert (left > right) == (viewer_side == "left")


def test_nodule_is_local(phantom):
    d = _diff(phantom, drr.Finding("nodule", "rul", 1.0), size=96)
    assert d.max() > 0.1
    assert (np.abs(d) > 0.05).mean() < 0.05


def test_render_is_deterministic_per_rng(phantom):
    f = drr.Finding("effusion", "left", 0.4)
    a = drr.render(phantom, f, np.random.default_rng(7), 32)
    assert np.array_equal(a, drr.render(phantom, f, np.random.default_rng(7), 32))
    assert not np.array_equal(a, drr.render(phantom, f, np.random.default_rng(8), 32))


def test_finding_rejects_bad_values():
    with pytest.raises(ValueError, match="where"):
        drr.Finding("effusion", "rll")
    with pytest.raises(ValueError, match="severity"):
        drr.Finding("nodule", "rul", 1.5)


# ----------------------------------------------------------------------------- data card


def test_card_grid_rows_cover_every_image_once(micro, tmp_path):
    root, df = micro
    hits = np.stack([pred(df).to_numpy() for _, pred in card.GRID_ROWS])
    assert (hits.sum(axis=0) == 1).all()  # each image belongs to exactly one grid row
    titles = [t for t, _ in card.GRID_ROWS]
    assert (df.loc[hits[titles.index("CT slices\n(base)")], "source"] == "ct-axial").all()
    assert (df.loc[hits[titles.index("memorization\nsubset (train)")], "subset"] == "mem").all()
    out = card.example_grid(df, root, tmp_path / "grid.png", per_row=3, thumb=32)
    with Image.open(out) as im:
        grid = np.asarray(im)
    assert grid.shape == (len(card.GRID_ROWS) * (32 + 12), 112 + 3 * 32)
    for r in range(len(card.GRID_ROWS)):  # a row shows images exactly when the manifest has some
        cells = grid[r * 44: r * 44 + 32, 112:]
        assert (cells.max() > 0) == bool(hits[r].any())


def test_card_counts_add_up(micro):
    _, df = micro
    table = card.counts(df)
    assert table["n"].sum() == len(df)
    assert set(table["source"]) == {"ct-axial", "drr+iu", "drr+template"} & set(df["source"])
    mem = table[table["subset"] == "mem"]
    assert mem["n"].sum() == MICRO["n_mem"] and (mem["split"] == "train").all()


def test_card_similarity_statistics(micro):
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    within = card.similarity(features)
    assert within["mean"] == pytest.approx(1 / 3)  # pairs: 0, 1, 0
    assert within["nn_max"] == pytest.approx(1.0) and within["nn_mean"] == pytest.approx(2 / 3)
    across = card.similarity(features[:2], np.array([[0.6, 0.8]]))
    assert (across["n_a"], across["n_b"]) == (2, 1)
    assert across["mean"] == pytest.approx(0.7) and across["nn_max"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least 2"):
        card.similarity(features[:1])
    root, df = micro
    paths = image_paths(df, root)[:5]
    same = card.pixel_correlation(paths, paths)  # every image's nearest neighbour is itself
    assert same["nn_p5"] == pytest.approx(1.0)
    other = card.pixel_correlation(paths)
    assert -1.0 <= other["p5"] <= other["mean"] <= other["nn_max"] < 1.0


# ----------------------------------------------------------------------------- manifest


def test_memorization_training_set_counts(micro):
    _, df = micro
    n_orig = ((df["split"] == "train") & (df["subset"] == "original")).sum()
    n_mem = (df["subset"] == "mem").sum()
    ts = memorization_training_set(df, data_size_ratio=0.5, n_repeats=3, seed=0)
    assert len(ts) == int(n_orig * 0.5) + 3 * n_mem
    assert (ts["subset"] == "mem").sum() == 3 * n_mem
    assert ts.loc[ts["subset"] == "mem", "id"].value_counts().eq(3).all()
    assert ts.loc[ts["subset"] == "original", "id"].is_unique
    assert (ts["split"] == "train").all()
    pd.testing.assert_frame_equal(ts, memorization_training_set(df, data_size_ratio=0.5, n_repeats=3, seed=0))
    other = memorization_training_set(df, data_size_ratio=0.5, n_repeats=3, seed=1)
    assert set(other.loc[other["subset"] == "original", "id"]) != set(ts.loc[ts["subset"] == "original", "id"])
    with pytest.raises(DataError, match="n_repeats"):
        memorization_training_set(df, data_size_ratio=0.5, n_repeats=0, seed=0)
    with pytest.raises(DataError, match="subset 'mem'"):
        memorization_training_set(df[df["subset"] != "mem"], data_size_ratio=0.5, n_repeats=2, seed=0)


def test_manifest_roundtrip_and_schema_errors(micro, tmp_path):
    _, df = micro
    path = save_manifest(df, tmp_path / "m.parquet")
    pd.testing.assert_frame_equal(load_manifest(path), df)
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temporary file left
    df.drop(columns=["prompt"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet.*missing column\(s\) \['prompt'\]"):
        load_manifest(tmp_path / "bad.parquet")
    bad = df.copy()
    bad.loc[3, "split"] = "validation"
    with pytest.raises(DataError, match="column 'split' row 4"):
        save_manifest(bad, tmp_path / "bad2.parquet")


# ----------------------------------------------------------------------------- ingest_csv


@pytest.fixture
def user_data(tmp_path):
    """A MIMIC-style folder of 6 real CXRs + CSV with path,text."""
    root = tmp_path / "images"
    (root / "p1").mkdir(parents=True)
    files = assets.pediatric_cxrs()[:3] + assets.pediatric_cxrs()[-3:]
    rows = []
    for i, f in enumerate(files):
        shutil.copy(f, root / "p1" / f"img{i}.jpg")
        rows.append({"path": f"p1/img{i}.jpg", "text": f"Report {i}. No acute cardiopulmonary process."})
    csv = tmp_path / "train.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv, root


def test_ingest_csv_builds_a_manifest(user_data):
    csv, root = user_data
    df = ingest_csv(csv, root, n_mem=2, test_fraction=0.34, seed=0)
    assert list(df.columns) == COLUMNS and len(df) == 6
    assert (df["split"] == "test").sum() == 2 and (df["split"] == "val").sum() == 1
    assert (df["subset"] == "mem").sum() == 2
    assert (df.loc[df["subset"] == "mem", "split"] == "train").all()
    assert (df["source"] == "user").all()
    for p, sha in zip(df["path"], df["sha256"]):
        assert Path(p).is_absolute() and hashlib.sha256(Path(p).read_bytes()).hexdigest() == sha
    pd.testing.assert_frame_equal(df, ingest_csv(csv, root, n_mem=2, test_fraction=0.34, seed=0))


def test_ingest_csv_with_split_column_and_mem_csv(user_data, tmp_path):
    csv, root = user_data
    d = pd.read_csv(csv)
    d["split"] = ["train", "train", "train", "train", "val", "test"]
    d.to_csv(csv, index=False)
    mem = tmp_path / "mem.csv"
    d.iloc[[1, 3]].to_csv(mem, index=False)
    df = ingest_csv(csv, root, split_column="split", mem_csv=mem)
    assert df.loc[df["subset"] == "mem", "id"].tolist() == ["p1/img1.jpg", "p1/img3.jpg"]
    d.iloc[[5]].to_csv(mem, index=False)
    with pytest.raises(DataError, match=r"mem\.csv row 2: .*img5\.jpg.*split 'test'"):
        ingest_csv(csv, root, split_column="split", mem_csv=mem)


def test_ingest_split_column_needs_all_three_splits(user_data):
    csv, root = user_data
    d = pd.read_csv(csv)
    d["split"] = ["train", "train", "train", "train", "test", "test"]
    d.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"train\.csv: column 'split' has no 'val' row"):
        ingest_csv(csv, root, split_column="split")


def test_ingest_group_column_keeps_each_patient_in_one_split(user_data):
    csv, root = user_data
    d = pd.read_csv(csv)
    d["patient"] = ["a", "a", "b", "b", "c", "d"]
    d.to_csv(csv, index=False)
    for seed in range(6):
        df = ingest_csv(csv, root, group_column="patient", n_mem=1, val_fraction=0.2, test_fraction=0.2, seed=seed)
        split_of = dict(zip(df["id"], df["split"]))
        for patient, group in d.groupby("patient"):
            assert len({split_of[p] for p in group["path"]}) == 1, (seed, patient)
        assert set(df["split"]) == {"train", "val", "test"}
    d["split"] = ["train", "test", "train", "train", "val", "test"]  # patient a in two splits
    d.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"row 3: group 'a' \(column 'patient'\) is in split 'test' but .*row 2 puts it in 'train'"):
        ingest_csv(csv, root, split_column="split", group_column="patient")


def test_ingest_without_group_column_warns_of_the_risk(user_data, caplog):
    csv, root = user_data
    with caplog.at_level("WARNING", logger="memcontrol.data.manifest"):
        ingest_csv(csv, root, n_mem=1)
    assert "no group column" in caplog.text and "group_column" in caplog.text


def test_ingest_missing_image_names_file_and_row(user_data):
    csv, root = user_data
    (root / "p1" / "img2.jpg").unlink()
    with pytest.raises(DataError, match=r"train\.csv row 4: image .*img2\.jpg not found"):
        ingest_csv(csv, root, n_mem=2)


def test_ingest_unreadable_image_names_file_and_row(user_data):
    csv, root = user_data
    d = pd.read_csv(csv)
    (root / "p1" / "garbage.png").write_bytes(b"this is not a png" * 10)
    d.loc[5, "path"] = "p1/garbage.png"
    d.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"train\.csv row 7: .*garbage\.png: not a readable image"):
        ingest_csv(csv, root, n_mem=2)


def test_ingest_missing_column_lists_columns_found(user_data):
    csv, root = user_data
    pd.read_csv(csv).rename(columns={"text": "report"}).to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) \['text'\]; found \['path', 'report'\]"):
        ingest_csv(csv, root)


def test_ingest_empty_prompt_names_row(user_data):
    csv, root = user_data
    d = pd.read_csv(csv)
    d.loc[2, "text"] = "   "
    d.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"train\.csv row 4: column 'text' \(prompt\) is empty"):
        ingest_csv(csv, root)


def test_ingest_duplicate_path_and_bad_split(user_data):
    csv, root = user_data
    d = pd.read_csv(csv)
    d.loc[4, "path"] = "p1/img0.jpg"
    d.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"row 6: path 'p1/img0\.jpg' duplicates .*row 2"):
        ingest_csv(csv, root)
    d = pd.read_csv(csv).drop_duplicates("path")
    d["split"] = "validate"
    d.to_csv(csv, index=False)
    with pytest.raises(DataError, match=r"row 2: column 'split' value 'validate' is not one of"):
        ingest_csv(csv, root, split_column="split")


def test_ingest_missing_csv(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: CSV file not found"):
        ingest_csv(tmp_path / "nope.csv", tmp_path)


def _outside(user_data, kind):
    """Row 3 of the CSV names an image outside the root: absolute, by `..`, or through a symlink."""
    csv, root = user_data
    outside = root.parent / "other_study"
    outside.mkdir()
    shutil.copy(root / "p1" / "img1.jpg", outside / "x.jpg")
    d = pd.read_csv(csv)
    if kind == "absolute":
        d.loc[1, "path"] = str(outside / "x.jpg")
    elif kind == "dotdot":
        d.loc[1, "path"] = "../other_study/x.jpg"
    else:
        (root / "link").symlink_to(outside, target_is_directory=True)
        d.loc[1, "path"] = "link/x.jpg"
    d.to_csv(csv, index=False)
    return csv, root


@pytest.mark.parametrize("kind, message", [
    ("absolute", r"row 3: path '/.*other_study/x\.jpg' is absolute; paths must be relative to the image root"),
    ("dotdot", r"row 3: path '\.\./other_study/x\.jpg' contains '\.\.'"),
    ("symlink", r"row 3: path 'link/x\.jpg' is a symlink out of the image root .*link -> .*other_study"),
])
def test_ingest_refuses_paths_outside_the_image_root_by_name(user_data, kind, message):
    csv, root = _outside(user_data, kind)
    with pytest.raises(DataError, match=message + r".*data\.csv\.allow_outside_root: true"):
        ingest_csv(csv, root, n_mem=2)
    df = ingest_csv(csv, root, n_mem=2, allow_outside_root=True)  # the user's opt-in
    assert df["path"].str.endswith("other_study/x.jpg").sum() == 1


def test_ingest_accepts_a_symlink_that_stays_inside_the_root(user_data):
    csv, root = user_data
    (root / "alias").symlink_to(root / "p1", target_is_directory=True)
    d = pd.read_csv(csv)
    d.loc[1, "path"] = "alias/img1.jpg"
    d.to_csv(csv, index=False)
    assert len(ingest_csv(csv, root, n_mem=2)) == 6


# ----------------------------------------------------------------------------- images


def test_load_images_shape_range_and_formats(tmp_path):
    grad16 = (np.linspace(0, 65535, 40 * 60).reshape(40, 60)).astype(np.uint16)
    save_png(grad16, tmp_path / "g16.png")
    rgb = np.zeros((30, 50, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    save_png(rgb, tmp_path / "rgb.png")
    paths = [assets.pediatric_cxrs()[0], tmp_path / "g16.png", tmp_path / "rgb.png", assets.adult_cxr_dicom()]
    x = load_images(paths, 24)
    assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    for i in (0, 1, 3):  # grayscale -> 3 equal channels
        assert torch.equal(x[i, 0], x[i, 1]) and torch.equal(x[i, 0], x[i, 2])
    assert x[1].min() < -0.9 and x[1].max() > 0.9  # 16-bit range used, not clipped to 8 bits
    assert x[2, 0].mean() > 0.99 and x[2, 1].mean() < -0.99  # red stays red
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")


def test_load_images_unreadable_names_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_images([bad], 16)


def test_dicom_monochrome1_is_inverted():
    a = read_dicom(assets.adult_cxr_dicom())
    h, w = a.shape
    mid = a[int(0.3 * h):int(0.6 * h)]
    lungs = (mid[:, int(0.2 * w):int(0.35 * w)].mean() + mid[:, int(0.65 * w):int(0.8 * w)].mean()) / 2
    assert mid[:, int(0.45 * w):int(0.55 * w)].mean() > lungs + 0.1  # mediastinum white, lungs dark
