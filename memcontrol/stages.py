"""The pipeline's stages as plain functions of (params, layout): what `tasks/` wraps and
`flows/` composes. Every stage reads its inputs from files and writes its outputs atomically,
so a crash or kill never leaves half an output and a rerun resumes from what is finished."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memcontrol import tuning
from memcontrol.config import OBJECTIVES, Params
from memcontrol.data.images import load_images
from memcontrol.data.manifest import load_manifest, memorization_training_set, save_manifest
from memcontrol.embed import build_embedder
from memcontrol.encode import Encoded, encode_manifest, image_paths
from memcontrol.memorization import ReferenceIndex, amd, calibrate_threshold, nn_scores, noise_norm
from memcontrol.models import tiny
from memcontrol.models.bundle import Bundle, load_bundle, save_bundle
from memcontrol.models.pretrain import fit_scaling_factor, pretrain_vae
from memcontrol.report import image_grid, pair_grid, save_image
from memcontrol.sample import generate, item_seed
from memcontrol.train import finetune, resolve_device
from memcontrol.tuning import Mask, block_layout

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None] | None  # (label, done, total)


@dataclass(frozen=True)
class Layout:
    """Where every stage reads and writes, relative to the working directory."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "data" / "processed" / "manifest.parquet"

    @property
    def demo_dir(self) -> Path:
        return self.root / "data" / "demo"

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    @property
    def reference(self) -> Path:
        return self.root / "data" / "reference"

    @property
    def search(self) -> Path:
        return self.root / "search"

    @property
    def study_db(self) -> Path:
        return self.search / "study.db"

    @property
    def trials(self) -> Path:
        return self.search / "trials"

    @property
    def selected(self) -> Path:
        return self.root / "masks" / "selected.json"

    @property
    def final(self) -> Path:
        return self.root / "models" / "final"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


def write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable))
    os.replace(tmp, path)
    return path


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def file_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names + bytes), for cache keys."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent if path.is_file() else path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def params_digest(p: Params, *sections: str) -> str:
    d = p.model_dump(mode="json")
    return hashlib.sha256(json.dumps({s: d[s] for s in sections}, sort_keys=True).encode()).hexdigest()[:12]


def _tick(progress: Progress, label: str):
    def f(done: int, total: int):
        if progress is not None:
            progress(label, done, total)
    return f


# ---------------------------------------------------------------- prepare
def prepare(p: Params, L: Layout) -> Path:
    """Ingest and validate the dataset into the manifest (paths relative to the manifest's folder)."""
    if p.data.source == "demo":
        from memcontrol.data.demo import build_demo

        df = build_demo(L.demo_dir, seed=p.seed, **p.data.demo.model_dump())
        df["path"] = [os.path.relpath(L.demo_dir / x, L.manifest.parent) for x in df["path"]]
    else:
        from memcontrol.data.manifest import ingest_csv

        c = p.data.csv
        df = ingest_csv(
            c.csv, c.image_root, path_column=c.path_column, text_column=c.text_column,
            split_column=c.split_column, mem_csv=c.mem_csv, n_mem=c.n_mem,
            test_fraction=c.test_fraction, seed=p.seed,
        )
        root = Path(c.image_root).resolve()
        df["path"] = [x if Path(x).is_absolute() else str(root / x) for x in df["path"]]
    L.manifest.parent.mkdir(parents=True, exist_ok=True)
    save_manifest(df, L.manifest)
    return L.manifest


def manifest(L: Layout) -> pd.DataFrame:
    return load_manifest(L.manifest)


def rows_of(df: pd.DataFrame, split: str, subset: str | None = None) -> pd.DataFrame:
    m = df["split"] == split
    if subset is not None:
        m &= df["subset"] == subset
    return df[m].reset_index(drop=True)


