"""Known-answer validation of memorization detection: are exact and mildly edited copies of
training images flagged by an embedder + reference index + threshold, and held-out real images not?

Used by tests/test_memorization.py and benchmarks/detection_rates.py; the measured rates are in
docs/metrics.md. Nothing in the pipeline calls it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from memcontrol.memorization import calibrate_threshold
from memcontrol.reference_index import ReferenceIndex

Augmentation = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


def _crop(x: torch.Tensor, rng: np.random.Generator, keep: tuple[float, float]) -> torch.Tensor:
    """Random crop keeping a share ``U(keep)`` of each side at a random position, resized back."""
    _, h, w = x.shape
    f = rng.uniform(*keep)
    ch, cw = max(1, round(h * f)), max(1, round(w * f))
    y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    c = x[None, :, y0 : y0 + ch, x0 : x0 + cw]
    return torch.nn.functional.interpolate(c, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def _brightness(x: torch.Tensor, rng: np.random.Generator, factor: tuple[float, float]) -> torch.Tensor:
    return (x * rng.uniform(*factor)).clamp(0, 1)


def _noise(x: torch.Tensor, rng: np.random.Generator, sigma: float) -> torch.Tensor:
    return (x + torch.from_numpy(rng.normal(0.0, sigma, x.shape).astype(np.float32))).clamp(0, 1)


def _jpeg(x: torch.Tensor, rng: np.random.Generator, quality: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1).contiguous()


AUGMENTATION_LEVELS = {
    # name -> (function, parameters); documented in docs/metrics.md
    "mild": {
        "exact": (lambda x, rng: x.clone(), "identity"),
        "crop": (lambda x, rng: _crop(x, rng, (0.90, 0.95)), "keep 90-95% of each side, resized back"),
        "hflip": (lambda x, rng: x.flip(-1), "horizontal flip"),
        "brightness": (lambda x, rng: _brightness(x, rng, (0.8, 1.2)), "x U(0.8, 1.2)"),
        "noise": (lambda x, rng: _noise(x, rng, 0.01), "Gaussian sigma 0.01"),
        "jpeg": (lambda x, rng: _jpeg(x, rng, (50, 75)), "JPEG quality 50-75"),
    },
    "moderate": {
        "crop": (lambda x, rng: _crop(x, rng, (0.80, 0.90)), "keep 80-90% of each side, resized back"),
        "brightness": (lambda x, rng: _brightness(x, rng, (0.6, 1.4)), "x U(0.6, 1.4)"),
        "noise": (lambda x, rng: _noise(x, rng, 0.03), "Gaussian sigma 0.03"),
        "jpeg": (lambda x, rng: _jpeg(x, rng, (20, 40)), "JPEG quality 20-40"),
        "combo": (
            lambda x, rng: _jpeg(_noise(_brightness(_crop(x, rng, (0.85, 0.95)), rng, (0.8, 1.2)), rng, 0.02), rng, (50, 75)),
            "crop 85-95% + brightness 0.8-1.2 + noise 0.02 + JPEG 50-75",
        ),
    },
}


def augmentations(level: str = "mild") -> dict[str, Augmentation]:
    """Copy edits of one strength, each ``(3, H, W) in [0, 1], rng -> (3, H, W) in [0, 1]``.

    ``mild`` (the >= 90% detection requirement): exact; crop keeping 90-95% of each side; hflip;
    brightness x U(0.8, 1.2); Gaussian noise sigma 0.01; JPEG quality 50-75. ``moderate``: crop 80-90%,
    brightness x U(0.6, 1.4), noise sigma 0.03, JPEG 20-40, and a combination. See
    ``AUGMENTATION_LEVELS`` for the parameters.
    """
    if level not in AUGMENTATION_LEVELS:
        raise ValueError(f"unknown augmentation level {level!r}; known: {list(AUGMENTATION_LEVELS)}")
    return {name: fn for name, (fn, _) in AUGMENTATION_LEVELS[level].items()}


@dataclass
class DetectionReport:
    """Result of `copy_detection_rates` (rates are shares of images flagged)."""

    threshold: float
    quantile: float | None
    n_train: int
    n_calib: int
    n_check: int
    copy_rates: dict[str, float]  # per augmentation: flagged share of augmented training copies
    copy_mean_sim: dict[str, float]
    heldout_check_rate: float  # flagged share of held-out real images not used for calibration
    heldout_check_mean_sim: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def copy_detection_rates(
    train_feats: np.ndarray,
    copy_feats: Mapping[str, np.ndarray],
    calib_feats: np.ndarray,
    check_feats: np.ndarray | None = None,
    *,
    quantile: float | None = 0.95,
    threshold: float | None = None,
    center: bool = True,
) -> DetectionReport:
    """Known-answer check of an embedder + reference index + threshold.

    Builds a flat index over ``train_feats``; the threshold is ``threshold`` if given, else calibrated
    on ``calib_feats`` (held-out real images) at ``quantile``. Reports, per augmentation, the share of
    ``copy_feats[name]`` (embeddings of augmented training images) flagged, and the share of
    ``check_feats`` (other held-out real images, not used to calibrate) flagged, which should stay
    <= 1 - quantile on average.

    Args:
        train_feats: (n, d); copy_feats: name -> (r, d); calib_feats: (c, d); check_feats: (k, d) or None.
    """
    ref = ReferenceIndex.build(train_feats, kind="flat", center=center)
    if threshold is None:
        if quantile is None:
            raise ValueError("copy_detection_rates: give `threshold` or `quantile`")
        threshold = calibrate_threshold(ref.search(calib_feats)[0][:, 0], quantile)
    rates, sims = {}, {}
    for name, f in copy_feats.items():
        s = ref.search(f)[0][:, 0]
        rates[name] = float((s > threshold).mean())
        sims[name] = float(s.mean())
    chk = ref.search(check_feats)[0][:, 0] if check_feats is not None else np.array([np.nan])
    return DetectionReport(
        threshold=float(threshold),
        quantile=quantile,
        n_train=len(train_feats),
        n_calib=len(calib_feats),
        n_check=0 if check_feats is None else len(check_feats),
        copy_rates=rates,
        copy_mean_sim=sims,
        heldout_check_rate=float((chk > threshold).mean()) if check_feats is not None else float("nan"),
        heldout_check_mean_sim=float(chk.mean()),
    )
