"""FID / KID sanity curves on real images with the default embedder (MobileNetV2, 1280-d).

1. Corruption curves: 39 real images (17 chest X-rays + 22 photos) against blurred / noisy copies.
2. Small-N bias: FID and KID between two *disjoint* random halves of the same real pool (LFW crops,
   200 images) for growing n: both should be ~0 for equal distributions, FID is not at small n.

Usage: python benchmarks/quality_curves.py [--out benchmarks/results/quality_curves.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see faiss_scale.py

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detection_rates import load_pools  # noqa: E402

from memcontrol.embed import build_embedder, gaussian_blur  # noqa: E402
from memcontrol.quality import fid_kid  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_curves.json"))
    args = ap.parse_args()
    t0 = time.time()
    pools = load_pools()
    x = torch.cat([pools["cxr"][0], pools["photos"][0]])
    emb = build_embedder("mobilenet_v2")
    real = emb.embed(x)
    out = {"corruption": [], "small_n": []}
    g = torch.Generator().manual_seed(0)
    print("| corruption | level | FID | KID mean |")
    print("|---|---|---|---|")
    r = fid_kid(real, real, kid_subset_size=len(real))
    out["corruption"].append(dict(corruption="none (same set)", level=0, **r))
    print(f"| none (same set) | 0 | {r['fid']:.3g} | {r['kid_mean']:.4f} |")
    for kind, levels in (("blur sigma px", (0.5, 1, 2, 4)), ("noise sigma", (0.02, 0.05, 0.1, 0.2))):
        for s in levels:
            y = gaussian_blur(x, s) if kind.startswith("blur") else (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)
            r = fid_kid(real, emb.embed(y), kid_subset_size=len(real))
            out["corruption"].append(dict(corruption=kind, level=s, **r))
            print(f"| {kind} | {s} | {r['fid']:.1f} | {r['kid_mean']:.4f} |")
    lfw = emb.embed(pools["lfw"][0])
    rs = np.random.default_rng(0)
    print("\n| n per half (disjoint halves of 200 real LFW crops) | FID mean | FID sd | KID mean | KID sd |")
    print("|---|---|---|---|---|")
    for n in (10, 25, 50, 100):
        fids, kids = [], []
        for _ in range(10):
            p = rs.permutation(len(lfw))
            r = fid_kid(lfw[p[:n]], lfw[p[n : 2 * n]], kid_subset_size=n)
            fids.append(r["fid"])
            kids.append(r["kid_mean"])
        out["small_n"].append(dict(n=n, fid_mean=float(np.mean(fids)), fid_sd=float(np.std(fids)), kid_mean=float(np.mean(kids)), kid_sd=float(np.std(kids))))
        print(f"| {n} | {np.mean(fids):.1f} | {np.std(fids):.1f} | {np.mean(kids):.4f} | {np.std(kids):.4f} |")
    out["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({out['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