# ---------------------------------------------------------------- base model
def base(p: Params, L: Layout, progress: Progress = None) -> Path:
    """Real path: check the user's diffusers folder loads and point at it.
    Embedded default: pretrain the tiny model on the `base` split and save a diffusers folder."""
    if p.model.path is not None:
        b = load_bundle(p.model.path)
        L.base.mkdir(parents=True, exist_ok=True)
        write_json({"path": str(Path(p.model.path).resolve()), "resolution": b.resolution}, L.base / "source.json")
        return L.base
    df = manifest(L)
    rows = rows_of(df, "base")
    if rows.empty:
        raise ValueError(f"{L.manifest}: no `base` rows to pretrain the tiny model on (set model.path for a real model)")
    cfg, bt = p.model.tiny, p.model.base_train
    torch.manual_seed(p.seed)
    bundle = tiny.build(cfg, seed=p.seed)
    images = load_images(image_paths(rows, L.manifest.parent), cfg.resolution)
    pretrain_vae(bundle.vae, images, steps=bt.vae_steps, lr=bt.vae_lr, batch_size=bt.batch_size,
                 kl_weight=bt.vae_kl_weight, seed=p.seed,
                 progress=lambda s, _l: _tick(progress, "base: VAE")(s, bt.vae_steps))
    bundle.vae.register_to_config(scaling_factor=fit_scaling_factor(bundle.vae, images))
    enc = encode_manifest(bundle, rows, L.manifest.parent)
    unet = bundle.unet
    finetune(unet, [{"params": [q for q in unet.parameters()], "lr": bt.unet_lr, "name": "unet"}],
             enc.train_data(rows), bundle.scheduler, steps=bt.unet_steps, batch_size=bt.batch_size,
             seed=p.seed, cfg_dropout=0.1, device=p.train.device,
             progress=lambda s, _l: _tick(progress, "base: UNet")(s, bt.unet_steps))
    unet.to("cpu").requires_grad_(False)
    save_bundle(bundle, L.base)
    # A sample grid of the base model on held-out prompts, to see that it draws radiographs.
    test = rows_of(df, "test").head(16)
    text = bundle.encode_prompts(test["prompt"].tolist())
    imgs = generate(bundle, text, [item_seed(p.sample.seed, i, 0) for i in range(len(test))],
                    steps=p.sample.steps, guidance=p.sample.guidance)
    L.reports.mkdir(parents=True, exist_ok=True)
    save_image(image_grid(imgs, cols=8, scale=2), L.reports / "base_samples.png")
    return L.base


def load_base(L: Layout, device: str = "cpu") -> Bundle:
    src = L.base / "source.json"
    path = Path(json.loads(src.read_text())["path"]) if src.exists() else L.base
    return load_bundle(path).to(device)


# ---------------------------------------------------------------- reference
def make_embedder(p: Params):
    m = p.metrics
    return build_embedder(m.embedder, path=m.embedder_path, image_size=m.embed_size, **m.embedder_options)


def reference(p: Params, L: Layout) -> Path:
    """Once per dataset: latents + text states of every image/prompt, the FAISS index of the
    training images' embeddings and the memorization threshold calibrated on held-out images."""
    df = manifest(L)
    bundle = load_base(L, resolve_device(p.train.device))
    root = L.manifest.parent
    out = L.reference
    out.mkdir(parents=True, exist_ok=True)
    encode_manifest(bundle, df[df["split"] != "base"].reset_index(drop=True), root).save(out / "encoded.safetensors")

    embedder = make_embedder(p)
    train, test = rows_of(df, "train"), rows_of(df, "test")

    def feats(rows: pd.DataFrame) -> np.ndarray:
        out = []
        for i in range(0, len(rows), 256):
            x = load_images(image_paths(rows.iloc[i : i + 256], root), bundle.resolution)
            if p.metrics.reference_space == "decoded":
                x01 = bundle.decode(bundle.encode_images(x)[0])
            else:
                x01 = (x + 1) / 2
            out.append(embedder.embed(x01))
        return np.concatenate(out)

    train_f, test_f = feats(train), feats(test)
    index = ReferenceIndex.build(train_f, kind=p.metrics.index, center=p.metrics.center)
    index.save(out / "index")
    np.save(out / "train_feats.npy", train_f)
    np.save(out / "test_feats.npy", test_f)
    write_json({"train": train["id"].tolist(), "test": test["id"].tolist()}, out / "ids.json")

    sims = index.search(test_f, k=1)[0][:, 0]
    # Calibrate on half of the held-out images, measure the false-positive floor on the other half.
    cal, chk = sims[0::2], sims[1::2]
    th = p.metrics.threshold
    thr = float(th.value) if th.mode == "fixed" else calibrate_threshold(cal, th.quantile)
    real = ~test["source"].str.startswith("drr").to_numpy()  # acquired images, not DRR renders
    info = {
        "threshold": thr,
        "mode": th.mode,
        "quantile": th.quantile,
        "embedder": embedder.name,
        "center": p.metrics.center,
        "n_heldout": int(len(sims)),
        "heldout_flagged_rate": float((chk > thr).mean()) if len(chk) else float("nan"),
        "heldout_flagged_rate_all": float((sims > thr).mean()),
        "heldout_mean_sim": float(sims.mean()),
        "heldout_p95_sim": float(np.quantile(sims, 0.95)),
        "heldout_real_n": int(real.sum()),
        "heldout_real_flagged_rate": float((sims[real] > thr).mean()) if real.any() else float("nan"),
        "heldout_real_mean_sim": float(sims[real].mean()) if real.any() else float("nan"),
    }
    write_json(info, out / "threshold.json")
    return out


