"""The audit: the selected mask against full fine-tuning, each PEFT method unmasked and the known
mitigations (alone and stacked on the mask), every arm with the same data, steps, seeds and metrics
as the final model, plus an extraction attack per model. Also the transfer experiment's arms.

Arm names are ``base[+mitigation...]`` (memcontrol.mitigations.parse_arm). Bases: ``full`` (the
whole UNet), ``selected`` (the saved mask), ``unmasked`` (the selected mask's method on the whole
UNet, at the selected LR and options, so it differs from ``selected`` by the mask alone) and any
PEFT method name (unmasked, at ``audit.method_lr``; the selected mask's own method gets the
selected LR, as ``unmasked``).

Outputs of one arm and seed (``<out>/<arm>/seed<k>/``): what ``stages.run_arm`` writes (adapter,
mask.json, metrics.json, grid.png) plus ``audit.json`` (extraction attack, hook counters) and
``nearest.png`` (the most similar generations above their nearest training images).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memcontrol import mitigations as M
from memcontrol import stages, tuning
from memcontrol.config import OBJECTIVES, Params
from memcontrol.extraction import calibrate_tile_threshold, extraction_attack
from memcontrol.report import markdown_table, pair_grid, save_image
from memcontrol.sample import generate, item_seed
from memcontrol.train import resolve_device
from memcontrol.tuning import Mask

log = logging.getLogger(__name__)

# (metrics key, column title, lower is better?) of the report table, in order
REPORT_KEYS = (
    ("trainable", "trainable params", None),
    ("trainable_pct", "trainable %", None),
    ("mem.flagged_rate", "memorization rate", True),
    ("mem.mean_sim", "mean NN sim", True),
    ("mem.p95_sim", "p95 NN sim", True),
    ("mem.own_match_rate", "own-image match", True),
    ("extraction.n_extracted", "extracted (count)", True),
    ("extraction.n_memorized", "memorized prompts (count)", True),
    ("noise_norm.max", "noise norm", True),
    ("quality.fid", "FID", True),
    ("quality.kid_mean", "KID", True),
    ("wall_seconds", "wall s", None),
)


@dataclass(frozen=True)
class Arm:
    name: str
    base: str
    mitigations: tuple[str, ...]
    mask: Mask


def arm_mask(p: Params, L: stages.Layout, base: str, selected: Mask | None) -> Mask:
    """The mask of an arm's base (see the module docstring)."""
    if base == "full":
        return stages.full_mask(p, L)
    if base == "selected":
        if selected is None:
            raise FileNotFoundError(f"arm `selected` needs a saved mask ({L.selected}); run `memcontrol search` first")
        return selected
    if base == "unmasked" and selected is None:
        raise FileNotFoundError(f"arm `unmasked` needs a saved mask ({L.selected}) to know the method")
    method = selected.method if base == "unmasked" else base
    if method not in tuning.METHODS:
        raise ValueError(f"arm base {base!r}: not full, selected, unmasked or a method ({sorted(tuning.METHODS)})")
    if method == "full":
        return stages.full_mask(p, L)
    if selected is not None and method == selected.method:
        lr, options = selected.lr, dict(selected.options)
    else:
        if method not in p.audit.method_lr:
            raise ValueError(f"audit.method_lr has no learning rate for method {method!r}")
        lr = p.audit.method_lr[method]
        options = dict(p.tuning.options) if method == p.tuning.method else {}
    return Mask(method=method, blocks=(), bits=(), lr=lr, mode="reference", options=options)


def build_arms(p: Params, L: stages.Layout, names: tuple[str, ...], selected: Mask | None) -> list[Arm]:
    arms = []
    for n in names:
        base, mits = M.parse_arm(n)
        arms.append(Arm(n, base, mits, arm_mask(p, L, base, selected)))
    return arms


def settings(p: Params) -> M.Settings:
    m = p.audit.mitigations
    return M.Settings(rwa_k=m.rwa_k, gn_sigma=m.gn_sigma, wen_threshold=m.wen_threshold, wen_quantile=m.wen_quantile)


class TextSide:
    """The frozen text encoder alone (RWA re-encodes captions at every use), loaded once."""

    def __init__(self, L: stages.Layout):
        from transformers import AutoModel, AutoTokenizer

        from memcontrol.models.bundle import Bundle

        src = L.base / "source.json"
        path = Path(json.loads(src.read_text())["path"]) if src.exists() else L.base
        tok = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        enc = AutoModel.from_pretrained(path / "text_encoder", local_files_only=True, use_safetensors=True)
        enc.eval().requires_grad_(False)
        # Bundle.encode_prompts uses only the text encoder and tokenizer: same tokenisation as training
        self._bundle = Bundle(vae=None, unet=None, text_encoder=enc, tokenizer=tok, scheduler=None)
        self.words = M.vocabulary_words(tok)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self._bundle.encode_prompts(prompts)


