"""The white-box attack grid and the sweep that crafts it.

What keeps the numbers honest and cheap:
- Each adversarial batch is crafted once per spec (attack, eps, steps, objective) and scored by
  every classifier, so kNN and linear numbers describe the same adversarial examples, and the
  per-example worst case (`hsat.evaluate.worst_case`) can combine them.
- Label-free objectives (`feature`, `head`: cosine distance to the clean output) have a zero
  gradient at the clean input, so every iterative attack on them starts at a uniform random
  point of the eps-ball: BIM and MI-FGSM run there as `bim_r` / `mifgsm_r`. Under label-based
  objectives (`linear_ce`, `knn_soft`) they start at x, as defined, and keep their names.
- `knn_soft` is the adaptive attack on the classifier that is scored: cross-entropy of a
  differentiable copy of the kNN vote (`SoftKNN`), with the same bank and temperature.
  `evaluation.whitebox.knn_attacks` adds converged attacks on that copy: APGD-CE and APGD-T
  (`autoattack`, objective `knn_soft`) and margin PGD (`knn_margin`, Carlini & Wagner's margin of
  the soft kNN's log-probabilities), at the kNN's temperature and any other (`knn_soft_T0.02`). A model
  with its own classification head (the supervised references) is also scored by that head
  (classifier `head`) and attacked through it (objective `head_ce`, added automatically).
- Every spec has its own random generator, seeded from the spec itself, so adding or removing
  other specs never changes a spec's random start.
- The sanity check's PGD restarts (`restart_specs`) run in every model's sweep, so the worst
  case includes every example they find; they have no rows of their own (their accuracies are
  in sanity.csv; the first is the grid's PGD `linear_ce` where the grid has it).
- Crafting may run in bf16 autocast (`evaluation.attack_precision`); every clean and adversarial
  image is scored in fp32, so low precision can only weaken an attack, never flatter a score —
  and the sanity check `precision` measures whether it did.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hsat import attacks
from hsat.config import resolve_evaluation
from hsat.errors import HSATError
from hsat.evaluate.classifiers import KNNVote, LinearProbe, SoftKNN, classify
from hsat.evaluate.embeddings import dataset_groups, dataset_labels, loader
from hsat.evaluate.metrics import level_metrics, slide_stratified_subset
from hsat.evaluate.worst_case import worst_case_rows
from hsat.oom import HalvingBatches
from hsat.precision import autocast_factory, exact_fp32

WHITEBOX_COLUMNS: tuple[str, ...] = (
    "model", "method", "group", "seed", "attack", "eps", "steps", "objective",
    "classifier", "level", "acc", "mca", "top2", "top3", "map",
)
AUTOATTACK_OBJECTIVE = "linear_probe"
"""`objective` recorded for AutoAttack rows: it attacks the linear probe's logits with its own losses."""

LABEL_FREE_OBJECTIVES: tuple[str, ...] = ("feature", "head")
"""Objectives that need no label; their gradient vanishes at the clean input."""
OBJECTIVES: tuple[str, ...] = ("feature", "head", "linear_ce", "knn_soft", "knn_margin")
HEAD_OBJECTIVE = "head_ce"
KNN_OBJECTIVES: tuple[str, ...] = ("knn_soft", "knn_margin")
"""Objectives through the soft kNN; an objective at another temperature than `evaluation.knn`'s
is recorded with the temperature appended (`knn_margin_T0.02`, `knn_objective`)."""
"""Cross-entropy of the model's own classification head: attacks classifier `head`."""

RANDOM_START: dict[str, bool] = {"pgd": True, "bim": False, "mifgsm": False, "bim_r": True, "mifgsm_r": True}
"""Whether each iterative attack starts at a uniform random point of the eps-ball."""


def knn_objective(base: str, temperature: float, knn_temperature: float) -> str:
    """The recorded objective of `base` (one of `KNN_OBJECTIVES`) through a soft kNN at
    `temperature`: the plain name at the kNN's own temperature, else `<base>_T<temperature>`."""
    if float(temperature) == float(knn_temperature):
        return base
    return f"{base}_T{float(temperature):g}"