# ---------------------------------------------------------------- evaluation of one model
class EvalContext:
    """Everything an evaluation needs that is the same for every trial, loaded once."""

    def __init__(self, p: Params, L: Layout):
        self.p, self.L = p, L
        self.df = manifest(L)
        self.ref = L.reference
        self.ids = json.loads((self.ref / "ids.json").read_text())
        self.threshold = json.loads((self.ref / "threshold.json").read_text())

    @cached_property
    def encoded(self) -> Encoded:
        return Encoded.load(self.ref / "encoded.safetensors")

    @cached_property
    def index(self) -> ReferenceIndex:
        return ReferenceIndex.load(self.ref / "index")

    @cached_property
    def train_feats(self) -> np.ndarray:
        return np.load(self.ref / "train_feats.npy")

    @cached_property
    def test_feats(self) -> np.ndarray:
        return np.load(self.ref / "test_feats.npy")

    @cached_property
    def embedder(self):
        return make_embedder(self.p)

    @cached_property
    def mem_rows(self) -> pd.DataFrame:
        return rows_of(self.df, "train", "mem")

    @cached_property
    def quality_rows(self) -> pd.DataFrame:
        test = rows_of(self.df, "test")
        n = min(self.p.sample.n_quality, len(test))
        return test.sample(n=n, random_state=self.p.seed).reset_index(drop=True)

    def train_images(self, ids: list[str], size: int) -> torch.Tensor:
        rows = self.df.set_index("id").loc[ids].reset_index()
        return (load_images(image_paths(rows, self.L.manifest.parent), size) + 1) / 2


def evaluate(bundle: Bundle, ctx: EvalContext, progress: Progress = None) -> tuple[dict, object]:
    """Generate for the memorization-subset prompts (several seeds each) and for held-out prompts,
    embed once, then: FAISS nearest-training similarity (memorization), FID/KID (quality) and the
    noise-norm proxy. Returns (metrics, grid image)."""
    p, enc = ctx.p, ctx.encoded
    s = p.sample
    mem, qual = ctx.mem_rows, ctx.quality_rows
    mem_p = enc.prompt_index(mem["prompt"].tolist())
    qual_p = enc.prompt_index(qual["prompt"].tolist())
    text = torch.cat([enc.text[mem_p].repeat_interleave(s.mem_seeds, 0), enc.text[qual_p]])
    seeds = [item_seed(s.seed, i, k) for i in range(len(mem)) for k in range(s.mem_seeds)]
    seeds += [item_seed(s.seed + 1, i, 0) for i in range(len(qual))]
    n_mem = len(mem) * s.mem_seeds
    tick = _tick(progress, "generate")
    done = [0]

    def on_batch(b: int) -> None:
        done[0] += b
        tick(done[0], len(seeds))

    imgs = generate(bundle, text, seeds, steps=s.steps, guidance=s.guidance, batch_size=s.batch_size,
                    null_text=enc.null_text, progress=on_batch)
    feats = ctx.embedder.embed(imgs)
    mem_f, qual_f = feats[:n_mem], feats[n_mem:]

    sims, idx = ctx.index.search(mem_f, k=1)
    sims, idx = sims[:, 0], idx[:, 0]
    thr = ctx.threshold["threshold"]
    sc = nn_scores(sims, thr)
    nearest_ids = [ctx.ids["train"][i] for i in idx]
    own_ids = np.repeat(mem["id"].to_numpy(), s.mem_seeds)
    own = (np.asarray(nearest_ids) == own_ids) & (sims > thr)

    from memcontrol.quality import fid_kid

    test_pos = {k: i for i, k in enumerate(ctx.ids["test"])}
    real_f = ctx.test_feats[[test_pos[i] for i in qual["id"]]]
    q = fid_kid(real_f, qual_f, kid_subset_size=min(p.metrics.kid_subset_size, len(qual)), seed=p.seed)

    img_idx = enc.image_index(mem["id"].tolist())
    nn = noise_norm(bundle.unet, enc.latent_mean[img_idx], enc.text[mem_p], enc.null_text,
                    bundle.scheduler, seed=s.seed)
    metrics = {
        "mem.flagged_rate": sc.flagged_rate,
        "mem.mean_sim": sc.mean_sim,
        "mem.p95_sim": sc.p95_sim,
        "mem.own_match_rate": float(own.mean()),
        "mem.amd": float(amd(mem_f, ctx.train_feats)),
        "mem.n": int(n_mem),
        "mem.threshold": float(thr),
        "quality.fid": float(q["fid"]),
        "quality.kid_mean": float(q["kid_mean"]),
        "quality.kid_std": float(q["kid_std"]),
        "quality.n": int(len(qual)),
        "noise_norm.max": float(nn["max"]),
        "noise_norm.mean": float(nn["mean"]),
    }
    first = np.arange(0, n_mem, s.mem_seeds)  # one generation per memorization prompt
    grid = pair_grid(imgs[:n_mem][first], ctx.train_images([nearest_ids[i] for i in first], bundle.resolution),
                     sims[first], cols=min(8, len(first)), scale=2)
    return metrics, grid