def tile_threshold(p: Params, ctx: stages.EvalContext, out: Path, resolution: int) -> float:
    """Link threshold of the extraction attack: fixed, or the `quantile` of the tile distances between
    distinct training images at the model's resolution (cached in `out`, keyed by ids and settings)."""
    e = p.audit.extraction
    if e.threshold != "calibrated":
        return float(e.threshold)
    ids = list(ctx.ids["train"])
    key = hashlib.sha256(json.dumps([ids, e.quantile, e.tiles, resolution]).encode()).hexdigest()[:12]
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("key") == key:
            return float(old["threshold"])
    thr = calibrate_tile_threshold(ctx.train_images(ids, resolution), e.quantile, tiles=e.tiles)
    stages.write_json({"key": key, "threshold": thr, "quantile": e.quantile, "n_images": len(ids),
                       "resolution": resolution}, out)
    return thr


def extraction_eval(p: Params, L: stages.Layout, ctx: stages.EvalContext, arm_dir: Path, *, threshold: float,
                    top: int) -> tuple[dict, object]:
    """Reload the arm's adapter on the base model, generate `audit.extraction.per_prompt` images per
    memorization prompt (the first `sample.mem_seeds` are the very images `evaluate` scored), run the
    extraction attack against each prompt's training image and draw the `top` most similar
    generations above their nearest training images. Returns (metrics, grid)."""
    e, s = p.audit.extraction, p.sample
    bundle = stages.load_base(L, resolve_device(p.train.device))
    tuning.load_adapter(arm_dir, bundle.unet)
    enc, mem = ctx.encoded, ctx.mem_rows
    n = e.per_prompt
    text = enc.text[enc.prompt_index(mem["prompt"].tolist())].repeat_interleave(n, 0)
    seeds = [item_seed(s.seed, i, k) for i in range(len(mem)) for k in range(n)]
    imgs = generate(bundle, text, seeds, steps=s.steps, guidance=s.guidance, batch_size=s.batch_size,
                    null_text=enc.null_text)
    res = bundle.resolution
    own = ctx.train_images(mem["id"].tolist(), res)
    attack = extraction_attack(list(imgs.view(len(mem), n, *imgs.shape[1:])), list(own), tiles=e.tiles,
                               threshold=threshold, min_component=e.min_component)
    sims, idx = ctx.index.search(ctx.embedder.embed(imgs), k=1)
    sims, idx = sims[:, 0], idx[:, 0]
    order = np.argsort(-sims, kind="stable")[: min(top, len(sims))]
    nearest = ctx.train_images([ctx.ids["train"][i] for i in idx[order]], res)
    grid = pair_grid(imgs[order], nearest, sims[order], cols=min(8, len(order)), scale=2)
    metrics = {
        "extraction.n_prompts": attack.n_prompts,
        "extraction.n_memorized": attack.n_memorized,
        "extraction.n_extracted": attack.n_extracted,
        "extraction.memorized_rate": attack.memorized_rate,
        "extraction.extracted_rate": attack.extracted_rate,
        "extraction.threshold": float(threshold),
        "extraction.per_prompt": n,
        "mem.max_sim": float(sims.max()),
    }
    return metrics, grid


