"""Robustness evaluation: clean embeddings, kNN and linear-probe classifiers, patch/slide/patient
metrics, the white-box attack sweep and the attack sanity checks (Carlini et al. 2019).

Design points that keep the numbers honest and cheap:
- The classifiers read the *backbone* features (before the projection head), as HiDisc/HSAT do.
- The clean training bank (kNN) and the linear probe are computed once per model by `hsat embed`
  and loaded from disk by every later stage; an attack sweep never re-embeds the training set.
- Each adversarial batch is crafted once per (attack, eps, steps, objective) and evaluated by
  every classifier, so kNN and linear numbers describe the same adversarial examples.
- Slide and patient predictions sum the patch probability vectors of the slide or patient (the
  OpenSRH evaluation), then L1-normalise the sum so average precision compares like with like.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    top_k_accuracy_score,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from hsat.errors import HSATError
from hsat.io import atomic_path, write_csv, write_json

log = logging.getLogger(__name__)

LEVELS_EVAL: tuple[str, ...] = ("patch", "slide", "patient")
"""Levels at which every classifier is scored, finest first."""

WHITEBOX_COLUMNS: tuple[str, ...] = (
    "model", "method", "group", "seed", "attack", "eps", "steps", "objective",
    "classifier", "level", "acc", "mca", "top2", "top3", "map",
)
SANITY_COLUMNS: tuple[str, ...] = (
    "model", "check", "param", "value", "acc", "passed",
    "attack", "eps", "steps", "objective", "classifier", "criterion",
)
AUTOATTACK_OBJECTIVE = "linear_probe"
"""`objective` recorded for AutoAttack rows: it attacks the linear probe's logits with its own losses."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- classifiers