def objective_values(p: Params, metrics: dict) -> list[float]:
    return [float(metrics[OBJECTIVES[o][0]]) for o in p.search.objectives]


# ---------------------------------------------------------------- one arm = fine-tune + evaluate
def run_arm(
    p: Params,
    L: Layout,
    ctx: EvalContext,
    mask: Mask,
    out_dir: Path,
    *,
    rows: pd.DataFrame,
    steps: int,
    seed: int,
    progress: Progress = None,
    train_hooks: dict | None = None,
    batch_size: int | None = None,
) -> dict:
    """Fine-tune the base model with `mask` on `rows` (batch_size None: train.batch_size), save the
    adapter, evaluate. Finished work (metrics.json, written last) is reused when its configuration
    digest matches."""
    batch_size = batch_size or p.train.batch_size
    key = {"mask": mask.digest(), "cfg": params_digest(p, "train", "sample", "metrics", "data", "model"),
           "steps": steps, "batch_size": batch_size, "seed": seed,
           "rows": hashlib.sha256("|".join(rows["id"]).encode()).hexdigest()[:12],
           "hooks": sorted((train_hooks or {}).keys())}
    done = out_dir / "metrics.json"
    if done.exists():
        old = json.loads(done.read_text())
        if old.get("key") == key:
            log.info("reusing finished arm %s", out_dir)
            return old
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(p.train.device)
    bundle = load_base(L, device)
    torch.manual_seed(seed)  # adapters drawn at init (LoRA A) must not depend on what ran before
    prepared = tuning.apply(bundle.unet, mask)
    t0 = time.perf_counter()
    res = finetune(
        bundle.unet, prepared.groups, ctx.encoded.train_data(rows), bundle.scheduler,
        steps=steps, batch_size=batch_size, seed=seed, cfg_dropout=p.train.cfg_dropout,
        grad_clip=p.train.grad_clip, weight_decay=p.train.weight_decay,
        mixed_precision=p.train.mixed_precision, gradient_checkpointing=p.train.gradient_checkpointing,
        device=device, progress=lambda s_, _l: _tick(progress, "fine-tune")(s_, steps), **(train_hooks or {}),
    )
    tuning.save_adapter(out_dir, bundle.unet, mask)
    metrics, grid = evaluate(bundle, ctx, progress)
    save_image(grid, out_dir / "grid.png")
    metrics.update({
        "trainable": int(prepared.trainable),
        "trainable_pct": float(prepared.pct),
        "train_seconds": res.seconds,
        "final_loss": float(np.mean(res.losses[-10:])),
        "wall_seconds": time.perf_counter() - t0,
    })
    record = {"key": key, "mask": json.loads(mask.to_json()), "metrics": metrics}
    write_json(record, done)
    return record