def run_audit_arm(p: Params, L: stages.Layout, ctx: stages.EvalContext, arm: Arm, seed: int, out_root: Path, *,
                  steps: int, threshold: float, text_side: TextSide | None = None, progress=None) -> dict:
    """Fine-tune + evaluate one arm and seed (reusing finished work), then the extraction attack.
    Returns {"arm", "seed", "dir", "key", "mask", "metrics", "info"}."""
    out = out_root / arm.name / f"seed{seed}"
    rows = stages.final_rows(p, ctx)
    if "dedup" in arm.mitigations:
        rows = M.deduplicate(rows)
    st = settings(p)
    aux = {"mitigations": list(arm.mitigations), "settings": _settings_used(st, arm.mitigations),
           "extraction": p.audit.extraction.model_dump(mode="json"), "extraction_threshold": round(threshold, 6),
           "top": p.audit.grid_top}
    side = out / "audit.json"
    if side.exists() and json.loads(side.read_text()).get("aux", {}).get("settings") != aux["settings"]:
        # run_arm's key names the hooks, not their settings: a changed setting means retraining
        (out / "metrics.json").unlink(missing_ok=True)
        side.unlink()
    hooks = {}
    if arm.mitigations:
        needs_text = "rwa" in arm.mitigations
        if needs_text and text_side is None:
            text_side = TextSide(L)
        hooks = M.train_hooks([m for m in arm.mitigations if m != "dedup"], st, prompts=ctx.encoded.prompts,
                              encode=text_side.encode if needs_text else None,
                              words=text_side.words if needs_text else ())
    rec = stages.run_arm(p, L, ctx, arm.mask, out, rows=rows, steps=steps, seed=seed, progress=progress,
                         train_hooks=hooks or None, batch_size=p.final.batch_size)
    old = json.loads(side.read_text()) if side.exists() else None
    if old is not None and old.get("key") == rec["key"] and old.get("aux") == aux and (out / "nearest.png").exists():
        extra, info = old["metrics"], old.get("info", {})
    else:
        t0 = time.perf_counter()
        extra, grid = extraction_eval(p, L, ctx, out, threshold=threshold, top=p.audit.grid_top)
        extra["extraction.seconds"] = time.perf_counter() - t0
        save_image(grid, out / "nearest.png")
        counters = M.hook_stats(hooks)
        if old is not None and old.get("key") == rec["key"] and not counters.get("wen.seen", 1):
            counters = old.get("info", {})  # training was reused: keep the counters of the run that trained
        info = {"n_rows": len(rows), "n_distinct_images": int(rows["id"].nunique()), **counters}
        extra.update({k: v for k, v in counters.items() if isinstance(v, (int, float))})
        stages.write_json({"key": rec["key"], "aux": aux, "metrics": extra, "info": info}, side)
    return {"arm": arm.name, "seed": seed, "dir": str(out), "key": rec["key"], "mask": rec["mask"],
            "metrics": {**rec["metrics"], **extra}, "info": info}


def _settings_used(st: M.Settings, mits: tuple[str, ...]) -> dict:
    d = {}
    if "rwa" in mits:
        d["rwa_k"] = st.rwa_k
    if "gn" in mits:
        d["gn_sigma"] = st.gn_sigma
    if "wen" in mits:
        d["wen_threshold"], d["wen_quantile"] = st.wen_threshold, st.wen_quantile
    return d


# ----------------------------------------------------------------------------- aggregation


