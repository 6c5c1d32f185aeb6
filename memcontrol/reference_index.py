"""The reference index: a FAISS inner-product index over the training images' embeddings.

Built once per dataset (stage `reference`) and searched by every evaluation. Vectors are centred on
the training mean (optional), L2-normalised, optionally PCA-projected and renormalised, so search
returns cosine similarities. `brute_force_search` is the exact numpy ground truth FAISS is checked
against (tests/test_memorization.py, benchmarks/faiss_scale.py). Index kinds and their recall and
speed: docs/metrics.md.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from memcontrol import atomic
from memcontrol.errors import MissingInput

LOG = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "ivf", "hnsw")
INDEX_DTYPES = ("float32", "float16")
_FORMAT_VERSION = 1
_CHUNK = 65536  # rows transformed/added per step, so building never copies the whole set twice


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation, the one place embeddings are normalised (before add and search).

    Args:
        x: (n, d) float.

    Returns:
        (n, d) float32 with unit rows (zero rows stay zero).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"l2_normalise expects (n, d), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, eps), dtype=np.float32)


def check_feats(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty (n, d) array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"`{name}` has dim {x.shape[1]}, the index expects {dim}")
    for i in range(0, len(x), _CHUNK):  # chunked: a full-size boolean copy of 1M x d is wasteful
        if not np.isfinite(x[i : i + _CHUNK]).all():
            raise ValueError(f"`{name}` contains NaN or inf (rows {i}..{min(i + _CHUNK, len(x)) - 1})")
    return x


# ----------------------------------------------------------------------------- reference index


@dataclass(frozen=True)
class IndexSettings:
    """How a `ReferenceIndex` is built and searched (all of it is saved with the index).

    kind: ``flat`` (exact), ``ivf`` (inverted lists, ``nlist`` cells, ``nprobe`` searched) or
        ``hnsw`` (graph, ``hnsw_m`` links, ``ef_construction``/``ef_search`` beam widths).
    center: subtract the reference mean before normalising (copy-detection practice; essential when
        all images look alike, e.g. chest X-rays).
    dtype: ``float16`` stores vectors as a fp16 scalar quantizer (half the memory, tiny recall cost).
    pca_dim: project the normalised vectors on their top ``pca_dim`` principal directions
        (uncentred second moment) and renormalise: cosine is then approximate.
    """

    kind: str = "flat"
    center: bool = True
    dtype: str = "float32"
    pca_dim: int | None = None
    nlist: int | None = None  # None: sqrt(n), at least 1 and at most n // 39
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    train_size: int = 100_000  # PCA training sample; IVF k-means uses at most 64 * nlist of it
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index `kind` must be one of {INDEX_KINDS}, got {self.kind!r}")
        if self.dtype not in INDEX_DTYPES:
            raise ValueError(f"index `dtype` must be one of {INDEX_DTYPES}, got {self.dtype!r}")
        if self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"index `pca_dim` must be >= 1 or None, got {self.pca_dim}")
        for k in ("nprobe", "hnsw_m", "ef_construction", "ef_search", "train_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"index `{k}` must be >= 1, got {getattr(self, k)}")


class ReferenceIndex:
    """FAISS inner-product index over centred, L2-normalised training embeddings.

    Vectors go through `transform` (centre -> `l2_normalise` -> optional PCA -> `l2_normalise`)
    before both add and search, so search returns cosine similarities in that space.
    """

    def __init__(self, index: faiss.Index, settings: IndexSettings, dim_in: int, mean: np.ndarray | None, pca: np.ndarray | None) -> None:
        self.index = index
        self.settings = settings
        self.dim_in = dim_in
        self.mean = mean  # (dim_in,) float32 or None
        self.pca = pca  # (dim_in, pca_dim) float32 or None
        self._apply_search_params()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        """Dimension of the vectors stored in FAISS."""
        return int(self.index.d)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, dim_in) raw embeddings -> (n, dim) float32 unit vectors as stored in the index."""
        x = np.asarray(x, dtype=np.float32)
        if self.mean is not None:
            x = x - self.mean
        x = l2_normalise(x)
        if self.pca is not None:
            x = l2_normalise(x @ self.pca)
        return x

    @classmethod
    def build(
        cls,
        feats: np.ndarray,
        *,
        kind: str = "flat",
        center: bool = True,
        dtype: str = "float32",
        pca_dim: int | None = None,
        **options,
    ) -> ReferenceIndex:
        """Build the index over training embeddings.

        Args:
            feats: (n, d) float32 raw (unnormalised) training embeddings.
            kind, center, dtype, pca_dim, **options: see `IndexSettings`.
        """
        s = IndexSettings(kind=kind, center=center, dtype=dtype, pca_dim=pca_dim, **options)
        feats = check_feats(feats, "feats")
        n, d = feats.shape
        rng = np.random.default_rng(s.seed)
        mean = feats.mean(axis=0, dtype=np.float64).astype(np.float32) if s.center else None
        ref = cls(faiss.IndexFlatIP(d), s, d, mean, None)  # placeholder index until trained
        sample = rng.choice(n, size=min(n, s.train_size), replace=False)  # random order
        if s.pca_dim is not None:
            if s.pca_dim > d:
                raise ValueError(f"pca_dim={s.pca_dim} exceeds the embedding dim {d}")
            x = ref.transform(feats[np.sort(sample)]).astype(np.float64)
            # eigh of the uncentred second moment: its top eigenvectors best preserve inner products
            _, vecs = np.linalg.eigh(x.T @ x / len(x))
            ref.pca = np.ascontiguousarray(vecs[:, ::-1][:, : s.pca_dim], dtype=np.float32)
        dim = s.pca_dim or d
        ref.index = _new_faiss_index(s, dim, n)
        if not ref.index.is_trained:  # IVF: 64 points per centroid is plenty for k-means
            ivf = faiss.try_extract_index_ivf(ref.index)
            km_rows = np.sort(sample[: 64 * ivf.nlist] if ivf is not None else sample)
            ref.index.train(ref.transform(feats[km_rows]))
        for i in range(0, n, _CHUNK):
            ref.index.add(ref.transform(feats[i : i + _CHUNK]))
        ref._apply_search_params()
        LOG.info("built %s reference index: n=%d, dim %d -> %d, center=%s, dtype=%s", s.kind, n, d, dim, s.center, s.dtype)
        return ref

    def _apply_search_params(self) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = self.settings.nprobe
        elif hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = self.settings.ef_search

    def search(self, queries: np.ndarray, k: int = 1, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """k nearest training vectors of each query.

        Args:
            queries: (m, dim_in) float32 raw embeddings (transformed here like the training set).
            k: neighbours per query, 1 <= k <= ntotal.
            batch_size: queries per FAISS call; bounds the transformed copy and result buffers.

        Returns:
            sims: (m, k) float32 cosine similarities, descending; idx: (m, k) int64 training rows.
        """
        q = check_feats(queries, "queries", self.dim_in)
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be in [1, {self.ntotal}] (the index size), got {k}")
        sims = np.empty((len(q), k), dtype=np.float32)
        idx = np.empty((len(q), k), dtype=np.int64)
        for i in range(0, len(q), batch_size):
            sims[i : i + batch_size], idx[i : i + batch_size] = self.index.search(self.transform(q[i : i + batch_size]), k)
        if (idx < 0).any():  # IVF probing too few cells can come back short of k results
            LOG.warning("%d of %d queries got fewer than k=%d neighbours (idx -1, sim -inf); raise nprobe",
                        int((idx < 0).any(axis=1).sum()), len(q), k)
            sims[idx < 0] = -np.inf
        return sims, idx

    def save(self, directory: Path) -> None:
        """Write ``index.faiss``, ``arrays.npz`` (mean, PCA) and ``meta.json`` atomically (meta last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(directory / "index.faiss") as tmp:
            faiss.write_index(self.index, str(tmp))
        buf = io.BytesIO()
        arrays = {k: v for k, v in (("mean", self.mean), ("pca", self.pca)) if v is not None}
        np.savez(buf, **arrays)
        atomic.write_bytes(directory / "arrays.npz", buf.getvalue())
        meta = {"format_version": _FORMAT_VERSION, "dim_in": self.dim_in, "ntotal": self.ntotal, "settings": asdict(self.settings)}
        atomic.write_bytes(directory / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())

    @classmethod
    def load(cls, directory: Path) -> ReferenceIndex:
        """Load an index written by `save`; checks that its parts agree."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise MissingInput(f"`{meta_path}` is missing: not a saved ReferenceIndex (or an interrupted save)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"`{meta_path}`: format_version {meta.get('format_version')} != {_FORMAT_VERSION}")
        settings = IndexSettings(**meta["settings"])
        index = faiss.read_index(str(directory / "index.faiss"))
        with np.load(directory / "arrays.npz") as z:
            mean = z["mean"] if "mean" in z else None
            pca = z["pca"] if "pca" in z else None
        if index.ntotal != meta["ntotal"]:
            raise ValueError(f"`{directory / 'index.faiss'}` holds {index.ntotal} vectors, meta.json says {meta['ntotal']}")
        if (mean is not None) != settings.center or (pca is not None) != (settings.pca_dim is not None):
            raise ValueError(f"`{directory / 'arrays.npz'}` does not match the settings in meta.json")
        return cls(index, settings, int(meta["dim_in"]), mean, pca)