def parse_knn_objective(objective: str) -> tuple[str, float | None] | None:
    """(base objective, temperature or None for the kNN's own) of a soft-kNN objective; None for others."""
    for base in KNN_OBJECTIVES:
        if objective == base:
            return base, None
        if objective.startswith(f"{base}_T"):
            try:
                return base, float(objective[len(base) + 2:])
            except ValueError:
                break
    return None


def attack_name(attack: str, objective: str) -> str:
    """The recorded name of `attack` under `objective`: BIM and MI-FGSM take a random start
    (and the `_r` suffix) under a label-free objective, whose gradient is zero at x."""
    if attack in ("bim", "mifgsm") and objective in LABEL_FREE_OBJECTIVES:
        return f"{attack}_r"
    return attack


@dataclass(frozen=True)
class AttackSpec:
    """One attack configuration. eps and alpha in 1/255 units.

    attack: pgd | bim | bim_r | mifgsm | mifgsm_r | autoattack | noise; objective: feature |
    head | linear_ce | knn_soft | linear_probe (autoattack) | none (noise). `version` names the
    AutoAttack variant; `restart` tells repeated runs of one configuration apart.
    """

    attack: str
    eps: float
    steps: int
    objective: str
    alpha: float = 2.0
    seed: int = 0
    version: str = ""
    restart: int = 0

    @property
    def random_start(self) -> bool:
        return RANDOM_START.get(self.attack, False)

    @property
    def generator_seed(self) -> int:
        key = repr((self.attack, float(self.eps), int(self.steps), self.objective, float(self.alpha),
                    int(self.seed), self.version, int(self.restart)))
        return zlib.crc32(key.encode())


class ProbeClassifier(nn.Module):
    """image -> class logits of a classifier on backbone features, the end-to-end classifier that
    AutoAttack sees: the linear probe, or the soft kNN (`SoftKNN`'s log-probabilities are logits:
    their softmax is its vote, and APGD's losses, CE and DLR, only compare them)."""

    def __init__(self, model: nn.Module, probe: nn.Module):
        super().__init__()
        self.model = model
        self.probe = probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe(self.model.encode(x))


