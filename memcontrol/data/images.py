"""Image reading, preprocessing and PNG writing.

`load_images` is the one preprocessing path for training and evaluation: any PIL-readable file
(8/16-bit grayscale, RGB, palette) or DICOM -> RGB float32 in [-1, 1], short side resized with an
antialiased bicubic filter, centre crop. Grayscale becomes 3 equal channels.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from memcontrol import atomic
from memcontrol.data.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")


def read_dicom(path: Path) -> np.ndarray:
    """A DICOM radiograph as (H, W) float32 in [0, 1], white = dense.

    MONOCHROME1 (white = low value) is inverted; the window is the 0.5-99.5 percentile of the pixel
    values, which works for CR/DX whose VOI tags differ between vendors.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        a = ds.pixel_array.astype(np.float32)
    except Exception as e:  # pydicom raises many types for bad files
        raise DataError(f"{path}: not a readable DICOM image ({type(e).__name__}: {e})") from e
    if a.ndim != 2:
        raise DataError(f"{path}: expected a single-frame grayscale DICOM, got pixel array of shape {a.shape}")
    lo, hi = np.percentile(a, [0.5, 99.5])
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if ds.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        a = 1.0 - a
    return a


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as float32 in [0, 1]: (H, W) for grayscale, (H, W, 3) for colour.

    16-bit images are scaled by 65535, 8-bit by 255; 32-bit integer or float images by their own
    min..max (PIL gives no bit depth for them). Raises DataError naming the file if it cannot be read.
    """
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return np.asarray(im, dtype=np.float32) / 65535.0
            if mode in ("I", "F"):
                a = np.asarray(im, dtype=np.float32)
                if mode == "I" and a.min() >= 0 and a.max() <= 65535:
                    return a / (255.0 if a.max() <= 255 else 65535.0)
                lo, hi = float(a.min()), float(a.max())
                return (a - lo) / max(hi - lo, 1e-6)
            if mode in ("L", "1"):
                return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            if mode == "LA":
                return np.asarray(im.getchannel("L"), dtype=np.float32) / 255.0
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file not found") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def check_readable(path: str | os.PathLike) -> None:
    """Cheap validity check (header + structure, no full decode for JPEG); DataError if not."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    if path.suffix.lower() in DICOM_SUFFIXES:
        import pydicom

        try:
            ds = pydicom.dcmread(path)  # the pixel bytes are read, not decoded
        except Exception as e:
            raise DataError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from e
        if "PixelData" not in ds:
            raise DataError(f"{path}: DICOM file without pixel data")
        if not ds.file_meta.TransferSyntaxUID.is_compressed:  # pydicom reads a cut file short, silently
            want = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
                    * int(ds.get("NumberOfFrames", 1) or 1))
            if len(ds.PixelData) < want:
                raise DataError(f"{path}: truncated DICOM file ({len(ds.PixelData)} of {want} pixel bytes)")
        return
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def resize_crop(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W) or (H, W, C) float32 in [0, 1] -> (size, size[, C]): short side to `size` with PIL's
    antialiased bicubic filter, then centre crop; clipped back to [0, 1] (bicubic overshoots)."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    chans = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    out = []
    for ch in chans:
        # mode "F" keeps 16-bit precision through the resize
        im = Image.fromarray(np.ascontiguousarray(ch, dtype=np.float32))  # float32 -> mode "F"
        if (nh, nw) != (h, w):
            im = im.resize((nw, nh), Image.BICUBIC)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32))
    r = out[0] if image.ndim == 2 else np.stack(out, axis=-1)
    return np.clip(r, 0.0, 1.0)


def load_images(paths: Iterable[str | os.PathLike], size: int) -> torch.Tensor:
    """Images -> (n, 3, size, size) float32 tensor in [-1, 1]; grayscale gives 3 equal channels.

    Raises DataError naming the first file that cannot be read.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    arrays = []
    for p in paths:
        a = resize_crop(read_image(p), size)
        if a.ndim == 2:
            a = np.repeat(a[None], 3, axis=0)
        else:
            a = a.transpose(2, 0, 1)
        arrays.append(a)
    if not arrays:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    return torch.from_numpy(np.stack(arrays)).mul_(2.0).sub_(1.0)


def _to_uint(image, value_range: tuple[float, float]) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[-1] == 3 and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 0], a[..., 2]):
        a = a[..., 0]  # store 3 equal channels as grayscale
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"save_png: expected (H, W), (H, W, C) or (C, H, W) with C in (1, 3), got {a.shape}")
    if a.dtype in (np.uint8, np.uint16):
        return a
    lo, hi = value_range
    return np.round(np.clip((a.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def encode_png(image, *, value_range: tuple[float, float] = (0.0, 1.0)) -> bytes:
    """PNG bytes of an image: numpy or torch; (H, W), (H, W, C) or (C, H, W), C in (1, 3).

    Float input is mapped from value_range to 0..255; uint8 and uint16 (grayscale) are written
    as they are. Same pixels -> same bytes (no timestamps or other metadata).
    """
    a = _to_uint(image, value_range)
    if a.dtype == np.uint16 and a.ndim != 2:
        raise ValueError(f"save_png: 16-bit output must be grayscale, got shape {a.shape}")
    im = Image.fromarray(a)  # uint16 (H, W) -> "I;16"
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image, path: str | os.PathLike, *, value_range: tuple[float, float] = (0.0, 1.0)) -> bytes:
    """Encode (see `encode_png`) and write atomically; returns the bytes written (hash them)."""
    data = encode_png(image, value_range=value_range)
    atomic.write_bytes(path, data)
    return data
