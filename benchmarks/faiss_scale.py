"""Reference-index scaling: build/query time and recall@1 of approximate vs exact search.

Synthetic clustered vectors stand in for image embeddings (1000 clusters so that neighbours are not
trivial, power-law spectrum so that PCA behaves as on CNN features; see `Synthetic`). Queries are perturbed copies of
random reference vectors mixed with fresh draws, the situation of generations near / far from the
training set. Ground truth: `ReferenceIndex` flat float32 (exact), itself checked against a blocked
numpy brute force where it fits. Sizes:

  10k and 100k vectors at d=1280 (MobileNetV2's dim): flat, flat fp16, PCA-256, IVF, IVF fp16, HNSW
  1M vectors at d=256 (standing for PCA-reduced embeddings, 1 GB as float32): flat, flat fp16, IVF,
  IVF fp16, HNSW fp16 (HNSW with M=16 to keep the build to a few minutes on 2 cores)

Memory stays bounded: vectors are generated, transformed and added in chunks, and queries are
searched in batches. Prints a table and writes benchmarks/results/faiss_scale.json.

Usage: python benchmarks/faiss_scale.py [--queries 1000] [--sizes 10000 100000 1000000] [--out ...]
"""

from __future__ import annotations

import os

# Before torch/faiss load libgomp: on a shared, oversubscribed box spinning OpenMP workers make small
# ops 100x slower (measured: KID on 26 x 1280 features 11.7 s -> 0.05 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import time
from pathlib import Path

import faiss
import numpy as np

from memcontrol.reference_index import ReferenceIndex, brute_force_search