@torch.no_grad()
def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores (N, C) as in the HiDisc/InstDisc evaluation.

    Cosine similarity of the L2-normalised query to the L2-normalised bank; the k most similar
    bank entries (k clipped to the bank size) vote with weight exp(sim / temperature); votes are
    summed per class and each row is L1-normalised. Queries are processed in batches so memory
    stays at batch_size x bank size.
    """
    if bank.shape[0] == 0:
        raise HSATError("kNN bank is empty (no training features)")
    k = min(int(k), bank.shape[0])
    bank_n = F.normalize(bank.float(), dim=1)
    labels = bank_labels.to(bank.device).long()
    out = []
    for start in range(0, query.shape[0], batch_size):
        q = F.normalize(query[start : start + batch_size].float().to(bank.device), dim=1)
        sim = q @ bank_n.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(q.shape[0], num_classes, device=bank.device, dtype=weights.dtype)
        scores.scatter_add_(1, labels[top_idx], weights)
        out.append(F.normalize(scores, p=1, dim=1))
    if not out:
        return torch.zeros(0, num_classes)
    return torch.cat(out)


class LinearProbe(nn.Module):
    """One affine map on frozen backbone features: standardise, then nn.Linear.

    The standardisation constants are buffers, so the probe stays a single differentiable affine
    map that a white-box attack can back-propagate through.
    """

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("scale", torch.ones(num_features))
        self.linear = nn.Linear(num_features, num_classes)

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.scale)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> LinearProbe:
    """Fit a `LinearProbe` by full-batch AdamW on cross-entropy (deterministic on CPU)."""
    features = features.detach().float().cpu()
    labels = labels.detach().long().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(features.shape[1], num_classes)
    probe.mean.copy_(features.mean(0))
    probe.scale.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
    opt = torch.optim.AdamW(probe.linear.parameters(), lr=lr, weight_decay=weight_decay)
    probe.train()
    for _ in range(epochs):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(probe(features), labels)
        loss.backward()
        opt.step()
    probe.eval()
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


def load_probe(path: str | Path) -> LinearProbe:
    state = load_file(str(path))
    weight = state["linear.weight"]
    probe = LinearProbe(weight.shape[1], weight.shape[0])
    probe.load_state_dict(state)
    probe.eval()
    for p in probe.parameters():
        p.requires_grad_(False)
    return probe


# ----------------------------------------------------------------------------- embeddings


def _loader(dataset: Dataset, batch_size: int, indices: Sequence[int] | None = None) -> DataLoader:
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
        for batch in tqdm(_loader(dataset, batch_size), desc=desc, disable=not progress, leave=False):
            f = model.forward_features(batch["image"].to(device))
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


def _index_frame(emb: Mapping[str, Any], split: str, classes: Sequence[str]) -> pd.DataFrame:
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
    index = pd.concat([_index_frame(train, "train", classes), _index_frame(val, "val", classes)], ignore_index=True)
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


# ----------------------------------------------------------------------------- metrics


def aggregate(
    scores: np.ndarray | torch.Tensor, groups: Sequence, labels: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, list]:
    """Sum the patch probability vectors within each group (slide or patient).

    Returns (group_scores (G, C), group_labels (G,), group_keys) with groups in sorted order and
    each summed row L1-normalised (argmax and top-k are those of the plain sum). Every patch of a
    group must carry the same label.
    """
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    labels = np.asarray(labels)
    codes, keys = pd.factorize(pd.Series(list(groups)), sort=True)
    sums = np.zeros((len(keys), scores.shape[1]))
    np.add.at(sums, codes, scores)
    totals = sums.sum(1, keepdims=True)
    sums = np.divide(sums, totals, out=np.zeros_like(sums), where=totals > 0)
    group_labels = np.full(len(keys), -1, dtype=np.int64)
    for c, y in zip(codes, labels):
        if group_labels[c] not in (-1, y):
            raise HSATError(f"group {keys[c]!r} mixes labels {group_labels[c]} and {y}; cannot aggregate")
        group_labels[c] = y
    return sums, group_labels, list(keys)


def classification_metrics(scores: np.ndarray | torch.Tensor, labels: Sequence[int], num_classes: int) -> dict[str, Any]:
    """Acc, MCA (macro recall), top-2/top-3 accuracy, macro AP (percentages) and the confusion matrix.

    MCA and mAP average over the classes present in `labels` (a class absent from the split has
    no recall and no AP).
    """
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    pred = scores.argmax(1)
    out: dict[str, Any] = {
        "acc": 100.0 * accuracy_score(labels, pred),
        "mca": 100.0 * _balanced_accuracy(labels, pred),
    }
    for k in (2, 3):
        if k >= num_classes:
            out[f"top{k}"] = 100.0
        else:
            out[f"top{k}"] = 100.0 * top_k_accuracy_score(labels, scores, k=k, labels=list(range(num_classes)))
    present = np.unique(labels)
    onehot = np.eye(num_classes)[labels][:, present]
    out["map"] = 100.0 * average_precision_score(onehot, scores[:, present], average="macro") if len(present) > 0 else float("nan")
    out["confusion"] = confusion_matrix(labels, pred, labels=list(range(num_classes)))
    return out


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    import warnings

    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected here
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(labels, pred))


def level_metrics(
    scores: np.ndarray | torch.Tensor,
    labels: Sequence[int],
    patients: Sequence[str],
    slides: Sequence[str],
    num_classes: int,
) -> dict[str, dict[str, Any]]:
    """`classification_metrics` at patch, slide and patient level."""
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    labels = np.asarray(labels)
    out = {"patch": classification_metrics(scores, labels, num_classes)}
    for level, groups in (("slide", slides), ("patient", patients)):
        s, y, _ = aggregate(scores, groups, labels)
        out[level] = classification_metrics(s, y, num_classes)
    return out


# ----------------------------------------------------------------------------- attacks


def stratified_subset(labels: Sequence[int], n: int | None, seed: int = 0) -> list[int] | None:
    """A deterministic class-stratified subset of n positions (sorted), or None for all.

    Each class keeps a share proportional to its size (largest remainders), at least one patch
    per class when n allows it.
    """
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return None
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n / counts.sum()
    take = np.floor(quota).astype(int)
    if n >= len(classes):
        take = np.maximum(take, 1)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    i = 0
    while take.sum() < n:
        c = order[i % len(order)]
        if take[c] < counts[c]:
            take[c] += 1
        i += 1
    while take.sum() > n:
        c = int(np.argmax(take))
        take[c] -= 1
    chosen: list[int] = []
    for c, t in zip(classes, take):
        members = np.flatnonzero(labels == c)
        chosen.extend(rng.permutation(members)[:t].tolist())
    return sorted(int(i) for i in chosen)


@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration. eps and alpha in 1/255 units."""

    attack: str  # pgd | bim | mifgsm | autoattack | noise
    eps: float
    steps: int
    objective: str  # feature | head | linear_ce | linear_probe (autoattack) | none (noise)
    alpha: float = 2.0
    seed: int = 0

    @property
    def random_start(self) -> bool:
        # PGD starts uniformly in the ball; BIM and MI-FGSM start at x (with a random start
        # BIM would be PGD again).
        return self.attack == "pgd"


