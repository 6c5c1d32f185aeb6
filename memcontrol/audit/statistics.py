"""Audit statistics: mean and spread over seeds per arm, the arms' trade-off and the paper's claims
(docs/paper.md §1) checked on the table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from memcontrol.mitigations import parse_arm
from memcontrol.pareto import is_pareto_front

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


def tradeoff(table: pd.DataFrame, mem: str, quality: str) -> pd.DataFrame:
    """Pairwise verdicts on the (memorization, quality) means, both lower-is-better: for each arm,
    whether it is on the front of the arms and which arms it dominates."""
    v = table[[mem, quality]].to_numpy(dtype=float)
    front = is_pareto_front(v, ["minimize", "minimize"])
    dom = []
    for i in range(len(v)):
        d = [table["arm"].iloc[j] for j in range(len(v))
             if j != i and (v[i] <= v[j]).all() and (v[i] < v[j]).any()]
        dom.append(", ".join(d))
    return pd.DataFrame({"arm": table["arm"], mem: [f"{x:.4f}" for x in v[:, 0]], quality: [f"{x:.4f}" for x in v[:, 1]],
                         "on the arms' front": ["yes" if f else "" for f in front], "dominates": dom})


def dominance(diff: np.ndarray, spread: np.ndarray) -> str:
    """Pareto comparison of arm a with arm b from `diff` = a - b per objective (lower is better) and the
    seed spread per objective; a difference within the spread is a tie. Returns "dominates" (a better
    beyond the spread on one objective, tied or better on the rest), "dominated", "ties" (tied on all)
    or "trade-off"."""
    tie = np.abs(diff) <= spread
    if tie.all():
        return "ties"
    if ((diff < 0) | tie).all():
        return "dominates"
    if ((diff > 0) | tie).all():
        return "dominated"
    return "trade-off"


def claims(table: pd.DataFrame, records: list[dict], mem_key: str, q_key: str,
           quality_tolerance: float = 0.2) -> list[dict]:
    """The paper's claims, checked on this table (means over seeds; Welch t-test p-values over seeds,
    which with 3 seeds are rough; dominance counts a difference within the seed std as a tie). Each
    item: claim, comparison, numbers, verdict."""
    from scipy import stats

    by = {a: [r["metrics"] for r in records if r["arm"] == a] for a in table["arm"]}
    mean = table.set_index("arm")

    def vals(arm, key):
        return np.array([m.get(key, np.nan) for m in by.get(arm, [])], dtype=float)

    def pval(arm, other, key):
        x, y = vals(arm, key), vals(other, key)
        if len(x) < 2 or len(y) < 2 or np.allclose(np.r_[x, y], x[0]):
            return float("nan")
        return float(stats.ttest_ind(x, y, equal_var=False).pvalue)

    def outcome(arm, other):
        keys = (mem_key, q_key)
        return dominance(np.array([mean.loc[arm, k] - mean.loc[other, k] for k in keys]),
                         np.array([max(np.nanstd(vals(arm, k)), np.nanstd(vals(other, k))) for k in keys]))

    def verdict(diff, p_value):
        if not diff < 0:
            return "does not hold"
        return "holds" if p_value < 0.05 else f"holds in the mean only (not significant over seeds, p={p_value:.2g})"

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
    if "selected" in arms and "full" in arms:
        flagged = "mem.flagged_rate" if "mem.flagged_rate" in mean.columns else mem_key
        m_ratio = mean.loc["selected", flagged] / max(mean.loc["full", flagged], 1e-12)
        q_ratio = mean.loc["selected", q_key] / max(mean.loc["full", q_key], 1e-12)
        ok = m_ratio <= 0.2 and q_ratio <= 1 + quality_tolerance
        out.append({"claim": f"the selected mask keeps full fine-tuning's quality (<= {1 + quality_tolerance:g}x) "
                             "at <= 1/5 of its memorization",
                    "comparison": "selected vs full",
                    "numbers": f"{flagged} ratio {m_ratio:.3f}, {q_key} ratio {q_ratio:.3f}",
                    "verdict": "holds" if ok else "does not hold"})
    if "selected" in arms:
        for a in methods + (["unmasked"] if "unmasked" in arms else []) + (["full"] if "full" in arms else []):
            diff = np.array([mean.loc["selected", k] - mean.loc[a, k] for k in (mem_key, q_key)])
            v = {"dominates": "holds (selected dominates)", "dominated": "does not hold (dominated)",
                 "trade-off": "trade-off (neither dominates)",
                 "ties": "tie within the seed spread (means: " + ("selected better on both)" if (diff <= 0).all()
                                                                  and (diff < 0).any() else "neither better on both)"),
                 }[outcome("selected", a)]
            out.append({"claim": "the searched mask beats each unmasked method on the trade-off",
                        "comparison": f"selected vs {a}",
                        "numbers": f"({mem_key}, {q_key}) = ({mean.loc['selected', mem_key]:.4f}, "
                                   f"{mean.loc['selected', q_key]:.4f}) vs ({mean.loc[a, mem_key]:.4f}, {mean.loc[a, q_key]:.4f})",
                        "verdict": v})
    for a in arms:
        base, mits = parse_arm(a)
        if not mits or base not in arms:
            continue
        dm = mean.loc[a, mem_key] - mean.loc[base, mem_key]
        dq = mean.loc[a, q_key] - mean.loc[base, q_key]
        out.append({"claim": "stacking a mitigation helps further", "comparison": f"{a} vs {base}",
                    "numbers": f"{mem_key} {dm:+.4f} (p={pval(a, base, mem_key):.3g}), {q_key} {dq:+.4f}",
                    "verdict": verdict(dm, pval(a, base, mem_key))})
    return out


# ----------------------------------------------------------------------------- plots


def metrics_json(table: pd.DataFrame) -> dict:
    """{arm: {metric: mean, metric.std: std, n_seeds}} for `dvc metrics show` (NaN -> null)."""
    out = {}
    for _, r in table.iterrows():
        out[r["arm"]] = {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                         for k, v in r.items() if k not in ("arm", "seeds")}
    return out
