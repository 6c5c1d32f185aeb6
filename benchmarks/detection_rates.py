"""Known-answer copy detection on real images: which augmented copies of training images get flagged?

Pools (all real, from installed packages):
  cxr     16 pediatric chest X-rays (Kermany et al.) + the adult RG1 DICOM; split by patient
  photos  22 scikit-image photos (motorcycle_right left out: it is a stereo twin of motorcycle_left)
  lfw     200 scikit-image LFW crops (25x25; 100 faces, 100 non-faces), only for the calibration check

Copy detection, per domain (cxr, photos), embedder and centring, averaged over random splits:
  half the groups are "training" (the reference index), the other half held-out real images; the
  threshold is calibrated on the held-out half at --quantile (with ~8 held-out images that is their
  max, see calibrate_threshold); each training image is augmented --repeats times per augmentation
  and the flagged share is recorded.
Calibration check, pool cxr+photos+lfw: random thirds train / calib / check; the share of `check`
  flagged must stay <= 1 - quantile on average (split-conformal guarantee).

Usage: python benchmarks/detection_rates.py [--splits 20] [--repeats 3] [--out benchmarks/results/detection_rates.json]
"""

from __future__ import annotations

import os

# Before torch/faiss load libgomp: on a shared, oversubscribed box spinning OpenMP workers make small
# ops 100x slower (measured: KID on 26 x 1280 features 11.7 s -> 0.05 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch

from memcontrol import assets
from memcontrol.embed import build_embedder, read_image, square_image
from memcontrol.extraction import REFERENCE_RMS_THRESHOLD, calibrate_tile_threshold, extract_prompt, tile_distance
from memcontrol.memorization import calibrate_threshold
from memcontrol.reference_index import ReferenceIndex
from memcontrol.validation import AUGMENTATION_LEVELS, copy_detection_rates

PHOTOS = (
    "astronaut.png brick.png camera.png cell.png chelsea.png coffee.png coins.png grass.png gravel.png horse.png "
    "hubble_deep_field.jpg ihc.png moon.png motorcycle_left.png page.png retina.jpg rocket.jpg text.png "
    "clock_motion.png microaneurysms.png logo.png color.png"
).split()
EMBEDDERS = {
    "mobilenet_v2": dict(kind="mobilenet_v2"),
    "mobilenet_v2+blur1.5": dict(kind="mobilenet_v2", blur_sigma=1.5),
    "pixel16": dict(kind="pixel", grid=16),
}