def blocks_of(p: Params, L: Layout, method: str | None = None) -> tuple[str, ...]:
    """The search space's block list: one bit per block of the base UNet for this method/mode."""
    return block_layout(load_base(L).unet, method or p.tuning.method, p.tuning.mode, p.tuning.granularity)


def search_rows(p: Params, ctx: EvalContext) -> pd.DataFrame:
    """The memorization-inducing training set of the inner loop (reference.md §3.3)."""
    return memorization_training_set(ctx.df, data_size_ratio=p.data.data_size_ratio, n_repeats=p.data.n_repeats, seed=p.seed)


def final_rows(p: Params, ctx: EvalContext) -> pd.DataFrame:
    """Stage 2's training set (also the audit's and transfer's): final.data_size_ratio of train + the
    memorization subset x final.n_repeats. On the demo the repeats stand in for the natural duplicates
    of a real dataset such as MIMIC-CXR; with all of train (ratio 1) and batch 8 the tiny model sees
    each duplicate too rarely to memorize it (benchmarks/results/memorization_probe*.json)."""
    return memorization_training_set(ctx.df, data_size_ratio=p.final.data_size_ratio, n_repeats=p.final.n_repeats,
                                     seed=p.seed)


# ---------------------------------------------------------------- Pareto front + selection
def trials_table(study, p: Params) -> pd.DataFrame:
    """One row per completed trial: number, lr, bits, objectives, every metric, Pareto flag."""
    from memcontrol.pareto import is_pareto_front
    from memcontrol.search import completed

    rows = []
    for t in completed(study):
        rec = json.loads(t.user_attrs["record"])
        m = rec["mask"]
        row = {"number": t.number, "lr": m["lr"], "bits": "".join(map(str, m["bits"])),
               "enabled": ",".join(b for b, x in zip(m["blocks"], m["bits"]) if x),
               "trial_dir": t.user_attrs.get("trial_dir", "")}
        for o, v in zip(p.search.objectives, t.values):
            row[o] = v
        row.update(rec["metrics"])
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    dirs = [OBJECTIVES[o][1] for o in p.search.objectives]
    df["pareto"] = is_pareto_front(df[list(p.search.objectives)].to_numpy(), dirs)
    return df.sort_values("number").reset_index(drop=True)


def pareto_and_select(p: Params, L: Layout, study) -> dict:
    """Save the trials table, the Pareto front (CSV + plot) and the chosen mask (JSON)."""
    from memcontrol.pareto import select
    from memcontrol.report import pareto_plot

    df = trials_table(study, p)
    if df.empty:
        raise RuntimeError(f"{L.study_db}: no completed trial to select from")
    L.search.mkdir(parents=True, exist_ok=True)
    mem_o, q_o = p.search.objectives
    front = df[df["pareto"]]
    pick = select(front, mem=mem_o, quality=q_o, rule=p.select.rule, quality_tolerance=p.select.quality_tolerance)
    for name, frame in (("trials.csv", df), ("pareto.csv", front)):
        tmp = L.search / (name + ".tmp")
        frame.to_csv(tmp, index=False)
        os.replace(tmp, L.search / name)
    pareto_plot(df, x=mem_o, y=q_o, path=L.search / "pareto.png", selected=int(pick["number"]))
    rec = json.loads(study.trials[int(pick["number"])].user_attrs["record"])
    mask = dataclasses.replace(Mask.from_json(json.dumps(rec["mask"])), trainable_params=int(pick["trainable"]))
    L.selected.parent.mkdir(parents=True, exist_ok=True)
    mask.save(L.selected)
    write_json({"trial": int(pick["number"]), "rule": p.select.rule, "metrics": rec["metrics"],
                "enabled_blocks": list(mask.enabled())}, L.selected.with_name("selected_info.json"))
    return {"trial": int(pick["number"]), "mask": L.selected}


# ---------------------------------------------------------------- Stage 2 + comparison
def full_mask(p: Params, L: Layout) -> Mask:
    """Full fine-tuning of the whole UNet: the reference-mode form with no blocks (no mask)."""
    return Mask(method="full", blocks=(), bits=(), lr=p.final.full_lr, mode="reference")


