"""Hierarchical sampling: shapes, replacement rules, determinism by key, resumption, DDP slices."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from hsat import CLASSES
from hsat.data.sampler import (
    HierarchicalBatchSampler,
    HierarchicalDataset,
    PatchDataset,
    collate_hierarchical,
    make_loader,
)
from hsat.data.transforms import strength_at
from hsat.errors import HSATError

SIZE = 16  # crop side; stored patches are 20 px so the crop has room to move

# patient -> (label, split, patches per slide); p1 has a single patch, stored as an SRH TIFF.
LAYOUT = {
    "p0": ("hgg", "train", [2, 2, 2]),
    "p1": ("hgg", "train", [1]),
    "p2": ("lgg", "train", [3, 3]),
    "p3": ("mening", "train", [3, 3]),
    "p4": ("lgg", "val", [2]),
}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> pd.DataFrame:
    """Patches whose red channel is a constant unique to the patch (identifies it after any crop);
    the other channels are random texture, so augmentations change something."""
    root: Path = tmp_path_factory.mktemp("patches")
    rng = np.random.default_rng(0)
    rows, code = [], 10
    for patient, (label, split, slides) in LAYOUT.items():
        for s, n in enumerate(slides):
            for k in range(n):
                path = root / f"{patient}_s{s}_{k}"
                if patient == "p1":
                    path = path.with_suffix(".tif")
                    tifffile.imwrite(path, rng.integers(0, 40000, (2, 20, 20), dtype=np.uint16))
                else:
                    path = path.with_suffix(".png")
                    arr = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                    arr[..., 0] = code
                    code += 5
                    Image.fromarray(arr).save(path)
                rows.append(
                    {"patient": patient, "slide": f"{patient}_s{s}", "path": str(path), "label": label, "split": split}
                )
    return pd.DataFrame(rows)


def _dataset(manifest, **kw) -> HierarchicalDataset:
    args = dict(num_slide_samples=2, num_patch_samples=2, num_transforms=2, image_size=SIZE, prob=0.5)
    args.update(kw)
    return HierarchicalDataset(manifest, **args)


def _index(ds: HierarchicalDataset, patient: str) -> int:
    return ds.patients.index(patient)


def _codes(images: torch.Tensor) -> Counter:
    """Patch identity of every patch in (S, K, V, C, H, W): its constant red value."""
    red = (images[:, :, 0, 0] * 255).round().to(torch.int64)  # (S, K, H, W)
    assert (red == red[..., :1, :1]).all()  # constant within each patch (prob 0: crop only)
    return Counter(red[..., 0, 0].flatten().tolist())


def test_item_shape_range_label(manifest):
    ds = _dataset(manifest, num_slide_samples=2, num_patch_samples=3, num_transforms=4)
    assert ds.patients == ["p0", "p1", "p2", "p3"]  # train split only, sorted
    assert len(ds) == 4
    item = ds[(_index(ds, "p2"), 0)]
    assert item["images"].shape == (2, 3, 4, 3, SIZE, SIZE)
    assert item["images"].dtype == torch.float32
    assert 0.0 <= float(item["images"].min()) and float(item["images"].max()) <= 1.0
    assert item["patient"] == "p2"
    assert item["label"] == CLASSES.index("lgg")


def test_views_of_one_patch_differ(manifest):
    ds = _dataset(manifest, prob=1.0)
    images = ds[(0, 0)]["images"]
    for s in range(2):
        for k in range(2):
            assert not torch.equal(images[s, k, 0], images[s, k, 1])


def test_same_key_same_tensor_other_step_or_seed_differs(manifest):
    ds = _dataset(manifest)
    a, b = ds[(2, 5)]["images"], ds[(2, 5)]["images"]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[(2, 6)]["images"])
    assert not torch.equal(a, _dataset(manifest, seed=1)[(2, 5)]["images"])


def test_caller_rng_untouched(manifest):
    ds = _dataset(manifest)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    ds[(0, 3)]
    assert torch.equal(torch.get_rng_state(), state)
    expected = torch.rand(5)
    torch.manual_seed(123)
    ds[(1, 4)]
    assert torch.equal(torch.rand(5), expected)


def test_draw_without_replacement_when_enough(manifest):
    # p0 has 3 slides x 2 patches: asking for 3 x 2 must return each of its 6 patches once.
    ds = _dataset(manifest, num_slide_samples=3, num_patch_samples=2, num_transforms=1, prob=0.0)
    p0 = manifest[manifest.patient == "p0"]
    for step in range(5):
        codes = _codes(ds[(_index(ds, "p0"), step)]["images"])
        assert len(codes) == len(p0) and set(codes.values()) == {1}


def test_draw_with_replacement_when_short(manifest):
    # p1 has one slide with one patch: 3 x 4 draws all repeat it; with prob 0 every view is the patch.
    from hsat.data.srh import read_image

    ds = _dataset(manifest, num_slide_samples=3, num_patch_samples=4, num_transforms=2, prob=0.0)
    images = ds[(_index(ds, "p1"), 0)]["images"]
    assert images.shape == (3, 4, 2, 3, SIZE, SIZE)
    patch = read_image(manifest.loc[manifest.patient == "p1", "path"].iloc[0])
    flat = images.reshape(-1, 3, SIZE, SIZE)
    # Every view is some SIZE x SIZE window of the one patch.
    windows = patch.unfold(1, SIZE, 1).unfold(2, SIZE, 1)  # (3, nh, nw, SIZE, SIZE)
    for view in flat:
        assert (windows - view[:, None, None]).abs().amax(dim=(0, 3, 4)).min() < 1e-6
    # p2 has 2 slides of 3 patches: asking for 3 slides x 4 patches repeats some.
    codes = _codes(ds[(_index(ds, "p2"), 0)]["images"][:, :, :1])
    assert sum(codes.values()) == 12 and len(codes) <= 6


def test_strength_fn_zero_gives_near_identity_views(manifest):
    fn = functools.partial(strength_at, total_steps=10, start=1.0, end=0.0, dynamic=True)
    ds = _dataset(manifest, prob=1.0, strength_fn=fn, image_size=20)  # crop = whole patch
    late = ds[(0, 10)]["images"]  # strength 0: flips only (prob 1 -> both flips)
    early = ds[(0, 0)]["images"]  # strength 1
    assert torch.allclose(late[:, :, 0], late[:, :, 1], atol=1e-6)
    assert not torch.allclose(early[:, :, 0], early[:, :, 1], atol=1e-3)


def test_collate_shapes(manifest):
    ds = _dataset(manifest)
    batch = collate_hierarchical([ds[(i, 0)] for i in range(3)])
    assert batch["images"].shape == (3, 2, 2, 2, 3, SIZE, SIZE)
    assert batch["label"].dtype == torch.long and batch["label"].shape == (3,)
    assert batch["patient"] == ["p0", "p1", "p2"]


def test_sampler_deterministic_unique_and_resumable():
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    full = list(HierarchicalBatchSampler(labels, patients_per_batch=4, total_steps=12, seed=7))
    assert len(full) == 12
    assert full == list(HierarchicalBatchSampler(labels, patients_per_batch=4, total_steps=12, seed=7))
    assert full != list(HierarchicalBatchSampler(labels, patients_per_batch=4, total_steps=12, seed=8))
    for step, keys in enumerate(full):
        assert len(keys) == 4
        assert {s for _, s in keys} == {step}
        assert len({i for i, _ in keys}) == 4  # without replacement within a step
    assert len({tuple(i for i, _ in keys) for keys in full}) > 1  # batches vary over steps
    resumed = HierarchicalBatchSampler(labels, patients_per_batch=4, total_steps=12, start_step=5, seed=7)
    assert len(resumed) == 7
    assert list(resumed) == full[5:]


def test_sampler_class_balancing():
    labels = [0] * 20 + [1] * 2 + [2] * 2  # imbalanced patients
    steps = 600
    plain = Counter(
        labels[i] for keys in HierarchicalBatchSampler(labels, 1, total_steps=steps, seed=0) for i, _ in keys
    )
    balanced = Counter(
        labels[i]
        for keys in HierarchicalBatchSampler(labels, 1, total_steps=steps, seed=0, balance_classes=True)
        for i, _ in keys
    )
    assert plain[0] / steps > 0.7
    for c in (0, 1, 2):
        assert abs(balanced[c] / steps - 1 / 3) < 0.08
    # Within a step patients stay unique even when a class runs out.
    for keys in HierarchicalBatchSampler(labels, 8, total_steps=20, balance_classes=True):
        assert len({i for i, _ in keys}) == 8


def test_sampler_ddp_slices_partition_global_batch():
    labels = list(range(10))
    full = list(HierarchicalBatchSampler(labels, 6, total_steps=5, seed=3))
    r0 = list(HierarchicalBatchSampler(labels, 6, total_steps=5, seed=3, rank=0, world_size=2))
    r1 = list(HierarchicalBatchSampler(labels, 6, total_steps=5, seed=3, rank=1, world_size=2))
    for g, a, b in zip(full, r0, r1):
        assert len(a) == len(b) == 3
        assert a + b == g
    with pytest.raises(HSATError, match="divisible"):
        HierarchicalBatchSampler(labels, 5, total_steps=5, world_size=2)


def test_sampler_bad_arguments(manifest):
    ds = _dataset(manifest)
    with pytest.raises(HSATError, match="patients_per_batch"):
        HierarchicalBatchSampler(ds, patients_per_batch=5, total_steps=3)  # 4 train patients
    with pytest.raises(HSATError, match="start_step"):
        HierarchicalBatchSampler(ds, 2, total_steps=3, start_step=4)
    with pytest.raises(HSATError, match="split='test'"):
        _dataset(manifest, split="test")


def test_patch_dataset_fields(manifest):
    ds = PatchDataset(manifest, split="val", image_size=SIZE)
    val = manifest[manifest.split == "val"].reset_index(drop=True)
    assert len(ds) == len(val)
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, SIZE, SIZE)
        assert torch.equal(item["image"], ds[i]["image"])  # deterministic
        assert item["index"] == i
        assert item["path"] == val.path[i] and item["slide"] == val.slide[i] and item["patient"] == "p4"
        assert item["label"] == CLASSES.index("lgg")
    full = PatchDataset(manifest, split=None, image_size=SIZE)
    assert len(full) == len(manifest)
    assert full.labels.tolist() == [CLASSES.index(lab) for lab in manifest.label]
    custom = PatchDataset(manifest, image_size=SIZE, classes=["mening", "lgg", "hgg"])
    assert custom[len(manifest) - 1]["label"] == 1  # p4 is lgg
    with pytest.raises(HSATError, match="not among the classes"):
        PatchDataset(manifest, classes=["hgg"])


def test_loader_workers_match_main_process(manifest):
    fn = functools.partial(strength_at, total_steps=3)
    ds = _dataset(manifest, strength_fn=fn, prob=0.5)
    batches = {}
    for workers in (0, 2):
        sampler = HierarchicalBatchSampler(ds, patients_per_batch=2, total_steps=3, seed=1)
        batches[workers] = list(make_loader(ds, sampler, num_workers=workers))
    assert len(batches[0]) == 3
    for a, b in zip(batches[0], batches[2]):
        assert a["images"].shape == (2, 2, 2, 2, 3, SIZE, SIZE)
        assert torch.equal(a["images"], b["images"])
        assert torch.equal(a["label"], b["label"]) and a["patient"] == b["patient"]


def test_on_embedded_cohort(tiny_manifest):
    """End to end on the synthetic SRH cohort's manifest (2-channel uint16 TIFFs)."""
    from hsat.data.manifest import read_manifest

    df = read_manifest(tiny_manifest)
    ds = HierarchicalDataset(df, split="train", image_size=SIZE)
    batch = next(iter(make_loader(ds, HierarchicalBatchSampler(ds, 4, total_steps=1, balance_classes=True))))
    assert batch["images"].shape == (4, 2, 2, 2, 3, SIZE, SIZE)
    assert 0.0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1.0
    assert set(batch["patient"]) <= set(df.loc[df.split == "train", "patient"])
    flat = PatchDataset(df, split="val", image_size=SIZE)
    assert flat[0]["image"].shape == (3, SIZE, SIZE)
    assert flat.classes == list(CLASSES)


