"""Proxy calibration of the embedded cohort: is its clean accuracy high and its PGD-8 accuracy near chance?

Trains a tiny supervised CNN (timm `resnet10t`, 32 px, CPU, one thread) on the train split of a
default-size synthetic cohort and reports val patch accuracy clean and under a 10-step L-inf PGD
(eps 8/255, step 2/255, random start, cross-entropy), plus a "coarse cues only" model trained and
evaluated on blurred inputs (what a robust model can still learn). These are proxy numbers for
`hsat.data.synthetic.SynthParams`; the real calibration is the HiDisc baseline of the study.

    .venv/bin/python workflow/scripts/calibrate_synthetic.py [--steps 400] [--seed 0] [--set key=value ...]

`--set` overrides a SynthParams field (e.g. `--set texture_amplitude=2.0`), so a calibration
sweep needs no code change. Prints one JSON object.

`--hidisc` runs the real calibration instead: the default study's non-adversarial HiDisc baseline
through the pipeline's own verbs (`hsat prepare`, `pretrain`, `embed`, `evaluate`) on a cohort of
the study's `dataset.synth` size, with the study's `pretrain` section (one torch thread; `--pretrain
key.path=value` overrides it, `--random-init` trains one step at lr 1e-9 as a random-features
reference), and reports val patch accuracy of the kNN (k=20) and linear probes, clean and under a
10-step PGD at eps 8/255 for the `feature` and `linear_ce` objectives (280 val patches):

    .venv/bin/python workflow/scripts/calibrate_synthetic.py --hidisc [--seed 0] [--pretrain train.steps=300]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from hsat import CLASSES
from hsat.data.manifest import label_ids
from hsat.data.opensrh import build_manifest
from hsat.data.srh import read_image
from hsat.data.synthetic import SynthParams, synthesize_cohort


def load(root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    df = build_manifest(root)
    x = torch.stack([read_image(p) for p in df["path"]])
    y = torch.from_numpy(label_ids(df, CLASSES).copy())
    masks = {s: torch.from_numpy((df["split"] == s).to_numpy().copy()) for s in ("train", "val")}
    return {s: (x[m], y[m]) for s, m in masks.items()}


class Net(nn.Module):
    """Normalisation (and optional blur) inside the model, so attacks live in [0, 1] pixel space."""

    def __init__(self, blur: float = 0.0):
        super().__init__()
        self.backbone = timm.create_model("resnet10t", pretrained=False, num_classes=len(CLASSES))
        self.blur = blur

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blur > 0:
            x = TF.gaussian_blur(x, kernel_size=[7, 7], sigma=[self.blur, self.blur])
        return self.backbone((x - 0.3) / 0.15)


def train(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, blur: float = 0.0, adv_eps: float = 0.0) -> Net:
    """Supervised training with flips; `adv_eps` > 0 trains on 3-step PGD examples (Madry AT)."""
    torch.manual_seed(seed)
    model = Net(blur)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (64,), generator=g)
        xb = x[idx]
        if torch.rand(1, generator=g) < 0.5:
            xb = xb.flip(-1)
        if torch.rand(1, generator=g) < 0.5:
            xb = xb.flip(-2)
        if adv_eps > 0:
            model.eval()
            xb = pgd(model, xb, y[idx], adv_eps, adv_eps / 2, 3)
            model.train()
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """L-inf PGD with a uniform random start, maximising cross-entropy; stays in [0, 1]."""
    delta = (torch.rand_like(x) * 2 - 1) * eps
    adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + alpha * grad.sign()
        adv = (x + (adv - x).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.0) -> float:
    correct = 0
    for i in range(0, len(x), 128):
        xb, yb = x[i : i + 128], y[i : i + 128]
        if eps > 0:
            xb = pgd(model, xb, yb, eps, 2 / 255, 10)
        with torch.no_grad():
            correct += int((model(xb).argmax(1) == yb).sum())
    return 100.0 * correct / len(x)


ROOT = Path(__file__).resolve().parents[2]


def _merge(base: dict, over: dict) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def hidisc(params: SynthParams, seed: int, overrides: list[str], random_init: bool, workdir: Path,
           synth_overrides: list[str] = ()) -> dict:
    """The study's HiDisc baseline through the real verbs; val patch accuracy clean and under PGD-8."""
    import pandas as pd
    import yaml

    study = yaml.safe_load((ROOT / "config" / "config.yaml").read_text(encoding="utf-8"))
    synth = {**study["dataset"]["synth"], "seed": seed}
    synth.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in synth_overrides)})
    pre = study["pretrain"]
    _merge(pre, {"device": "cpu", "threads": 1, "seed": seed})
    for kv in overrides + (["train.steps=1", "optim.lr=1.0e-9", "optim.warmup_steps=0"] if random_init else []):
        key, value = kv.split("=", 1)
        node: dict = {}
        cur = node
        *parents, leaf = key.split(".")
        for k in parents:
            cur = cur.setdefault(k, {})
        cur[leaf] = yaml.safe_load(value)
        _merge(pre, node)
    cfg = {
        "pretrain": pre,
        "models": {"hd": {"method": {"name": "hidisc"}}},
        "evaluation": {
            "max_val_patches": 280, "knn": {"k": 20}, "linear": {"epochs": 50},
            "whitebox": {"attacks": ["pgd"], "eps": [8], "alpha": 2, "steps": 10,
                         "objectives": ["feature", "linear_ce"], "classifiers": ["knn", "linear"]},
            "transfer": {"enabled": False}, "sanity": {"enabled": False},
        },
    }
    (workdir / "study.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    synthesize_cohort(workdir / "cohort", params=params, **{k: synth[k] for k in ("patients", "slides", "patches", "size", "seed", "val_fraction")})
    hsat = [sys.executable, "-m", "hsat"]
    w = str(workdir)
    steps = [
        ["prepare", "--root", f"{w}/cohort", "--out", f"{w}/manifest.csv"],
        ["pretrain", "--study", f"{w}/study.yaml", "--model", "hd", "--manifest", f"{w}/manifest.csv", "--out", f"{w}/run"],
        ["embed", "--run", f"{w}/run", "--manifest", f"{w}/manifest.csv", "--config", f"{w}/study.yaml", "--out", f"{w}/emb"],
        ["evaluate", "--run", f"{w}/run", "--manifest", f"{w}/manifest.csv", "--embeddings", f"{w}/emb",
         "--config", f"{w}/study.yaml", "--model", "hd", "--out", f"{w}/wb.csv"],
    ]
    seconds = {}
    for cmd in steps:
        t = time.perf_counter()
        subprocess.run(hsat + cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds[cmd[0]] = round(time.perf_counter() - t, 1)
    log = [json.loads(line) for line in (workdir / "run" / "log.jsonl").read_text().splitlines()]
    speed = [r["images_per_s"] for r in log if "images_per_s" in r]
    wb = pd.read_csv(workdir / "wb.csv")
    wb = wb[wb["level"] == "patch"]
    acc = {f"{o}/{c}": round(float(a), 1) for o, c, a in zip(wb["objective"], wb["classifier"], wb["acc"])}
    return {"patch_acc": acc, "seconds": seconds, "images_per_s": float(np.median(speed)) if speed else None,
            "pretrain": pre, "synth": synth}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0, help="cohort and training seed")
    ap.add_argument("--patients", type=int, default=42)
    ap.add_argument("--patches", type=int, default=24)
    ap.add_argument("--blur", type=float, default=1.5, help="gaussian sigma (px) of the coarse-cues-only model")
    ap.add_argument("--eps", type=float, nargs="*", default=[1.0, 2.0, 4.0, 8.0], help="PGD budgets in /255")
    ap.add_argument("--robust", action="store_true", help="also train a PGD-AT model (eps 8/255; ~4x slower)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override SynthParams fields")
    ap.add_argument("--hidisc", action="store_true", help="the real calibration: the study's HiDisc baseline")
    ap.add_argument("--pretrain", nargs="*", default=[], metavar="KEY.PATH=VALUE", help="with --hidisc: override the study's pretrain")
    ap.add_argument("--synth", nargs="*", default=[], metavar="KEY=VALUE", help="with --hidisc: override dataset.synth (patients, patches, size ...)")
    ap.add_argument("--random-init", action="store_true", help="with --hidisc: a random-init encoder (1 step at lr 1e-9)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    overrides = {}
    fields = {f.name: f for f in dataclasses.fields(SynthParams)}
    for kv in args.set:
        key, value = kv.split("=", 1)
        if key not in fields:
            sys.exit(f"unknown SynthParams field {key!r}")
        overrides[key] = float(value)
    params = SynthParams(**overrides)

    if args.hidisc:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"params": overrides, "seed": args.seed, "random_init": args.random_init,
                      **hidisc(params, args.seed, args.pretrain, args.random_init, Path(tmp), args.synth)}
        result["chance"] = 100.0 / len(CLASSES)
        print(json.dumps(result))
        return result

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = synthesize_cohort(Path(tmp) / "cohort", patients=args.patients, patches=args.patches, seed=args.seed, params=params)
        data = load(root)
    (xtr, ytr), (xva, yva) = data["train"], data["val"]

    result: dict = {"params": overrides, "steps": args.steps, "seed": args.seed, "n_train": len(xtr), "n_val": len(xva)}
    model = train(xtr, ytr, args.steps, args.seed)
    result["clean"] = accuracy(model, xva, yva)
    for e in args.eps:
        result[f"pgd{e:g}"] = accuracy(model, xva, yva, e / 255)
    coarse = train(xtr, ytr, args.steps, args.seed, blur=args.blur)
    result["coarse_clean"] = accuracy(coarse, xva, yva)
    result["coarse_pgd8"] = accuracy(coarse, xva, yva, 8 / 255)
    if args.robust:
        robust = train(xtr, ytr, args.steps, args.seed, adv_eps=8 / 255)
        result["at_clean"] = accuracy(robust, xva, yva)
        result["at_pgd8"] = accuracy(robust, xva, yva, 8 / 255)
    result["chance"] = 100.0 / len(CLASSES)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
