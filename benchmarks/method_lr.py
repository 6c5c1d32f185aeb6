"""Are the unmasked PEFT baselines fair opponents? Each method's flagged rate and quality against
its learning rate, at the Stage-2 budget (final.*), scored on test as the audit scores its arms
(benchmarks/full_ft_lr.py does the same for full fine-tuning). A baseline held at a rate where it
has not learned the domain flatters every mask on quality and every method on memorization; the
fair choice is the LR that gives the method its best quality (the lowest mean KID), which
`audit.method_lr` should hold.

Usage: python benchmarks/method_lr.py WORKDIR [--methods lora norm bias svdiff difffit]
       [--lrs 1e-3 3e-3 1e-2 3e-2] [--seeds 0] [--out benchmarks/results/method_lr.json]
WORKDIR: a workdir after `memcontrol prepare`, `base` and `reference` (the demo's). Finished arms
are reused (memcontrol/reuse.py), so a killed run resumes, and a later run with more LRs or seeds
trains only what is new.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_ft_lr import sweep  # noqa: E402

from memcontrol.audit.arms import arm_mask  # noqa: E402
from memcontrol.config import load_params  # noqa: E402
from memcontrol.report import markdown_table  # noqa: E402
from memcontrol.workdir import Layout  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--methods", nargs="+", default=["lora", "norm", "bias", "svdiff", "difffit"])
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/method_lr.json"))
    args = ap.parse_args()
    params = load_params(args.workdir / "params.yaml")
    layout = Layout(args.workdir)
    t0 = time.perf_counter()
    out = {"final": params.final.model_dump(mode="json"), "seeds": args.seeds, "lrs": args.lrs, "methods": {}}
    for method in args.methods:
        unmasked = arm_mask(params, layout, method, None)  # the audit's arm: the method on the whole UNet
        runs, summary, best = sweep(args.workdir, lambda lr: dataclasses.replace(unmasked, lr=lr), args.lrs,
                                    args.seeds, f"method_lr/{method}")
        print(f"{method}:\n{markdown_table(summary)}")
        print(f"{method}: best-quality LR {best:g} (audit.method_lr: {params.audit.method_lr.get(method)})")
        out["methods"][method] = {"best_quality_lr": best, "audit_lr": params.audit.method_lr.get(method),
                                  "summary": summary.to_dict(orient="records"), "runs": runs}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