# ---- pixel scale (data.resize, data.allow_upscale) and the `he` preset in the datasets


@pytest.fixture(scope="module")
def he_manifest(tmp_path_factory) -> pd.DataFrame:
    """112 px RGB crops of scikit-image's immunohistochemistry image: one patch per patient."""
    from skimage import data

    root: Path = tmp_path_factory.mktemp("he")
    image = data.immunohistochemistry()
    rows = []
    for i, (patient, label, split) in enumerate([("h0", "hgg", "train"), ("h1", "lgg", "train"), ("h2", "lgg", "val")]):
        path = root / f"{patient}.png"
        Image.fromarray(image[i * 112 : (i + 1) * 112, :112]).save(path)
        rows.append({"patient": patient, "slide": f"{patient}_s0", "path": str(path), "label": label, "split": split})
    return pd.DataFrame(rows)


def _crop_only(manifest, **kw) -> HierarchicalDataset:
    """Strength 0 and prob 0: each view is a plain `image_size` crop."""
    args = dict(num_slide_samples=1, num_patch_samples=1, num_transforms=2, image_size=32, prob=0.0,
                strength_fn=functools.partial(strength_at, total_steps=1, start=0.0, dynamic=False))
    return HierarchicalDataset(manifest, **{**args, **kw})


def test_resize_is_the_same_in_training_and_evaluation(he_manifest):
    from hsat.data.srh import read_image
    from torchvision.transforms.v2 import functional as F

    path = he_manifest.path[0]
    native = read_image(path)
    for resize in ({"size": 56}, {"scale": 0.5}):
        evaluated = PatchDataset(he_manifest, split="train", image_size=32, resize=resize)[0]["image"]
        assert torch.equal(evaluated, F.center_crop(F.resize(native, [56], antialias=True), [32]))
        assert not torch.equal(evaluated, F.center_crop(native, [32]))  # what the model saw without resize
    # The whole patch resized to the crop side: training views and the evaluated patch agree exactly.
    train = _crop_only(he_manifest, resize={"size": 32})
    views = train[(0, 0)]["images"][0, 0]
    flat = PatchDataset(he_manifest, split="train", image_size=32, resize={"size": 32})[0]["image"]
    assert torch.equal(views[0], flat) and torch.equal(views[1], flat)


