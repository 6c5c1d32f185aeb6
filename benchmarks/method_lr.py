"""Are the unmasked PEFT baselines fair opponents? Each method's flagged rate and quality against
its learning rate, at the Stage-2 budget (final.*), scored on test as the audit scores its arms
(benchmarks/full_ft_lr.py does the same for full fine-tuning). A baseline held at a rate where it
has not learned the domain flatters every mask on quality and every method on memorization; the
fair choice is the LR that gives the method its best quality (the lowest mean KID), which
`audit.method_lr` should hold.

Usage: python benchmarks/method_lr.py WORKDIR [--methods lora norm bias svdiff difffit]
       [--lrs 1e-3 3e-3 1e-2 3e-2] [--max-extend 2] [--seeds 0] [--out benchmarks/results/method_lr.json]
A method whose best LR is the grid's largest gets the next LRs of the 1, 3, 10 grid (at most
--max-extend of them) until it is not.
WORKDIR: a workdir after `memcontrol prepare`, `base` and `reference` (the demo's). Finished arms
are reused (memcontrol/reuse.py), so a killed run resumes, and a later run with more LRs or seeds
trains only what is new. An existing --out is updated: the methods swept now replace their entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_ft_lr import sweep  # noqa: E402

from memcontrol.audit.arms import arm_mask  # noqa: E402
from memcontrol.config import load_params  # noqa: E402
from memcontrol.report import markdown_table  # noqa: E402
from memcontrol.workdir import Layout  # noqa: E402


def next_lr(lr: float) -> float:
    """The next point of a 1, 3, 10 grid: 3e-2 -> 1e-1 -> 3e-1."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10 ** exponent)
    return float(f"{1 if mantissa >= 3 else 3}e{exponent + (1 if mantissa >= 3 else 0)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--methods", nargs="+", default=["lora", "norm", "bias", "svdiff", "difffit"])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-extend", type=int, default=2, help="LRs added above the grid while the best is its largest")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/method_lr.json"))
    args = ap.parse_args()
    params = load_params(args.workdir / "params.yaml")
    layout = Layout(args.workdir)
    t0 = time.perf_counter()
    # an existing --out keeps the methods not swept now (each method's entry holds its own grid)
    earlier = json.loads(args.out.read_text()).get("methods", {}) if args.out.exists() else {}
    out = {"final": params.final.model_dump(mode="json"), "seeds": args.seeds, "methods": earlier}
    for method in args.methods:
        unmasked = arm_mask(params, layout, method, None)  # the audit's arm: the method on the whole UNet
        lrs = list(args.lrs)
        while True:  # the grid grows upward (1, 3, 10 ...) while the best LR is its largest
            runs, summary, best = sweep(args.workdir, lambda lr: dataclasses.replace(unmasked, lr=lr), lrs,
                                        args.seeds, f"method_lr/{method}")
            if best < max(lrs) or len(lrs) >= len(args.lrs) + args.max_extend:
                break
            lrs.append(next_lr(max(lrs)))
        print(f"{method}:\n{markdown_table(summary)}")
        print(f"{method}: best-quality LR {best:g} (audit.method_lr: {params.audit.method_lr.get(method)})")
        out["methods"][method] = {"lrs": lrs, "seeds": args.seeds, "best_quality_lr": best,
                                  "best_at_edge": best == max(lrs),
                                  "audit_lr": params.audit.method_lr.get(method),  # audit.method_lr as run
                                  "summary": summary.to_dict(orient="records"), "runs": runs}
    out["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['seconds_this_run']} s)")


if __name__ == "__main__":
    main()
