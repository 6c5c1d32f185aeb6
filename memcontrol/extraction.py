"""Carlini et al.'s generate-and-cluster extraction attack (docs/paper.md §4.4).

For each prompt, several generations are compared pairwise with the tiled distance; generations
closer than ``threshold`` are linked, connected components are found, and the prompt counts as
**memorized** when its largest component has at least ``min_component`` members. It counts as
**extracted** when that component also matches the prompt's training image within ``threshold``.

Distance normalisation. Images are float in [0, 1]. Each image is cut into a ``tiles x tiles`` grid
and the distance is the max over grid cells of the *RMS* difference between corresponding tiles,
``max_t sqrt(mean((a_t - b_t)^2))``, so it does not depend on the resolution. The reference's
unnormalised L2 threshold of 20.0 on 3x56x56 tiles of 224 px images equals an RMS threshold of
``20 / sqrt(9408) = 0.206``; Carlini et al.'s normalised-L2 threshold is about 0.15.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

LOG = logging.getLogger(__name__)

REFERENCE_L2_THRESHOLD_224 = 20.0
REFERENCE_RMS_THRESHOLD = REFERENCE_L2_THRESHOLD_224 / math.sqrt(3 * 56 * 56)  # 0.2062


def _tile_vectors(x: torch.Tensor, tiles: int) -> list[torch.Tensor]:
    """(n, c, H, W) -> tiles*tiles tensors (n, c*h_t*w_t), row-major; uneven grids use rounded boundaries."""
    n, c, h, w = x.shape
    if h < tiles or w < tiles:
        raise ValueError(f"images of {h}x{w} px cannot be cut into a {tiles}x{tiles} grid")
    ys = [round(i * h / tiles) for i in range(tiles + 1)]
    xs = [round(i * w / tiles) for i in range(tiles + 1)]
    return [x[:, :, ys[i] : ys[i + 1], xs[j] : xs[j + 1]].reshape(n, -1) for i in range(tiles) for j in range(tiles)]


def tile_distance(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> np.ndarray:
    """Max over the ``tiles x tiles`` grid of the RMS difference between corresponding tiles.

    Args:
        a: (n, C, H, W) float in [0, 1].
        b: (m, C, H, W) float in [0, 1], same C, H, W.
        tiles: grid side (4 in Carlini et al. and the reference).

    Returns:
        (n, m) float64 distances in [0, 1]; multiply by ``sqrt(3 * 56 * 56)`` to get the reference's
        unnormalised L2 at 224 px.
    """
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"tile_distance needs (n, C, H, W) and (m, C, H, W) of equal C, H, W; got {tuple(a.shape)}, {tuple(b.shape)}")
    if tiles < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles}")
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for ta, tb in zip(_tile_vectors(a, tiles), _tile_vectors(b, tiles)):
        # RMS per tile; cdist is exact in float64 for these sizes
        out = torch.maximum(out, torch.cdist(ta, tb) / math.sqrt(ta.shape[1]))
    return out.numpy()


def calibrate_tile_threshold(images: torch.Tensor, quantile: float = 0.01, *, tiles: int = 4, groups: np.ndarray | None = None) -> float:
    """Link threshold from distinct real images: the ``quantile`` of their pairwise tile distances.

    On look-alike data a fixed threshold can link different real images (on the packaged chest
    X-rays the reference's 0.206 links 8.8% of distinct pairs, docs/metrics.md); linking only below
    this quantile keeps the false-link rate between distinct real images at about ``quantile``.

    Args:
        images: (n, C, H, W) float in [0, 1], n >= 2, e.g. the training images.
        quantile: in (0, 1).
        groups: optional (n,) ids; pairs within a group (same patient) are not "distinct".
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    d = tile_distance(images, images, tiles)
    iu = np.triu_indices(len(d), 1)
    keep = np.ones(len(iu[0]), dtype=bool) if groups is None else np.asarray(groups)[iu[0]] != np.asarray(groups)[iu[1]]
    pairs = d[iu][keep]
    if pairs.size == 0:
        raise ValueError("calibrate_tile_threshold needs at least two images from different groups")
    return float(np.quantile(pairs, quantile))


@dataclass
class PromptExtraction:
    """Attack outcome for one prompt."""

    prompt: int
    n_generations: int
    largest_component: int
    memorized: bool
    extracted: bool
    component: list[int]  # generation indices of the largest component
    train_distance: float  # min tile distance from the component's members to the training image


@dataclass
class ExtractionResult:
    """Counts over prompts; ``extracted_given_memorized`` is the reference's "#similar / #memorized"."""

    n_prompts: int
    n_memorized: int
    n_extracted: int
    memorized_rate: float
    extracted_rate: float
    extracted_given_memorized: float
    threshold: float
    tiles: int
    min_component: int
    prompts: list[PromptExtraction] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        """Scalars only (for logging)."""
        return {k: v for k, v in asdict(self).items() if k != "prompts"}


def extract_prompt(gens: torch.Tensor, train_image: torch.Tensor | None, *, tiles: int, threshold: float, min_component: int, prompt: int = 0) -> PromptExtraction:
    """The attack on one prompt.

    Args:
        gens: (N, C, H, W) generations for the prompt, float in [0, 1].
        train_image: (C, H, W) the prompt's training image, or None (then never "extracted").
        threshold: link two images when tile_distance < threshold.
        min_component: smallest component size that counts as memorized.
    """
    gens = torch.as_tensor(gens)
    if gens.ndim != 4 or gens.shape[0] < 1:
        raise ValueError(f"prompt {prompt}: generations must be (N, C, H, W), got {tuple(gens.shape)}")
    d = tile_distance(gens, gens, tiles)
    adj = csr_matrix(d < threshold)
    _, labels = connected_components(adj, directed=False)
    counts = np.bincount(labels)
    largest = int(counts.argmax())
    members = np.flatnonzero(labels == largest)
    size = int(members.size)
    memorized = size >= min_component
    train_d = float("nan")
    if train_image is not None:
        train_d = float(tile_distance(gens[members], torch.as_tensor(train_image)[None], tiles).min())
    extracted = bool(memorized and train_d < threshold)
    return PromptExtraction(prompt, int(gens.shape[0]), size, bool(memorized), extracted, members.tolist(), train_d)


def extraction_attack(
    gens: torch.Tensor | Sequence[torch.Tensor],
    train_images: torch.Tensor | Sequence[torch.Tensor | None],
    *,
    tiles: int = 4,
    threshold: float,
    min_component: int,
) -> ExtractionResult:
    """Carlini-style extraction attack over prompts.

    Args:
        gens: (P, N, C, H, W) or a sequence of P tensors (N_p, C, H, W): generations per prompt,
            float in [0, 1]. A sequence lets the caller stream prompts without one giant tensor.
        train_images: (P, C, H, W) or a sequence of P (C, H, W) (None: no training image).
        tiles: grid side.
        threshold: RMS tile-distance threshold (``REFERENCE_RMS_THRESHOLD`` = 0.206 matches the
            reference's 20.0 at 224 px; Carlini et al. use about 0.15).
        min_component: component size that flags a prompt (reference 3, Carlini et al. 10).

    Extraction is tested against *any* member of the largest component (the reference tests only
    its first image, which makes the outcome depend on generation order).
    """
    if len(gens) != len(train_images):
        raise ValueError(f"{len(gens)} prompts of generations but {len(train_images)} training images")
    if min_component < 1:
        raise ValueError(f"min_component must be >= 1, got {min_component}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    prompts = [
        extract_prompt(g, t, tiles=tiles, threshold=threshold, min_component=min_component, prompt=p)
        for p, (g, t) in enumerate(zip(gens, train_images))
    ]
    n = len(prompts)
    n_mem = sum(p.memorized for p in prompts)
    n_ext = sum(p.extracted for p in prompts)
    LOG.info("extraction attack: %d/%d prompts memorized, %d extracted", n_mem, n, n_ext)
    return ExtractionResult(
        n_prompts=n,
        n_memorized=n_mem,
        n_extracted=n_ext,
        memorized_rate=n_mem / n if n else float("nan"),
        extracted_rate=n_ext / n if n else float("nan"),
        extracted_given_memorized=n_ext / n_mem if n_mem else 0.0,
        threshold=float(threshold),
        tiles=tiles,
        min_component=min_component,
        prompts=prompts,
    )
