"""Image reading: the SRH conversion, ordinary RGB/greyscale images, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from hsat.data.srh import read_image, read_srh_raw, srh_to_rgb
from hsat.errors import HSATError


def test_srh_conversion_on_hand_made_array():
    raw = np.zeros((2, 2, 2), dtype=np.uint16)
    raw[0] = [[0, 10000], [65535, 20000]]  # CH2
    raw[1] = [[0, 30000], [0, 65535]]  # CH3
    out = srh_to_rgb(raw)
    assert out.shape == (3, 2, 2) and out.dtype == torch.float32
    ch2, ch3 = raw[0] / 65536.0, raw[1] / 65536.0
    expected = np.stack([ch3 - ch2 + 5000 / 65536.0, ch2, ch3]).clip(0, 1)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert out[0, 1, 0] == 0.0  # CH3 - CH2 far below zero is clamped
    assert float(out[0, 1, 1]) == pytest.approx((65535 - 20000 + 5000) / 65536.0)


def test_read_srh_tiff_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 40000, size=(2, 16, 12), dtype=np.uint16)
    path = tmp_path / "p.tif"
    tifffile.imwrite(path, raw, photometric="minisblack", planarconfig="separate")
    back = read_srh_raw(path)
    assert back.dtype == np.uint16 and back.shape == (2, 16, 12)
    np.testing.assert_array_equal(back, raw)
    np.testing.assert_allclose(read_image(path).numpy(), srh_to_rgb(raw).numpy())


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tif"])
def test_read_rgb_images(tmp_path, fmt):
    yy, xx = np.mgrid[0:10, 0:14]
    rgb = np.stack([yy * 20 + 30, xx * 12 + 40, np.full_like(xx, 200)], axis=-1).astype(np.uint8)  # smooth: JPEG-safe
    path = tmp_path / f"im.{fmt}"
    if fmt == "tif":
        tifffile.imwrite(path, rgb, photometric="rgb")
    else:
        Image.fromarray(rgb).save(path, **({"quality": 95} if fmt == "jpeg" else {}))
    x = read_image(path)
    assert x.shape == (3, 10, 14) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    tol = 0.03 if fmt == "jpeg" else 1e-6
    assert np.abs(x.numpy() - rgb.transpose(2, 0, 1) / 255.0).mean() < tol


def test_read_greyscale_and_uint16(tmp_path):
    grey = np.arange(12 * 9, dtype=np.uint8).reshape(12, 9)
    Image.fromarray(grey).save(tmp_path / "g.png")
    x = read_image(tmp_path / "g.png")
    assert x.shape == (3, 12, 9)
    assert torch.equal(x[0], x[2]) and float(x[0, 0, 1]) == pytest.approx(1 / 255)
    rgb16 = np.full((3, 8, 8), 65535, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", rgb16, photometric="rgb", planarconfig="separate")
    assert torch.allclose(read_image(tmp_path / "c.tif"), torch.ones(3, 8, 8))


def test_missing_file(tmp_path):
    with pytest.raises(HSATError, match="nope.tif"):
        read_image(tmp_path / "nope.tif")


def test_truncated_and_corrupt_tiff(tmp_path):
    raw = np.ones((2, 32, 32), dtype=np.uint16)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, raw, photometric="minisblack", planarconfig="separate")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"not a tiff at all" * 10)
    for bad in (trunc, garbage):
        with pytest.raises(HSATError, match=bad.name):
            read_srh_raw(bad)
        with pytest.raises(HSATError, match=bad.name):
            read_image(bad)


def test_wrong_dtype_and_channels(tmp_path):
    f32 = tmp_path / "f32.tif"
    tifffile.imwrite(f32, np.ones((2, 8, 8), dtype=np.float32), photometric="minisblack", planarconfig="separate")
    with pytest.raises(HSATError, match=r"f32\.tif.*uint16"):
        read_srh_raw(f32)
    with pytest.raises(HSATError, match=r"f32\.tif.*uint16"):
        read_image(f32)
    three = tmp_path / "three.tif"
    tifffile.imwrite(three, np.ones((3, 8, 8), dtype=np.uint16), photometric="rgb", planarconfig="separate")
    with pytest.raises(HSATError, match=r"three\.tif.*\(2, H, W\)"):
        read_srh_raw(three)
    five = tmp_path / "five.tif"
    tifffile.imwrite(five, np.ones((5, 8, 8), dtype=np.uint16), photometric="minisblack", planarconfig="separate")
    with pytest.raises(HSATError, match=r"five\.tif"):
        read_image(five)
