"""Hugging Face cards (YAML metadata + Markdown) for what leaves the project: the exported model
(`memcontrol export`) and the screened synthetic dataset (`memcontrol release`).

Every number is read from the file the pipeline wrote it to (reports/metrics.json,
data/reference/threshold.json, the arm's metrics.json, release/summary.json); a missing file is
an error naming it and the command that writes it. The metadata block repeats the numbers under
`memcontrol:` so a tool can read them without parsing the text."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from huggingface_hub import DatasetCardData, ModelCardData

from memcontrol.config import Params
from memcontrol.tuning import MASK_FILE, Mask
from memcontrol.workdir import Layout
from memcontrol.errors import MissingInput

DEMO_LICENSE = "cc-by-nc-nd-4.0"  # the IU report text, the embedded default's most restrictive part (docs/data.md)
TABLE = (("trainable %", "trainable_pct", ".3g"), ("flagged (memorized)", "mem.flagged_rate", ".3f"),
         ("own-image match", "mem.own_match_rate", ".3f"), ("mean NN sim", "mem.mean_sim", ".3f"),
         ("KID", "quality.kid_mean", ".4f"), ("FID", "quality.fid", ".1f"), ("seeds", "n_seeds", ".0f"))


def read_json(path: Path, made_by: str) -> dict:
    if not path.is_file():
        raise MissingInput(f"{path}: missing; `{made_by}` writes it")
    return json.loads(path.read_text())


def manifest_sha256(layout: Layout) -> str:
    if not layout.manifest.is_file():
        raise MissingInput(f"{layout.manifest}: missing; `memcontrol prepare` writes it")
    return hashlib.sha256(layout.manifest.read_bytes()).hexdigest()


def data_license(params: Params) -> dict:
    """{"license": id} or, when the licence is not known, {"license": "other", "license_name": ...}."""
    value = params.data.license or (DEMO_LICENSE if params.data.source == "demo" else None)
    if value is None:
        return {"license": "other", "license_name": "unknown (set data.license in params.yaml)"}
    return {"license": value}


def _fmt(value, spec: str) -> str:
    return "–" if value is None or value != value else format(value, spec)


def _front(data) -> str:
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(params: Params, layout: Layout, adapter_dir: Path, *, seed: int, base_model: str) -> str:
    """The model card of the Stage-2 fine-tune of `seed` in `adapter_dir` (models/final/seedK)."""
    mask = Mask.load(adapter_dir / MASK_FILE)
    own = read_json(adapter_dir / "metrics.json", "memcontrol finetune")["metrics"]
    compare_file = layout.reports / "metrics.json"
    compare = read_json(compare_file, "memcontrol compare")
    th_file = layout.reference / "threshold.json"
    th = read_json(th_file, "memcontrol reference")
    for arm in ("selected", "held-out"):
        if arm not in compare:
            raise KeyError(f"{compare_file}: no `{arm}` entry; rerun `memcontrol compare`")
    floor = compare["held-out"]["mem.flagged_rate"]
    flagged, own_flagged = compare["selected"]["mem.flagged_rate"], own["mem.flagged_rate"]
    seeds = list(params.final.seeds)
    licence = data_license(params)
    blocks = list(mask.enabled())
    numbers = {
        "method": mask.method, "enabled_blocks": blocks, "bits": "".join(map(str, mask.bits)),
        "trainable_params": own["trainable"], "trainable_pct": own["trainable_pct"],
        "manifest_sha256": manifest_sha256(layout), "flagged_rate": flagged, "flagged_rate_this_seed": own_flagged,
        "false_positive_floor": floor, "threshold": th["threshold"], "embedder": th["embedder"],
        "kid": compare["selected"].get("quality.kid_mean"), "fid": compare["selected"].get("quality.fid"),
        "seed": seed, "seeds": seeds, "sample_seed": params.sample.seed,
    }
    meta = ModelCardData(base_model=base_model, library_name="diffusers", pipeline_tag="text-to-image",
                         tags=["text-to-image", "stable-diffusion", "diffusers", "medical-imaging", "memcontrol",
                               "memorization", mask.method], **licence, memcontrol=numbers)
    rows = ["| arm | " + " | ".join(t for t, _, _ in TABLE) + " |", "|---" * (len(TABLE) + 1) + "|"]
    for arm, values in compare.items():
        rows.append(f"| {arm} | " + " | ".join(_fmt(values.get(k), f) for _, k, f in TABLE) + " |")
    warning = []
    if max(flagged, own_flagged) > floor:
        warning = [
            f"> **Warning: this model memorizes.** {max(flagged, own_flagged):.1%} of its generations for the "
            f"memorization prompts are flagged as copies of training images, above the {floor:.1%} that held-out "
            "real images reach (the false-positive floor). Do not release its images without screening them "
            "(`memcontrol release` excludes flagged samples).", ""]
    lora = ["- `pytorch_lora_weights.safetensors`: the LoRA in diffusers' format. It applies to the **base** "
            "model (`pipe = StableDiffusionPipeline.from_pretrained(BASE); pipe.load_lora_weights(THIS_FOLDER)`); "
            "this folder's UNet already has it merged."] if mask.method == "lora" else []
    final = params.final
    body = [
        f"# {mask.method} fine-tune with a MemControl mask",
        "",
        *warning,
        f"Fine-tuned from `{base_model}` with **{mask.method}** on {len(blocks)} of {len(mask.blocks)} UNet blocks "
        f"(the mask the MemControl search selected), {own['trainable']:,} trainable parameters "
        f"({own['trainable_pct']:.3g} % of the UNet). The adapter is merged into `unet/`.",
        "",
        "## Mask",
        "",
        f"- method: `{mask.method}` ({mask.mode} mode, {mask.granularity} granularity, options {dict(mask.options)})",
        f"- bits: `{numbers['bits']}`, learning rate {mask.lr:.3g}",
        "- enabled blocks: " + (", ".join(f"`{b}`" for b in blocks) or "(none)"),
        "",
        "## Use",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "pipe = StableDiffusionPipeline.from_pretrained(\"THIS_FOLDER\")",
        f"image = pipe(\"No acute cardiopulmonary abnormality.\", num_inference_steps={params.sample.steps}, "
        f"guidance_scale={params.sample.guidance:g}).images[0]",
        "```",
        "",
        f"- `scheduler/`: DDIM (eta 0), the sampler every number below was measured with "
        f"({params.sample.steps} steps, guidance {params.sample.guidance:g}).",
        *lora,
        "",
        "## Training data",
        "",
        f"- manifest `data/processed/manifest.parquet`, sha256 `{numbers['manifest_sha256']}` (source: "
        f"`{params.data.source}`)",
        f"- Stage 2: {final.steps} steps at batch {final.batch_size} on {final.data_size_ratio:g} of train plus "
        f"the memorization subset x {final.n_repeats}",
        f"- licence of the data: `{licence.get('license_name', licence['license'])}`",
        "",
        "## Memorization and quality",
        "",
        f"From `reports/metrics.json` (mean over Stage-2 seeds {seeds}) and `data/reference/threshold.json`. "
        f"A generation is flagged when the cosine similarity of its `{th['embedder']}` embedding to the nearest "
        f"training image exceeds {th['threshold']:.4f} ({th['mode']} threshold, quantile {th.get('quantile')}); "
        f"held-out real images pass it {floor:.1%} of the time (the false-positive floor). This export "
        f"(seed {seed}) flags {own_flagged:.1%}. "
        f"Generations use sample seed {params.sample.seed}.",
        "",
        *rows,
        "",
        "## Intended use",
        "",
        "Research on memorization in text-to-image fine-tuning of medical images, and synthetic data that is "
        "screened before release. Not for diagnosis or any clinical decision: the images are generated, and "
        "the memorization check covers only the training images, the embedder and the threshold named above.",
    ]
    return _front(meta) + "\n".join(body) + "\n"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def dataset_card(params: Params, layout: Layout, release_dir: Path) -> str:
    """The dataset card of the screened synthetic set in `release_dir` (its summary.json)."""
    summary = read_json(release_dir / "summary.json", "memcontrol release")
    th = read_json(layout.reference / "threshold.json", "memcontrol reference")
    floor = th["heldout_flagged_rate"]
    flagged = summary["n_excluded_embedding"] / max(summary["n_generated"], 1)
    licence = data_license(params)
    numbers = {key: summary[key] for key in ("n_generated", "n_released", "n_excluded", "n_excluded_embedding",
                                             "n_excluded_pixel", "threshold", "tile_threshold", "embedder")}
    numbers.update({"flagged_rate": flagged, "false_positive_floor": floor, "model": summary["model"],
                    "mask": summary["mask"], "manifest_sha256": manifest_sha256(layout)})
    meta = DatasetCardData(pretty_name="MemControl screened synthetic images", task_categories=["text-to-image"],
                           tags=["synthetic", "medical-imaging", "memcontrol", "memorization-screened"],
                           size_categories=[_size_category(summary["n_released"])], **licence, memcontrol=numbers)
    warning = []
    if flagged > floor:
        warning = [f"> **Warning:** the model that generated this set copies training images: {flagged:.1%} of "
                   f"its samples were flagged (above the {floor:.1%} false-positive floor of held-out real images) "
                   "and excluded. The screen is only as good as its embedder and threshold.", ""]
    mask = summary["mask"]
    body = [
        "# Screened synthetic images (MemControl release)",
        "",
        *warning,
        f"{summary['n_released']} of {summary['n_generated']} images generated by `{summary['model']}` "
        f"({mask['method']} on {', '.join(mask['enabled_blocks']) or 'no blocks'}) for {summary['prompts']} training "
        f"prompts x {summary['per_prompt']}. Excluded: {summary['n_excluded']} "
        f"({summary['n_excluded_embedding']} whose nearest training image has `{summary['embedder']}` cosine "
        f"similarity above {summary['threshold']:.4f}, {summary['n_excluded_pixel']} pixel-level near copies"
        + (f" with tile distance below {summary['tile_threshold']:.4f}" if summary.get("tile_threshold") else "")
        + ").",
        "",
        "## Files",
        "",
        "- `images/<sample_id>.png`: the released images only",
        "- `manifest.csv`, `manifest.parquet`: every generated sample with its prompt, seed, nearest training image "
        "(embedding and pixel), the flags and whether it was released",
        "- `summary.json`: the counts above",
        "",
        "## Source data",
        "",
        f"- training manifest sha256 `{numbers['manifest_sha256']}` (source `{params.data.source}`); the prompts "
        "are training prompts, so the manifest carries their text",
        f"- licence: `{licence.get('license_name', licence['license'])}`",
        "",
        "## Intended use",
        "",
        "Research and method development where the real images cannot be shared. Not for diagnosis, and not as "
        "ground truth: the images are generated and their prompts are real report text paired with them.",
    ]
    return _front(meta) + "\n".join(body) + "\n"
