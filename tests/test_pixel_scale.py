"""data.resize, data.allow_upscale and augment.preset travel from the run config to the datasets:
the training loader's, and evaluation's (read from the trained run's config.yaml)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from skimage import data
from torchvision.transforms.v2 import functional as F

from hsat.config import load_run_config
from hsat.data.manifest import write_manifest
from hsat.data.srh import read_image
from hsat.errors import HSATError
from hsat.evaluate.runs import datasets
from hsat.train import training_loader


@pytest.fixture(scope="module")
def he_manifest(tmp_path_factory):
    """Four 112 px RGB patients cut from scikit-image's immunohistochemistry image (2 train, 2 val)."""
    root = tmp_path_factory.mktemp("he_cohort")
    image = data.immunohistochemistry()
    rows = []
    for i in range(4):
        path = root / f"p{i}.png"
        Image.fromarray(image[(i // 2) * 112 : (i // 2 + 1) * 112, (i % 2) * 112 : (i % 2 + 1) * 112]).save(path)
        rows.append({"patient": f"p{i}", "slide": f"p{i}_s0", "path": str(path),
                     "label": ("hgg", "lgg")[i % 2], "split": ("train", "val")[i // 2]})
    out = root / "manifest.csv"
    write_manifest(pd.DataFrame(rows), out)
    return out


def _run_dir(tmp_path, data_cfg: dict):
    """A run directory holding only the config.yaml evaluation reads (a run config as pretrain writes it)."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": {"image_size": 32, **data_cfg}}))
    return tmp_path


def test_training_loader_passes_resize_upscale_and_preset(he_manifest):
    cfg = load_run_config(overrides=[f"data.manifest={he_manifest}", "data.image_size=32", "data.patients_per_batch=2",
                                     "data.num_workers=0", "data.resize={scale: 0.5}", "augment.preset=he"])
    ds = training_loader(cfg).dataset
    assert (ds.resize, ds.allow_upscale, ds.preset) == ({"scale": 0.5}, False, "he")
    default = training_loader(load_run_config(overrides=[f"data.manifest={he_manifest}", "data.patients_per_batch=2",
                                                         "data.num_workers=0"])).dataset
    assert (default.resize, default.allow_upscale, default.preset) == (None, False, "srh")


def test_evaluation_reads_the_runs_pixel_scale(he_manifest, tmp_path):
    (val,), _ = datasets(he_manifest, 32, ("val",), _run_dir(tmp_path, {"resize": {"size": 56}}))
    patch = read_image(val.rows.path[0])
    assert torch.equal(val[0]["image"], F.center_crop(F.resize(patch, [56], antialias=True), [32]))
    # A config.yaml from before these keys: native resolution, no upscaling.
    (old,), _ = datasets(he_manifest, 32, ("val",), _run_dir(tmp_path, {}))
    assert torch.equal(old[0]["image"], F.center_crop(patch, [32]))
    (too_small,), _ = datasets(he_manifest, 64, ("val",), _run_dir(tmp_path, {"resize": {"scale": 0.5}}))
    with pytest.raises(HSATError, match=r"p2\.png: patch is 56x56 px after data\.resize"):
        too_small[0]
    (upscaled,), _ = datasets(he_manifest, 64, ("val",), _run_dir(tmp_path, {"resize": {"scale": 0.5}, "allow_upscale": True}))
    assert upscaled[0]["image"].shape == (3, 64, 64)
