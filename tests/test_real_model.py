"""The real-model path: `model.path` pointing at a user's Stable-Diffusion-1.5-style diffusers folder
(written by diffusers' and transformers' own save_pretrained, real CLIP vocabulary, SD-1.5 block
layout, PNDM scheduler) and a user's image folder + CSV, through the real Prefect flows."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from memcontrol.data import reports
from memcontrol.data.images import load_images
from memcontrol.models.bundle import ModelError, load_bundle
from memcontrol.models.clip import VOCAB_SIZE, clip_tokenizer
from memcontrol.sample import generate, initial_noise, item_seed
from memcontrol.train import TrainData, finetune
from memcontrol.tuning import Mask, apply, block_layout, mask_for_model, reference_layout
from real_xrays import real_images
from sd_style import SD15_BLOCKS, build_sd_style

RES = 64


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return build_sd_style(tmp_path_factory.mktemp("models") / "sd15-style", resolution=RES)


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> tuple[Path, Path]:
    """A user's dataset as it arrives: original JPEGs (various sizes) and a DICOM in a folder, and a
    CSV `path,text,patient` of relative paths, report text (a distinct real IU report agreeing with
    each image's label) and the patient id (one patient has two images)."""
    root = tmp_path_factory.mktemp("userdata")
    (root / "images").mkdir()
    iu = reports.load_iu_reports()
    pools = {label: [t for _, t in reports.report_candidates(iu, label)] for label in reports.REAL_LABELS}
    rows = []
    for im in real_images():
        rel = f"images/{im.file.name}"
        shutil.copy(im.file, root / rel)
        rows.append({"path": rel, "text": pools[im.label].pop(0), "patient": im.patient})
    pd.DataFrame(rows).to_csv(root / "reports.csv", index=False)
    return root / "reports.csv", root


@pytest.fixture(scope="session")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def searched(sd_folder, user_data, prefect_api, tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows import pipeline

    root = tmp_path_factory.mktemp("work")
    csv, image_root = user_data
    params = {
        "seed": 0,
        "data": {"source": "csv", "csv": {"csv": str(csv), "image_root": str(image_root), "n_mem": 4,
                                          "group_column": "patient", "val_fraction": 0.2,
                                          "test_fraction": 0.25},
                 "data_size_ratio": 0.5, "n_repeats": 2},
        "model": {"path": str(sd_folder)},
        "tuning": {"method": "lora", "mode": "full", "options": {"rank": 2}},
        "train": {"steps": 2, "batch_size": 2},
        "sample": {"steps": 2, "mem_seeds": 1, "n_quality": 4, "batch_size": 16},
        "metrics": {"embed_size": 64, "kid_subset_size": 2},
        "search": {"n_trials": 2, "batch_size": 2, "population_size": 2, "sampler": "nsga2"},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    args = (str(root / "params.yaml"), str(root))
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: root / ".prefect-storage"}):
        pipeline.prepare(*args)
        pipeline.base(*args)
        pipeline.reference(*args)
        out = pipeline.search(*args)
    return root, out


def test_clip_tokenizer_is_openai_clip():
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.convert_ids_to_tokens(tok("No pleural effusion.").input_ids) == [
        "<|startoftext|>", "no</w>", "ple", "ural</w>", "ef", "fusion</w>", ".</w>", "<|endoftext|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)


def test_sd_style_folder_loads_with_sd15_layout(sd_folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    b = load_bundle(sd_folder)
    assert isinstance(b.tokenizer, CLIPTokenizer) and len(b.tokenizer) == 49408
    assert isinstance(b.text_encoder, CLIPTextModel) and b.resolution == RES
    assert block_layout(b.unet, "lora", "full") == SD15_BLOCKS
    assert len(reference_layout(b.unet, "svdiff")) == 13 and len(reference_layout(b.unet, "attention")) == 16
    # Prompts longer than 77 tokens are truncated, and our conditioning is diffusers' own.
    prompts = [" ".join(["Heart size is normal, no focal consolidation."] * 12), ""]
    ours = b.encode_prompts(prompts)
    assert ours.shape == (2, 77, 64)
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    # Our DDIM sampler on the PNDM folder's schedule (set_alpha_to_one=False, steps_offset=1) = diffusers'.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    seed = item_seed(1, 2, 3)
    noise = initial_noise((4, RES // 8, RES // 8), [seed])
    img = pipe(prompts[0], num_inference_steps=3, guidance_scale=4.0, latents=noise.clone(), output_type="pt").images
    torch.testing.assert_close(img.float(), generate(b, ours[:1], [seed], steps=3, guidance=4.0), atol=2e-3, rtol=0)


def _broken(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_load_bundle_errors_name_the_component(sd_folder, tmp_path):
    missing = _broken(sd_folder, tmp_path / "no_vae", lambda d: shutil.rmtree(d / "vae"))
    with pytest.raises(ModelError, match=r"missing component folder\(s\) \['vae'\]"):
        load_bundle(missing)
    no_weights = _broken(sd_folder, tmp_path / "no_w", lambda d: [f.unlink() for f in (d / "unet").glob("*.safetensors")])
    with pytest.raises(ModelError, match=r"no_w/unet: cannot load the UNet"):
        load_bundle(no_weights)

    def v_pred(d: Path) -> None:
        f = d / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": "v_prediction"}))

    with pytest.raises(ModelError, match=r"prediction_type 'v_prediction'"):
        load_bundle(_broken(sd_folder, tmp_path / "v", v_pred))


def test_search_on_sd_style_folder_and_user_csv(searched, sd_folder):
    from memcontrol.search import completed, open_study
    from memcontrol.workdir import Layout

    root, out = searched
    L = Layout(root)
    m = pd.read_parquet(L.manifest)
    assert len(m) == 17 and set(m["source"]) == {"user"} and (m["subset"] == "mem").sum() == 4
    assert json.loads((L.base / "source.json").read_text()) == {"path": str(sd_folder.resolve()), "resolution": RES}
    th = json.loads((L.reference / "threshold.json").read_text())
    assert th["n_heldout"] == 4 and np.isfinite(th["threshold"])

    study = open_study(L.study_db, "memcontrol", sampler="nsga2", seed=0, population_size=2,
                       directions=["minimize", "minimize"])
    assert tuple(study.user_attrs["blocks"]) == SD15_BLOCKS
    trials = completed(study)
    assert len(trials) == 2
    for t in trials:
        rec = json.loads(t.user_attrs["record"])
        assert tuple(rec["mask"]["blocks"]) == SD15_BLOCKS
        vals = [rec["metrics"][k] for k in ("mem.mean_sim", "mem.flagged_rate", "quality.kid_mean", "quality.fid",
                                            "noise_norm.max", "final_loss")]
        assert np.isfinite(vals).all() and rec["metrics"]["trainable"] > 0
        assert (root / t.user_attrs["trial_dir"] / "adapter.safetensors").exists()

    sel = Mask.load(out["selected"])
    assert sel.blocks == SD15_BLOCKS and sel.method == "lora" and sel.trainable_params > 0
    # the selected mask applies to a fresh load of the user's folder (what Stage 2 does)
    assert apply(load_bundle(sd_folder).unet, sel).trainable == sel.trainable_params


@pytest.fixture(scope="module")
def real_train_data(sd_folder, user_data) -> TrainData:
    """Latents and text states of 4 real CXRs and their reports through the SD-style folder."""
    csv, root = user_data
    rows = pd.read_csv(csv).head(4)
    b = load_bundle(sd_folder)
    mean, std = b.encode_images(load_images([root / p for p in rows["path"]], RES))
    return TrainData(latent_mean=mean, latent_std=std, text=b.encode_prompts(rows["text"].tolist()),
                     null_text=b.encode_prompts([""]), image_idx=torch.arange(4), prompt_idx=torch.arange(4))


@pytest.mark.parametrize("method", ["lora", "svdiff"])
def test_gradient_checkpointing_gives_the_same_training(sd_folder, real_train_data, method):
    base = load_bundle(sd_folder)
    runs = []
    for ckpt in (False, True):
        unet = copy.deepcopy(base.unet)
        torch.manual_seed(0)  # LoRA's A matrices are drawn at injection
        prepared = apply(unet, mask_for_model(unet, method, lr=1e-3, options={"rank": 2} if method == "lora" else {}))
        res = finetune(unet, prepared.groups, real_train_data, base.scheduler, steps=4, batch_size=2, seed=0,
                       gradient_checkpointing=ckpt, device="cpu")
        runs.append((res.losses, {k: v.detach().clone() for k, v in unet.named_parameters() if v.requires_grad}))
        assert not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())  # switched off after
    (l0, p0), (l1, p1) = runs
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert l0[-1] != l0[0] and p0.keys() == p1.keys()
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-4, atol=1e-6)
