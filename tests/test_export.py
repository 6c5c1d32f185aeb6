"""Export: for every method, the merged diffusers folder drawn by diffusers' own
StableDiffusionPipeline equals our sampler with the adapter, on the tiny default (MiniLM text
encoder) and on an SD-1.5-layout folder (CLIP); LoRA also loads with `load_lora_weights`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DDIMScheduler, StableDiffusionPipeline

from memcontrol.config import TinyModel
from memcontrol.export import LORA_FILE, RECORD_FILE, ExportError, export_model
from memcontrol.models import tiny
from memcontrol.models.bundle import load_bundle, save_bundle
from memcontrol.sample import generate, initial_noise, item_seed
from memcontrol.tuning import apply, load_adapter, mask_for_model, save_adapter, trainable_state_dict
from sd_style import build_sd_style

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "attention", "bias", "norm", "lora", "svdiff", "difffit")
OPTIONS = {"lora": {"rank": 2, "alpha": 4}}  # alpha != rank: the scale must survive the export
PROMPTS = ["No acute cardiopulmonary abnormality.", "Large right pleural effusion."]
STEPS, GUIDANCE = 3, 4.0
# Our sampler and diffusers' pipeline run the same fp32 ops in a different order (batched CFG,
# merged weights): pixel differences in [0, 1] stay below 2e-3 (half an 8-bit level).
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    micro = yaml.safe_load((ROOT / "tests" / "micro_params.yaml").read_text())["model"]["tiny"]
    return {"tiny": save_bundle(tiny.build(TinyModel(**micro), seed=0), root / "tiny"),
            "sd_style": build_sd_style(root / "sd_style", resolution=64)}


def fine_tuned(base: Path, method: str, out: Path) -> Path:
    """An adapter far from its identity init (random values, as after a long fine-tune), on every
    other block of the method's layout."""
    unet = load_bundle(base).unet
    n = len(mask_for_model(unet, method, 1e-3).blocks)
    mask = mask_for_model(unet, method, 1e-3, [1 - i % 2 for i in range(n)], options=OPTIONS.get(method, {}))
    torch.manual_seed(0)
    apply(unet, mask)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainable_state_dict(unet, mask).values():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 * p.abs().mean() + 0.05))
    save_adapter(out, unet, mask)
    return out


def ours(base: Path, adapter: Path | None, seeds: list[int]) -> torch.Tensor:
    bundle = load_bundle(base)
    if adapter is not None:
        load_adapter(adapter, bundle.unet)
    return generate(bundle, bundle.encode_prompts(PROMPTS), seeds, steps=STEPS, guidance=GUIDANCE)


def theirs(pipe: StableDiffusionPipeline, seeds: list[int]) -> torch.Tensor:
    c = pipe.unet.config
    noise = torch.cat([initial_noise((c.in_channels, c.sample_size, c.sample_size), [s]) for s in seeds])
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise,
                output_type="pt").images.float()


@pytest.mark.parametrize("model", ["tiny", "sd_style"])
@pytest.mark.parametrize("method", METHODS)
def test_exported_folder_draws_what_our_sampler_draws(bases, model, method, tmp_path, record_property):
    base = bases[model]
    adapter = fine_tuned(base, method, tmp_path / "adapter")
    out = export_model(base, adapter, tmp_path / "export", card="# card\n")
    seeds = [item_seed(3, i, 0) for i in range(len(PROMPTS))]

    pipe = StableDiffusionPipeline.from_pretrained(out)  # as a diffusers user loads it: no extra arguments
    assert isinstance(pipe.scheduler, DDIMScheduler) and not pipe.scheduler.config.clip_sample
    bundle = load_bundle(base)
    # the pipeline's conditioning (tokeniser, attention mask for MiniLM) is ours, bit for bit
    torch.testing.assert_close(pipe.encode_prompt(PROMPTS + [""], "cpu", 1, False)[0],
                               bundle.encode_prompts(PROMPTS + [""]), rtol=0, atol=0)
    expected = ours(base, adapter, seeds)
    assert (expected - ours(base, None, seeds)).abs().max() > 0.02  # the adapter changes the images
    got = theirs(pipe, seeds)
    diff = float((got - expected).abs().max())
    record_property(f"max_pixel_diff.{model}.{method}", diff)
    print(f"export {model} {method}: max |pixel difference| {diff:.2e}")
    assert got.shape == expected.shape and diff <= TOLERANCE
    assert (out / "README.md").read_text() == "# card\n" and (out / RECORD_FILE).exists()

    if method == "lora":  # diffusers' own LoRA file, applied to the base model
        assert (out / LORA_FILE).exists()
        pipe = StableDiffusionPipeline.from_pretrained(base)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        pipe.load_lora_weights(out)
        diff = float((theirs(pipe, seeds) - expected).abs().max())
        record_property(f"max_pixel_diff.{model}.lora_file", diff)
        print(f"export {model} lora file via load_lora_weights: max |pixel difference| {diff:.2e}")
        assert diff <= TOLERANCE
    else:
        assert not (out / LORA_FILE).exists()


