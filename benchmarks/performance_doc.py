"""Render the tables of docs/performance.md and the README's performance section from the committed
results (benchmarks/results/*.json), so no number in them is typed by hand.

    python benchmarks/performance_doc.py            # rewrites the marked blocks in both files

A block is the text between `<!-- perf:NAME -->` and `<!-- /perf:NAME -->`; everything outside the
blocks is prose kept as written.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"
PART_NAMES = {
    "data_loading": "data loading (base model, cached latents/text of the rows, mask applied)",
    "finetune": "fine-tune steps", "generation": "generation (UNet denoising, CFG)", "decode": "VAE decode",
    "embedding": "embedding (pixel copy detector + MobileNetV2 quality features)", "faiss_search": "FAISS search", "mem_scores": "memorization scores + AMD",
    "kid_fid": "KID/FID", "noise_norm": "noise norm", "writing": "writing (adapter, grid, metrics.json)",
    "tracking": "tracking (MLflow child run + grid)",
}


def load(name: str) -> dict | None:
    p = RES / name
    return json.loads(p.read_text()) if p.exists() else None


def f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def profile_table() -> str:
    d = load("trial_profile.json")
    runs = d["runs"]

    def basis(r):  # CPU time where the run recorded it (robust to the shared machine's load), else wall
        return ("parts_cpu_s", "CPU") if "parts_cpu_s" in r else ("parts_s", "wall")

    head = "| part | " + " | ".join(f"{r['label']} ({basis(r)[1]} s)" for r in runs) + " |\n|---|" + "---|" * len(runs)
    lines = [head]
    for part, label in PART_NAMES.items():
        cells = []
        for r in runs:
            key, _ = basis(r)
            cells.append(f"{f(r[key][part])} ({100 * r[key][part] / r[key]['total']:.1f} %)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **total (split trial)** | " + " | ".join(f"**{f(r[basis(r)[0]]['total'], 1)}**" for r in runs) + " |")
    lines.append("| wall time of the split trial | " + " | ".join(f"{f(r['parts_s']['total'], 1)}" for r in runs) + " |")
    lines.append("| the same trial through `run_arm`, same process (CPU / wall s) | " + " | ".join(
        (f"{f(r['run_arm_median_cpu_s'], 1)} / " if "run_arm_median_cpu_s" in r else "– / ") + f"{f(r['run_arm_median_s'], 1)}"
        for r in runs) + " |")
    lines.append("| metrics of the split trial equal `run_arm`'s | " + " | ".join(
        str(r["metrics_equal_to_run_arm"]) for r in runs) + " |")
    lines.append("| once per search, not per trial: reference index, cached latents/text, features, embedder (wall s) | "
                 + " | ".join(f"{f(r['setup_once_per_search_s']['total'])}" for r in runs) + " |")
    lines.append("| peak RSS of the process (setup, trials) | " + " | ".join(
        f"{r['peak_rss_mb_process']:.0f} MB" for r in runs) + " |")
    lines.append("")
    for r in runs:
        t, m = r["trial"], r["model"]
        lines.append(f"- {r['label']}: UNet {m['unet_parameters']:,} parameters, VAE {m['vae_parameters']:,}, "
                     f"text encoder {m['text_encoder']}, {m['resolution']} px; {t['train_steps']} fine-tuning steps at batch "
                     f"{t['train_batch']} on {t['n_train_rows']} rows, {t['generations']} generations at {t['sample_steps']} "
                     f"DDIM steps, guidance {t['guidance']}, index of {t['index_size']} training images; mask: "
                     f"{t['mask']['method']}, {t['mask']['enabled_blocks']} of {t['mask']['n_blocks']} blocks.")
    return "\n".join(lines)


def obvious_tables() -> str:
    d = load("obvious_trial.json")
    masks = d["masks"]
    out = []
    parts = []
    for m in masks.values():
        for k in m["obvious"]["parts_cpu_s"]:
            if k not in parts and k != "total":
                parts.append(k)
    out.append("| part of the obvious trial (CPU s) | " + " | ".join(masks) + " |\n|---|" + "---|" * len(masks))
    for p in parts:
        out.append(f"| {p.replace('_', ' ')} | " + " | ".join(f"{f(m['obvious']['parts_cpu_s'].get(p, 0.0), 1)}" for m in masks.values()) + " |")
    out.append("| **obvious trial, total** | " + " | ".join(f"**{f(m['obvious']['parts_cpu_s']['total'], 1)}**" for m in masks.values()) + " |")
    out.append("| **our trial (`run_arm`), same mask and seed** | " + " | ".join(f"**{f(m['ours'][0]['cpu_s'], 1)}**" for m in masks.values()) + " |")
    out.append("| **obvious / ours (CPU time)** | " + " | ".join(f"**{f(m['ratio_obvious_over_ours'], 1)}x**" for m in masks.values()) + " |")
    out.append("| obvious / ours (wall time, loaded machine) | " + " | ".join(f"{f(m['ratio_obvious_over_ours_wall'], 1)}x" for m in masks.values()) + " |")
    out.append("")
    out.append("Decision metrics (val split; the obvious arm at training seed 0, ours at each seed run; a second "
               "seed of ours, where present, shows the seed noise):")
    out.append("")
    out.append("| mask | blocks on | arm | flagged rate | mean NN sim | KID | FID |\n|---|---|---|---|---|---|---|")
    for name, m in masks.items():
        o = m["obvious"]["metrics"]
        out.append(f"| {name} | {m['enabled_blocks']} | obvious (seed {m['ours'][0]['seed']}) | {f(o['mem.flagged_rate'], 3)} | "
                   f"{f(o['mem.mean_sim'], 3)} | {f(o['quality.kid_mean'], 3)} | {f(o['quality.fid'], 1)} |")
        for run in m["ours"]:
            r = run["metrics"]
            out.append(f"| {name} | {m['enabled_blocks']} | ours (seed {run['seed']}) | {f(r['mem.flagged_rate'], 3)} | "
                       f"{f(r['mem.mean_sim'], 3)} | {f(r['quality.kid_mean'], 3)} | {f(r['quality.fid'], 1)} |")
    if "ranking" in d and len(masks) > 1:
        out.append("")
        out.append("| ranking by (highest first) | obvious | ours |\n|---|---|---|")
        for key, r in d["ranking"].items():
            out.append(f"| {key} | {' > '.join(r['obvious'])} | {' > '.join(r['ours'])} |")
    g = d.get("generation_only")
    if g:
        out.append("")
        out.append(f"Generation alone, {g['n_images']} images, DDIM {g['steps']} steps, guidance {g['guidance']}, same "
                   f"prompts and seeds: our `generate` {f(statistics.median(g['ours_cpu_s']), 1)} CPU s, "
                   f"`StableDiffusionPipeline` {f(statistics.median(g['pipeline_cpu_s']), 1)} CPU s "
                   f"(**{f(g['ratio_pipeline_over_ours'], 2)}x** ours); largest pixel difference "
                   f"{g['max_abs_pixel_diff']:.1e}, mean {g['mean_abs_pixel_diff']:.1e} (pixels in [0, 1]).")
    return "\n".join(out)


def flops_table() -> str:
    d = load("sd15_flops.json")
    c = d["components"]
    out = ["| forward pass (GFLOP) | tiny default | SD-1.5 (512 px) |\n|---|---|---|"]
    for k in ("unet_forward", "vae_encode", "vae_decode", "text_encoder"):
        out.append(f"| {k.replace('_', ' ')} | {c['tiny_default'][k] / 1e9:.3g} | {c['sd15'][k] / 1e9:.4g} |")
    out.append(f"| embedder (MobileNetV2, 224 px) | {d['embedder_forward'] / 1e9:.3g} | {d['embedder_forward'] / 1e9:.3g} |")
    out.append("")
    out.append("| per trial (PFLOP, share) | tiny: ours | tiny: obvious | SD-1.5: ours | SD-1.5: obvious |\n|---|---|---|---|---|")
    pt = d["per_trial"]
    keys = list(pt["sd15_512px"]["obvious"]["pflop"])
    for k in keys:
        cells = []
        for scale in ("tiny_default", "sd15_512px"):
            for arm in ("ours", "obvious"):
                a = pt[scale][arm]
                cells.append(f"{a['pflop'][k]:.3g} ({100 * a['share'][k]:.0f} %)" if k in a["pflop"] else "–")
        out.append(f"| {k.replace('_', ' ')} | " + " | ".join(cells) + " |")
    out.append("| **total** | " + " | ".join(f"**{pt[s][a]['total_pflop']:.3g}**" for s in ("tiny_default", "sd15_512px")
                                        for a in ("ours", "obvious")) + " |")
    out.append(f"| **obvious / ours** | | **{pt['tiny_default']['ratio_obvious_over_ours']:.1f}x** | | "
               f"**{pt['sd15_512px']['ratio_obvious_over_ours']:.1f}x** |")
    return "\n".join(out)


def options_table() -> str:
    d = load("gen_options.json")
    out = ["| option | denoise CPU s | speed vs default | max pixel diff | flagged rate | mean NN sim | KID | FID |\n"
           "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['option']} | {f(statistics.median(r['denoise_cpu_s']), 1)} | {f(r['speedup_vs_default'], 2)}x | "
                   f"{r['max_abs_pixel_diff_vs_default']:.1e} | {f(r['mem.flagged_rate'], 3)} | {f(r['mem.mean_sim'], 3)} | "
                   f"{f(r['quality.kid_mean'], 3)} | {f(r['quality.fid'], 1)} |")
    if d.get("compile"):
        out.append("")
        out.append(f"torch.compile: {json.dumps(d['compile'])}")
    return "\n".join(out)


def scaling_table() -> str:
    d = load("trial_scaling.json")
    out = ["| point | training rows | index size | generations | resolution | fine-tune | generation | decode | "
           "embedding | FAISS search | scores + AMD | total (CPU s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if r["point"] == "size_x1":
            continue
        p = r["parts_cpu_s"]
        out.append(f"| {r['point']} | {r['n_train_rows']} | {r['index_size']} | {r['generations']} | {r['resolution']} | "
                   f"{f(p['finetune'], 1)} | {f(p['generation'], 1)} | {f(p['decode'], 2)} | {f(p['embedding'], 1)} | "
                   f"{f(p['faiss_search'], 3)} | {f(p['mem_scores'], 3)} | **{f(p['total'], 1)}** |")
    out.append("")
    out.append(f"The default point measured first and last: last / first = {f(d['drift_default_last_over_first'], 2)} "
               f"(the drift of the shared machine during the run).")
    return "\n".join(out)


def memory_table() -> str:
    d = load("stage_memory.json")
    tp = load("trial_profile.json")
    out = ["| process | wall s | peak RSS MB |\n|---|---|---|"]
    for name, stages in d.items():
        for stage, v in stages.items():
            out.append(f"| {name}: {stage} | {f(v['wall_s'], 1)} | {v['peak_rss_mb']:.0f} |")
    if tp:
        for r in tp["runs"]:
            out.append(f"| trial process, {r['label']} (setup and its trials: split and run_arm) | "
                       f"{f(r['parts_s']['total'], 1)} (one trial) | {r['peak_rss_mb_process']:.0f} |")
    return "\n".join(out)


BLOCKS = {"profile": profile_table, "obvious": obvious_tables, "flops": flops_table, "options": options_table,
          "scaling": scaling_table, "memory": memory_table}


def render(path: Path) -> None:
    text = path.read_text()
    for name, fn in BLOCKS.items():
        pat = re.compile(rf"(<!-- perf:{name} -->\n)(?:.*?\n)?(<!-- /perf:{name} -->)", re.S)
        if pat.search(text):
            try:
                body = fn()
            except (TypeError, KeyError):  # a results file not there (yet)
                body = "*No results file yet: not measured (see the text).*"
            text = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    path.write_text(text)


if __name__ == "__main__":
    render(ROOT / "docs" / "performance.md")
    render(ROOT / "README.md")