class ProbeClassifier(nn.Module):
    """image -> linear-probe logits, the end-to-end classifier that AutoAttack sees."""

    def __init__(self, model: nn.Module, probe: nn.Module):
        super().__init__()
        self.model = model
        self.probe = probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(self.model.forward_features(x))


def make_objective(
    objective: str,
    model: nn.Module,
    probe: nn.Module | None,
    clean_features: torch.Tensor,
    labels: torch.Tensor,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """objective(x_adv) -> scalar to maximise (summed over the batch, so per-example gradients
    do not depend on the batch size).

    feature: cosine distance between adversarial and clean backbone features (label-free, the
    paper's attack on the representation the classifiers use); head: the same on the projection
    head output (what the paper's code attacked); linear_ce: cross-entropy of the linear probe.
    """
    if objective == "feature":
        ref = F.normalize(clean_features.detach(), dim=1)
        return lambda xa: (1.0 - (F.normalize(model.forward_features(xa), dim=1) * ref).sum(1)).sum()
    if objective == "head":
        ref = F.normalize(model.forward_head(clean_features).detach(), dim=1)
        return lambda xa: (1.0 - (F.normalize(model.forward(xa), dim=1) * ref).sum(1)).sum()
    if objective == "linear_ce":
        if probe is None:
            raise HSATError("objective linear_ce needs a linear probe")
        return lambda xa: F.cross_entropy(probe(model.forward_features(xa)), labels, reduction="sum")
    raise HSATError(f"unknown attack objective {objective!r} (feature, head, linear_ce)")


def craft_batch(
    model: nn.Module,
    probe: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AttackSpec,
    clean_features: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adversarial (or noisy) version of the batch `x` under `spec`; the model must be frozen."""
    from hsat import attacks

    eps, alpha = spec.eps / 255.0, spec.alpha / 255.0
    if spec.attack == "noise":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return (x + eps * noise).clamp(0, 1)
    if spec.attack == "autoattack":
        import torchattacks

        if probe is None:
            raise HSATError("autoattack needs a linear probe")
        clf = ProbeClassifier(model, probe)
        aa = torchattacks.AutoAttack(clf, norm="Linf", eps=eps, version="standard", n_classes=probe.num_classes, seed=spec.seed)
        return aa(x, y).detach()
    fn = {"pgd": attacks.pgd, "bim": attacks.bim, "mifgsm": attacks.mifgsm}.get(spec.attack)
    if fn is None:
        raise HSATError(f"unknown attack {spec.attack!r} (pgd, bim, mifgsm, autoattack)")
    kw = {"decay": 1.0} if spec.attack == "mifgsm" else {}
    obj = make_objective(spec.objective, model, probe, clean_features, y)
    x_adv = fn(x, obj, eps, alpha, spec.steps, random_start=spec.random_start, generator=generator, **kw)
    return x_adv.detach()


@contextlib.contextmanager
def _eval_frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of an attack (input gradients only)."""
    from hsat.attacks import frozen

    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    with contextlib.ExitStack() as stack:
        for m in modules:
            m.eval()
            stack.enter_context(frozen(m))
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)


def _classify(
    features: torch.Tensor,
    probe: nn.Module | None,
    bank: tuple[torch.Tensor, torch.Tensor] | None,
    classifiers: Sequence[str],
    num_classes: int,
    knn: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    out = {}
    for clf in classifiers:
        if clf == "knn":
            if bank is None:
                raise HSATError("classifier knn needs a training bank")
            out[clf] = knn_predict(features, bank[0], bank[1], num_classes, k=knn.get("k", 200), temperature=knn.get("temperature", 0.07)).cpu()
        elif clf == "linear":
            if probe is None:
                raise HSATError("classifier linear needs a linear probe")
            out[clf] = probe(features).softmax(1).float().cpu()
        else:
            raise HSATError(f"unknown classifier {clf!r} (knn, linear)")
    return out


@dataclass
class AttackResults:
    """Patch-level class scores of the clean and each attacked version of the same patches."""

    labels: np.ndarray
    patients: list[str]
    slides: list[str]
    paths: list[str]
    positions: list[int]
    clean: dict[str, np.ndarray]
    adv: list[dict[str, np.ndarray]]
    specs: list[AttackSpec]


def run_attacks(
    model: nn.Module,
    probe: nn.Module | None,
    bank: tuple[torch.Tensor, torch.Tensor] | None,
    dataset: Dataset,
    specs: Sequence[AttackSpec],
    classifiers: Sequence[str],
    num_classes: int,
    knn: Mapping[str, Any] | None = None,
    indices: Sequence[int] | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "attacks",
    keep: Callable[[int, torch.Tensor], None] | None = None,
) -> AttackResults:
    """Craft every spec on every batch once and score it with every classifier.

    Loops batches outside and specs inside, so each batch is read once; each spec has its own
    random generator seeded from (spec.seed, spec position), so results do not depend on which
    other specs run. `keep(spec_position, x_adv)` receives each adversarial batch (transfer).
    """
    device = torch.device(device)
    knn = dict(knn or {})
    if bank is not None:
        bank = (bank[0].to(device), bank[1].to(device))
    if probe is not None:
        probe = probe.to(device)
    gens = []
    for i, spec in enumerate(specs):
        g = torch.Generator(device=device)
        g.manual_seed(int(spec.seed) * 1_000_003 + i)
        gens.append(g)
    clean: dict[str, list] = {c: [] for c in classifiers}
    adv: list[dict[str, list]] = [{c: [] for c in classifiers} for _ in specs]
    labels, patients, slides, paths, positions = [], [], [], [], []
    positions_all = list(indices) if indices is not None else None
    seen = 0
    loader = _loader(dataset, batch_size, indices)
    with _eval_frozen(model, probe):
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x = batch["image"].to(device)
            y = torch.as_tensor(batch["label"]).long().to(device)
            n = x.shape[0]
            positions.extend(positions_all[seen : seen + n] if positions_all is not None else range(seen, seen + n))
            seen += n
            labels.append(y.cpu())
            patients.extend(batch["patient"])
            slides.extend(batch["slide"])
            paths.extend(str(p) for p in batch["path"])
            with torch.no_grad():
                f_clean = model.forward_features(x)
                for c, s in _classify(f_clean, probe, bank, classifiers, num_classes, knn).items():
                    clean[c].append(s)
            for i, spec in enumerate(specs):
                x_adv = craft_batch(model, probe, x, y, spec, f_clean, gens[i])
                if keep is not None:
                    keep(i, x_adv)
                with torch.no_grad():
                    f_adv = model.forward_features(x_adv)
                    for c, s in _classify(f_adv, probe, bank, classifiers, num_classes, knn).items():
                        adv[i][c].append(s)
    if not labels:
        raise HSATError(f"{desc}: no validation patches to attack")
    return AttackResults(
        labels=torch.cat(labels).numpy(),
        patients=[str(p) for p in patients],
        slides=[str(s) for s in slides],
        paths=paths,
        positions=[int(p) for p in positions],
        clean={c: torch.cat(v).numpy() for c, v in clean.items()},
        adv=[{c: torch.cat(v).numpy() for c, v in d.items()} for d in adv],
        specs=list(specs),
    )


def _dataset_labels(dataset: Dataset) -> np.ndarray:
    """Labels of every item, without reading images where the dataset exposes them."""
    for attr in ("labels", "label_ids", "targets"):
        val = getattr(dataset, attr, None)
        if val is not None and len(val) == len(dataset):
            return np.asarray(val, dtype=np.int64)
    return np.asarray([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=np.int64)


def whitebox_specs(cfg_eval: Mapping[str, Any], seed: int = 0) -> list[AttackSpec]:
    """The (attack, eps, objective) grid of `evaluation.whitebox`; AutoAttack once per eps."""
    wb = cfg_eval.get("whitebox", {})
    steps, alpha = int(wb.get("steps", 10)), float(wb.get("alpha", 2))
    specs = []
    for attack in wb.get("attacks", ["pgd", "bim", "mifgsm"]):
        for eps in wb.get("eps", [4, 8]):
            if attack == "autoattack":
                specs.append(AttackSpec("autoattack", float(eps), 0, AUTOATTACK_OBJECTIVE, alpha, seed))
                continue
            for objective in wb.get("objectives", ["feature", "linear_ce"]):
                specs.append(AttackSpec(attack, float(eps), steps, objective, alpha, seed))
    return specs


def whitebox_sweep(
    model: nn.Module,
    probe: LinearProbe,
    bank: tuple[torch.Tensor, torch.Tensor],
    val_dataset: Dataset,
    cfg_eval: Mapping[str, Any],
    *,
    model_name: str = "",
    method: str = "",
    group: str = "",
    seed: int = 0,
    device: str | torch.device = "cpu",
    indices: Sequence[int] | None = None,
    attack_seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """White-box robustness table of one model: clean rows plus one row per (attack, eps,
    objective, classifier, level), columns `WHITEBOX_COLUMNS`, percentages, eps in 1/255.

    `bank` is the clean training bank (features, labels) computed once by `hsat embed`.
    Attacks run on `indices` of `val_dataset` or, when None, on the class-stratified subset of
    `evaluation.max_val_patches` (all patches if null).
    """
    if indices is None and cfg_eval.get("max_val_patches"):
        indices = stratified_subset(_dataset_labels(val_dataset), cfg_eval["max_val_patches"], seed=attack_seed)
    specs = whitebox_specs(cfg_eval, seed=attack_seed)
    classifiers = list(cfg_eval.get("whitebox", {}).get("classifiers", ["knn", "linear"]))
    num_classes = probe.num_classes
    res = run_attacks(
        model, probe, bank, val_dataset, specs, classifiers, num_classes,
        knn=cfg_eval.get("knn", {}), indices=indices, batch_size=int(cfg_eval.get("batch_size", 128)),
        device=device, progress=progress, desc=f"whitebox {model_name}".strip(),
    )
    base = {"model": model_name, "method": method, "group": group, "seed": seed}
    rows = []

    def add(attack, eps, steps, objective, scores_by_clf):
        for clf, scores in scores_by_clf.items():
            for level, m in level_metrics(scores, res.labels, res.patients, res.slides, num_classes).items():
                rows.append({**base, "attack": attack, "eps": eps, "steps": steps, "objective": objective,
                             "classifier": clf, "level": level, **{k: m[k] for k in ("acc", "mca", "top2", "top3", "map")}})

    add("none", 0.0, 0, "none", res.clean)
    for spec, scores in zip(res.specs, res.adv):
        add(spec.attack, spec.eps, spec.steps, spec.objective, scores)
    return pd.DataFrame(rows, columns=list(WHITEBOX_COLUMNS))


# ----------------------------------------------------------------------------- sanity checks


def _patch_acc(scores: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((scores.argmax(1) == labels).mean())


def sanity_checks(
    model: nn.Module,
    probe: LinearProbe,
    bank: tuple[torch.Tensor, torch.Tensor],
    val_dataset: Dataset,
    cfg_eval: Mapping[str, Any],
    *,
    model_name: str = "",
    device: str | torch.device = "cpu",
    indices: Sequence[int] | None = None,
    attack_seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Attack sanity checks of Carlini et al. (2019), patch level, rows `SANITY_COLUMNS`.

    All use PGD with the linear-probe cross-entropy scored by the linear probe (the strongest
    standard setting), at eps = the largest white-box eps unless the check varies eps:
    - `steps`: accuracy must not rise with more steps (also `steps_feature_knn`: the feature
      objective scored by kNN, the paper's setting);
    - `restarts`: per-example worst case over r random restarts must not exceed one restart;
    - `eps`: accuracy must not rise with eps and must reach chance (100/C) at the largest eps;
      alpha = max(alpha, 2.5 eps / steps) so the ball can be crossed (Madry et al.'s rule);
    - `noise`: uniform noise in the same ball must hurt at most half as much as PGD;
    - `clean`: the reference accuracy (always passes).
    Tolerance: tol = max(1, 100/N) percentage points (one patch of N). A failing check is
    reported in `passed`, never raised. White-box vs transfer is `hsat.transfer.whitebox_vs_transfer`.
    """
    if indices is None and cfg_eval.get("max_val_patches"):
        indices = stratified_subset(_dataset_labels(val_dataset), cfg_eval["max_val_patches"], seed=attack_seed)
    wb, san = cfg_eval.get("whitebox", {}), cfg_eval.get("sanity", {})
    alpha, steps = float(wb.get("alpha", 2)), int(wb.get("steps", 10))
    eps_ref = float(max(wb.get("eps", [8]) or [8]))
    step_list = [int(s) for s in san.get("steps", [1, 5, 10, 20])]
    eps_list = sorted(float(e) for e in san.get("eps", [2, 4, 8, 16, 32, 64]))
    restarts = int(san.get("restarts", 2))
    noise_eps = sorted(float(e) for e in wb.get("eps", [4, 8]))
    s = attack_seed

    specs: list[tuple[str, AttackSpec]] = []
    specs += [("steps", AttackSpec("pgd", eps_ref, st, "linear_ce", alpha, s)) for st in step_list]
    specs += [("steps_feature_knn", AttackSpec("pgd", eps_ref, st, "feature", alpha, s)) for st in step_list]
    specs += [("restarts", AttackSpec("pgd", eps_ref, steps, "linear_ce", alpha, s + r)) for r in range(restarts)]
    specs += [("eps", AttackSpec("pgd", e, steps, "linear_ce", max(alpha, 2.5 * e / steps), s)) for e in eps_list]
    specs += [("noise_pgd", AttackSpec("pgd", e, steps, "linear_ce", alpha, s)) for e in noise_eps]
    specs += [("noise", AttackSpec("noise", e, 0, "none", alpha, s)) for e in noise_eps]

    res = run_attacks(
        model, probe, bank, val_dataset, [sp for _, sp in specs], ["knn", "linear"], probe.num_classes,
        knn=cfg_eval.get("knn", {}), indices=indices, batch_size=int(cfg_eval.get("batch_size", 128)),
        device=device, progress=progress, desc=f"sanity {model_name}".strip(),
    )
    y = res.labels
    tol = max(1.0, 100.0 / len(y))
    chance = 100.0 / probe.num_classes
    rows: list[dict] = []

    def row(check, param, value, acc, passed, spec, clf, criterion):
        rows.append({"model": model_name, "check": check, "param": param, "value": value, "acc": acc,
                     "passed": bool(passed), "attack": spec.attack if spec else "none", "eps": spec.eps if spec else 0.0,
                     "steps": spec.steps if spec else 0, "objective": spec.objective if spec else "none",
                     "classifier": clf, "criterion": criterion})

    clean_acc = _patch_acc(res.clean["linear"], y)
    row("clean", "eps", 0.0, clean_acc, True, None, "linear", "reference")
    by_check: dict[str, list[tuple[AttackSpec, dict]]] = {}
    for (check, spec), scores in zip(specs, res.adv):
        by_check.setdefault(check, []).append((spec, scores))

    for check, clf in (("steps", "linear"), ("steps_feature_knn", "knn")):
        prev = None
        for spec, scores in sorted(by_check.get(check, []), key=lambda t: t[0].steps):
            acc = _patch_acc(scores[clf], y)
            row(check, "steps", spec.steps, acc, prev is None or acc <= prev + tol, spec, clf,
                f"acc <= acc at fewer steps + {tol:.2f}")
            prev = acc if prev is None else min(prev, acc)

    restart_runs = by_check.get("restarts", [])
    correct = np.ones(len(y), dtype=bool)
    first = None
    for r, (spec, scores) in enumerate(restart_runs, start=1):
        correct &= scores["linear"].argmax(1) == y
        acc = 100.0 * float(correct.mean())
        first = acc if first is None else first
        row("restarts", "restarts", r, acc, acc <= first + tol, spec, "linear",
            f"worst case over restarts <= one restart + {tol:.2f}")

    prev = None
    eps_runs = sorted(by_check.get("eps", []), key=lambda t: t[0].eps)
    for j, (spec, scores) in enumerate(eps_runs):
        acc = _patch_acc(scores["linear"], y)
        ok = prev is None or acc <= prev + tol
        crit = f"acc <= acc at smaller eps + {tol:.2f}"
        if j == len(eps_runs) - 1:
            ok = ok and acc <= chance + tol
            crit += f"; largest eps: acc <= chance {chance:.2f} + {tol:.2f}"
        row("eps", "eps", spec.eps, acc, ok, spec, "linear", crit)
        prev = acc if prev is None else min(prev, acc)

    pgd_at = {spec.eps: _patch_acc(scores["linear"], y) for spec, scores in by_check.get("noise_pgd", [])}
    for spec, scores in by_check.get("noise", []):
        acc = _patch_acc(scores["linear"], y)
        attack_drop = clean_acc - pgd_at[spec.eps]
        row("noise", "eps", spec.eps, acc, (clean_acc - acc) <= 0.5 * max(attack_drop, 0.0) + tol, spec, "linear",
            f"noise drop <= 0.5 x PGD drop ({attack_drop:.2f}) + {tol:.2f}")
    df = pd.DataFrame(rows, columns=list(SANITY_COLUMNS))
    failed = df[~df["passed"]]
    if len(failed):
        log.warning("%s: %d attack sanity check(s) failed: %s", model_name or "model", len(failed),
                    ", ".join(f"{c}={v}" for c, v in zip(failed["check"], failed["value"])))
    return df


# ----------------------------------------------------------------------------- study-level entry points


def model_info(study: Mapping[str, Any], name: str) -> dict[str, Any]:
    """CSV identity of a model of the study: model, method, group, seed."""
    from hsat.config import run_config_for_model

    run_cfg = run_config_for_model(study, name)
    entry = study["models"][name]
    return {"model": name, "method": run_cfg["method"]["name"], "group": entry.get("group", ""), "seed": int(run_cfg["seed"])}


def eval_image_size(study: Mapping[str, Any], run_dir: str | Path) -> int:
    """evaluation.image_size, else the run's data.image_size (run_dir/config.yaml)."""
    size = study.get("evaluation", {}).get("image_size")
    if size:
        return int(size)
    from hsat.config import read_yaml

    run_cfg = read_yaml(Path(run_dir) / "config.yaml")
    return int(run_cfg.get("data", {}).get("image_size", 32))


def _datasets(manifest: str | Path, image_size: int, splits: Sequence[str]) -> tuple[list, list[str]]:
    from hsat.data.manifest import class_names, read_manifest
    from hsat.data.sampler import PatchDataset

    df = read_manifest(manifest)
    classes = list(class_names(df))
    out = []
    for split in splits:
        if not (df["split"] == split).any():
            raise HSATError(f"{manifest}: no {split!r} patches")
        out.append(PatchDataset(df, split=split, image_size=image_size, classes=classes))
    return out, classes


def embed_run(
    run_dir: str | Path,
    manifest: str | Path,
    study: Mapping[str, Any],
    out_dir: str | Path,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> Path:
    """`hsat embed`: clean train/val backbone features of one model and its fitted linear probe."""
    from hsat.models import load_trained_model

    device = torch.device(device) if device else default_device()
    cfg_eval = study.get("evaluation", {})
    size = eval_image_size(study, run_dir)
    (train_ds, val_ds), classes = _datasets(manifest, size, ("train", "val"))
    model = load_trained_model(run_dir, device=device)
    bs = int(cfg_eval.get("batch_size", 128))
    train = embed(model, train_ds, bs, device, progress, desc="embed train")
    val = embed(model, val_ds, bs, device, progress, desc="embed val")
    lin = cfg_eval.get("linear", {})
    probe = fit_linear_probe(train["features"], train["labels"], len(classes), epochs=int(lin.get("epochs", 100)),
                             lr=float(lin.get("lr", 0.01)), weight_decay=float(lin.get("weight_decay", 1e-4)))
    with torch.no_grad():
        train_acc = _patch_acc(probe(train["features"]).numpy(), train["labels"].numpy())
    meta = {"run": str(run_dir), "manifest": str(manifest), "image_size": size,
            "num_features": int(train["features"].shape[1]), "num_classes": len(classes),
            "n_train": int(len(train["labels"])), "n_val": int(len(val["labels"])),
            "linear": dict(lin), "probe_train_acc": train_acc}
    return write_embeddings(out_dir, train, val, probe, classes, meta)


def _check_val_matches(emb: Embeddings, val_ds: Dataset, emb_dir: str | Path, manifest: str | Path) -> None:
    n = len(val_ds)
    if n != len(emb.val_labels):
        raise HSATError(f"{emb_dir}: embeddings hold {len(emb.val_labels)} validation patches but {manifest} has {n}; rerun `hsat embed`")


def _load_for_eval(run_dir, manifest, emb_dir, study, device):
    from hsat.models import load_trained_model

    emb = load_embeddings(emb_dir)
    size = eval_image_size(study, run_dir)
    if int(emb.meta.get("image_size", size)) != size:
        raise HSATError(f"{emb_dir}: embedded at image size {emb.meta.get('image_size')} but evaluation uses {size}")
    (val_ds,), classes = _datasets(manifest, size, ("val",))
    if emb.classes and emb.classes != classes:
        raise HSATError(f"{emb_dir}: classes {emb.classes} differ from {manifest}'s {classes}")
    _check_val_matches(emb, val_ds, emb_dir, manifest)
    model = load_trained_model(run_dir, device=device)
    return model, emb, val_ds


def _subset_from_embeddings(emb: Embeddings, cfg_eval: Mapping[str, Any], seed: int = 0) -> list[int] | None:
    return stratified_subset(emb.val_labels.numpy(), cfg_eval.get("max_val_patches"), seed=seed)


def whitebox_run(run_dir, manifest, emb_dir, study, model_name: str, out, device=None, progress: bool = True) -> pd.DataFrame:
    """`hsat evaluate`: the white-box sweep of one model, written to `out`."""
    device = torch.device(device) if device else default_device()
    info = model_info(study, model_name)
    model, emb, val_ds = _load_for_eval(run_dir, manifest, emb_dir, study, device)
    cfg_eval = study.get("evaluation", {})
    df = whitebox_sweep(model, emb.probe, emb.bank, val_ds, cfg_eval, model_name=info["model"], method=info["method"],
                        group=info["group"], seed=info["seed"], device=device,
                        indices=_subset_from_embeddings(emb, cfg_eval), progress=progress)
    write_csv(out, df)
    return df


def sanity_run(run_dir, manifest, emb_dir, study, model_name: str, out, device=None, progress: bool = True) -> pd.DataFrame:
    """`hsat sanity`: the attack sanity checks of one model, written to `out`."""
    device = torch.device(device) if device else default_device()
    model_info(study, model_name)  # fail early on an unknown model name
    model, emb, val_ds = _load_for_eval(run_dir, manifest, emb_dir, study, device)
    cfg_eval = study.get("evaluation", {})
    df = sanity_checks(model, emb.probe, emb.bank, val_ds, cfg_eval, model_name=model_name, device=device,
                       indices=_subset_from_embeddings(emb, cfg_eval), progress=progress)
    write_csv(out, df)
    return df
