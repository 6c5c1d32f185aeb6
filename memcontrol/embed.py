"""Image embedders behind one interface, for nearest-neighbour memorization search and FID/KID.

Every embedder maps images ``(n, 3, H, W)`` float in ``[0, 1]`` (1-channel input is accepted and
repeated) to ``(n, dim)`` float32 features, *not* normalised: `reference_index.l2_normalise` is the one
place that normalises, after optional centring. Each embedder resizes and normalises its input as
its model needs, runs under ``torch.no_grad`` in eval mode, and returns CPU numpy arrays.

Kinds (`build_embedder`):

- ``"mobilenet_v2"`` (default): torchvision's ImageNet MobileNetV2 (IMAGENET1K_V1), loaded from the
  packaged state dict, ``features -> global average pool -> 1280-d``. An ImageNet embedder is a
  stand-in for a chest-X-ray or copy-detection one (see docs/metrics.md).
- ``"pixel"``: no weights; the grayscale image area-downsampled to ``grid x grid`` and flattened.
- ``"torchscript"``: a user-supplied TorchScript archive (e.g. SSCD's ``sscd_disc_large.torchscript.pt``).
- ``"xrv_densenet"``: a user-supplied torchxrayvision DenseNet-121 state dict (e.g. the weights of
  ``densenet121-res224-mimic_ch``), ``features -> relu -> GAP -> 1024-d`` as in the reference's FID.

Weights are never unpickled as arbitrary objects: ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memcontrol import assets
from memcontrol.errors import UserError
from memcontrol.models.backbones import MobileNetV2, XrvDenseNet

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("mobilenet_v2", "pixel", "torchscript", "xrv_densenet")


class EmbedderError(UserError, ValueError):
    """An embedder file or input is unusable; the message names the file or the argument."""


# ----------------------------------------------------------------------------- interface


class Embedder:
    """One interface for all embedders: ``embed(images) -> (n, dim) float32``.

    Subclasses set ``name`` and ``dim`` and implement `_forward` on a preprocessed batch already on
    ``self.device``.
    """

    name: str
    dim: int

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (b, 3, H, W) float32 in [0, 1] on self.device -> (b, dim)."""
        raise NotImplementedError

    @torch.no_grad()
    def embed(self, images: torch.Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Embed images.

        Args:
            images: (n, 3, H, W) or (n, 1, H, W) float in [0, 1] (torch or numpy).
            batch_size: images per forward pass; bounds memory.

        Returns:
            (n, dim) float32, not normalised.
        """
        x = torch.as_tensor(images)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise EmbedderError(f"{self.name}: images must be (n, 3|1, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise EmbedderError(f"{self.name}: images must be float in [0, 1], got dtype {x.dtype}")
        if batch_size < 1:
            raise EmbedderError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        for i in range(0, x.shape[0], batch_size):
            b = x[i : i + batch_size].to(self.device, torch.float32)
            if b.shape[1] == 1:
                b = b.expand(-1, 3, -1, -1)
            f = self._forward(b)
            if f.ndim != 2 or f.shape[1] != self.dim:
                raise EmbedderError(f"{self.name}: model returned shape {tuple(f.shape)}, expected (b, {self.dim})")
            out[i : i + b.shape[0]] = f.float().cpu().numpy()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(b, c, H, W) -> (b, c, size, size), bilinear with antialiasing (no crop: the caller frames)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(b, c, H, W) -> same shape, separable Gaussian blur (reflect padding); sigma in pixels."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _imagenet_normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- MobileNetV2


class MobileNetV2Embedder(Embedder):
    """ImageNet MobileNetV2: resize to ``image_size``, ImageNet normalisation, features -> GAP -> 1280-d.

    ``blur_sigma`` > 0 low-passes the resized input first (Gaussian, in pixels at ``image_size``):
    ImageNet CNN features are very sensitive to pixel noise, and a blur of ~1.5 px makes noisy copies
    detectable at some cost on crops (measured in docs/metrics.md). Off by default.
    """

    name = "mobilenet_v2"
    dim = 1280

    def __init__(
        self,
        path: Path | None = None,
        *,
        image_size: int = 224,
        blur_sigma: float = 0.0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(device)
        self.path = Path(path) if path is not None else assets.mobilenet_v2_weights()
        self.image_size = image_size
        self.blur_sigma = float(blur_sigma)
        self.model = MobileNetV2()
        state = _load_state_dict(self.path)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EmbedderError(f"`{self.path}` is not a torchvision MobileNetV2 state dict: {e}") from e
        self.model.eval().to(self.device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gaussian_blur(_resize(x, self.image_size), self.blur_sigma)
        return self.model.embed(_imagenet_normalise(x))


# ----------------------------------------------------------------------------- pixel


class PixelEmbedder(Embedder):
    """No weights: grayscale (channel mean) area-downsampled to ``grid x grid``, flattened (grid**2-d).

    A pixel-space copy detector: exact and lightly perturbed copies stay close, and it needs no
    pretrained network. Insensitive to semantics, sensitive to shifts and crops.
    """

    name = "pixel"

    def __init__(self, *, grid: int = 16, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        if grid < 1:
            raise EmbedderError(f"pixel: grid must be >= 1, got {grid}")
        self.grid = grid
        self.dim = grid * grid

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=1, keepdim=True)
        return F.adaptive_avg_pool2d(g, self.grid).flatten(1)


# ----------------------------------------------------------------------------- TorchScript


class TorchScriptEmbedder(Embedder):
    """A user-supplied TorchScript model, e.g. SSCD (``sscd_disc_large.torchscript.pt``).

    A TorchScript archive contains *code* (TorchScript, a restricted Python subset run by the
    TorchScript interpreter, not by Python) plus tensors. ``torch.jit.load`` rebuilds it without
    unpickling arbitrary Python objects, but the archive's code still runs: load only files you
    trust. Input: resized to ``image_size`` and normalised with ``mean``/``std`` (ImageNet by
    default, as SSCD expects); output dim is read from one dummy forward.
    """

    name = "torchscript"

    def __init__(
        self,
        path: Path,
        *,
        image_size: int = 224,
        mean: tuple[float, float, float] | None = IMAGENET_MEAN,
        std: tuple[float, float, float] | None = IMAGENET_STD,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(device)
        self.path = Path(path)
        if not self.path.is_file():
            raise EmbedderError(f"torchscript: file `{self.path}` does not exist")
        try:
            with warnings.catch_warnings():  # deprecated in favour of torch.export, but SSCD ships TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(self.path), map_location=self.device)
        except Exception as e:  # torch raises several types for a non-TorchScript file
            raise EmbedderError(f"`{self.path}` is not a TorchScript archive (torch.jit.load failed: {e})") from e
        self.model.eval()
        self.image_size = image_size
        self.mean, self.std = mean, std
        with torch.no_grad():
            probe = self._forward(torch.zeros(1, 3, image_size, image_size, device=self.device))
        if probe.ndim != 2:
            raise EmbedderError(f"`{self.path}` returns shape {tuple(probe.shape)}, expected (b, dim)")
        self.dim = int(probe.shape[1])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(x, self.image_size)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return self.model(x)


# ----------------------------------------------------------------------------- torchxrayvision DenseNet-121


XRV_IGNORED_KEYS = ("classifier.", "op_threshs")


class XrvDenseNetEmbedder(Embedder):
    """torchxrayvision DenseNet-121 features (e.g. ``densenet121-res224-mimic_ch``, the reference's FID).

    Preprocessing as xrv: channel mean -> 1 channel, scaled from [0, 1] to [-1024, 1024], resized to
    ``image_size`` (224 for all xrv DenseNet weights). Output 1024-d.
    """

    name = "xrv_densenet"
    dim = 1024

    def __init__(self, path: Path, *, image_size: int = 224, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        self.path = Path(path)
        self.image_size = image_size
        state = _load_state_dict(self.path, full_model_hint=XRV_CONVERT_HINT)
        extra = [k for k in state if not k.startswith("features.") and not k.startswith(XRV_IGNORED_KEYS)]
        if extra:
            raise EmbedderError(f"`{self.path}`: unexpected keys for an xrv DenseNet-121: {extra[:5]}")
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        self.model = XrvDenseNet()
        try:
            self.model.load_state_dict(features, strict=True)
        except RuntimeError as e:
            raise EmbedderError(f"`{self.path}` is not an xrv DenseNet-121 state dict: {e}") from e
        self.model.eval().to(self.device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean(dim=1, keepdim=True) * 2048.0 - 1024.0
        return self.model(_resize(g, self.image_size))


XRV_CONVERT_HINT = (
    "torchxrayvision's released .pt files are pickled whole models, which memcontrol will not "
    "unpickle. Convert once, in an environment where torchxrayvision runs and you trust the file:\n"
    "  python -c \"import torch, torchxrayvision as xrv; from safetensors.torch import save_file; "
    "m = xrv.models.DenseNet(weights='densenet121-res224-mimic_ch'); "
    "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'densenet121-res224-mimic_ch.safetensors')\"\n"
    "and pass the .safetensors file (a `torch.save(model.state_dict(), ...)` file also works)."
)


# ----------------------------------------------------------------------------- loading


def square_image(arr: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) or (H, W, 3) float in [0, 1] -> (3, size, size): centre crop to a square, then resize."""
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    h, w = x.shape[-2:]
    c = min(h, w)
    x = x[:, (h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c]
    return _resize(x[None], size)[0].contiguous()


def read_image(path: Path, size: int = 224) -> torch.Tensor:
    """Read an image file as embedder input: (3, size, size) float32 in [0, 1], centre-cropped square.

    PIL formats are read as RGB. DICOM (``.dcm``) is windowed to its 0.5-99.5 percentiles and
    MONOCHROME1 is inverted, so bone is bright as in MONOCHROME2 / JPEG chest X-rays.
    """
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path)
        px = ds.pixel_array.astype(np.float32)
        if px.ndim != 2:
            raise EmbedderError(f"`{path}`: expected a single 2-D frame, got pixel array shape {px.shape}")
        lo, hi = np.percentile(px, [0.5, 99.5])
        px = np.clip((px - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
            px = 1.0 - px
        return square_image(px, size)
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return square_image(arr, size)


def _load_state_dict(path: Path, *, full_model_hint: str = "") -> dict[str, torch.Tensor]:
    """Load a plain state dict from ``.safetensors`` or a ``torch.save`` file, never unpickling objects.

    A ``{"state_dict": {...}}`` wrapper is unwrapped. A pickled whole model raises `EmbedderError`
    with ``full_model_hint``.
    """
    path = Path(path)
    if not path.is_file():
        raise EmbedderError(f"weights file `{path}` does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EmbedderError(
            f"`{path}` is not a plain state dict (it pickles Python objects, e.g. a whole model), "
            f"refused for safety. {full_model_hint}".strip()
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EmbedderError(f"`{path}` does not hold a state dict of tensors (got {type(obj).__name__}). {full_model_hint}".strip())
    return obj


def build_embedder(
    kind: str = "mobilenet_v2",
    *,
    path: Path | None = None,
    image_size: int = 224,
    device: str | torch.device = "cpu",
    **options,
) -> Embedder:
    """Build an embedder by name.

    Args:
        kind: one of ``KINDS``.
        path: weights file; optional for ``mobilenet_v2`` (packaged default), required for
            ``torchscript`` and ``xrv_densenet``, unused for ``pixel``.
        image_size: model input side (ignored by ``pixel``).
        device: where the model runs; outputs always come back as CPU numpy.
        **options: kind-specific keywords: ``blur_sigma`` (mobilenet_v2), ``grid`` (pixel),
            ``mean``/``std`` (torchscript).
    """
    if kind == "mobilenet_v2":
        return MobileNetV2Embedder(path, image_size=image_size, device=device, **options)
    if kind == "pixel":
        return PixelEmbedder(device=device, **options)
    if kind in ("torchscript", "xrv_densenet"):
        if path is None:
            raise EmbedderError(f"embedder kind `{kind}` needs `path` (a local weights file)")
        cls = TorchScriptEmbedder if kind == "torchscript" else XrvDenseNetEmbedder
        return cls(Path(path), image_size=image_size, device=device, **options)
    raise EmbedderError(f"unknown embedder kind `{kind}`; known: {', '.join(KINDS)}")