def load_pools(size: int = 224) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """name -> (images (n, 3, size, size) in [0, 1], group id per image)."""
    cxr_paths = list(assets.pediatric_cxrs()) + [assets.adult_cxr_dicom()]
    cxr_groups = [re.match(r"(NORMAL2-IM-\d+|person\d+|RG1)", p.name).group(1) for p in cxr_paths]
    cxr = torch.stack([read_image(p, size) for p in cxr_paths])
    d = assets.pkgdir("skimage") / "data"
    photos = torch.stack([read_image(d / n, size) for n in PHOTOS])
    lfw = np.load(d / "lfw_subset.npy")
    lfw_t = torch.stack([square_image(a, size) for a in lfw])
    return {
        "cxr": (cxr, np.unique(cxr_groups, return_inverse=True)[1]),
        "photos": (photos, np.arange(len(PHOTOS))),
        "lfw": (lfw_t, np.arange(len(lfw))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantile", type=float, default=0.95)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/detection_rates.json"))
    args = ap.parse_args()
    logging.getLogger("memcontrol.memorization").setLevel(logging.ERROR)  # the small-n calibration warning repeats
    torch.manual_seed(0)
    t0 = time.time()
    pools = load_pools()
    print(f"loaded pools in {time.time() - t0:.1f}s: " + ", ".join(f"{k}={len(v[0])}" for k, v in pools.items()))

    augs = [(f"{level}:{name}", fn) for level, table in AUGMENTATION_LEVELS.items() for name, (fn, _) in table.items()]
    copies = {}  # domain -> aug -> (n*repeats, 3, H, W); copy r of image i at row i*repeats + r
    for dom in ("cxr", "photos"):
        imgs = pools[dom][0]
        rng = np.random.default_rng(0)
        copies[dom] = {a: torch.stack([fn(imgs[i], rng) for i in range(len(imgs)) for _ in range(args.repeats)]) for a, fn in augs}

    results = {"settings": vars(args) | {"out": str(args.out)}, "augmentations": {
        f"{lv}:{n}": desc for lv, t in AUGMENTATION_LEVELS.items() for n, (_, desc) in t.items()}, "copy_detection": [], "calibration_check": []}
    for emb_name, spec in EMBEDDERS.items():
        t1 = time.time()
        emb = build_embedder(**spec)
        feats = {k: emb.embed(v[0]) for k, v in pools.items()}
        copy_feats = {dom: {a: emb.embed(x) for a, x in table.items()} for dom, table in copies.items()}
        print(f"embedded with {emb_name} in {time.time() - t1:.1f}s")
        for center in (True, False):
            for dom in ("cxr", "photos"):
                groups = pools[dom][1]
                rs = np.random.default_rng(1)
                rates = {a: [] for a, _ in augs}
                thresholds, check = [], []
                for _ in range(args.splits):
                    ug = rs.permutation(np.unique(groups))
                    tr_g = ug[: len(ug) // 2]
                    tr = np.flatnonzero(np.isin(groups, tr_g))
                    ho = np.flatnonzero(~np.isin(groups, tr_g))
                    rows = (tr[:, None] * args.repeats + np.arange(args.repeats)).ravel()
                    rep = copy_detection_rates(
                        feats[dom][tr], {a: f[rows] for a, f in copy_feats[dom].items()}, feats[dom][ho],
                        quantile=args.quantile, center=center,
                    )
                    for a in rates:
                        rates[a].append(rep.copy_rates[a])
                    thresholds.append(rep.threshold)
                row = {"embedder": emb_name, "center": center, "domain": dom,
                       "threshold_mean": float(np.mean(thresholds)),
                       "rates": {a: float(np.mean(v)) for a, v in rates.items()}}
                results["copy_detection"].append(row)
            # calibration check on the big mixed pool
            allf = np.concatenate([feats["cxr"], feats["photos"], feats["lfw"]])
            rs = np.random.default_rng(2)
            for q in (0.9, args.quantile):
                flagged = []
                for _ in range(max(args.splits, 50)):
                    p = rs.permutation(len(allf))
                    tr, ca, ch = np.array_split(p, 3)
                    ref = ReferenceIndex.build(allf[tr], center=center)
                    thr = calibrate_threshold(ref.search(allf[ca])[0][:, 0], q)
                    flagged.append(float((ref.search(allf[ch])[0][:, 0] > thr).mean()))
                results["calibration_check"].append({"embedder": emb_name, "center": center, "quantile": q,
                    "n_train": len(tr), "n_calib": len(ca), "n_check": len(ch), "splits": len(flagged),
                    "check_flagged_mean": float(np.mean(flagged)), "check_flagged_max": float(np.max(flagged)),
                    "allowed": 1 - q})

    names = [a for a, _ in augs]
    short = [a.replace("mild:", "").replace("moderate:", "mod:") for a in names]
    print("\nflagged share of augmented training copies (threshold: held-out quantile "
          f"{args.quantile}, mean over {args.splits} splits, {args.repeats} copies per image)")
    print(f"| {'domain':6} | {'embedder':20} | center | thr   | " + " | ".join(f"{s:>9}" for s in short) + " |")
    print("|" + "---|" * (4 + len(short)))
    for r in results["copy_detection"]:
        print(f"| {r['domain']:6} | {r['embedder']:20} | {str(r['center']):6} | {r['threshold_mean']:.3f} | "
              + " | ".join(f"{r['rates'][a]:9.2f}" for a in names) + " |")
    print("\nheld-out calibration check (pool cxr+photos+lfw, random thirds)")
    print("| embedder | center | quantile | allowed | check flagged (mean) | (max over splits) |")
    print("|---|---|---|---|---|---|")
    for r in results["calibration_check"]:
        print(f"| {r['embedder']} | {r['center']} | {r['quantile']} | {r['allowed']:.2f} | {r['check_flagged_mean']:.3f} | {r['check_flagged_max']:.3f} |")
    # extraction-attack threshold on real images: distinct images the tile distance links
    print("\nextraction attack on distinct real images (4x4 tiles, RMS): share of distinct pairs linked, largest component")
    print("| pool | px | threshold | pairs linked | largest component |")
    print("|---|---|---|---|---|")
    results["extraction_thresholds"] = []
    for dom in ("cxr", "photos"):
        imgs, groups = pools[dom]
        d = tile_distance(imgs, imgs)
        iu = np.triu_indices(len(d), 1)
        distinct = groups[iu[0]] != groups[iu[1]]
        cal = calibrate_tile_threshold(imgs, 0.01, groups=groups)
        for name, thr in (("reference 20.0@224 = 0.206", REFERENCE_RMS_THRESHOLD), ("Carlini ~0.15", 0.15), ("calibrated 1% quantile", cal)):
            linked = float((d[iu][distinct] < thr).mean())
            comp = extract_prompt(imgs, None, tiles=4, threshold=thr, min_component=3).largest_component
            results["extraction_thresholds"].append(dict(pool=dom, threshold_name=name, threshold=thr, distinct_pairs_linked=linked, largest_component=comp, n=len(imgs)))
            print(f"| {dom} (n={len(imgs)}) | 224 | {name}: {thr:.3f} | {linked:.3f} | {comp} |")
    results["seconds"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out} ({results['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