def aggregate(records: list[dict]) -> pd.DataFrame:
    """One row per arm (in first-seen order): n_seeds, and for each REPORT_KEYS metric the mean over
    seeds and, with >= 2 seeds, the sample std (`<key>.std`), min and max."""
    arms: dict[str, list[dict]] = {}
    for r in records:
        arms.setdefault(r["arm"], []).append(r)
    rows = []
    for arm, recs in arms.items():
        row = {"arm": arm, "n_seeds": len(recs), "seeds": ",".join(str(r["seed"]) for r in recs)}
        for k, _, _ in REPORT_KEYS:
            v = np.array([r["metrics"].get(k, np.nan) for r in recs], dtype=float)
            row[k] = float(np.mean(v))
            if len(v) > 1:
                row[k + ".std"] = float(np.std(v, ddof=1))
                row[k + ".min"], row[k + ".max"] = float(v.min()), float(v.max())
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(v, key: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if key == "trainable":
        return f"{int(round(v)):,}"
    if key == "trainable_pct":
        return f"{v:.4g}"
    if key.startswith("extraction.n_"):
        return f"{v:.2g}"
    if key == "wall_seconds":
        return f"{v:.0f}"
    if key == "quality.kid_mean":
        return f"{v:.4f}"
    if key == "quality.fid":
        return f"{v:.1f}"
    return f"{v:.3f}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The report table as strings: `mean ± std` per metric (std over seeds)."""
    out = pd.DataFrame({"arm": table["arm"], "seeds": table["n_seeds"]})
    for k, title, _ in REPORT_KEYS:
        cells = []
        for _, r in table.iterrows():
            m = _fmt(r.get(k), k)
            sd = r.get(k + ".std")
            cells.append(m if sd is None or pd.isna(sd) or k in ("trainable", "trainable_pct") else f"{m} ± {_fmt(sd, k)}")
        out[title] = cells
    return out


def tradeoff(table: pd.DataFrame, mem: str, quality: str) -> pd.DataFrame:
    """Pairwise verdicts on the (memorization, quality) means, both lower-is-better: for each arm,
    whether it is on the front of the arms and which arms it dominates."""
    from memcontrol.pareto import is_pareto_front

    v = table[[mem, quality]].to_numpy(dtype=float)
    front = is_pareto_front(v, ["minimize", "minimize"])
    dom = []
    for i in range(len(v)):
        d = [table["arm"].iloc[j] for j in range(len(v))
             if j != i and (v[i] <= v[j]).all() and (v[i] < v[j]).any()]
        dom.append(", ".join(d))
    return pd.DataFrame({"arm": table["arm"], mem: [f"{x:.4f}" for x in v[:, 0]], quality: [f"{x:.4f}" for x in v[:, 1]],
                         "on the arms' front": ["yes" if f else "" for f in front], "dominates": dom})


def claims(table: pd.DataFrame, records: list[dict], mem_key: str, q_key: str) -> list[dict]:
    """The paper's claims, checked on this table (means over seeds; Welch t-test p-values over seeds,
    which with 3 seeds are rough). Each item: claim, comparison, numbers, verdict."""
    from scipy import stats

    by = {a: [r["metrics"] for r in records if r["arm"] == a] for a in table["arm"]}
    mean = table.set_index("arm")

    def vals(a, k):
        return np.array([m.get(k, np.nan) for m in by.get(a, [])], dtype=float)

    def pval(a, b, k):
        x, y = vals(a, k), vals(b, k)
        if len(x) < 2 or len(y) < 2 or np.allclose(np.r_[x, y], x[0]):
            return float("nan")
        return float(stats.ttest_ind(x, y, equal_var=False).pvalue)

    def dominates(a, b):
        va = np.array([mean.loc[a, mem_key], mean.loc[a, q_key]])
        vb = np.array([mean.loc[b, mem_key], mean.loc[b, q_key]])
        return bool((va <= vb).all() and (va < vb).any())

    def verdict(d, p):
        if not d < 0:
            return "does not hold"
        return "holds" if p < 0.05 else f"holds in the mean only (not significant over seeds, p={p:.2g})"

    out = []
    arms = list(table["arm"])
    methods = [a for a in arms if "+" not in a and a not in ("full", "selected", "unmasked")]
    if "full" in arms:
        for a in methods + (["selected"] if "selected" in arms else []):
            d = mean.loc[a, mem_key] - mean.loc["full", mem_key]
            out.append({"claim": "PEFT memorizes less than full fine-tuning", "comparison": f"{a} vs full",
                        "numbers": f"{mem_key} {mean.loc[a, mem_key]:.4f} vs {mean.loc['full', mem_key]:.4f} "
                                   f"(diff {d:+.4f}, p={pval(a, 'full', mem_key):.3g})",
                        "verdict": verdict(d, pval(a, "full", mem_key))})
    if "selected" in arms:
        for a in methods + (["unmasked"] if "unmasked" in arms else []) + (["full"] if "full" in arms else []):
            if dominates("selected", a):
                v = "holds (selected dominates)"
            elif dominates(a, "selected"):
                v = "does not hold (dominated)"
            else:
                v = "trade-off (neither dominates)"
            out.append({"claim": "the searched mask beats each unmasked method on the trade-off",
                        "comparison": f"selected vs {a}",
                        "numbers": f"({mem_key}, {q_key}) = ({mean.loc['selected', mem_key]:.4f}, "
                                   f"{mean.loc['selected', q_key]:.4f}) vs ({mean.loc[a, mem_key]:.4f}, {mean.loc[a, q_key]:.4f})",
                        "verdict": v})
    for a in arms:
        base, mits = M.parse_arm(a)
        if not mits or base not in arms:
            continue
        dm = mean.loc[a, mem_key] - mean.loc[base, mem_key]
        dq = mean.loc[a, q_key] - mean.loc[base, q_key]
        out.append({"claim": "stacking a mitigation helps further", "comparison": f"{a} vs {base}",
                    "numbers": f"{mem_key} {dm:+.4f} (p={pval(a, base, mem_key):.3g}), {q_key} {dq:+.4f}",
                    "verdict": verdict(dm, pval(a, base, mem_key))})
    return out


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(table: pd.DataFrame, path: Path, keys: tuple[str, ...] | None = None) -> Path:
    """One panel per metric, one bar per arm (mean), error bar = std over seeds."""
    plt = _plt()
    keys = keys or ("mem.flagged_rate", "mem.mean_sim", "mem.p95_sim", "extraction.n_extracted",
                    "quality.kid_mean", "quality.fid")
    titles = {k: t for k, t, _ in REPORT_KEYS}
    n = len(table)
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(4.2 * ((len(keys) + 1) // 2), 0.28 * n * 2 + 2.5), dpi=100)
    colors = ["#d62728" if a == "full" else "#1f77b4" if a.startswith("selected") else "#7f7f7f" for a in table["arm"]]
    for ax, k in zip(np.ravel(axes), keys):
        y = np.arange(n)
        err = table[k + ".std"] if k + ".std" in table else None
        ax.barh(y, table[k], xerr=err, color=colors, alpha=0.85, capsize=2)
        ax.set_yticks(y, table["arm"], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(titles.get(k, k) + " (lower = better)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in np.ravel(axes)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, plt, path)


def tradeoff_plot(table: pd.DataFrame, mem: str, quality: str, path: Path) -> Path:
    """Arms in the (memorization, quality) plane, mean with std error bars; the arms' front joined."""
    from memcontrol.pareto import is_pareto_front

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=110)
    for _, r in table.iterrows():
        c = "#d62728" if r["arm"] == "full" else "#1f77b4" if r["arm"].startswith("selected") else "#555555"
        ax.errorbar(r[mem], r[quality], xerr=r.get(mem + ".std", 0) or 0, yerr=r.get(quality + ".std", 0) or 0,
                    fmt="o", c=c, ms=5, capsize=2, alpha=0.9)
        ax.annotate(r["arm"], (r[mem], r[quality]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = is_pareto_front(table[[mem, quality]].to_numpy(dtype=float), ["minimize", "minimize"])
    f = table[front].sort_values(mem)
    ax.plot(f[mem], f[quality], "--", c="#1f77b4", alpha=0.5, label="front of the arms")
    ax.set_xlabel(f"{mem} (lower = less memorization)")
    ax.set_ylabel(f"{quality} (lower = better quality)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- report files


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def data_card(df: pd.DataFrame) -> pd.DataFrame:
    """Rows per split / subset / source kind (the report uid after ':' dropped)."""
    kind = df["source"].str.split(":").str[0]
    kind = kind.where(~kind.str.startswith("kermany"), "kermany2018+iu")
    return (df.assign(source=kind).groupby(["split", "subset", "source"]).size().rename("images").reset_index())


@dataclass
class ReportInputs:
    title: str
    intro: list[str]            # markdown paragraphs
    table: pd.DataFrame         # aggregate()
    records: list[dict]
    mem_key: str
    quality_key: str
    card: pd.DataFrame
    settings: dict              # shown as a key/value list
    figures: list[tuple[str, Path, str]]  # (title, png, caption)
    grids: list[tuple[str, Path]]         # (arm, nearest.png)


def write_report(inp: ReportInputs, md_path: Path, html_path: Path) -> tuple[Path, Path]:
    """Markdown (figures linked relative to md_path) and a self-contained HTML (figures inline)."""
    disp = display_table(inp.table)
    trade = tradeoff(inp.table, inp.mem_key, inp.quality_key)
    cl = pd.DataFrame(claims(inp.table, inp.records, inp.mem_key, inp.quality_key))
    rel = lambda p: os.path.relpath(p, md_path.parent)  # noqa: E731
    md = [f"# {inp.title}", "", *[x + "\n" for x in inp.intro],
          "## Results (mean ± std over seeds)", "", markdown_table(disp), "",
          f"Trade-off objectives: `{inp.mem_key}` and `{inp.quality_key}` (both lower = better).", "",
          markdown_table(trade), ""]
    if not cl.empty:
        md += ["## The paper's claims on this run", "", markdown_table(cl), ""]
    for title, png, cap in inp.figures:
        md += [f"## {title}", "", f"![{title}]({rel(png)})", "", cap, ""]
    md += ["## Most similar generations (top) and their nearest training images (bottom), seed 0", ""]
    for arm, png in inp.grids:
        md += [f"**{arm}**", "", f"![{arm}]({rel(png)})", ""]
    md += ["## Data card", "", markdown_table(inp.card), "", "## Settings", ""]
    md += [f"- **{k}**: {v}" for k, v in inp.settings.items()]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_text(md_path, "\n".join(md) + "\n")

    def tbl(df: pd.DataFrame) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>"
                       for r in df.itertuples(index=False))
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = [f"<h1>{html.escape(inp.title)}</h1>", *[f"<p>{html.escape(x)}</p>" for x in inp.intro],
             "<h2>Results (mean ± std over seeds)</h2>", tbl(disp),
             f"<p>Trade-off objectives: <code>{html.escape(inp.mem_key)}</code> and "
             f"<code>{html.escape(inp.quality_key)}</code> (both lower = better).</p>", tbl(trade)]
    if not cl.empty:
        parts += ["<h2>The paper's claims on this run</h2>", tbl(cl)]
    for title, png, cap in inp.figures:
        parts += [f"<h2>{html.escape(title)}</h2>", f'<img alt="{html.escape(title)}" src="{_data_uri(png)}">',
                  f"<p class=cap>{html.escape(cap)}</p>"]
    parts += ["<h2>Most similar generations (top row of each pair) and their nearest training images, seed 0</h2>",
              '<div class="grids">']
    for arm, png in inp.grids:
        parts += [f'<figure><figcaption>{html.escape(arm)}</figcaption><img alt="{html.escape(arm)}" '
                  f'src="{_data_uri(png)}"></figure>']
    parts += ["</div>", "<h2>Data card</h2>", tbl(inp.card), "<h2>Settings</h2><ul>"]
    parts += [f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in inp.settings.items()]
    parts += ["</ul>"]
    style = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}"
             "table{border-collapse:collapse;font-size:12px;margin:8px 0 16px}"
             "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f0f0f0}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             ".grids{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0}"
             "figcaption{font-weight:bold;font-size:13px}.cap{font-size:12px;color:#555}")
    doc = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(inp.title)}</title>"
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    _atomic_text(html_path, doc)
    return md_path, html_path


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def metrics_json(table: pd.DataFrame) -> dict:
    """{arm: {metric: mean, metric.std: std, n_seeds}} for `dvc metrics show` (NaN -> null)."""
    out = {}
    for _, r in table.iterrows():
        out[r["arm"]] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                         for k, v in r.items() if k not in ("arm", "seeds")}
    return out


def plots_csv(table: pd.DataFrame, path: Path) -> Path:
    """One row per arm, underscore column names (DVC plots templates read them as fields)."""
    cols = {"arm": "arm"}
    for k, _, _ in REPORT_KEYS:
        cols[k] = k.replace(".", "_")
        if k + ".std" in table:
            cols[k + ".std"] = k.replace(".", "_") + "_std"
    df = table[[c for c in cols if c in table]].rename(columns=cols)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def search_pareto_with_baselines(p: Params, L: stages.Layout, table: pd.DataFrame, path: Path) -> Path | None:
    """The search's trials and front (search/trials.csv) with every audit arm overlaid."""
    from memcontrol.report import pareto_plot

    f = L.search / "trials.csv"
    if not f.exists():
        return None
    trials = pd.read_csv(f)
    if trials.empty:
        return None
    mem_o, q_o = p.search.objectives
    base = pd.DataFrame({"arm": table["arm"], mem_o: table[OBJECTIVES[mem_o][0]], q_o: table[OBJECTIVES[q_o][0]]})
    sel = json.loads(L.selected.with_name("selected_info.json").read_text()).get("trial") \
        if L.selected.with_name("selected_info.json").exists() else None
    return pareto_plot(trials, x=mem_o, y=q_o, path=path, selected=sel, baselines=base)


def nan_safe(obj):
    """NaN/inf -> None, recursively (JSON for MLflow/DVC)."""
    if isinstance(obj, dict):
        return {k: nan_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------- the audit and transfer runs


def model_resolution(L: stages.Layout) -> int:
    """The base model's image size, from its configs (no weights loaded)."""
    src = L.base / "source.json"
    if src.exists():
        return int(json.loads(src.read_text())["resolution"])
    unet = json.loads((L.base / "unet" / "config.json").read_text())
    vae = json.loads((L.base / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def run_arms(p: Params, L: stages.Layout, arm_names: tuple[str, ...], seeds: tuple[int, ...], out_root: Path, *,
             selected: Mask | None, steps: int, progress=None, on_record=None) -> list[dict]:
    """Every arm for every seed (seeds outermost: a partial run has every arm at seed 0 first)."""
    ctx = stages.EvalContext(p, L)
    arms = build_arms(p, L, arm_names, selected)
    thr = tile_threshold(p, ctx, out_root / "extraction_threshold.json", model_resolution(L))
    text_side = TextSide(L) if any("rwa" in a.mitigations for a in arms) else None
    records = []
    for seed in seeds:
        for arm in arms:
            log.info("audit arm %s seed %d", arm.name, seed)
            rec = run_audit_arm(p, L, ctx, arm, seed, out_root, steps=steps, threshold=thr, text_side=text_side,
                                progress=progress)
            records.append(rec)
            if on_record is not None:
                on_record(rec)
    return records


def _selected(path: Path) -> Mask | None:
    return Mask.load(path) if path.exists() else None


def _settings_list(p: Params, L: stages.Layout, steps: int, seeds, selected: Mask | None, threshold_file: Path) -> dict:
    th = json.loads((L.reference / "threshold.json").read_text())
    ext = json.loads(threshold_file.read_text()) if threshold_file.exists() else {}
    return {
        "embedder": f"{th['embedder']} (centred: {th['center']}; image size {p.metrics.embed_size})",
        "memorization threshold": f"{th['threshold']:.4f} ({th['mode']}, quantile {th['quantile']}; held-out "
                                  f"real flagged rate {th.get('heldout_flagged_rate', float('nan')):.3f})",
        "selected mask": (f"{selected.method}, {selected.mode} mode, LR {selected.lr:.3g}, enabled: "
                          f"{', '.join(selected.enabled()) or '(none)'}") if selected else "(none)",
        "steps per arm": steps, "seeds": list(seeds), "batch size": p.final.batch_size,
        "training rows": f"final_rows: {p.final.data_size_ratio:g} of train + memorization subset x {p.final.n_repeats}",
        "method learning rates": dict(p.audit.method_lr) | {"full": p.final.full_lr},
        "mitigations": p.audit.mitigations.model_dump(mode="json"),
        "extraction attack": (f"{p.audit.extraction.per_prompt} generations per memorization prompt, "
                              f"{p.audit.extraction.tiles}x{p.audit.extraction.tiles} tiles, RMS link threshold "
                              f"{ext.get('threshold', p.audit.extraction.threshold)} "
                              f"({p.audit.extraction.threshold}, quantile {p.audit.extraction.quantile}), "
                              f"component >= {p.audit.extraction.min_component}"),
        "sampling": f"DDIM {p.sample.steps} steps, guidance {p.sample.guidance}, {p.sample.mem_seeds} seeds per "
                    f"memorization prompt, {p.sample.n_quality} held-out prompts for FID/KID",
    }


def report(p: Params, L: stages.Layout, records: list[dict], *, title: str, out_md: Path, out_html: Path,
           fig_dir: Path, steps: int, seeds, selected: Mask | None, threshold_file: Path, intro: list[str],
           with_search: bool) -> dict:
    """Table, figures and report files of a set of arm records; returns the aggregated table and paths."""
    table = aggregate(records)
    mem_key, q_key = (OBJECTIVES[o][0] for o in p.search.objectives)
    fig_dir.mkdir(parents=True, exist_ok=True)  # DVC removes declared output folders before a run
    figs = []
    if with_search:
        pp = search_pareto_with_baselines(p, L, table, fig_dir / "pareto_baselines.png")
        if pp is not None:
            figs.append(("Search Pareto front with every baseline", pp,
                         "Grey: the search's trials (inner-loop setting: memorization-inducing subset, "
                         f"train.steps = {p.train.steps}); blue line: their Pareto front; red ring: the selected "
                         f"trial; squares: audit arms (mean over seeds, Stage-2 setting: {steps} steps at batch "
                         f"{p.final.batch_size} on the final training set). The two settings differ, so compare squares with squares."))
    figs.append(("Trade-off of the arms", tradeoff_plot(table, mem_key, q_key, fig_dir / "tradeoff.png"),
                 "Mean over seeds with std error bars; dashed: the arms' Pareto front. Red: full fine-tuning; "
                 "blue: the selected mask (alone and stacked)."))
    figs.append(("Metrics per arm", bar_plot(table, fig_dir / "bars.png"),
                 "Mean over seeds, error bars = std over seeds."))
    grids = [(r["arm"], Path(r["dir"]) / "nearest.png") for r in records if r["seed"] == min(seeds)]
    inp = ReportInputs(title=title, intro=intro, table=table, records=records, mem_key=mem_key, quality_key=q_key,
                       card=data_card(stages.manifest(L)), settings=_settings_list(p, L, steps, seeds, selected, threshold_file),
                       figures=figs, grids=grids)
    write_report(inp, out_md, out_html)
    return {"table": table, "md": out_md, "html": out_html, "figures": [f[1] for f in figs]}


def run_audit(p: Params, L: stages.Layout, *, progress=None, on_record=None) -> dict:
    """The audit on the workdir `L`: arms x seeds into audit/, report into reports/."""
    steps = p.audit.steps or p.final.steps
    out_root = L.root / "audit" / "arms"
    selected = _selected(L.selected)
    records = run_arms(p, L, p.audit.arms, p.audit.seeds, out_root, selected=selected, steps=steps,
                       progress=progress, on_record=on_record)
    intro = [
        "Every arm fine-tunes the same base model on the same training rows (the final training set; "
        "`dedup` arms drop the repeats) for the same number of steps and is scored by the same evaluation "
        "(memorization-prompt generations against the training set's FAISS index, FID/KID on held-out "
        "prompts, the noise-norm proxy) plus an extraction attack. Lower is better in every metric column.",
    ]
    res = report(p, L, records, title="MemControl audit: the selected mask against baselines and mitigations",
                 out_md=L.reports / "audit.md", out_html=L.reports / "audit.html", fig_dir=L.reports / "audit",
                 steps=steps, seeds=p.audit.seeds, selected=selected,
                 threshold_file=out_root / "extraction_threshold.json", intro=intro, with_search=True)
    stages.write_json(metrics_json(res["table"]), L.reports / "audit_metrics.json")
    plots_csv(res["table"], L.reports / "audit_plots.csv")
    return {**res, "records": records, "metrics": L.reports / "audit_metrics.json", "plots": L.reports / "audit_plots.csv"}


# ----------------------------------------------------------------------------- transfer


def transfer_layout(L: stages.Layout) -> stages.Layout:
    return stages.Layout(L.root / "transfer")


def prepare_transfer(p: Params, L: stages.Layout) -> stages.Layout:
    """Build the transfer dataset (once per settings), point its base at the workdir's base model and
    build its reference (index, threshold) with the same embedder. Returns the transfer layout."""
    from memcontrol.data.manifest import save_manifest
    from memcontrol.data.transfer import build_transfer

    T = transfer_layout(L)
    t = p.transfer
    key = {"n_train": t.n_train, "n_test": t.n_test, "image_size": t.image_size, "seed": p.seed,
           "base": stages.file_digest(L.base), "metrics": stages.params_digest(p, "metrics")}
    stamp = T.root / "prepared.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key and T.manifest.exists():
        return T
    data_dir = T.root / "data" / "images_root"
    df = build_transfer(data_dir, n_train=t.n_train, n_test=t.n_test, image_size=t.image_size, seed=p.seed)
    df["path"] = [os.path.relpath(data_dir / x, T.manifest.parent) for x in df["path"]]
    save_manifest(df, T.manifest)
    src = L.base / "source.json"
    path = json.loads(src.read_text())["path"] if src.exists() else str(L.base.resolve())
    stages.write_json({"path": path, "resolution": model_resolution(L)}, T.base / "source.json")
    stages.reference(p, T)
    stages.write_json({"key": key}, stamp)
    return T


def run_transfer(p: Params, L: stages.Layout, *, progress=None, on_record=None) -> dict:
    """The saved mask (transfer.mask, default masks/selected.json) on the transfer dataset against
    the arms of transfer.arms; everything under transfer/."""
    mask_path = Path(p.transfer.mask) if p.transfer.mask else L.selected
    if not mask_path.exists():
        raise FileNotFoundError(f"transfer: mask {mask_path} not found (run `memcontrol search`, or set transfer.mask)")
    selected = Mask.load(mask_path)
    T = prepare_transfer(p, L)
    steps = p.transfer.steps or p.final.steps
    out_root = T.root / "arms"
    records = run_arms(p, T, p.transfer.arms, p.transfer.seeds, out_root, selected=selected, steps=steps,
                       progress=progress, on_record=on_record)
    intro = [
        f"The mask {mask_path} (found on the chest X-ray set) applied unchanged to a second dataset of other "
        "modalities: axial slices of a real chest CT (train/test) and 12 real CT/MR/ultrasound/radiograph DICOM "
        "images as the memorization subset (memcontrol/data/transfer.py). Same base model, same steps, seeds and "
        "metrics as the audit; the memorization threshold and FAISS index are rebuilt on this dataset.",
    ]
    res = report(p, T, records, title="MemControl transfer: the saved mask on CT/MR slices",
                 out_md=T.reports / "transfer.md", out_html=T.reports / "transfer.html", fig_dir=T.reports / "transfer",
                 steps=steps, seeds=p.transfer.seeds, selected=selected,
                 threshold_file=out_root / "extraction_threshold.json", intro=intro, with_search=False)
    stages.write_json(metrics_json(res["table"]), T.reports / "transfer_metrics.json")
    return {**res, "records": records, "metrics": T.reports / "transfer_metrics.json", "root": T.root}
