"""Image reading: SRH patches (2-channel uint16 TIFF) and ordinary RGB/greyscale images.

The conversion is chosen by the file, never by a flag: a (2, H, W) uint16 TIFF is an SRH patch
(CH2 lipid, CH3 protein) and becomes the 3-channel image of the OpenSRH release; anything with
1, 3 or 4 channels is an ordinary image scaled by its dtype's maximum. Reads run in DataLoader
workers, so they do one file read and a few vectorised operations.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image, UnidentifiedImageError

from hsat.errors import HSATError

SRH_SCALE = 65536.0
"""OpenSRH divides raw uint16 intensities by 2**16 (not 65535)."""
SRH_SUBTRACTED_BASE = 5000.0 / 65536.0
"""Offset added to CH3 - CH2 so the difference channel sits above zero."""
TIFF_SUFFIXES = (".tif", ".tiff")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise HSATError(f"{path}: image file not found")


def _read_tiff(path: Path) -> np.ndarray:
    _check_exists(path)
    try:
        return tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for corrupt/truncated files
        raise HSATError(f"{path}: cannot read TIFF (corrupt or truncated?): {exc}") from exc


def validate_srh_array(arr: np.ndarray, source: str | os.PathLike) -> np.ndarray:
    """Check that `arr` is an SRH patch: uint16, shape (2, H, W) with H, W > 0."""
    if arr.ndim != 3 or arr.shape[0] != 2:
        raise HSATError(
            f"{source}: an SRH patch must have shape (2, H, W) (CH2, CH3); got shape {tuple(arr.shape)}"
        )
    if arr.dtype != np.uint16:
        raise HSATError(f"{source}: an SRH patch must be uint16; got dtype {arr.dtype}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise HSATError(f"{source}: empty SRH patch of shape {tuple(arr.shape)}")
    return arr


def read_srh_raw(path: str | os.PathLike) -> np.ndarray:
    """Read an SRH patch as stored: uint16 array (2, H, W) = (CH2, CH3), validated."""
    path = Path(path)
    return validate_srh_array(_read_tiff(path), path)


def srh_to_rgb(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """OpenSRH conversion of a (2, H, W) raw patch: /2**16, (CH3 - CH2 + 5000/2**16, CH2, CH3), clamp [0, 1]."""
    x = torch.as_tensor(np.asarray(raw, dtype=np.float32) if isinstance(raw, np.ndarray) else raw)
    x = x.to(torch.float32) / SRH_SCALE
    ch2, ch3 = x[0], x[1]
    out = torch.stack((ch3 - ch2 + SRH_SUBTRACTED_BASE, ch2, ch3), dim=0)
    return out.clamp_(0.0, 1.0).contiguous()


def _scale(arr: np.ndarray, source: Path) -> np.ndarray:
    """Scale an ordinary image to float32 [0, 1] by its dtype's maximum."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1 or np.isnan(arr).any()):
            raise HSATError(f"{source}: floating-point image values must lie in [0, 1]")
        return arr.astype(np.float32)
    raise HSATError(f"{source}: unsupported image dtype {arr.dtype} (expected uint8, uint16 or float in [0, 1])")


def _to_chw3(arr: np.ndarray, source: Path) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4} -> (3, H, W); alpha is dropped."""
    if arr.ndim == 2:
        return np.broadcast_to(arr, (3, *arr.shape))
    if arr.ndim == 3:
        if arr.shape[-1] in (1, 3, 4):  # channels-last, as PIL and contiguous RGB TIFFs store it
            arr = np.moveaxis(arr, -1, 0)
        if arr.shape[0] == 1:
            return np.broadcast_to(arr, (3, *arr.shape[1:]))
        if arr.shape[0] in (3, 4):
            return arr[:3]
    raise HSATError(
        f"{source}: unsupported image shape {tuple(arr.shape)}; expected (2, H, W) uint16 SRH, "
        "greyscale (H, W), or 3/4-channel RGB(A)"
    )


def _read_pil(path: Path) -> np.ndarray:
    _check_exists(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(im, dtype=np.uint16)
            if im.mode == "I":  # 16-bit greyscale PNGs may open as 32-bit integers
                arr = np.asarray(im)
                if arr.min() < 0 or arr.max() > 65535:
                    raise HSATError(f"{path}: integer image values outside the uint16 range")
                return arr.astype(np.uint16)
            if im.mode == "F":
                return np.asarray(im, dtype=np.float32)
            if im.mode not in ("L", "RGB"):
                im = im.convert("RGB")
            return np.asarray(im)
    except HSATError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise HSATError(f"{path}: cannot read image (corrupt or truncated?): {exc}") from exc


def read_array(path: str | os.PathLike) -> np.ndarray:
    """The stored array of any supported image (TIFF via tifffile, others via PIL)."""
    path = Path(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _read_tiff(path)
    return _read_pil(path)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read any supported image as float32 (3, H, W) in [0, 1].

    A 2-channel uint16 TIFF is an SRH patch (OpenSRH conversion); other 2-channel arrays are
    errors. Greyscale is replicated to 3 channels; RGBA loses alpha.
    """
    path = Path(path)
    arr = read_array(path)
    if arr.ndim == 3 and arr.shape[0] == 2:
        return srh_to_rgb(validate_srh_array(arr, path))
    if arr.ndim == 3 and arr.shape[-1] == 2 and arr.shape[0] > 4:
        raise HSATError(
            f"{path}: 2-channel image stored channels-last {tuple(arr.shape)}; SRH patches must be (2, H, W)"
        )
    if arr.size == 0:
        raise HSATError(f"{path}: empty image of shape {tuple(arr.shape)}")
    chw = _to_chw3(arr, path)
    return torch.from_numpy(np.ascontiguousarray(_scale(chw, path)))
