"""Audit report rendering: the display table, figures (matplotlib, Agg), the Markdown report and a
self-contained HTML one (figures inline, nothing fetched), the DVC plots file."""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memcontrol import atomic
from memcontrol.audit.statistics import REPORT_KEYS, claims, tradeoff
from memcontrol.config import OBJECTIVES, Params
from memcontrol.pareto import is_pareto_front
from memcontrol.report import markdown_table, pareto_plot
from memcontrol.workdir import Layout, write_csv, write_text

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
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
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
    quality_tolerance: float = 0.2        # select.quality_tolerance: the "selected mask wins" claim's limit


def write_report(inp: ReportInputs, md_path: Path, html_path: Path) -> tuple[Path, Path]:
    """Markdown (figures linked relative to md_path) and a self-contained HTML (figures inline)."""
    disp = display_table(inp.table)
    trade = tradeoff(inp.table, inp.mem_key, inp.quality_key)
    cl = pd.DataFrame(claims(inp.table, inp.records, inp.mem_key, inp.quality_key, inp.quality_tolerance))
    rel = lambda png: os.path.relpath(png, md_path.parent)  # noqa: E731
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
    write_text("\n".join(md) + "\n", md_path)

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
    write_text(doc, html_path)
    return md_path, html_path



def plots_csv(table: pd.DataFrame, path: Path) -> Path:
    """One row per arm, underscore column names (DVC plots templates read them as fields)."""
    cols = {"arm": "arm"}
    for k, _, _ in REPORT_KEYS:
        cols[k] = k.replace(".", "_")
        if k + ".std" in table:
            cols[k + ".std"] = k.replace(".", "_") + "_std"
    return write_csv(table[[c for c in cols if c in table]].rename(columns=cols), path)


def search_pareto_with_baselines(params: Params, layout: Layout, table: pd.DataFrame, path: Path) -> Path | None:
    """The search's trials and front (search/trials.csv) with every audit arm overlaid."""
    trials_csv = layout.search / "trials.csv"
    if not trials_csv.exists():
        return None
    trials = pd.read_csv(trials_csv)
    if trials.empty:
        return None
    # the metrics themselves: an audit arm has no anchor to divide a relative objective by
    mem_k, q_k = (OBJECTIVES[o][0] for o in params.search.objectives)
    base = pd.DataFrame({"arm": table["arm"], mem_k: table[mem_k], q_k: table[q_k]})
    sel = json.loads(layout.selected_info.read_text()).get("trial") if layout.selected_info.exists() else None
    return pareto_plot(trials, x=mem_k, y=q_k, path=path, selected=sel, baselines=base)