def final_arms(p: Params, L: Layout) -> dict[str, Mask]:
    return {"selected": Mask.load(L.selected), "full": full_mask(p, L)}


def summarize(p: Params, L: Layout, records: dict[str, list[dict]], base_metrics: dict | None = None) -> pd.DataFrame:
    """Mean and spread over seeds per arm, plus the held-out false-positive floor."""
    keys = ["trainable", "trainable_pct", "mem.flagged_rate", "mem.own_match_rate", "mem.mean_sim", "mem.p95_sim",
            "mem.amd", "noise_norm.max", "quality.fid", "quality.kid_mean", "wall_seconds"]
    rows = []
    for arm, recs in records.items():
        row = {"arm": arm, "n_seeds": len(recs)}
        for k in keys:
            v = np.array([r["metrics"][k] for r in recs], dtype=float)
            row[k] = float(v.mean())
            if len(v) > 1 and k not in ("trainable", "trainable_pct"):
                row[k + ".std"] = float(v.std(ddof=1))
        rows.append(row)
    if base_metrics is not None:
        rows.append({"arm": "base (no fine-tune)", "n_seeds": 1, "trainable": 0, "trainable_pct": 0.0,
                     **{k: base_metrics.get(k, float("nan")) for k in keys if k not in ("trainable", "trainable_pct")}})
    th = json.loads((L.reference / "threshold.json").read_text())
    rows.append({"arm": "held-out real images (floor)", "n_seeds": 1,
                 "mem.flagged_rate": th["heldout_flagged_rate"], "mem.mean_sim": th["heldout_mean_sim"],
                 "mem.p95_sim": th["heldout_p95_sim"]})
    return pd.DataFrame(rows)


def write_comparison(p: Params, L: Layout, table: pd.DataFrame, records: dict[str, list[dict]]) -> dict:
    """reports/compare.{csv,md} and reports/metrics.json (the DVC metrics file)."""
    from memcontrol.report import markdown_table

    L.reports.mkdir(parents=True, exist_ok=True)
    tmp = L.reports / "compare.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, L.reports / "compare.csv")
    cols = ["arm", "n_seeds", "trainable", "trainable_pct", "mem.flagged_rate", "mem.own_match_rate",
            "mem.mean_sim", "mem.p95_sim", "noise_norm.max", "quality.kid_mean", "quality.fid", "wall_seconds"]
    th = json.loads((L.reference / "threshold.json").read_text())
    sel = json.loads(L.selected.with_name("selected_info.json").read_text()) if L.selected.with_name("selected_info.json").exists() else {}
    md = [
        "# Selected mask vs full fine-tuning",
        "",
        f"Method `{p.tuning.method}` ({p.tuning.mode} mode); selected trial {sel.get('trial', '?')}, "
        f"enabled blocks: {', '.join(sel.get('enabled_blocks', [])) or '(none)'}.",
        f"Stage 2: {p.final.steps} steps at batch {p.final.batch_size} on {p.final.data_size_ratio:g} of train + the "
        f"memorization subset x {p.final.n_repeats}; seeds: {list(p.final.seeds)}; memorization threshold "
        f"{th['threshold']:.4f} ({th['mode']}, quantile {th['quantile']}, embedder {th['embedder']}; held-out real "
        f"flagged rate {th.get('heldout_flagged_rate', float('nan')):.3f}, the false-positive floor).",
        "",
        markdown_table(table[[c for c in cols if c in table.columns]]),
        "",
        "mem.flagged_rate: share of memorization-prompt generations whose nearest training image passes the "
        "threshold; mem.own_match_rate: share whose nearest neighbour is the very image of that prompt. "
        "Lower is better for every column but quality's (lower KID/FID = better quality too).",
    ]
    tmp = L.reports / "compare.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, L.reports / "compare.md")
    metrics = {}
    for _, r in table.iterrows():
        arm = str(r["arm"]).split(" ")[0]
        metrics[arm] = {k: (None if pd.isna(v) else v) for k, v in r.items() if k not in ("arm",)}
    write_json(metrics, L.reports / "metrics.json")
    return {"table": str(L.reports / "compare.md"), "metrics": str(L.reports / "metrics.json")}
