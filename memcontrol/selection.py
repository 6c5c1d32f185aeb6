"""After the search: the trials table, the Pareto front and the one mask the selection rule picks
(docs/paper.md §2.3). Writes search/trials.csv, search/pareto.{csv,png} and masks/selected*.json."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pandas as pd
from optuna.trial import FrozenTrial

from memcontrol.config import OBJECTIVES, Params
from memcontrol.pareto import is_pareto_front, select
from memcontrol.report import pareto_plot
from memcontrol.search import completed, stopped
from memcontrol.study_storage import retried_from
from memcontrol.tuning import Mask
from memcontrol.workdir import Layout, write_csv, write_json
from memcontrol.errors import MissingInput


def ask_position(trial: FrozenTrial) -> int:
    """Where a trial stands in the order of asking: a retry (its worker or search was killed) at the
    place of the trial it repeats, so a resumed search lists its trials as an uninterrupted one does."""
    original = retried_from(trial)
    return trial.number if original is None else original


def trials_table(study: optuna.Study, params: Params) -> pd.DataFrame:
    """One row per completed trial: number, lr, bits, objectives, every metric, Pareto flag. Trials
    stopped early (memcontrol/fidelity.py) are rows too, with their partial objectives, `stopped_at`
    (the step) and never on the front."""
    rows = []
    early = stopped(study)
    early_numbers = {t.number for t in early}
    for trial in sorted(completed(study) + early, key=ask_position):
        rec = json.loads(trial.user_attrs["record"])
        mask = rec["mask"]
        row = {"number": trial.number, "method": mask["method"], "lr": mask["lr"], "bits": "".join(map(str, mask["bits"])),
               "enabled": ",".join(b for b, bit in zip(mask["blocks"], mask["bits"]) if bit),
               "trial_dir": trial.user_attrs.get("trial_dir", "")}
        values = trial.user_attrs["partial_values"] if trial.number in early_numbers else trial.values
        for objective, value in zip(params.search.objectives, values):
            row[objective] = value
        if early:
            row["stopped_at"] = trial.user_attrs.get("stopped_at")
        row.update(rec["metrics"])
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    directions = [OBJECTIVES[o][1] for o in params.search.objectives]
    done = df["stopped_at"].isna() if early else pd.Series(True, index=df.index)  # a partial point is no result
    df["pareto"] = False
    df.loc[done, "pareto"] = is_pareto_front(df.loc[done, list(params.search.objectives)].to_numpy(), directions)
    return df.reset_index(drop=True)  # in the order the trials were asked


def reference_quality(params: Params, df: pd.DataFrame, front: pd.DataFrame) -> pd.Series | None:
    """Per front point, the quality objective of its anchor: the method with no mask (every bit 1)
    at the same learning rate (and method), a trial the search enqueued first. A low learning rate
    has learned less after the inner loop's steps, masked or not; measured against its own anchor
    a mask is charged only for what the mask costs (docs/search.md "Selection"). None when the rule
    needs no reference."""
    if params.select.rule != "least_memorization_within_quality":
        return None
    q_o = params.search.objectives[1]
    anchors = df[df["bits"].astype(str).str.fullmatch("1+")]
    if "stopped_at" in anchors:  # a stopped anchor's partial point is no reference
        anchors = anchors[anchors["stopped_at"].isna()]
    by_key = {(row["method"], float(row["lr"])): float(row[q_o]) for _, row in anchors.iterrows()}
    out = {}
    for i, row in front.iterrows():
        key = (row["method"], float(row["lr"]))
        if key not in by_key:
            raise MissingInput(f"search: no anchor trial (method {key[0]} with no mask at lr {key[1]:g}) to measure "
                               f"trial {int(row['number'])}'s quality against; the search enqueues one per learning "
                               "rate when it starts (rerun `memcontrol search` with a new search.study_name)")
        out[i] = by_key[key]
    return pd.Series(out, dtype=float)


def pareto_and_select(params: Params, layout: Layout, study: optuna.Study) -> dict:
    """Save the trials table, the Pareto front (CSV + plot) and the chosen mask (JSON)."""
    df = trials_table(study, params)
    if df.empty:
        raise RuntimeError(f"{layout.study_db}: no completed trial to select from")
    layout.search.mkdir(parents=True, exist_ok=True)
    mem_o, q_o = params.search.objectives
    front = df[df["pareto"]]
    reference = reference_quality(params, df, front)
    pick, why = select(front, mem=mem_o, quality=q_o, rule=params.select.rule,
                       quality_tolerance=params.select.quality_tolerance, reference_quality=reference)
    write_csv(df, layout.search / "trials.csv")
    write_csv(front, layout.search / "pareto.csv")
    pareto_plot(df, x=mem_o, y=q_o, path=layout.search / "pareto.png", selected=int(pick["number"]))
    rec = json.loads(study.trials[int(pick["number"])].user_attrs["record"])
    mask = dataclasses.replace(Mask.from_json(json.dumps(rec["mask"])), trainable_params=int(pick["trainable"]))
    layout.selected.parent.mkdir(parents=True, exist_ok=True)
    mask.save(layout.selected)
    write_json({"trial": int(pick["number"]), "rule": params.select.rule, "why": why, "metrics": rec["metrics"],
                "reference": ({"arm": params.select.quality_reference, "lr": float(pick["lr"]),
                               q_o: float(reference[pick.name])} if reference is not None else None),
                "enabled_blocks": list(mask.enabled())}, layout.selected_info)
    return {"trial": int(pick["number"]), "mask": layout.selected}