def _new_faiss_index(s: IndexSettings, dim: int, n: int) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    fp16 = faiss.ScalarQuantizer.QT_fp16
    if s.kind == "flat":
        return faiss.IndexFlatIP(dim) if s.dtype == "float32" else faiss.IndexScalarQuantizer(dim, fp16, ip)
    if s.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, s.hnsw_m, ip) if s.dtype == "float32" else faiss.IndexHNSWSQ(dim, fp16, s.hnsw_m, ip)
        index.hnsw.efConstruction = s.ef_construction
        return index
    nlist = s.nlist or int(math.sqrt(n))
    nlist = max(1, min(nlist, n // 39))  # FAISS wants >= 39 training points per centroid
    quantizer = faiss.IndexFlatIP(dim)
    if s.dtype == "float32":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, fp16, ip)
    index.cp.seed = s.seed  # k-means initialisation
    return index  # faiss' Python wrapper keeps `quantizer` alive as a referenced object


def brute_force_search(ref_feats: np.ndarray, queries: np.ndarray, k: int = 1, *, center: bool = True, block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact numpy cosine k-NN with the same centring and normalisation as `ReferenceIndex` (flat).

    The ground truth that FAISS is checked against. Blocks over the reference set so memory stays
    ``O(m * (block + k))``.

    Returns:
        sims (m, k) float32 descending, idx (m, k) int64.
    """
    ref_feats = check_feats(ref_feats, "ref_feats")
    q = check_feats(queries, "queries", ref_feats.shape[1])
    mean = ref_feats.mean(axis=0, dtype=np.float64).astype(np.float32) if center else 0.0
    qn = l2_normalise(q - mean)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for j in range(0, len(ref_feats), block):
        s = qn @ l2_normalise(ref_feats[j : j + block] - mean).T
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(j, j + s.shape[1]), s.shape)], axis=1)
        top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    return best_s.astype(np.float32), best_i.astype(np.int64)
