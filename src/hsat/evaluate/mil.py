"""Weakly supervised slide classification on frozen patch features: gated attention MIL.

The slide-level protocol of Chen & Krishnan 2021 (CLAM-SB on frozen DINO features; Ilse et al.
2018's gated attention pooling): each slide is a bag of its patches' clean backbone features
(`hsat embed`), labelled by its patient's class; a small attention network learns which patches
to weigh and classifies the pooled feature. Trained on the training slides, scored on the
validation slides (accuracy, mean class accuracy, macro one-vs-rest AUC).

Under attack (`mil_whitebox_rows`), every patch of a validation slide is perturbed within eps at
once and the bag goes end to end through the frozen backbone and the MIL head: the objective
`abmil_ce` is the cross-entropy of the slide's MIL prediction (the adaptive attack on the
classifier scored), `feature` the label-free cosine distance of every patch's features (from a
random start). The rows go into `whitebox.csv` as `classifier=abmil` at slide and patient level,
with the per-slide worst case over every attack at each eps (restarts and the twice-the-steps
run of `evaluation.mil.converged` included).
"""

from __future__ import annotations

import contextlib
import logging
import json
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from hsat import attacks
from hsat.errors import HSATError
from hsat.evaluate.metrics import aggregate, classification_metrics
from hsat.evaluate.sweep import WHITEBOX_COLUMNS, AttackSpec, attack_name, eval_frozen, start_draw, sweep_alpha
from hsat.evaluate.worst_case import WORST_CASE, WORST_CASE_OBJECTIVE, mean_class_accuracy, worst_case_correct
from hsat.io import atomic_path
from hsat.oom import free_cached_memory, is_out_of_memory
from hsat.precision import autocast_factory, exact_fp32

log = logging.getLogger(__name__)

MIL_OBJECTIVES: tuple[str, ...] = ("abmil_ce", "feature")
"""Objectives of the attack on a bag: the MIL head's cross-entropy, or backbone-feature distance."""
MIL_CLASSIFIER = "abmil"
MIL_LABEL_OBJECTIVE = "abmil_ce"
"""The adaptive bag attack: its restarts and its convergence run are `evaluation.mil.restarts` / `converged`."""

MIL_COLUMNS: tuple[str, ...] = ("model", "method", "group", "seed", "classifier", "level", "n_slides",
                                "acc", "mca", "auc")


class GatedAttentionMIL(nn.Module):
    """Bag (n, d) -> class logits (C,) and attention weights (n,): Linear-ReLU, gated attention
    (tanh branch x sigmoid branch -> one score per patch, softmax over the bag), linear classifier."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128, attention: int = 64, dropout: float = 0.25):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.att_a = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh())
        self.att_b = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid())
        self.att_c = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(bag)
        weights = torch.softmax(self.att_c(self.att_a(h) * self.att_b(h)).squeeze(-1), dim=0)
        return self.classifier(weights @ h), weights


MIL_METADATA_KEY = "hsat"
"""The one metadata key of a stored head: its sizes and `meta` as key-sorted JSON. safetensors
writes several keys in a random order, so one key keeps the file's bytes the same on every run."""


def save_mil(path, model: GatedAttentionMIL, meta: dict[str, Any]) -> None:
    """The trained head as safetensors (weights only; sizes in the metadata), written atomically."""
    sizes = {"in_dim": model.fc[0].in_features, "hidden": model.fc[0].out_features,
             "attention": model.att_c.in_features, "num_classes": model.classifier.out_features}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={MIL_METADATA_KEY: json.dumps({**sizes, **meta}, sort_keys=True)})