class Synthetic:
    """Embedding-like vectors: 1000 clusters in a latent space with a power-law spectrum.

    x = offset + ((c_k + 0.5 * g) * s) @ Q, with latent std s_i = (1 + i)^-0.75 (variance decays as
    i^-1.5, so the top 256 of 1280 directions hold ~97% of it, as CNN embeddings concentrate their
    variance), Q a random rotation and g ~ N(0, I).
    """

    def __init__(self, d: int, rng: np.random.Generator) -> None:
        self.d, self.rng = d, rng
        self.spectrum = ((1.0 + np.arange(d)) ** -0.75).astype(np.float32)
        self.q = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
        self.centres = rng.standard_normal((1000, d), dtype=np.float32)
        self.offset = rng.random(d, dtype=np.float32)

    def draw(self, n: int, chunk: int = 50_000) -> np.ndarray:
        out = np.empty((n, self.d), dtype=np.float32)
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            z = self.centres[self.rng.integers(0, 1000, m)] + 0.5 * self.rng.standard_normal((m, self.d), dtype=np.float32)
            out[i : i + m] = self.offset + (z * self.spectrum) @ self.q
        return out

    def queries(self, ref: np.ndarray, nq: int) -> np.ndarray:
        """Half near-copies of reference rows (latent noise 0.1), half fresh draws."""
        near = ref[self.rng.integers(0, len(ref), nq // 2)]
        near = near + (0.1 * self.rng.standard_normal(near.shape, dtype=np.float32) * self.spectrum) @ self.q
        return np.concatenate([near, self.draw(nq - nq // 2)])


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--brute-max", type=int, default=100_000, help="largest size checked with numpy brute force")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/faiss_scale.json"))
    args = ap.parse_args()
    rows = []
    print(f"faiss {faiss.__version__}, omp threads {faiss.omp_get_max_threads()}, {args.queries} queries, k=1")
    for n in args.sizes:
        d = 1280 if n <= 100_000 else 256
        rng = np.random.default_rng(n)
        gen = Synthetic(d, rng)
        ref = gen.draw(n)
        q = gen.queries(ref, args.queries)
        configs = [("flat", dict(kind="flat"))]
        configs += [("flat fp16", dict(kind="flat", dtype="float16"))]
        if d > 256:
            configs += [("flat pca256", dict(kind="flat", pca_dim=256))]
        configs += [("ivf", dict(kind="ivf")), ("ivf fp16", dict(kind="ivf", dtype="float16"))]
        if n < 1_000_000:
            configs += [("hnsw", dict(kind="hnsw"))]
        else:
            configs += [("hnsw fp16 M16", dict(kind="hnsw", dtype="float16", hnsw_m=16, ef_construction=40, ef_search=64))]
        exact_idx = exact_sims = None
        for name, kw in configs:
            index, t_build = timed(lambda: ReferenceIndex.build(ref, **kw))
            (sims, idx), t_query = timed(lambda: index.search(q, k=1))
            if name == "flat":
                exact_idx, exact_sims = idx[:, 0], sims[:, 0]
            hit = idx[:, 0] == exact_idx
            recall, half = float(hit.mean()), len(q) // 2
            row = dict(n=n, d=d, index=name, nlist=getattr(faiss.try_extract_index_ivf(index.index), "nlist", None),
                       build_s=t_build, query_s=t_query,
                       recall_at_1=recall, recall_near_copies=float(hit[:half].mean()), recall_fresh=float(hit[half:].mean()),
                       max_abs_sim_err=float(np.abs(sims[:, 0] - exact_sims).max()),
                       stored_mb=index.ntotal * index.dim * (2 if kw.get("dtype") == "float16" else 4) / 2**20,
                       peak_rss_gb=rss_gb())
            rows.append(row)
            sweep = [("nprobe", p) for p in (1, 4, 64)] if "ivf" in name else [("efSearch", e) for e in (32, 256, 512)] if "hnsw" in name else []
            for param, value in sweep:
                if param == "nprobe":
                    faiss.extract_index_ivf(index.index).nprobe = value
                else:
                    index.index.hnsw.efSearch = value
                (s2, i2), t2 = timed(lambda: index.search(q, k=1))
                h2 = i2[:, 0] == exact_idx
                rows.append(dict(row, index=f"{name} {param}={value}", build_s=float("nan"), query_s=t2, recall_at_1=float(h2.mean()),
                                 recall_near_copies=float(h2[:half].mean()), recall_fresh=float(h2[half:].mean()),
                                 max_abs_sim_err=float(np.abs(s2[:, 0] - exact_sims).max())))
            print(f"n={n:>8} d={d:>4} {name:14} build {t_build:7.2f}s  query {t_query:6.3f}s  recall@1 {recall:.4f} (near {row['recall_near_copies']:.3f}, fresh {row['recall_fresh']:.3f})  "
                  f"max|dsim| {row['max_abs_sim_err']:.4f}  rss {row['peak_rss_gb']:.2f} GB", flush=True)
            for r in rows[len(rows) - len(sweep):]:
                print(f"    {r['index']:28} query {r['query_s']:6.3f}s  recall@1 {r['recall_at_1']:.4f} (near {r['recall_near_copies']:.3f})")
            del index
        if n <= args.brute_max:
            (bs, bi), t_b = timed(lambda: brute_force_search(ref, q, k=1))
            rows.append(dict(n=n, d=d, index="numpy brute force", build_s=0.0, query_s=t_b,
                             recall_at_1=float((bi[:, 0] == exact_idx).mean()),
                             max_abs_sim_err=float(np.abs(bs[:, 0] - exact_sims).max()), peak_rss_gb=rss_gb()))
            print(f"n={n:>8} d={d:>4} {'numpy brute':14} build    0.00s  query {t_b:6.3f}s  agreement {rows[-1]['recall_at_1']:.4f}  "
                  f"max|dsim| {rows[-1]['max_abs_sim_err']:.2e}", flush=True)
        del ref, q
    print(f"\n| n | d | index | build s | query s ({args.queries} q) | recall@1 vs flat | near copies | fresh | max abs sim err | stored MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        build = "" if np.isnan(r["build_s"]) else f"{r['build_s']:.2f}"
        print(f"| {r['n']:,} | {r['d']} | {r['index']} | {build} | {r['query_s']:.3f} | {r['recall_at_1']:.4f} | "
              f"{r.get('recall_near_copies', float('nan')):.3f} | {r.get('recall_fresh', float('nan')):.3f} | {r['max_abs_sim_err']:.2g} | "
              f"{r.get('stored_mb', float('nan')):.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                    "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