def test_too_small_patch_names_the_file_unless_upscaling(manifest):
    val_path = manifest.loc[manifest.split == "val", "path"].iloc[0]
    with pytest.raises(HSATError, match=rf"{val_path}: patch is 20x20 px.*24 px crop.*data\.allow_upscale"):
        PatchDataset(manifest, split="val", image_size=24)[0]
    with pytest.raises(HSATError, match=r"\.png: patch is 20x20 px.*data\.resize"):
        _dataset(manifest, image_size=24)[(0, 0)]
    assert PatchDataset(manifest, split="val", image_size=24, allow_upscale=True)[0]["image"].shape == (3, 24, 24)
    assert _dataset(manifest, image_size=24, allow_upscale=True)[(0, 0)]["images"].shape[-2:] == (24, 24)
    # A factor that takes the patch below the crop says so.
    with pytest.raises(HSATError, match=r"10x10 px after data\.resize \(from 20x20 px\)"):
        PatchDataset(manifest, split="val", image_size=16, resize={"scale": 0.5})[0]


def test_too_small_patch_message_survives_a_loader_worker(manifest):
    ds = _dataset(manifest, image_size=24)
    loader = make_loader(ds, HierarchicalBatchSampler(ds, patients_per_batch=2, total_steps=1), num_workers=1)
    with pytest.raises(HSATError, match=r"\.(png|tif): patch is 20x20 px.*data\.allow_upscale") as caught:
        next(iter(loader))
    assert str(caught.value).startswith(str(manifest.path[0].rsplit("/", 1)[0]))  # the message alone
    assert "Traceback" not in str(caught.value)