def test_export_refuses_a_folder_it_did_not_write(bases, tmp_path):
    adapter = fine_tuned(bases["tiny"], "bias", tmp_path / "adapter")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="mine: exists and is not a memcontrol export"):
        export_model(bases["tiny"], adapter, mine, card=None)
    assert (mine / "notes.txt").read_text() == "keep me"
    out = export_model(bases["tiny"], adapter, tmp_path / "out", card=None)
    export_model(bases["tiny"], adapter, out, card=None)  # an earlier export is replaced
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae", RECORD_FILE])
    with pytest.raises(ExportError, match="no mask.json"):
        export_model(bases["tiny"], tmp_path / "nothing", tmp_path / "out2", card=None)


def test_memcontrol_export_of_the_micro_run_loads_and_carries_its_model_card(micro_project):
    """`memcontrol export models/export` after the README's DVC chain (a real micro fine-tune): the
    folder draws what our sampler draws, and its card's numbers are those of the result files."""
    import hashlib
    import json

    from huggingface_hub import ModelCard

    project, _ = micro_project
    out, adapter = project / "models/export", project / "models/final/seed0"
    seeds = [item_seed(3, i, 0) for i in range(len(PROMPTS))]
    diff = float((theirs(StableDiffusionPipeline.from_pretrained(out), seeds) - ours(project / "models/base", adapter, seeds))
                 .abs().max())
    print(f"export micro run (lora, trained): max |pixel difference| {diff:.2e}")
    assert diff <= TOLERANCE

    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    compare = json.loads((project / "reports/metrics.json").read_text())
    th = json.loads((project / "data/reference/threshold.json").read_text())
    own = json.loads((adapter / "metrics.json").read_text())["metrics"]
    enabled = [b for b, bit in zip(*(json.loads((adapter / "mask.json").read_text())[k] for k in ("blocks", "bits"))) if bit]
    assert meta["library_name"] == "diffusers" and meta["base_model"] == "models/base"
    assert meta["license"] == "cc-by-nc-nd-4.0" and "memcontrol" in meta["tags"] and meta["pipeline_tag"] == "text-to-image"
    m = meta["memcontrol"]
    assert m["method"] == "lora" and m["enabled_blocks"] == enabled and enabled
    assert m["trainable_pct"] == own["trainable_pct"] and m["flagged_rate_this_seed"] == own["mem.flagged_rate"]
    assert m["flagged_rate"] == compare["selected"]["mem.flagged_rate"]
    assert m["false_positive_floor"] == compare["held-out"]["mem.flagged_rate"]
    assert m["kid"] == compare["selected"]["quality.kid_mean"] and m["fid"] == compare["selected"]["quality.fid"]
    assert m["threshold"] == th["threshold"] and m["embedder"] == th["embedder"] and m["seeds"] == [0]
    assert m["manifest_sha256"] == hashlib.sha256((project / "data/processed/manifest.parquet").read_bytes()).hexdigest()
    for block in enabled:
        assert f"`{block}`" in card.text
    memorizes = max(m["flagged_rate"], m["flagged_rate_this_seed"]) > m["false_positive_floor"]
    assert ("this model memorizes" in card.text) == memorizes
    assert "Intended use" in card.text and "pytorch_lora_weights.safetensors" in card.text


def test_release_writes_a_dataset_card_from_its_summary(micro_project):
    import json

    from huggingface_hub import DatasetCard

    project, _ = micro_project
    card = DatasetCard.load(project / "release/README.md")
    summary = json.loads((project / "release/summary.json").read_text())
    th = json.loads((project / "data/reference/threshold.json").read_text())
    m = card.data.to_dict()["memcontrol"]
    for key in ("n_generated", "n_released", "n_excluded", "n_excluded_embedding", "threshold", "embedder"):
        assert m[key] == summary[key], key
    assert m["false_positive_floor"] == th["heldout_flagged_rate"] and card.data.license == "cc-by-nc-nd-4.0"
    assert ("**Warning:**" in card.text) == (m["flagged_rate"] > m["false_positive_floor"])
    assert f"{summary['n_released']} of {summary['n_generated']} images" in card.text


def test_export_stops_with_one_clear_error_when_a_result_is_missing(micro_project, tmp_path):
    import shutil
    import subprocess

    from micro_project import newcomer_env

    project, _ = micro_project
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns(".git", "cache", "mlruns", "dvc_plots",
                                                                                "export", "release", "audit"))
    (copy / "reports/metrics.json").unlink()
    r = subprocess.run(["bash", "-c", "source scripts/env.sh\nmemcontrol export models/export"], cwd=copy,
                       env=newcomer_env(copy), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "reports/metrics.json: missing; `memcontrol compare` writes it" in r.stderr
    assert not (copy / "models/export").exists() and not list((copy / "models").glob(".export*"))