def make_objective(
    objective: str,
    model: nn.Module,
    probe: nn.Module | None,
    clean_features: torch.Tensor,
    labels: torch.Tensor,
    soft_knn: SoftKNN | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """objective(x_adv) -> scalar to maximise (summed over the batch, so per-example gradients
    do not depend on the batch size).

    feature: cosine distance between adversarial and clean backbone features (label-free, the
    paper's attack on the representation the classifiers use); head: the same on the projection
    head output (what the paper's code attacked); linear_ce: cross-entropy of the linear probe;
    knn_soft: cross-entropy of the soft kNN (the adaptive attack on the kNN classifier);
    knn_margin: the soft kNN's margin, the largest other log-probability minus the true class's
    (Carlini & Wagner 2017; unlike cross-entropy it stops pushing an example once it is misclassified
    and does not saturate on confidently correct ones). `soft_knn` is at the objective's temperature.
    """
    parsed = parse_knn_objective(objective)
    if parsed is not None:
        objective = parsed[0]  # the temperature is soft_knn's
    if objective == "feature":
        ref = F.normalize(clean_features.detach(), dim=1)
        return lambda xa: (1.0 - (F.normalize(model.encode(xa), dim=1) * ref).sum(1)).sum()
    if objective == "head":
        ref = F.normalize(model.project(clean_features).detach(), dim=1)
        return lambda xa: (1.0 - (F.normalize(model.forward(xa), dim=1) * ref).sum(1)).sum()
    if objective == "linear_ce":
        if probe is None:
            raise HSATError("objective linear_ce needs a linear probe")
        return lambda xa: F.cross_entropy(probe(model.encode(xa)), labels, reduction="sum")
    if objective == "knn_soft":
        if soft_knn is None:
            raise HSATError("objective knn_soft needs the kNN bank")
        return lambda xa: F.nll_loss(soft_knn(model.encode(xa)), labels, reduction="sum")
    if objective == "knn_margin":
        if soft_knn is None:
            raise HSATError("objective knn_margin needs the kNN bank")
        return lambda xa: margin_loss(soft_knn(model.encode(xa)), labels).sum()
    if objective == HEAD_OBJECTIVE:
        return lambda xa: F.cross_entropy(model.logits(model.encode(xa)), labels, reduction="sum")
    raise HSATError(f"unknown attack objective {objective!r} ({', '.join(OBJECTIVES)}, {HEAD_OBJECTIVE})")


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: the largest logit of another class minus the true class's (> 0: misclassified)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


DLR_MIN_CLASSES = 4
"""APGD-T's targeted DLR loss divides by the gap between the largest logit and the mean of the
third and fourth largest: a probe needs at least this many classes for it."""


def _apgd_targeted_ce(apgdt: type) -> type:
    """torchattacks' APGD-T with the targeted cross-entropy in place of the targeted DLR loss
    (the original AutoAttack's `ce-targeted`), for probes of two or three classes, where the
    DLR loss does not exist (torchattacks indexes a third logit and fails)."""

    class APGDTargetedCE(apgdt):
        def dlr_loss_targeted(self, x: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
            return -F.cross_entropy(x, y_target, reduction="none")  # maximised: towards the target

    return APGDTargetedCE


SQUARE_QUERIES_PER_STEP = 50
"""Square's query budget per AutoAttack step: 5000 queries at the original 100 steps, as in
Croce & Hein's standard version, and a budget that shrinks with `steps` -- a fixed 5000 would
make a few-step rehearsal (or a quick look) spend hours of forward passes on every survivor."""


def autoattack(model: nn.Module, probe: nn.Module, eps: float, version: str, steps: int, seed: int) -> Callable:
    """AutoAttack (Croce & Hein 2020) on image -> `probe` logits, built from torchattacks' parts.
    `probe` is a classifier on backbone features with `num_classes`: the linear probe, or the soft
    kNN (`SoftKNN`, the kNN's AutoAttack).

    `standard`: APGD-CE, APGD-T (C - 1 targets), FAB-T and Square (50 queries a step: 5000 at
    100 steps), each on the examples the previous ones left correct, with `steps` iterations
    (the original: 100).
    `apgd-ce+apgd-t`: the first two only (the gradient-based part; what the CPU study runs).
    With fewer than four classes APGD-T optimises the targeted cross-entropy (two classes: one
    target, the other class), as the targeted DLR loss needs four logits.

    It runs in fp32 whatever `evaluation.attack_precision` says: AutoAttack stops searching an
    example once its own logits call it misclassified, and bf16 logits end the search of
    borderline examples that fp32 scores correct. Tried on the default study (2026-12-05): 25 %
    faster evaluation jobs, but a weaker worst case in 29 of 136 patch cells (by up to 2.4
    points), and still in some after redoing those examples in fp32 (docs/performance.md).
    """
    import torchattacks  # installed with --no-deps (Makefile); imported here so kNN-only users never need it

    # In eval mode: torchattacks puts the classifier back into the mode it found it in, and a
    # fresh module is in training mode -- which would leave the encoder's batch norm updating
    # its statistics on every later batch of the sweep.
    clf = ProbeClassifier(model, probe).eval()
    n = probe.num_classes
    targeted = torchattacks.APGDT if n >= DLR_MIN_CLASSES else _apgd_targeted_ce(torchattacks.APGDT)
    parts = [
        torchattacks.APGD(clf, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce"),
        targeted(clf, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=n),
    ]
    if version == "standard":
        parts += [
            torchattacks.FAB(clf, norm="Linf", eps=eps, steps=steps, n_restarts=1, seed=seed, multi_targeted=True, n_classes=n),
            torchattacks.Square(clf, norm="Linf", eps=eps, n_queries=SQUARE_QUERIES_PER_STEP * steps, n_restarts=1,
                                seed=seed),
        ]
    elif version != "apgd-ce+apgd-t":
        raise HSATError(f"evaluation.whitebox.autoattack.version: unknown version {version!r} (standard, apgd-ce+apgd-t)")
    return torchattacks.MultiAttack(parts)


def craft_batch(
    model: nn.Module,
    probe: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AttackSpec,
    clean_features: torch.Tensor,
    generator: torch.Generator | None = None,
    soft_knn: SoftKNN | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    start: torch.Tensor | None = None,
    knn: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Adversarial (or noisy) version of the batch `x` under `spec`; the model must be frozen.
    `start`: the uniform draw of the random start (or of the noise), made by the caller
    (`start_draw`); None draws it from `generator`.

    `soft_knn` is the soft kNN at the spec's temperature (its objective, or AutoAttack on it);
    `knn` (k, temperature of `evaluation.knn`) the kNN whose votes AutoAttack's decisions follow
    (`KNNVote`).
    `autocast` wraps the objective's forward passes (the iterative attacks; AutoAttack runs as
    torchattacks calls it, in fp32). What runs in fp32 runs in full fp32 on a GPU too (TF32 off:
    `hsat.precision.exact_fp32`)."""
    eps, alpha = spec.eps / 255.0, spec.alpha / 255.0
    if spec.attack == "noise":
        u = start if start is not None else torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + eps * (u * 2 - 1)).clamp(0, 1)
    if spec.attack == "autoattack":
        target = probe
        if parse_knn_objective(spec.objective):  # AutoAttack on the kNN
            if soft_knn is None or knn is None:
                raise HSATError(f"autoattack on {spec.objective} needs the kNN bank and evaluation.knn")
            target = KNNVote(soft_knn, knn["k"], knn["temperature"])
        if target is None:
            raise HSATError("autoattack needs a linear probe")
        aa = autoattack(model, target, eps, spec.version or "standard", spec.steps, spec.seed)
        with exact_fp32():
            return aa(x, y).detach()
    base = spec.attack.removesuffix("_r")
    fn = attacks.ATTACKS.get(base)
    if fn is None:
        raise HSATError(f"unknown attack {spec.attack!r} (pgd, bim, bim_r, mifgsm, mifgsm_r, autoattack)")
    kw = {"decay": 1.0} if base == "mifgsm" else {}
    if start is not None:
        kw["start"] = start
    objective = make_objective(spec.objective, model, probe, clean_features, y, soft_knn)

    def obj(xa: torch.Tensor) -> torch.Tensor:
        with autocast():
            return objective(xa).float()

    with exact_fp32():
        x_adv = fn(x, obj, eps, alpha, spec.steps, random_start=spec.random_start, generator=generator, **kw)
    return x_adv.detach()


def start_draw(spec: AttackSpec, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    """The uniform draw `craft_batch` would make from `generator` for the whole batch `x` (the
    noise, or an iterative attack's random start), or None where it makes none: drawn once, it
    can be sliced when the batch is crafted in pieces (`hsat.oom.HalvingBatches`)."""
    if spec.attack == "noise" or (spec.attack != "autoattack" and spec.random_start and spec.eps != 0 and spec.steps != 0):
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return None


@contextlib.contextmanager
def eval_frozen(*modules: nn.Module | None) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration of an attack (input gradients only)."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    with contextlib.ExitStack() as stack:
        for m in modules:
            m.eval()
            stack.enter_context(attacks.frozen(m))
        try:
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)


def _check_still_eval(spec: AttackSpec, *modules: nn.Module | None) -> None:
    """An attack must leave every module in eval mode: a module switched to training mode would
    score every later batch with batch statistics and overwrite the stored ones."""
    for m in modules:
        if m is not None and any(sub.training for sub in m.modules()):
            raise HSATError(f"attack {spec.attack} (eps {spec.eps:g}, {spec.objective}) left {type(m).__name__} "
                            "in training mode; the sweep would be scored with batch statistics")


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


def spec_temperature(spec: AttackSpec, knn: Mapping[str, Any]) -> float | None:
    """The soft kNN's temperature a spec attacks through (None: it does not use the soft kNN)."""
    parsed = parse_knn_objective(spec.objective)
    if parsed is None:
        return None
    return float(knn["temperature"]) if parsed[1] is None else parsed[1]


def run_attacks(
    model: nn.Module,
    probe: nn.Module | None,
    bank: tuple[torch.Tensor, torch.Tensor] | None,
    dataset: Dataset,
    specs: Sequence[AttackSpec],
    classifiers: Sequence[str],
    num_classes: int,
    knn: Mapping[str, Any],
    indices: Sequence[int] | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "attacks",
    keep: Callable[[int, torch.Tensor], None] | None = None,
    precision: str = "fp32",
) -> AttackResults:
    """Craft every spec on every batch once and score it with every classifier.

    Loops batches outside and specs inside, so each batch is read and its clean features computed
    once. `knn` holds k and temperature (of `evaluation.knn`). `keep(spec_position, x_adv)`
    receives each adversarial batch (transfer). `precision` (fp32 | bf16 | auto) is the
    crafting's; scoring is always fp32.
    """
    device = torch.device(device)
    autocast = autocast_factory(precision, device)
    head = getattr(model, "classifier", None) if "head" in classifiers else None
    if bank is not None:
        bank = (bank[0].to(device), bank[1].to(device))
    if probe is not None:
        probe = probe.to(device)
    # One soft kNN per temperature an objective asks for (None: the kNN's own).
    temps = [spec_temperature(s, knn) for s in specs]
    soft_knns = {t: SoftKNN(bank[0], bank[1], num_classes, temperature=t).to(device)
                 for t in dict.fromkeys(t for t in temps if t is not None)} if bank is not None else {}
    gens = []
    for spec in specs:
        g = torch.Generator(device=device)
        g.manual_seed(spec.generator_seed)
        gens.append(g)
    # A crafting batch that runs out of GPU memory is crafted in halves, and so are later ones:
    # rows are independent and each random start is drawn for the whole batch, so the examples
    # are the same at any piece size (AutoAttack's own seeded draws excepted).
    halving = HalvingBatches(desc)
    clean: dict[str, list] = {c: [] for c in classifiers}
    adv: list[dict[str, list]] = [{c: [] for c in classifiers} for _ in specs]
    labels, patients, slides, paths, positions = [], [], [], [], []
    positions_all = list(indices) if indices is not None else None
    seen = 0
    with eval_frozen(model, probe, *soft_knns.values()):
        for batch in tqdm(loader(dataset, batch_size, indices), desc=desc, disable=not progress, leave=False):
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
                f_clean = model.encode(x)
            for c, s in classify(f_clean, probe, bank, classifiers, num_classes, knn, head).items():
                clean[c].append(s)
            for i, spec in enumerate(specs):
                u = start_draw(spec, x, gens[i])
                soft_knn = soft_knns.get(temps[i])
                x_adv = halving(lambda sl: craft_batch(model, probe, x[sl], y[sl], spec, f_clean[sl], gens[i], soft_knn,
                                                       autocast, None if u is None else u[sl], knn), n)
                _check_still_eval(spec, model, probe, soft_knn)
                if keep is not None:
                    keep(i, x_adv)
                with torch.no_grad():
                    f_adv = model.encode(x_adv)
                for c, s in classify(f_adv, probe, bank, classifiers, num_classes, knn, head).items():
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


def sweep_alpha(wb: Mapping[str, Any], eps: float, steps: int | None = None) -> float:
    """The step (1/255) of an evaluation attack at `eps` and `steps` (default: the sweep's) under the
    validated `evaluation.whitebox` `wb`: its alpha, raised to alpha_scale * eps / steps."""
    return attacks.step_size(wb["alpha"], eps, int(wb["steps"] if steps is None else steps), wb["alpha_scale"])


def restart_specs(cfg_eval: Mapping[str, Any], seed: int = 0) -> list[AttackSpec]:
    """The sanity check's random restarts of PGD (`evaluation.sanity.restarts`, label attack on the
    probe at the sweep's largest eps), run in every model's sweep too while the sanity checks are
    enabled, so the per-example worst case includes every example they find. Restart 0 is the
    sweep's own PGD `linear_ce` spec at that eps."""
    wb, san = cfg_eval["whitebox"], cfg_eval["sanity"]
    eps_ref = float(max(wb["eps"]))
    return [AttackSpec("pgd", eps_ref, int(wb["steps"]), "linear_ce", sweep_alpha(wb, eps_ref), seed, restart=r)
            for r in range(int(san["restarts"]))]


def listed(models: Sequence[str], model_name: str | None) -> bool:
    """Whether a config's model list covers `model_name` (empty: every model; None: any model)."""
    return model_name is None or not models or model_name in models


def knn_attack_specs(cfg_eval: Mapping[str, Any], seed: int = 0, model_name: str | None = None) -> list[AttackSpec]:
    """The converged attacks on the soft kNN of `evaluation.whitebox.knn_attacks` (none unless
    enabled): at each eps and temperature, AutoAttack (`whitebox.autoattack.version`) on
    image -> soft-kNN log-probabilities and margin PGD, both with `knn_attacks.steps`."""
    wb = cfg_eval["whitebox"]
    ka = wb["knn_attacks"]
    if not ka["enabled"] or not listed(ka["models"], model_name):
        return []
    knn_t = float(cfg_eval["knn"]["temperature"])
    steps = int(ka["steps"])
    specs = []
    for eps in wb["eps"]:
        for t in ka["temperatures"] or [knn_t]:
            if ka["autoattack"]:
                specs.append(AttackSpec("autoattack", float(eps), steps, knn_objective("knn_soft", t, knn_t),
                                        sweep_alpha(wb, eps, steps), seed, version=wb["autoattack"]["version"]))
            if ka["margin"]:
                specs.append(AttackSpec("pgd", float(eps), steps, knn_objective("knn_margin", t, knn_t),
                                        sweep_alpha(wb, eps, steps), seed))
    return specs


def whitebox_specs(cfg_eval: Mapping[str, Any], seed: int = 0, model_name: str | None = None,
                   head_classifier: bool = False, restarts: bool = True) -> list[AttackSpec]:
    """The (attack, eps, objective) grid of a validated `evaluation.whitebox`.

    AutoAttack runs once per eps, and only for the models of `whitebox.autoattack.models` (every
    model when that list is empty, or when `model_name` is None). `head_classifier`: the model
    has its own classification head, which every iterative attack also targets (`head_ce`).
    Then the soft kNN's attacks (`knn_attack_specs`) and, with `restarts`, the sanity check's
    restarts (`restart_specs`, while `evaluation.sanity` is enabled).
    """
    wb = cfg_eval["whitebox"]
    aa = wb["autoattack"]
    run_aa = listed(aa["models"], model_name)
    specs = []
    for attack in wb["attacks"]:
        for eps in wb["eps"]:
            if attack == "autoattack":
                if run_aa:
                    specs.append(AttackSpec("autoattack", float(eps), int(aa["steps"]), AUTOATTACK_OBJECTIVE,
                                            sweep_alpha(wb, eps), seed, version=aa["version"]))
                continue
            for objective in [*wb["objectives"], *([HEAD_OBJECTIVE] if head_classifier else [])]:
                specs.append(AttackSpec(attack_name(attack, objective), float(eps), int(wb["steps"]), objective,
                                        sweep_alpha(wb, eps), seed))
    specs += knn_attack_specs(cfg_eval, seed, model_name)
    if restarts and cfg_eval["sanity"]["enabled"]:
        specs += restart_specs(cfg_eval, seed)
    return list(dict.fromkeys(specs))  # bim and bim_r listed together would repeat a spec


def attack_subset(dataset: Dataset, cfg_eval: Mapping[str, Any], seed: int = 0) -> list[int] | None:
    """The slide-stratified validation subset of `evaluation.max_val_patches` (None: all): the
    positions `hsat.evaluate.attacked_positions` gives from the same model's embeddings."""
    if not cfg_eval["max_val_patches"]:
        return None
    slides, patients = dataset_groups(dataset)
    return slide_stratified_subset(dataset_labels(dataset), slides, cfg_eval["max_val_patches"], seed=seed,
                                   patients=patients)


def metric_rows(
    base: Mapping[str, Any],
    spec_fields: Mapping[str, Any],
    scores_by_clf: Mapping[str, np.ndarray],
    res: AttackResults,
    num_classes: int,
) -> list[dict[str, Any]]:
    """`whitebox.csv` rows of one condition: every classifier at patch, slide and patient level."""
    rows = []
    for clf, scores in scores_by_clf.items():
        for level, m in level_metrics(scores, res.labels, res.patients, res.slides, num_classes).items():
            rows.append({**base, **spec_fields, "classifier": clf, "level": level,
                         **{k: m[k] for k in ("acc", "mca", "top2", "top3", "map")}})
    return rows


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
    on_results: Callable[[AttackResults], None] | None = None,
) -> pd.DataFrame:
    """White-box robustness table of one model: clean rows, one row per (attack, eps, steps, objective,
    classifier, level), and the per-example worst case over all of them (restarts included) at each eps
    (`attack=worst_case`, `objective=all`); columns `WHITEBOX_COLUMNS`, percentages, eps in 1/255.

    `cfg_eval` is an `evaluation` section (validated here, defaults from the schema). `bank` is
    the clean training bank (features, labels) computed once by `hsat embed`. Attacks run on
    `indices` of `val_dataset` or, when None, on the slide-stratified subset of
    `evaluation.max_val_patches` (all patches if null). `on_results` receives the scores the table
    is computed from (`hsat.evaluate.examples` keeps them per example).
    """
    cfg_eval = resolve_evaluation(cfg_eval)
    if indices is None:
        indices = attack_subset(val_dataset, cfg_eval, seed=attack_seed)
    has_head = getattr(model, "classifier", None) is not None
    specs = whitebox_specs(cfg_eval, seed=attack_seed, model_name=model_name or None, head_classifier=has_head)
    # The grid's specs have rows; the sanity check's restarts only count in the worst case.
    with_rows = set(whitebox_specs(cfg_eval, seed=attack_seed, model_name=model_name or None,
                                   head_classifier=has_head, restarts=False))
    classifiers = list(cfg_eval["whitebox"]["classifiers"]) + (["head"] if has_head else [])
    num_classes = probe.num_classes
    res = run_attacks(
        model, probe, bank, val_dataset, specs, classifiers, num_classes,
        knn=cfg_eval["knn"], indices=indices, batch_size=cfg_eval["batch_size"],
        device=device, progress=progress, desc=f"whitebox {model_name}".strip(),
        precision=cfg_eval["attack_precision"],
    )
    if on_results is not None:
        on_results(res)
    base = {"model": model_name, "method": method, "group": group, "seed": seed}
    rows = metric_rows(base, {"attack": "none", "eps": 0.0, "steps": 0, "objective": "none"}, res.clean, res, num_classes)
    for spec, scores in zip(res.specs, res.adv):
        if spec not in with_rows:
            continue
        rows += metric_rows(base, {"attack": spec.attack, "eps": spec.eps, "steps": spec.steps, "objective": spec.objective},
                            scores, res, num_classes)
    rows += [{**base, **r} for r in worst_case_rows(res)]
    return pd.DataFrame(rows, columns=list(WHITEBOX_COLUMNS))
