"""Clean backbone features of a model's training and validation patches, computed once per model
by `hsat embed` and stored with the fitted linear probe, so no later stage re-embeds the bank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from hsat.errors import HSATError
from hsat.evaluate.classifiers import LinearProbe, load_probe
from hsat.io import atomic_path, write_csv, write_json


def loader(dataset: Dataset, batch_size: int, indices: Sequence[int] | None = None) -> DataLoader:
    ds = Subset(dataset, list(indices)) if indices is not None else dataset
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


@torch.no_grad()
def embed(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "embed",
) -> dict[str, Any]:
    """Clean backbone features of every item of `dataset`, in dataset order.

    Returns {"features": (N, F) float32 CPU, "labels": (N,) int64, "index": [...], "patient",
    "slide", "path": lists of str}.
    """
    was_training = model.training
    model.eval()
    feats, labels, index, patients, slides, paths = [], [], [], [], [], []
    try:
        for batch in tqdm(loader(dataset, batch_size), desc=desc, disable=not progress, leave=False):
            f = model.encode(batch["image"].to(device))
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(batch["label"]).long())
            index.extend(int(i) for i in batch["index"])
            patients.extend(batch["patient"])
            slides.extend(batch["slide"])
            paths.extend(batch["path"])
    finally:
        model.train(was_training)
    if not feats:
        raise HSATError(f"{desc}: the dataset is empty")
    return {
        "features": torch.cat(feats),
        "labels": torch.cat(labels),
        "index": index,
        "patient": patients,
        "slide": slides,
        "path": [str(p) for p in paths],
    }


@dataclass
class Embeddings:
    """What `hsat embed` writes for one model: clean features, their manifest rows, the probe."""

    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    index: pd.DataFrame  # train rows then val rows, in feature order
    probe: LinearProbe
    meta: dict = field(default_factory=dict)

    @property
    def bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kNN bank: clean training features and labels."""
        return self.train_features, self.train_labels

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    @property
    def val_index(self) -> pd.DataFrame:
        return self.index[self.index["split"] == "val"].reset_index(drop=True)


def index_frame(emb: Mapping[str, Any], split: str, classes: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "patient": emb["patient"],
            "slide": emb["slide"],
            "path": emb["path"],
            "label": [classes[int(i)] for i in emb["labels"]],
            "split": split,
            "label_id": emb["labels"].numpy(),
            "index": emb["index"],
        }
    )


def write_embeddings(
    out_dir: str | Path,
    train: Mapping[str, Any],
    val: Mapping[str, Any],
    probe: LinearProbe,
    classes: Sequence[str],
    meta: Mapping[str, Any],
) -> Path:
    """Write features.safetensors, index.csv, probe.safetensors and meta.json (each atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        "train_features": train["features"].float().contiguous(),
        "train_labels": train["labels"].long().contiguous(),
        "val_features": val["features"].float().contiguous(),
        "val_labels": val["labels"].long().contiguous(),
    }
    with atomic_path(out_dir / "features.safetensors") as tmp:
        save_file(tensors, str(tmp))
    index = pd.concat([index_frame(train, "train", classes), index_frame(val, "val", classes)], ignore_index=True)
    write_csv(out_dir / "index.csv", index)
    with atomic_path(out_dir / "probe.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in probe.state_dict().items()}, str(tmp))
    write_json(out_dir / "meta.json", {**dict(meta), "classes": list(classes)})
    return out_dir


def load_embeddings(emb_dir: str | Path) -> Embeddings:
    emb_dir = Path(emb_dir)
    needed = ["features.safetensors", "index.csv", "probe.safetensors", "meta.json"]
    missing = [n for n in needed if not (emb_dir / n).is_file()]
    if missing:
        raise HSATError(f"{emb_dir}: not an embeddings folder (missing {', '.join(missing)}); run `hsat embed` first")
    t = load_file(str(emb_dir / "features.safetensors"))
    index = pd.read_csv(emb_dir / "index.csv", dtype={"patient": str, "slide": str, "path": str, "label": str, "split": str})
    meta = json.loads((emb_dir / "meta.json").read_text(encoding="utf-8"))
    n_train, n_val = t["train_features"].shape[0], t["val_features"].shape[0]
    if (index["split"] == "train").sum() != n_train or (index["split"] == "val").sum() != n_val:
        raise HSATError(f"{emb_dir}/index.csv does not match features.safetensors ({n_train} train, {n_val} val rows expected)")
    return Embeddings(
        t["train_features"], t["train_labels"], t["val_features"], t["val_labels"],
        index, load_probe(emb_dir / "probe.safetensors"), meta,
    )


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of every item, without reading images where the dataset exposes them."""
    for attr in ("labels", "label_ids", "targets"):
        val = getattr(dataset, attr, None)
        if val is not None and len(val) == len(dataset):
            return np.asarray(val, dtype=np.int64)
    return np.asarray([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=np.int64)


def dataset_groups(dataset: Dataset) -> tuple[list[str], list[str]]:
    """(slide, patient) of every item, from the dataset's table (`rows`) where it has one, so the
    attacked subset is drawn without reading every image."""
    rows = getattr(dataset, "rows", None)
    if isinstance(rows, pd.DataFrame) and {"slide", "patient"} <= set(rows.columns) and len(rows) == len(dataset):
        return rows["slide"].astype(str).tolist(), rows["patient"].astype(str).tolist()
    items = [dataset[i] for i in range(len(dataset))]
    return [str(it["slide"]) for it in items], [str(it["patient"]) for it in items]
