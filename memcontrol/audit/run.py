"""The audit run (`run_audit`: every arm of audit.arms for every seed of audit.seeds, into audit/,
report into reports/) and the report of any set of arm records (`report`, shared with transfer)."""

from __future__ import annotations

import json
from pathlib import Path

from memcontrol.audit.arms import run_arms
from memcontrol.audit.render import ReportInputs, bar_plot, data_card, plots_csv, search_pareto_with_baselines
from memcontrol.audit.render import tradeoff_plot, write_report
from memcontrol.audit.statistics import aggregate, metrics_json
from memcontrol.config import OBJECTIVES, Params
from memcontrol.progress import Progress
from memcontrol.tuning import Mask
from memcontrol.workdir import Layout, read_manifest, write_json


def _settings_list(params: Params, layout: Layout, steps: int, seeds, selected: Mask | None, threshold_file: Path) -> dict:
    th = json.loads((layout.reference / "threshold.json").read_text())
    ext = json.loads(threshold_file.read_text()) if threshold_file.exists() else {}
    extraction = params.audit.extraction
    return {
        "embedder": f"{th['embedder']} (centred: {th['center']}; image size {params.metrics.embed_size})",
        "memorization threshold": f"{th['threshold']:.4f} ({th['mode']}, quantile {th['quantile']}; held-out "
                                  f"real flagged rate {th.get('heldout_flagged_rate', float('nan')):.3f})",
        "selected mask": (f"{selected.method}, {selected.mode} mode, LR {selected.lr:.3g}, enabled: "
                          f"{', '.join(selected.enabled()) or '(none)'}") if selected else "(none)",
        "steps per arm": steps, "seeds": list(seeds), "batch size": params.final.batch_size,
        "training rows": f"final_rows: {params.final.data_size_ratio:g} of train + memorization subset x "
                         f"{params.final.n_repeats}",
        "method learning rates": dict(params.audit.method_lr) | {"full": params.final.full_lr},
        "mitigations": params.audit.mitigations.model_dump(mode="json"),
        "extraction attack": (f"{extraction.per_prompt} generations per memorization prompt, "
                              f"{extraction.tiles}x{extraction.tiles} tiles, RMS link threshold "
                              f"{ext.get('threshold', extraction.threshold)} "
                              f"({extraction.threshold}, quantile {extraction.quantile}), "
                              f"component >= {extraction.min_component}"),
        "sampling": f"DDIM {params.sample.steps} steps, guidance {params.sample.guidance}, {params.sample.mem_seeds} "
                    f"seeds per memorization prompt, {params.sample.n_quality} held-out prompts for FID/KID",
    }


def report(params: Params, layout: Layout, records: list[dict], *, title: str, out_md: Path, out_html: Path,
           fig_dir: Path, steps: int, seeds, selected: Mask | None, threshold_file: Path, intro: list[str],
           with_search: bool) -> dict:
    """Table, figures and report files of a set of arm records; returns the aggregated table and paths."""
    table = aggregate(records)
    mem_key, q_key = (OBJECTIVES[o][0] for o in params.search.objectives)
    fig_dir.mkdir(parents=True, exist_ok=True)  # DVC removes declared output folders before a run
    figs = []
    if with_search:
        pareto_png = search_pareto_with_baselines(params, layout, table, fig_dir / "pareto_baselines.png")
        if pareto_png is not None:
            figs.append(("Search Pareto front with every baseline", pareto_png,
                         "Grey: the search's trials (inner-loop setting: memorization-inducing subset, "
                         f"train.steps = {params.train.steps}); blue line: their Pareto front; red ring: the selected "
                         f"trial; squares: audit arms (mean over seeds, Stage-2 setting: {steps} steps at batch "
                         f"{params.final.batch_size} on the final training set). The two settings differ, so compare "
                         "squares with squares."))
    figs.append(("Trade-off of the arms", tradeoff_plot(table, mem_key, q_key, fig_dir / "tradeoff.png"),
                 "Mean over seeds with std error bars; dashed: the arms' Pareto front. Red: full fine-tuning; "
                 "blue: the selected mask (alone and stacked)."))
    figs.append(("Metrics per arm", bar_plot(table, fig_dir / "bars.png"),
                 "Mean over seeds, error bars = std over seeds."))
    grids = [(r["arm"], Path(r["dir"]) / "nearest.png") for r in records if r["seed"] == min(seeds)]
    inp = ReportInputs(title=title, intro=intro, table=table, records=records, mem_key=mem_key, quality_key=q_key,
                       card=data_card(read_manifest(layout)),
                       settings=_settings_list(params, layout, steps, seeds, selected, threshold_file),
                       figures=figs, grids=grids, quality_tolerance=params.select.quality_tolerance)
    write_report(inp, out_md, out_html)
    return {"table": table, "md": out_md, "html": out_html, "figures": [f[1] for f in figs]}


def run_audit(params: Params, layout: Layout, *, progress: Progress = None, on_record=None) -> dict:
    """The audit on the workdir `layout`: arms x seeds into audit/, report into reports/."""
    steps = params.audit.steps or params.final.steps
    out_root = layout.root / "audit" / "arms"
    selected = Mask.load(layout.selected) if layout.selected.exists() else None
    records = run_arms(params, layout, params.audit.arms, params.audit.seeds, out_root, selected=selected,
                       steps=steps, progress=progress, on_record=on_record)
    intro = [
        "Every arm fine-tunes the same base model on the same training rows (the final training set; "
        "`dedup` arms drop the repeats) for the same number of steps and is scored by the same evaluation "
        "(memorization-prompt generations against the training set's FAISS index, FID/KID on held-out "
        "prompts, the noise-norm proxy) plus an extraction attack. Lower is better in every metric column.",
    ]
    res = report(params, layout, records, title="MemControl audit: the selected mask against baselines and mitigations",
                 out_md=layout.reports / "audit.md", out_html=layout.reports / "audit.html",
                 fig_dir=layout.reports / "audit", steps=steps, seeds=params.audit.seeds, selected=selected,
                 threshold_file=out_root / "extraction_threshold.json", intro=intro, with_search=True)
    write_json(metrics_json(res["table"]), layout.reports / "audit_metrics.json")
    plots_csv(res["table"], layout.reports / "audit_plots.csv")
    return {**res, "records": records, "metrics": layout.reports / "audit_metrics.json",
            "plots": layout.reports / "audit_plots.csv"}
