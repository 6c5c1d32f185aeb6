"""How a trial's time grows: with the training-set size, the number of generations and the image
size. Each point is one trial split into its parts (benchmarks/trial_profile.py's split_trial),
all points in one process on one torch thread, the default point measured first and last to show
the drift of a shared machine.

    python benchmarks/trial_scaling.py --workdir W [--out benchmarks/results/trial_scaling.json] [--plots docs/images]

* training-set size x1, x4, x16: the training rows, the reference index and the AMD's training
  features k times the default's (the extra index vectors are the real embeddings plus N(0, 0.01)
  noise); train.steps stays fixed, as the search's inner loop is a fixed budget;
* generations: (sample.mem_seeds, sample.n_quality) = (1, 16), (3, 48) (default), (6, 96) (96 quality prompts asked, capped at the 80 val images: 152 generations);
* resolution: 64 px (the default) and 128 px: the same UNet and VAE at twice the latent size, the
  cached latents upsampled (timing only: the 128-px metrics mean nothing). 512 px needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memcontrol.arms import search_rows  # noqa: E402
from memcontrol.config import load_params  # noqa: E402
from memcontrol.reference_index import ReferenceIndex  # noqa: E402
from memcontrol.workdir import Layout  # noqa: E402
from trial_profile import PARTS, default_mask, eval_inputs, setup, split_trial  # noqa: E402


def scaled_context(params, layout, size: int = 1, mem_seeds: int | None = None, n_quality: int | None = None):
    if mem_seeds is not None:
        params = params.model_copy(update={"sample": params.sample.model_copy(
            update={"mem_seeds": mem_seeds, "n_quality": n_quality})})
    ctx, _ = setup(params, layout)
    rows = search_rows(params, ctx)
    if size > 1:
        base = ctx.train_feats
        rng = np.random.default_rng(0)
        extra = [base + rng.normal(0, 0.01, base.shape).astype(base.dtype) for _ in range(size - 1)]
        feats = np.concatenate([base, *extra])
        ctx.__dict__["train_feats"] = feats
        ctx.__dict__["index"] = ReferenceIndex.build(feats, kind=params.metrics.index, center=params.metrics.center)
        ctx.ids = {**ctx.ids, "train": ctx.ids["train"] * size}
        rows = pd.concat([rows] * size, ignore_index=True)
    return params, ctx, rows


TRAIN_STEPS = None  # set by --train-steps: fine-tune measured over fewer steps, reported per train.steps


def point(params, layout, ctx, rows, tmp: Path, name: str, resolution_factor: int = 1) -> dict:
    parts, _ = split_trial(params, layout, ctx, default_mask(params, layout), tmp / name, rows=rows, seed=params.seed,
                           resolution_factor=resolution_factor, steps=TRAIN_STEPS)
    if TRAIN_STEPS is not None:  # the fine-tune's cost per step is constant: scale it to the real budget
        for d in (parts, parts["cpu"]):
            measured = d["finetune"]
            d["finetune"] = measured * params.train.steps / TRAIN_STEPS
            d["total"] += d["finetune"] - measured
    row = {"point": name, "n_train_rows": len(rows), "index_size": int(ctx.index.ntotal),
           "generations": len(eval_inputs(ctx)[1]),
           "resolution": 64 * resolution_factor if resolution_factor else 64,
           "parts_s": {k: round(parts.get(k, 0.0), 3) for k in (*PARTS, "total")},
           "parts_cpu_s": {k: round(parts["cpu"].get(k, 0.0), 3) for k in (*PARTS, "total")}}
    print(name, row["parts_cpu_s"]["total"], flush=True)
    return row


def plot(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["point"]: r for r in result["rows"]}
    groups = {
        "training-set size (x default)": [("size_x1", 1), ("size_x4", 4), ("size_x16", 16)],
        # the gens_<n> points are named by their real count (quality prompts are capped by the split)
        "generations per trial": sorted([(n, None) for n in rows if n.startswith("gens_")] + [("default", None)],
                                        key=lambda p: rows[p[0]]["generations"]),
        "resolution (px)": [("default", None), ("res_128", None)],
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    shown = ("finetune", "generation", "decode", "embedding", "faiss_search", "mem_scores")
    for ax, (title, pts) in zip(axes, groups.items()):
        xs = []
        for name, k in pts:
            r = rows[name]
            xs.append(k if k is not None else (r["generations"] if "gen" in title else r["resolution"]))
        bottom = np.zeros(len(pts))
        for part in shown:
            vals = np.array([rows[n]["parts_cpu_s"][part] for n, _ in pts])
            ax.bar(range(len(pts)), vals, bottom=bottom, label=part.replace("_", " "))
            bottom += vals
        other = np.array([rows[n]["parts_cpu_s"]["total"] for n, _ in pts]) - bottom
        ax.bar(range(len(pts)), other, bottom=bottom, label="other parts", color="lightgrey")
        ax.set_xticks(range(len(pts)), [str(x) for x in xs])
        ax.set_xlabel(title)
        ax.set_ylabel("CPU seconds per trial (1 thread)")
    axes[0].legend(fontsize=7)
    fig.suptitle("One trial's time by part (benchmarks/results/trial_scaling.json)")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "trial_scaling.png"
    fig.savefig(path, dpi=110)
    return [str(path.relative_to(ROOT))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/trial_scaling.json")
    ap.add_argument("--plots", type=Path, default=ROOT / "docs/images")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="measure the fine-tune over this many steps and scale it to train.steps (a shorter run)")
    a = ap.parse_args(argv)
    if a.plot_only:
        result = json.loads(a.out.read_text())
        result["plots"] = plot(result, a.plots)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    torch.set_num_threads(1)
    global TRAIN_STEPS
    TRAIN_STEPS = a.train_steps
    t0 = time.perf_counter()
    params, layout = load_params(a.workdir / "params.yaml"), Layout(a.workdir)
    tmp = Path(tempfile.mkdtemp(prefix="trial_scaling_"))
    rows_out = []
    p, ctx, rows = scaled_context(params, layout)
    rows_out.append(point(p, layout, ctx, rows, tmp, "default"))
    for k in (4, 16):
        p, ctx, rows = scaled_context(params, layout, size=k)
        rows_out.append(point(p, layout, ctx, rows, tmp, f"size_x{k}"))
    for seeds, n_q in ((1, 16), (6, 96)):
        p, ctx, rows = scaled_context(params, layout, mem_seeds=seeds, n_quality=n_q)
        rows_out.append(point(p, layout, ctx, rows, tmp, f"gens_{len(eval_inputs(ctx)[1])}"))
    p, ctx, rows = scaled_context(params, layout)
    rows_out.append(point(p, layout, ctx, rows, tmp, "res_128", resolution_factor=2))
    rows_out.append({**point(p, layout, ctx, rows, tmp, "default_again"), "point": "default_again"})
    size1 = dict(rows_out[0], point="size_x1")
    result = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "train_steps": params.train.steps, "finetune_measured_over_steps": a.train_steps or params.train.steps,
              "rows": rows_out + [size1],
              "drift_default_last_over_first": round(rows_out[-1]["parts_cpu_s"]["total"] / rows_out[0]["parts_cpu_s"]["total"], 3),
              "time_basis": "parts_cpu_s: CPU time of the process (one torch thread); parts_s: wall",
              "wall_s": round(time.perf_counter() - t0, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")  # the measurements first: a plot error loses nothing
    result["plots"] = plot(result, a.plots)
    a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