def test_bad_settings_fail_when_the_dataset_is_built(manifest):
    with pytest.raises(HSATError, match="augment.preset"):
        _dataset(manifest, preset="ihc")
    with pytest.raises(HSATError, match="data.resize"):
        _dataset(manifest, resize={"factor": 2})


def test_he_preset_in_the_training_dataset_is_keyed(he_manifest):
    ds = HierarchicalDataset(he_manifest, num_slide_samples=1, num_patch_samples=1, num_transforms=2,
                             image_size=32, prob=1.0, preset="he", resize={"scale": 0.5})
    a = ds[(1, 3)]["images"]
    assert a.shape == (1, 1, 2, 3, 32, 32) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert torch.equal(a, ds[(1, 3)]["images"])  # the key alone decides the draw
    assert not torch.equal(a, ds[(1, 4)]["images"])
    assert not torch.equal(a[0, 0, 0], a[0, 0, 1])


def test_decoded_image_cache_is_lru_within_its_byte_budget_and_hands_out_copies():
    from hsat.data.cache import DecodedImageCache

    reads = []

    def read(path):
        reads.append(path)
        return torch.full((1, 4, 4), float(len(reads)))  # 64 bytes

    cache = DecodedImageCache(read, max_bytes=128)
    a = cache("a")
    cache("b")
    a[:] = -1  # a caller writing into what it got must not change the next read
    assert float(cache("a")[0, 0, 0]) == 1.0 and reads == ["a", "b"]
    cache("c")  # over budget: "b" is the least recently used
    assert len(cache) == 2 and cache.nbytes == 128
    cache("b")
    assert reads == ["a", "b", "c", "b"] and cache.hits == 1
    assert len(DecodedImageCache(read, max_bytes=10)) == 0 and DecodedImageCache(read, 10)("x").shape == (1, 4, 4)


def test_cached_reads_give_the_same_items_and_workers_start_empty(manifest):
    import pickle

    plain, cached = _dataset(manifest), _dataset(manifest, cache_mb=16)
    for key in [(0, 0), (1, 3), (0, 0), (1, 3)]:
        assert torch.equal(plain[key]["images"], cached[key]["images"])
    assert cached._cache is not None and cached._cache.hits > 0
    assert pickle.loads(pickle.dumps(cached))._cache is None
