"""Where one trial's time goes: a search trial (memcontrol.arms.run_arm + memcontrol.evaluate.evaluate)
split into its parts, each timed on its own, on one torch thread.

    python benchmarks/trial_profile.py --workdir W [--workdir-sd W2] [--repeats 2] [--out benchmarks/results/trial_profile.json]

W is a working folder made by the pipeline's prepare/base/reference stages
(benchmarks/perf_workdir.py W), W2 the same on the SD-1.5-layout folder of tests/sd_style.py
(benchmarks/perf_workdir.py W2 --sd-style). The parts call the same library functions in the same
order as run_arm/evaluate; each repeat also runs run_arm itself (alternating with the split trial)
so the sum of the parts can be checked against the real trial, and the metrics of both must be
equal. The once-per-search setup (reference index, cached latents and text states, embedder) is
reported apart: a trial does not pay it.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memcontrol import tuning  # noqa: E402
from memcontrol.arms import run_arm, search_rows  # noqa: E402
from memcontrol.base_model import block_list, load_base  # noqa: E402
from memcontrol.config import load_params  # noqa: E402
from memcontrol.evaluate import EvalContext  # noqa: E402
from memcontrol.memorization import amd, nn_scores, noise_norm  # noqa: E402
from memcontrol.quality import fid_kid  # noqa: E402
from memcontrol.report import pair_grid, save_image  # noqa: E402
from memcontrol.sample import denoise, item_seed  # noqa: E402
from memcontrol.train import finetune, resolve_device  # noqa: E402
from memcontrol.tuning import Mask  # noqa: E402
from memcontrol.workdir import Layout, write_json  # noqa: E402

PARTS = ("data_loading", "finetune", "generation", "decode", "embedding", "faiss_search", "mem_scores",
         "kid_fid", "noise_norm", "writing", "tracking")


class Clock:
    """Accumulates seconds per part: wall (`s`) and this process's CPU time (`cpu`). On one torch
    thread the CPU time is the work done, whatever else the shared machine runs; wall time is not."""

    def __init__(self):
        self.s: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def part(self, name: str):
        clock = self

        class _Part:
            def __enter__(self):
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.s[name] = clock.s.get(name, 0.0) + time.perf_counter() - self.t0
                clock.cpu[name] = clock.cpu.get(name, 0.0) + time.process_time() - self.c0

        return _Part()


def cpu_timed(fn):
    """(fn(), wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def default_mask(params, layout) -> Mask:
    """A mid-sized search candidate: every other block of the search's block list, the middle LR."""
    blocks = block_list(params, layout)
    bits = tuple(i % 2 for i in range(len(blocks)))
    lrs = params.search.learning_rates
    return Mask(method=params.tuning.method, blocks=blocks, bits=bits, lr=float(lrs[len(lrs) // 2]),
                mode=params.tuning.mode, granularity=params.tuning.granularity, options=dict(params.tuning.options))


def setup(params, layout, split: str = "val") -> tuple[EvalContext, dict]:
    """The once-per-search part: what EvalContext loads once and keeps for every trial."""
    ctx = EvalContext(params, layout, split=split)
    t = {}
    for name in ("encoded", "index", "train_feats", "heldout_feats", "embedder", "quality_embedder", "mem_rows", "quality_rows"):
        t0 = time.perf_counter()
        getattr(ctx, name)
        t[name] = time.perf_counter() - t0
    return ctx, t


def eval_inputs(ctx: EvalContext):
    """evaluate()'s prompt states and seeds (memorization prompts x mem_seeds, then quality prompts)."""
    sample, enc = ctx.params.sample, ctx.encoded
    mem, qual = ctx.mem_rows, ctx.quality_rows
    mem_p = enc.prompt_index(mem["prompt"].tolist())
    qual_p = enc.prompt_index(qual["prompt"].tolist())
    text = torch.cat([enc.text[mem_p].repeat_interleave(sample.mem_seeds, 0), enc.text[qual_p]])
    seeds = [item_seed(sample.seed, i, k) for i in range(len(mem)) for k in range(sample.mem_seeds)]
    seeds += [item_seed(sample.seed + 1, i, 0) for i in range(len(qual))]
    return text, seeds, mem_p, len(mem) * sample.mem_seeds


def upsampled(latents: torch.Tensor, factor: int) -> torch.Tensor:
    """Latents at `factor` x the model's resolution (for timing at a larger image size only)."""
    if factor == 1:
        return latents
    return torch.nn.functional.interpolate(latents, scale_factor=factor, mode="nearest").contiguous()


def split_trial(params, layout, ctx: EvalContext, mask: Mask, out_dir: Path, *, rows, seed: int,
                steps: int | None = None, tracking: dict | None = None, resolution_factor: int = 1) -> tuple[dict, dict]:
    """One trial, part by part, as run_arm + evaluate do it. Returns (seconds per part, metrics).

    resolution_factor > 1 runs the same networks at that multiple of the model's resolution (the
    UNet's sample_size and the cached latents scaled up): for timing, its metrics mean nothing."""
    clock = Clock()
    sample, enc = params.sample, ctx.encoded
    steps = params.train.steps if steps is None else steps
    t_all, c_all = time.perf_counter(), time.process_time()
    device = resolve_device(params.train.device)  # as run_arm does
    with clock.part("data_loading"):
        bundle = load_base(layout, device)
        if resolution_factor != 1:
            bundle.unet.register_to_config(sample_size=bundle.unet.config.sample_size * resolution_factor)
        torch.manual_seed(seed)
        prepared = tuning.apply(bundle.unet, mask)
        data = enc.train_data(rows)
        if resolution_factor != 1:
            data = dataclasses.replace(data, latent_mean=upsampled(data.latent_mean, resolution_factor),
                                       latent_std=upsampled(data.latent_std, resolution_factor))
    with clock.part("finetune"):
        res = finetune(bundle.unet, prepared.groups, data, bundle.scheduler, steps=steps,
                       batch_size=params.train.batch_size, seed=seed, cfg_dropout=params.train.cfg_dropout,
                       grad_clip=params.train.grad_clip, weight_decay=params.train.weight_decay,
                       mixed_precision=params.train.mixed_precision,
                       gradient_checkpointing=params.train.gradient_checkpointing, device=device)
    text, seeds, mem_p, n_mem = eval_inputs(ctx)
    imgs = []
    for i in range(0, len(seeds), sample.batch_size):
        with clock.part("generation"):
            z = denoise(bundle, text[i:i + sample.batch_size], seeds[i:i + sample.batch_size], steps=sample.steps,
                        guidance=sample.guidance, null_text=enc.null_text)
        with clock.part("decode"):
            imgs.append(bundle.decode(z.float()))
    imgs = torch.cat(imgs)
    with clock.part("embedding"):
        mem_f, qual_f = ctx.embedder.embed(imgs[:n_mem]), ctx.quality_embedder.embed(imgs[n_mem:])
    with clock.part("faiss_search"):
        sims, idx = ctx.index.search(mem_f, k=1)
    with clock.part("mem_scores"):
        sims, idx = sims[:, 0], idx[:, 0]
        thr = ctx.threshold["threshold"]
        scores = nn_scores(sims, thr)
        nearest_ids = [ctx.ids["train"][i] for i in idx]
        own = (np.asarray(nearest_ids) == np.repeat(ctx.mem_rows["id"].to_numpy(), sample.mem_seeds)) & (sims > thr)
        amd_value = float(amd(mem_f, ctx.train_feats))
    with clock.part("kid_fid"):
        pos = {k: i for i, k in enumerate(ctx.ids[ctx.split])}
        real_f = ctx.heldout_feats[[pos[i] for i in ctx.quality_rows["id"]]]
        quality = fid_kid(real_f, qual_f, kid_subset_size=min(params.metrics.kid_subset_size, len(real_f)),
                          seed=params.seed)
    with clock.part("noise_norm"):
        img_idx = enc.image_index(ctx.mem_rows["id"].tolist())
        noise = noise_norm(bundle.unet, upsampled(enc.latent_mean[img_idx], resolution_factor), enc.text[mem_p], enc.null_text, bundle.scheduler,
                           seed=sample.seed)
    metrics = {
        "mem.flagged_rate": scores.flagged_rate, "mem.mean_sim": scores.mean_sim, "mem.p95_sim": scores.p95_sim,
        "mem.own_match_rate": float(own.mean()), "mem.amd": amd_value,
        "quality.fid": float(quality["fid"]), "quality.kid_mean": float(quality["kid_mean"]),
        "noise_norm.max": float(noise["max"]), "noise_norm.mean": float(noise["mean"]),
    }
    with clock.part("writing"):
        out_dir.mkdir(parents=True, exist_ok=True)
        tuning.save_adapter(out_dir, bundle.unet, mask)
        first = np.arange(0, n_mem, sample.mem_seeds)
        grid = pair_grid(imgs[:n_mem][first], ctx.train_images([nearest_ids[i] for i in first], bundle.resolution),
                         sims[first], cols=min(8, len(first)), scale=2)
        save_image(grid, out_dir / "grid.png")
        record = {"mask": json.loads(mask.to_json()), "metrics": {**metrics, "train_seconds": res.seconds}}
        write_json(record, out_dir / "metrics.json")
    if tracking is not None:
        from tasks import tracking as T

        with clock.part("tracking"):
            T.log_child(tracking["uri"], "perf", tracking["root"], tracking["parent"], name=out_dir.name,
                        record={"key": str(out_dir), **record}, artifacts=[out_dir / "grid.png"])
    clock.s["total"] = time.perf_counter() - t_all
    clock.cpu["total"] = time.process_time() - c_all
    return {**clock.s, "cpu": clock.cpu}, metrics


def tracking_target(root: Path) -> dict:
    from tasks import tracking as T

    uri = f"sqlite:///{root / 'mlflow.db'}"
    parent = T.parent_run(uri, "perf", root, kind="study", name="perf", params={})
    return {"uri": uri, "root": root, "parent": parent}


def profile(workdir: Path, repeats: int, label: str) -> dict:
    params, layout = load_params(workdir / "params.yaml"), Layout(workdir)
    t0 = time.perf_counter()
    ctx, setup_s = setup(params, layout)
    setup_total = time.perf_counter() - t0
    mask = default_mask(params, layout)
    rows = search_rows(params, ctx)
    tmp = Path(tempfile.mkdtemp(prefix="trial_profile_"))
    track = tracking_target(tmp)
    split_runs, arm_runs, arm_cpu, equal = [], [], [], []
    # warm-up (first calls: thread pools, kernels, the embedder, MLflow's store), not recorded
    split_trial(params, layout, ctx, mask, tmp / "warmup", rows=rows, seed=params.seed, steps=5, tracking=track)
    for r in range(repeats):
        def split():
            return split_trial(params, layout, ctx, mask, tmp / f"split{r}", rows=rows, seed=params.seed,
                               tracking=track)

        def arm():
            rec, wall, cpu = cpu_timed(lambda: run_arm(params, layout, ctx, mask, tmp / f"arm{r}", rows=rows,
                                                       steps=params.train.steps, seed=params.seed))
            arm_cpu.append(cpu)
            return rec, wall

        if r % 2 == 0:  # alternate which goes first
            (parts, metrics), (rec, arm_s) = split(), arm()
        else:
            (rec, arm_s), (parts, metrics) = arm(), split()
        split_runs.append(parts)
        arm_runs.append(arm_s)
        equal.append(all(abs(rec["metrics"][k] - v) <= 1e-9 * max(1.0, abs(v)) for k, v in metrics.items()))
        print(f"[{label}] repeat {r}: split trial {parts['total']:.1f}s, run_arm {arm_runs[-1]:.1f}s, "
              f"metrics equal {equal[-1]}", flush=True)
    med = {k: statistics.median(p[k] for p in split_runs) for k in split_runs[0] if k != "cpu"}
    med_cpu = {k: statistics.median(p["cpu"].get(k, 0.0) for p in split_runs) for k in split_runs[0]["cpu"]}
    bundle = load_base(layout)
    return {
        "label": label,
        "model": {"resolution": bundle.resolution, "unet_parameters": sum(p.numel() for p in bundle.unet.parameters()),
                  "vae_parameters": sum(p.numel() for p in bundle.vae.parameters()),
                  "text_encoder": type(bundle.text_encoder).__name__},
        "trial": {"train_steps": params.train.steps, "train_batch": params.train.batch_size,
                  "n_train_rows": len(rows), "generations": len(eval_inputs(ctx)[1]), "sample_steps": params.sample.steps,
                  "guidance": params.sample.guidance, "embedder": params.metrics.embedder,
                  "index_size": int(ctx.index.ntotal) if hasattr(ctx.index, "ntotal") else len(ctx.ids["train"]),
                  "mask": {"method": mask.method, "enabled_blocks": int(sum(mask.bits)), "n_blocks": len(mask.bits)}},
        "setup_once_per_search_s": {k: round(v, 3) for k, v in setup_s.items()} | {"total": round(setup_total, 3)},
        "parts_s": {k: round(med.get(k, 0.0), 3) for k in (*PARTS, "total")},
        "parts_cpu_s": {k: round(med_cpu.get(k, 0.0), 3) for k in (*PARTS, "total")},
        "parts_share": {k: round(med_cpu.get(k, 0.0) / med_cpu["total"], 4) for k in PARTS},
        "repeats": [{k: (round(v, 3) if k != "cpu" else {c: round(x, 3) for c, x in v.items()}) for k, v in p.items()}
                    for p in split_runs],
        "run_arm_s": [round(x, 3) for x in arm_runs],
        "run_arm_median_s": round(statistics.median(arm_runs), 3),
        "run_arm_cpu_s": [round(x, 3) for x in arm_cpu],
        "run_arm_median_cpu_s": round(statistics.median(arm_cpu), 3),
        "metrics_equal_to_run_arm": all(equal),
        "peak_rss_mb_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def table(result: dict) -> str:
    lines = ["| part | " + " | ".join(r["label"] for r in result["runs"]) + " |",
             "|---|" + "---|" * len(result["runs"])]
    for part in (*PARTS, "total"):
        cells = []
        for r in result["runs"]:
            s = r["parts_cpu_s"][part]
            cells.append(f"{s:.2f} s ({100 * s / r['parts_cpu_s']['total']:.0f} %)" if part != "total" else f"**{s:.1f} s**")
        lines.append(f"| {part.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _one_thread() -> None:
    torch.set_num_threads(1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--workdir-sd", type=Path, default=None)
    ap.add_argument("--append", action="store_true", help="keep the runs of other labels already in --out")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/trial_profile.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    jobs = [(a.workdir, "default (tiny model, CPU)")] if a.workdir is not None else []
    if a.workdir_sd is not None:
        jobs.append((a.workdir_sd, "SD-1.5-layout folder (tests/sd_style.py, CPU)"))
    runs = []
    for workdir, label in jobs:  # each in its own process: its peak RSS is its own
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
            runs.append(pool.submit(profile, workdir, a.repeats, label).result())
    if a.append and a.out.exists():
        labels = {r["label"] for r in runs}
        runs = [r for r in json.loads(a.out.read_text())["runs"] if r["label"] not in labels] + runs
        runs.sort(key=lambda r: not r["label"].startswith("default"))
    result = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "repeats": a.repeats, "runs": runs, "wall_s": round(time.perf_counter() - t0, 1),
              "note": "parts are medians over the repeats: parts_s wall, parts_cpu_s the process's CPU time (one torch "
                      "thread: the work, independent of the machine's load), parts_share from CPU time; run_arm_* is "
                      "the same trial through memcontrol.arms.run_arm, run alternately in the same process"}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