def load_mil(path) -> GatedAttentionMIL:
    """A head written by `save_mil` (no code runs on load), in eval mode; also one written with a
    metadata key per size, as before."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if MIL_METADATA_KEY in meta:
            meta = json.loads(meta[MIL_METADATA_KEY])
        sizes = {k: int(meta[k]) for k in ("in_dim", "hidden", "attention", "num_classes")}
    except (OSError, KeyError, ValueError) as e:
        raise HSATError(f"{path}: not a MIL head written by hsat mil ({e})") from e
    model = GatedAttentionMIL(sizes["in_dim"], sizes["num_classes"], hidden=sizes["hidden"],
                              attention=sizes["attention"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def slide_bags(features: torch.Tensor, labels: torch.Tensor, slides: Sequence[str]) -> list[tuple[str, torch.Tensor, int]]:
    """(slide, bag of its patch features, label) per slide, in sorted slide order."""
    slides = np.asarray([str(s) for s in slides])
    if len(slides) != len(features):
        raise HSATError(f"{len(features)} features but {len(slides)} slide ids")
    bags = []
    for slide in sorted(set(slides.tolist())):
        idx = np.flatnonzero(slides == slide)
        ys = set(labels[idx].tolist())
        if len(ys) != 1:
            raise HSATError(f"slide {slide!r} has patches of several labels {sorted(ys)}")
        bags.append((slide, features[idx], int(ys.pop())))
    return bags


def train_mil(bags: Sequence[tuple[str, torch.Tensor, int]], num_classes: int, *, epochs: int = 30,
              lr: float = 2e-4, weight_decay: float = 1e-5, seed: int = 0) -> GatedAttentionMIL:
    """One bag per step (CLAM's protocol), Adam, a seeded shuffle every epoch."""
    if not bags:
        raise HSATError("MIL: no training slides")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GatedAttentionMIL(int(bags[0][1].shape[1]), num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(int(epochs)):
        for i in torch.randperm(len(bags), generator=g).tolist():
            _, bag, y = bags[i]
            logits, _ = model(bag.float())
            loss = F.cross_entropy(logits[None], torch.tensor([y]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_mil(model: GatedAttentionMIL, bags: Sequence[tuple[str, torch.Tensor, int]]) -> np.ndarray:
    """Class probabilities (n_slides, C)."""
    return np.stack([torch.softmax(model(bag.float())[0], -1).numpy() for _, bag, _ in bags])


def mil_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, mean class accuracy and macro one-vs-rest AUC (over classes present), in %."""
    pred = probs.argmax(1)
    acc = 100.0 * float((pred == labels).mean())
    present = sorted(set(labels.tolist()))
    mca = 100.0 * float(np.mean([(pred[labels == c] == c).mean() for c in present]))
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in present if 0 < (labels == c).sum() < len(labels)]
    return {"acc": acc, "mca": mca, "auc": 100.0 * float(np.mean(aucs)) if aucs else float("nan")}


def _split_bags(emb: Any, split: str) -> list[tuple[str, torch.Tensor, int]]:
    idx = emb.index[emb.index["split"] == split]
    feats, labels = (emb.train_features, emb.train_labels) if split == "train" else (emb.val_features, emb.val_labels)
    return slide_bags(feats, labels, idx["slide"].tolist())


def num_classes_of(emb: Any) -> int:
    return len(emb.classes) or int(max(emb.train_labels.max(), emb.val_labels.max())) + 1


def fit_mil(emb: Any, *, epochs: int = 30, lr: float = 2e-4, weight_decay: float = 1e-5,
            seed: int = 0) -> GatedAttentionMIL:
    """The MIL head trained on one model's training-slide bags (`hsat.evaluate.Embeddings`)."""
    return train_mil(_split_bags(emb, "train"), num_classes_of(emb), epochs=epochs, lr=lr,
                     weight_decay=weight_decay, seed=seed)


def mil_rows(emb: Any, info: dict[str, Any], *, model: GatedAttentionMIL | None = None, epochs: int = 30,
             lr: float = 2e-4, weight_decay: float = 1e-5, seed: int = 0) -> pd.DataFrame:
    """`MIL_COLUMNS` row of one model's embeddings, scored by `model` (trained here when None)."""
    if model is None:
        model = fit_mil(emb, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed)
    val = _split_bags(emb, "val")
    m = mil_metrics(predict_mil(model, val), np.array([y for _, _, y in val]), num_classes_of(emb))
    row = {**info, "classifier": MIL_CLASSIFIER, "level": "slide", "n_slides": len(val), **m}
    return pd.DataFrame([row], columns=list(MIL_COLUMNS))


def bag_chunks(slides: Sequence[str], max_patches: int) -> list[list[np.ndarray]]:
    """Each slide's dataset positions (sorted slide order), grouped into chunks of whole slides
    with at most `max_patches` patches (a larger slide is a chunk of its own)."""
    slides = np.asarray([str(s) for s in slides])
    chunks: list[list[np.ndarray]] = [[]]
    size = 0
    for slide in sorted(set(slides.tolist())):
        idx = np.flatnonzero(slides == slide)
        if chunks[-1] and size + len(idx) > max_patches:
            chunks.append([])
            size = 0
        chunks[-1].append(idx)
        size += len(idx)
    return [c for c in chunks if c]


def _bag_probs(mil: GatedAttentionMIL, features: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    return torch.stack([torch.softmax(mil(f.float())[0], -1) for f in torch.split(features, list(sizes))])


def encode_chunked(model: nn.Module, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`model.encode(x)` in pieces of at most `chunk` patches (None: at once), concatenated."""
    if chunk is None or len(x) <= chunk:
        return model.encode(x)
    return torch.cat([model.encode(x[i:i + chunk]) for i in range(0, len(x), chunk)])


class _ChunkedBagLoss(torch.autograd.Function):
    """`head_loss(encode(x))` whose input gradient runs the backbone chunk by chunk, so a bag of
    any size needs the activations of one chunk only: the forward encodes every chunk without a
    graph; the backward takes dL/dfeatures of the whole bag first (the cheap head), then each
    chunk's vector-Jacobian product through a re-run of the backbone on that chunk. By the chain
    rule this is the gradient of the whole-bag graph."""

    @staticmethod
    def forward(ctx, x, encode, head_loss, chunk, autocast):
        with torch.no_grad(), autocast():
            feats = torch.cat([encode(x[i:i + chunk]).float() for i in range(0, len(x), chunk)])
            loss = head_loss(feats).float()
        ctx.save_for_backward(x, feats)
        ctx.encode, ctx.head_loss, ctx.chunk, ctx.autocast = encode, head_loss, chunk, autocast
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, feats = ctx.saved_tensors
        with torch.enable_grad():
            f = feats.detach().requires_grad_(True)
            with ctx.autocast():
                loss = ctx.head_loss(f).float()
            (grad_f,) = torch.autograd.grad(loss, f)
            parts = []
            for i in range(0, len(x), ctx.chunk):
                xc = x[i:i + ctx.chunk].detach().requires_grad_(True)
                with ctx.autocast():
                    fc = ctx.encode(xc).float()
                parts.append(torch.autograd.grad(fc, xc, grad_outputs=grad_f[i:i + ctx.chunk])[0])
        return grad_out * torch.cat(parts), None, None, None, None


def craft_bags(model: nn.Module, mil: GatedAttentionMIL, x: torch.Tensor, sizes: Sequence[int],
               bag_labels: torch.Tensor, spec: Any, clean_features: torch.Tensor,
               generator: torch.Generator | None = None, autocast: Any = None,
               chunk: int | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """Adversarial patches of the bags in `x` (concatenated, `sizes` patches each) under `spec`
    (`hsat.evaluate.sweep.AttackSpec`, objective in `MIL_OBJECTIVES`). The objective is summed
    over bags, so a bag's perturbation does not depend on which bags share its chunk. With
    `chunk`, a bag larger than `chunk` patches goes through the backbone `chunk` patches at a time
    (`_ChunkedBagLoss`): memory bounded by the setting, not by the slide, the same perturbation."""
    autocast = autocast or contextlib.nullcontext
    if spec.objective == "abmil_ce":
        def head_loss(features: torch.Tensor) -> torch.Tensor:
            feats = torch.split(features, list(sizes))
            return sum(F.cross_entropy(mil(f)[0][None], y[None], reduction="sum") for f, y in zip(feats, bag_labels))
    elif spec.objective == "feature":
        ref = F.normalize(clean_features.detach().float(), dim=1)

        def head_loss(features: torch.Tensor) -> torch.Tensor:
            return (1.0 - (F.normalize(features, dim=1) * ref).sum(1)).sum()
    else:
        raise HSATError(f"MIL attack objective {spec.objective!r}: expected one of {', '.join(MIL_OBJECTIVES)}")

    if chunk is not None and len(x) > chunk:
        def obj(xa: torch.Tensor) -> torch.Tensor:
            return _ChunkedBagLoss.apply(xa, model.encode, head_loss, int(chunk), autocast)
    else:
        def obj(xa: torch.Tensor) -> torch.Tensor:
            with autocast():
                return head_loss(model.encode(xa).float()).float()

    fn = attacks.ATTACKS[spec.attack.removesuffix("_r")]
    kw = {"decay": 1.0} if spec.attack.startswith("mifgsm") else {}
    if start is not None:  # the random start drawn by the caller (hsat.evaluate.sweep.start_draw)
        kw["start"] = start
    with exact_fp32():  # TF32 off on a GPU: fp32 crafting in fp32 (hsat.precision)
        return fn(x, obj, spec.eps / 255.0, spec.alpha / 255.0, spec.steps, random_start=spec.random_start,
                  generator=generator, **kw).detach()


def mil_specs(cfg_eval: Mapping[str, Any], seed: int = 0) -> list[Any]:
    """The bag attacks of `evaluation.mil` at the white-box sweep's eps, steps and alpha; then the
    random restarts of every PGD under `abmil_ce` (`mil.restarts`, `restart` 1, 2, ...) and, with
    `mil.converged`, PGD under `abmil_ce` at the largest eps with twice the steps (the same step:
    more steps only search longer), whose row the study's abmil `converged` check reads."""
    wb, mcfg = cfg_eval["whitebox"], cfg_eval["mil"]
    specs = [AttackSpec(attack_name(a, o) if o == "feature" else a, float(eps), int(wb["steps"]), o, sweep_alpha(wb, eps), seed)
             for a in mcfg["attacks"] for eps in wb["eps"] for o in mcfg["objectives"]]
    specs += [replace(s, restart=r) for s in specs if s.attack == "pgd" and s.objective == MIL_LABEL_OBJECTIVE
              for r in range(1, int(mcfg.get("restarts", 1)))]
    if mcfg.get("converged", False):
        eps_ref = float(max(wb["eps"]))
        specs.append(AttackSpec("pgd", eps_ref, 2 * int(wb["steps"]), MIL_LABEL_OBJECTIVE, sweep_alpha(wb, eps_ref), seed))
    return list(dict.fromkeys(specs))


def _level_rows(probs: np.ndarray, labels: np.ndarray, patients: Sequence[str], num_classes: int,
                fields: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for level, (scores, ys) in {"slide": (probs, labels),
                                "patient": aggregate(probs, patients, labels)[:2]}.items():
        m = classification_metrics(scores, ys, num_classes)
        rows.append({**fields, "classifier": MIL_CLASSIFIER, "level": level,
                     **{k: m[k] for k in ("acc", "mca", "top2", "top3", "map")}})
    return rows


def mil_whitebox_rows(model: nn.Module, mil: GatedAttentionMIL, val_dataset: Any, info: Mapping[str, Any],
                      cfg_eval: Mapping[str, Any], device: str | torch.device = "cpu",
                      seed: int = 0) -> pd.DataFrame:
    """`whitebox.csv` rows (`WHITEBOX_COLUMNS`) of the ABMIL classifier: clean, every bag attack
    of `mil_specs`, and the worst case per eps (a slide / patient counts only if correct under
    every attack at that eps), at slide and patient level, on every validation slide."""
    device = torch.device(device)
    autocast = autocast_factory(cfg_eval["attack_precision"], device)
    specs = mil_specs(cfg_eval, seed)
    gens = [torch.Generator(device=device).manual_seed(s.generator_seed) for s in specs]
    mil = mil.to(device).eval()
    num_classes = int(mil.classifier.out_features)
    slides = val_dataset.rows["slide"].astype(str).tolist()
    patients_of = dict(zip(slides, val_dataset.rows["patient"].astype(str).tolist()))
    label_of = dict(zip(slides, np.asarray(val_dataset.labels).tolist()))
    clean, adv = [], [[] for _ in specs]
    order: list[str] = []
    # Whole slides per chunk; a slide above batch_size patches goes through the backbone
    # batch_size patches at a time, so memory follows the setting, not the slide.
    chunk = int(cfg_eval["batch_size"])
    with eval_frozen(model, mil):
        # A log line per chunk of slides with tqdm's ETA: on OpenSRH this attack runs for hours.
        for bags in tqdm(bag_chunks(slides, chunk), desc="abmil attack", unit="chunk", leave=False):
            idx = np.concatenate(bags)
            x = torch.stack([val_dataset[int(i)]["image"] for i in idx]).to(device)
            sizes = [len(c) for c in bags]
            names = [slides[int(c[0])] for c in bags]
            order += names
            y = torch.tensor([label_of[n] for n in names], device=device)
            with torch.no_grad():
                f_clean = encode_chunked(model, x, chunk).float()
                clean.append(_bag_probs(mil, f_clean, sizes).cpu())
            for i, spec in enumerate(specs):
                u = start_draw(spec, x, gens[i])
                while True:  # out of GPU memory: the backbone chunk halves (kept for later slides)
                    try:
                        x_adv = craft_bags(model, mil, x, sizes, y, spec, f_clean, gens[i], autocast, chunk=chunk,
                                           start=u)
                        break
                    except Exception as exc:
                        if not is_out_of_memory(exc) or chunk == 1:
                            raise
                    chunk = max(1, min(chunk, len(x)) // 2)
                    log.warning("MIL bag attack: out of memory; the backbone now takes %d patches at a time", chunk)
                    free_cached_memory()
                with torch.no_grad():
                    adv[i].append(_bag_probs(mil, encode_chunked(model, x_adv, chunk).float(), sizes).cpu())
    if not order:
        raise HSATError("MIL: no validation slides to attack")
    labels = np.array([label_of[n] for n in order])
    patients = [patients_of[n] for n in order]
    clean_p = torch.cat(clean).numpy()
    adv_p = [torch.cat(a).numpy() for a in adv]
    rows = _level_rows(clean_p, labels, patients, num_classes,
                       {**info, "attack": "none", "eps": 0.0, "steps": 0, "objective": "none"})
    for spec, probs in zip(specs, adv_p):
        if spec.restart:  # a repeat of a spec with its own rows: in the worst case only
            continue
        rows += _level_rows(probs, labels, patients, num_classes,
                            {**info, "attack": spec.attack, "eps": spec.eps, "steps": spec.steps, "objective": spec.objective})
    for eps in sorted({s.eps for s in specs}):
        at_eps = [(s, p) for s, p in zip(specs, adv_p) if s.eps <= eps]  # the smaller balls lie inside
        score_list = [clean_p] + [p for _, p in at_eps]
        for level, groups in (("slide", None), ("patient", patients)):
            correct, ys = worst_case_correct(score_list, labels, groups, k=1)
            top = {k: worst_case_correct(score_list, labels, groups, k=k)[0] for k in (2, 3)}
            rows.append({**info, "attack": WORST_CASE, "eps": float(eps), "steps": max(s.steps for s, _ in at_eps),
                         "objective": WORST_CASE_OBJECTIVE, "classifier": MIL_CLASSIFIER, "level": level,
                         "acc": 100.0 * float(correct.mean()), "mca": mean_class_accuracy(correct, ys),
                         "top2": 100.0 * float(top[2].mean()), "top3": 100.0 * float(top[3].mean()), "map": float("nan")})
    return pd.DataFrame(rows, columns=list(WHITEBOX_COLUMNS))
